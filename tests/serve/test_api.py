"""Every endpoint of a real server (uvicorn on 127.0.0.1) over tiny-model pipelines, with httpx and openai."""
from __future__ import annotations

import asyncio
import concurrent.futures as cf
import json

import httpx
import pytest

from tests.serve.helpers import metric, sse_events, start_server, wait_until
from tokenmill import SamplingParams

PROMPT = "The quick brown fox jumps over the lazy dog"
LONG = "one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen " * 2


@pytest.fixture(scope="module")
def offline(serve_pipelines):
    """Greedy reference outputs from the pipeline itself, before any server owns it."""
    pipe = serve_pipelines["tiny"]
    outs = pipe.generate([PROMPT, "Hello world"], SamplingParams(max_tokens=12, ignore_eos=True))
    return {PROMPT: outs[0], "Hello world": outs[1]}


@pytest.fixture(scope="module")
def server(serve_pipelines, offline):
    run = start_server(list(serve_pipelines.values()))
    yield run
    run.stop()
    for pipe in serve_pipelines.values():  # nothing leaked into the engines
        assert pipe.stats()["kv"]["used_blocks"] == 0
        assert not pipe.engine.requests and not pipe.engine.has_unfinished()


@pytest.fixture()
def client(server):
    with server.client() as c:
        yield c


def kv_used(client, name: str) -> int:
    return client.get("/v1/cache/stats", params={"optimization": name}).json()["used_blocks"]


# ---------------------------------------------------------------------------------------------- probes
def test_health_ready_and_models(client):
    h = client.get("/health")
    assert h.status_code == 200 and h.json()["status"] == "ok"
    r = client.get("/ready")
    assert r.status_code == 200 and r.json()["status"] == "ready"
    assert set(r.json()["pipelines"].values()) == {"ready"}
    models = client.get("/v1/models").json()
    assert [m["id"] for m in models["data"]] == ["tiny", "tiny-paged", "faulty", "tiny-dynamic"]
    assert client.get("/openapi.json").json()["paths"]["/v1/generate"]
    assert client.get("/docs").status_code == 200


# ---------------------------------------------------------------------------------------------- native
def test_generate_matches_offline_engine(client, offline):
    r = client.post("/v1/generate", json={"prompt": PROMPT, "max_tokens": 12, "ignore_eos": True})
    assert r.status_code == 200, r.text
    body = r.json()
    ref = offline[PROMPT]
    assert body["text"] == ref.text and body["tokens_generated"] == 12
    assert body["finish_reason"] == "length" and body["optimization_used"] == "tiny"
    assert body["prompt_tokens"] == len(ref.prompt_token_ids)
    assert 0 < body["queue_ms"] <= body["ttft_ms"] < body["latency_ms"]


def test_generate_stream_sends_one_event_per_chunk_and_final_stats(client, offline):
    with client.stream("POST", "/v1/generate", json={"prompt": PROMPT, "max_tokens": 12, "ignore_eos": True,
                                                      "stream": True}) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r.iter_lines())
    chunks = [d for e, d in events if e == "message"]
    done = [d for e, d in events if e == "done"]
    assert len(done) == 1 and events[-1][0] == "done"
    assert sum(c["tokens"] for c in chunks) == 12 and len(chunks) >= 2
    assert "".join(c["text"] for c in chunks) == done[0]["text"] == offline[PROMPT].text
    assert done[0]["tokens_generated"] == 12 and done[0]["ttft_ms"] < done[0]["latency_ms"]


def test_optimization_selects_the_pipeline(client, offline):
    body = client.post("/v1/generate", json={"prompt": PROMPT, "max_tokens": 12, "ignore_eos": True,
                                              "optimization": "tiny-paged"}).json()
    assert body["optimization_used"] == "tiny-paged" and body["text"] == offline[PROMPT].text
    r = client.post("/v1/generate", json={"prompt": PROMPT, "optimization": "turbo"})
    assert r.status_code == 400
    msg = r.json()["error"]["message"]
    assert "unknown optimization 'turbo'" in msg and "tiny, tiny-paged, faulty" in msg


def test_batch_runs_prompts_together(client, offline):
    steps0 = metric(client.get("/metrics").text, "tokenmill_engine_steps_total", pipeline="tiny")
    prompts = [PROMPT, "Hello world", "a b c", "x y"]
    r = client.post("/v1/generate/batch", json={"prompts": prompts, "max_tokens": 12, "ignore_eos": True})
    assert r.status_code == 200, r.text
    body = r.json()
    assert [x["text"] for x in body["results"][:2]] == [offline[PROMPT].text, offline["Hello world"].text]
    assert body["tokens_generated"] == 48 and all(x["finish_reason"] == "length" for x in body["results"])
    assert body["throughput_tokens_per_sec"] == pytest.approx(48 / (body["total_latency_ms"] / 1000), rel=1e-2)
    steps = metric(client.get("/metrics").text, "tokenmill_engine_steps_total", pipeline="tiny") - steps0
    assert steps <= 14, f"4 prompts x 12 tokens took {steps} steps: they were not batched"


def test_concurrent_clients_share_engine_steps(server, offline):
    with server.client() as c:
        steps0 = metric(c.get("/metrics").text, "tokenmill_engine_steps_total", pipeline="tiny")

    async def main():
        async with httpx.AsyncClient(base_url=server.base, timeout=60) as ac:
            return await asyncio.gather(*(ac.post("/v1/generate", json={"prompt": PROMPT, "max_tokens": 12,
                                                                        "ignore_eos": True}) for _ in range(8)))

    rs = asyncio.run(main())
    assert all(r.status_code == 200 and r.json()["text"] == offline[PROMPT].text for r in rs)
    with server.client() as c:
        steps = metric(c.get("/metrics").text, "tokenmill_engine_steps_total", pipeline="tiny") - steps0
    assert steps < 8 * 12 / 2, f"8 concurrent requests x 12 tokens took {steps} engine steps"


def test_dynamic_batching_window_forms_one_batch(server, offline):
    """The engine thread waits out the scheduler's batching window (sleeping), then runs the batch."""
    with server.client() as c:
        steps0 = metric(c.get("/metrics").text, "tokenmill_engine_steps_total", pipeline="tiny-dynamic")

    async def main():
        async with httpx.AsyncClient(base_url=server.base, timeout=60) as ac:
            return await asyncio.gather(*(ac.post("/v1/generate", json={
                "prompt": PROMPT, "max_tokens": 12, "ignore_eos": True, "optimization": "tiny-dynamic"})
                for _ in range(4)))

    rs = asyncio.run(main())
    assert all(r.status_code == 200 and r.json()["text"] == offline[PROMPT].text for r in rs)
    with server.client() as c:
        steps = metric(c.get("/metrics").text, "tokenmill_engine_steps_total", pipeline="tiny-dynamic") - steps0
    assert steps <= 2 * 12, f"4 requests x 12 tokens took {steps} steps"


# ---------------------------------------------------------------------------------------------- cache / info
def test_cache_stats_measure_prefix_hits_and_delete_frees_them(client):
    before = client.get("/v1/cache/stats", params={"optimization": "tiny-paged"}).json()
    assert before["prefix_caching"] is True and before["kind"] == "paged"
    for _ in range(2):
        r = client.post("/v1/generate", json={"prompt": LONG, "max_tokens": 4, "optimization": "tiny-paged"})
        assert r.status_code == 200
    after = client.get("/v1/cache/stats", params={"optimization": "tiny-paged"}).json()
    assert after["hits"] > before["hits"] and after["queries"] > before["queries"]
    assert after["hit_rate"] == pytest.approx(after["hits"] / after["queries"])
    assert after["entries"] >= 4 and after["used_blocks"] == 0
    assert after["total_size_mb"] == pytest.approx(after["entries"] * after["pool_size_mb"] / after["num_blocks"],
                                                   rel=1e-2)
    cleared = client.delete("/v1/cache", params={"optimization": "tiny-paged"}).json()
    assert cleared["freed_blocks"] == after["entries"] == cleared["entries_before"]
    assert cleared["entries_after"] == 0 and cleared["freed_mb"] > 0
    assert client.get("/v1/cache/stats", params={"optimization": "tiny-paged"}).json()["entries"] == 0
    contiguous = client.get("/v1/cache/stats").json()
    assert contiguous["optimization"] == "tiny" and contiguous["prefix_caching"] is False
    assert contiguous["entries"] == contiguous["hits"] == contiguous["queries"] == 0
    assert client.delete("/v1/cache").json()["freed_blocks"] == 0


def test_model_info(client, serve_pipelines):
    info = client.get("/v1/model/info").json()
    assert info["architecture"] == "llama" and info["dtype"] == "float32"
    assert info["params"] == sum(p.numel() for p in serve_pipelines["tiny"].loaded.model.parameters())
    assert info["max_batch_size"] == 8 and info["max_sequence_length"] == 256 and info["quantization"] is None
    assert info["weight_bytes"] >= info["params"] * 4
    paged = client.get("/v1/model/info", params={"optimization": "tiny-paged"}).json()
    assert paged["plugins"]["paged_kv"]["block_size"] == 8 and "continuous_batching" in paged["plugins"]
    assert paged["available"] == ["tiny", "tiny-paged", "faulty", "tiny-dynamic"]


def test_metrics_move_as_requests_complete(client):
    m0 = client.get("/metrics")
    assert m0.status_code == 200 and m0.headers["content-type"].startswith("text/plain")
    t0 = m0.text
    r = client.post("/v1/generate", json={"prompt": PROMPT, "max_tokens": 7, "ignore_eos": True,
                                          "optimization": "tiny-paged"})
    body = r.json()
    t1 = client.get("/metrics").text
    lab = {"pipeline": "tiny-paged"}

    def delta(name, **kw):
        return metric(t1, name, **{**lab, **kw}) - metric(t0, name, **{**lab, **kw})

    assert delta("tokenmill_requests_total", outcome="length") == 1
    assert delta("tokenmill_generation_tokens_total") == 7
    assert delta("tokenmill_prompt_tokens_total") == body["prompt_tokens"]
    assert delta("tokenmill_time_to_first_token_seconds_count") == 1
    assert delta("tokenmill_inter_token_latency_seconds_count") == 6
    assert delta("tokenmill_e2e_request_latency_seconds_count") == 1
    assert delta("tokenmill_request_queue_time_seconds_count") == 1
    assert delta("tokenmill_e2e_request_latency_seconds_sum") == pytest.approx(body["latency_ms"] / 1000, abs=2e-3)
    assert delta("tokenmill_prefix_cache_queries_total") >= body["prompt_tokens"] - 1
    assert delta("tokenmill_engine_steps_total") >= 7
    assert metric(t1, "tokenmill_num_requests_running", **lab) == 0
    assert metric(t1, "tokenmill_kv_cache_usage_perc", **lab) == 0
    assert metric(t1, "tokenmill_pipeline_ready", **lab) == 1
    assert metric(t1, "tokenmill_batch_utilization", **lab) > 0
    for name in ("tokenmill_num_preemptions_total", "tokenmill_spec_decode_num_draft_tokens_total",
                 "tokenmill_spec_decode_num_accepted_tokens_total", "tokenmill_num_requests_waiting"):
        assert f"{name}{{" in t1
    assert metric(t1, "tokenmill_http_requests_total", route="/v1/generate", method="POST", status="200") >= 1


# ---------------------------------------------------------------------------------------------- OpenAI
@pytest.fixture()
def oai(server):
    openai = pytest.importorskip("openai")
    with openai.OpenAI(base_url=server.base + "/v1", api_key="unused", max_retries=0) as c:
        yield c


def test_openai_models_and_completions(oai, offline):
    assert [m.id for m in oai.models.list().data] == ["tiny", "tiny-paged", "faulty", "tiny-dynamic"]
    out = oai.completions.create(model="tiny", prompt=PROMPT, max_tokens=12, temperature=0,
                                 extra_body={"ignore_eos": True})
    assert out.object == "text_completion" and out.model == "tiny"
    assert out.choices[0].text == offline[PROMPT].text and out.choices[0].finish_reason == "length"
    assert out.usage.completion_tokens == 12
    assert out.usage.prompt_tokens == len(offline[PROMPT].prompt_token_ids)
    assert out.usage.total_tokens == out.usage.prompt_tokens + 12
    two = oai.completions.create(model="tiny-paged", prompt=[PROMPT, "Hello world"], max_tokens=12, temperature=0,
                                 extra_body={"ignore_eos": True})
    assert [c.text for c in sorted(two.choices, key=lambda c: c.index)] == [offline[PROMPT].text,
                                                                           offline["Hello world"].text]


def test_openai_completion_stream(oai, offline):
    stream = oai.completions.create(model="tiny", prompt=PROMPT, max_tokens=12, temperature=0, stream=True,
                                    stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    chunks = list(stream)
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == offline[PROMPT].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 12


def test_openai_chat(oai, serve_pipelines):
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Say hi"}]
    ref = serve_pipelines["tiny"].apply_chat_template(messages)
    out = oai.chat.completions.create(model="tiny", messages=messages, max_tokens=6, temperature=0,
                                      extra_body={"ignore_eos": True})
    assert out.object == "chat.completion" and out.choices[0].message.role == "assistant"
    assert out.usage.prompt_tokens == len(ref) and out.usage.completion_tokens == 6
    stream = oai.chat.completions.create(model="tiny", messages=messages, max_tokens=6, temperature=0, stream=True,
                                         extra_body={"ignore_eos": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == out.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == "length"


def test_openai_unknown_model_is_404_with_the_list(oai):
    import openai

    with pytest.raises(openai.NotFoundError) as info:
        oai.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "x"}])
    err = info.value.body
    assert err["code"] == "model_not_found" and "tiny, tiny-paged, faulty" in err["message"]


# ---------------------------------------------------------------------------------------------- bad input
BAD = [
    ({"prompt": "", "max_tokens": 4}, "prompt is empty"),
    ({"prompt": [], "max_tokens": 4}, "prompt is empty"),
    ({"prompt": "x", "max_tokens": 0}, "max_tokens must be an integer >= 1, got 0"),
    ({"prompt": "x", "max_tokens": -3}, "max_tokens must be an integer >= 1, got -3"),
    ({"prompt": "x", "max_tokens": 256}, "max_tokens must be at most 255 for 'tiny' (its max_model_len is 256"),
    ({"prompt": "word " * 200, "max_tokens": 100}, "exceeds the pipeline's max_model_len of 256"),
    ({"prompt": "x", "temperature": -0.5}, "temperature must be 0 (greedy) or a finite number >= 1e-05, got -0.5"),
    ({"prompt": "x", "temperature": float("nan")}, "temperature must be 0 (greedy) or a finite number >= 1e-05, got nan"),
    ({"prompt": "x", "temperature": float("inf")}, "temperature must be 0 (greedy) or a finite number >= 1e-05, got inf"),
    ({"prompt": "x", "temperature": 1e-300}, "temperature must be 0 (greedy) or a finite number >= 1e-05, got 1e-300"),
    ({"prompt": "x", "top_p": 0}, "top_p must be a finite number in [1e-06, 1] (1 disables it), got 0.0"),
    ({"prompt": "x", "top_p": 1.5}, "top_p must be a finite number in [1e-06, 1] (1 disables it), got 1.5"),
    ({"prompt": "x", "top_p": 1e-300}, "top_p must be a finite number in [1e-06, 1] (1 disables it), got 1e-300"),
    ({"prompt": "a\ud800b"}, "prompt is not valid Unicode text: a lone surrogate at character 1"),
    ({"prompt": "x", "max_tokens": "8"}, "max_tokens: Input should be a valid integer"),
    ({"prompt": "x", "max_tokens": True}, "max_tokens: Input should be a valid integer"),
    ({"prompt": "x", "stream": "yes"}, "stream: Input should be a valid boolean"),
    ({"prompt": [False]}, "prompt"),
    ({"prompt": "x", "top_k": -1}, "top_k must be an integer >= 0"),
    ({"prompt": "x", "max_tokens": "many"}, "max_tokens: Input should be a valid integer"),
    ({"prompt": "x", "stop": [""]}, "stop must be a string or a list of non-empty strings"),
    ({"prompt": "x", "maxtokens": 3}, "unknown field 'maxtokens'"),
    ({"max_tokens": 3}, "prompt is required"),
    ({"prompt": [10**9]}, "prompt token ids must be integers in [0, "),
]


def post_json(client, url: str, payload):
    """POST as clients send it: Python's json writes NaN and Infinity (httpx's json= refuses to)."""
    return client.post(url, content=json.dumps(payload).encode(), headers={"content-type": "application/json"})


@pytest.mark.parametrize("payload,message", BAD, ids=[f"{i}-{m[:30]}" for i, (_, m) in enumerate(BAD)])
def test_bad_input_is_400_with_a_clear_message(client, payload, message):
    r = post_json(client, "/v1/generate", payload)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert message in err["message"] and err["type"] == "invalid_request_error"


def test_openai_bad_numbers_and_loose_types_are_400(client):
    """The OpenAI routes share the checks: no 500 for NaN, Infinity, underflowing values or a lone surrogate,
    and no silent coercion of strings and booleans."""
    cases = [({"temperature": float("nan")}, "temperature must be 0 (greedy) or a finite number"),
             ({"top_p": 1e-300}, "top_p must be a finite number in [1e-06, 1]"),
             ({"max_tokens": "8"}, "max_tokens"), ({"stream": "yes"}, "stream")]
    for extra, message in cases:
        r = post_json(client, "/v1/completions", dict({"model": "tiny", "prompt": "x"}, **extra))
        assert r.status_code == 400 and message in r.json()["error"]["message"], (extra, r.text)
    r = post_json(client, "/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user",
                                                                                   "content": "a\ud800b"}]})
    assert r.status_code == 400 and "not valid Unicode text" in r.json()["error"]["message"], r.text


def test_malformed_json_and_wrong_shapes(client):
    r = client.post("/v1/generate", content=b'{"prompt": "x",', headers={"content-type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    r = client.post("/v1/generate", json=["prompt"])
    assert r.status_code == 400 and "valid dictionary" in r.json()["error"]["message"]
    r = client.post("/v1/generate/batch", json={"prompts": []})
    assert r.status_code == 400 and "prompts must hold 1 to" in r.json()["error"]["message"]
    r = client.post("/v1/generate/batch", json={"prompts": ["ok", ""]})
    assert r.status_code == 400 and "prompts[1] is empty" in r.json()["error"]["message"]
    r = client.post("/v1/completions", json={"model": "tiny", "prompt": "x", "n": 0})
    assert r.status_code == 400 and "n must be an integer in [1, 128]" in r.json()["error"]["message"]
    r = client.post("/v1/chat/completions", json={"model": "tiny", "messages": []})
    assert r.status_code == 400 and "messages is empty" in r.json()["error"]["message"]
    r = client.get("/v1/nowhere")
    assert r.status_code == 404 and "no route GET /v1/nowhere" in r.json()["error"]["message"]


# ---------------------------------------------------------------------------------------------- faults
def test_injected_failure_fails_only_its_request(server):
    ok = {"prompt": PROMPT, "max_tokens": 12, "ignore_eos": True, "optimization": "faulty"}
    bad = dict(ok, prompt="poison pill")
    # submitted together, the poisoned prompt shares every engine step with the others
    r = httpx.post(server.base + "/v1/generate/batch", timeout=60,
                   json={"prompts": [PROMPT, "poison pill", "Hello world"], "max_tokens": 12, "ignore_eos": True,
                         "optimization": "faulty"})
    res = r.json()["results"]
    assert r.status_code == 200 and [x["finish_reason"] for x in res] == ["length", "error", "length"]
    assert "injected failure" in res[1]["error"] and res[0]["tokens_generated"] == 12

    async def main():
        async with httpx.AsyncClient(base_url=server.base, timeout=60) as ac:
            reqs = [ac.post("/v1/generate", json=ok) for _ in range(3)] + [ac.post("/v1/generate", json=bad)]
            reqs.append(ac.post("/v1/generate", json=dict(bad, stream=True)))
            return await asyncio.gather(*reqs)

    *good, failed, failed_stream = asyncio.run(main())
    assert all(g.status_code == 200 and g.json()["tokens_generated"] == 12 for g in good)
    for f in (failed, failed_stream):  # fails before its first token: a real 500 even when streaming
        assert f.status_code == 500, f.text
        assert "injected failure" in f.json()["error"]["message"]
    with server.client() as c:  # the loop carries on, and the failed requests hold no KV
        assert c.post("/v1/generate", json=ok).status_code == 200
        assert kv_used(c, "faulty") == 0
        assert metric(c.get("/metrics").text, "tokenmill_requests_total", pipeline="faulty", outcome="error") >= 3


def test_fifty_clients_dropping_mid_stream_leak_nothing(server):
    async def drop(ac: httpx.AsyncClient, i: int) -> int:
        payload = {"prompt": f"{PROMPT} {i}", "max_tokens": 200, "ignore_eos": True, "stream": True,
                   "optimization": "tiny-paged"}
        async with ac.stream("POST", "/v1/generate", json=payload) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if line.startswith("data:"):
                    return 1  # leave after the first chunk: the connection closes mid-stream
        return 0

    async def main():
        limits = httpx.Limits(max_connections=64)
        async with httpx.AsyncClient(base_url=server.base, timeout=60, limits=limits) as ac:
            return await asyncio.gather(*(drop(ac, i) for i in range(50)))

    assert sum(asyncio.run(main())) == 50
    with server.client() as c:
        wait_until(lambda: kv_used(c, "tiny-paged") == 0, timeout=30, what="KV freed after disconnects")
        text = c.get("/metrics").text
        assert metric(text, "tokenmill_num_requests_running", pipeline="tiny-paged") == 0
        assert metric(text, "tokenmill_requests_total", pipeline="tiny-paged", outcome="cancelled") >= 50
        assert metric(text, "tokenmill_generation_tokens_total", pipeline="tiny-paged") < 50 * 200 / 4
        r = c.post("/v1/generate", json={"prompt": PROMPT, "max_tokens": 4, "optimization": "tiny-paged"})
        assert r.status_code == 200 and r.json()["tokens_generated"] == 4
    assert server.service.inflight == 0 and not server.service.calls


def test_client_gone_before_first_token_aborts(server):
    """A non-streaming client that gives up is noticed through the ASGI disconnect message."""
    with server.client() as c:
        before = metric(c.get("/metrics").text, "tokenmill_requests_total", pipeline="tiny-paged",
                        outcome="cancelled")

    def give_up():
        try:
            httpx.post(server.base + "/v1/generate", timeout=httpx.Timeout(5, read=0.2),
                       json={"prompt": PROMPT, "max_tokens": 250 - 10, "ignore_eos": True,
                             "optimization": "tiny-paged"})
        except httpx.ReadTimeout:
            return True
        return False

    with cf.ThreadPoolExecutor(4) as ex:
        gave_up = sum(ex.map(lambda _: give_up(), range(4)))
    assert gave_up >= 1
    with server.client() as c:
        wait_until(lambda: metric(c.get("/metrics").text, "tokenmill_requests_total", pipeline="tiny-paged",
                                  outcome="cancelled") - before >= gave_up, timeout=30, what="aborts counted")
        wait_until(lambda: kv_used(c, "tiny-paged") == 0, timeout=30, what="KV freed")
