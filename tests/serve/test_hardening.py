"""Review hardening (issue 17): keep-alive latency, huge bodies and prompts, 5xx accounting, the token-rate
gauge and the queue bound under a burst. Real uvicorn servers on 127.0.0.1, or the ASGI app in-process."""
from __future__ import annotations

import http.client
import json
import statistics
import time

import pytest

from tests.serve.helpers import Slow

PROMPT = "The quick brown fox jumps over the lazy dog"



# ---------------------------------------------------------------------------------------------- item 1
def test_keep_alive_connection_has_no_nagle_stall(make_server, spare_pipeline):
    """20 sequential requests on one kept-alive connection: each costs little beyond its generation. Without
    TCP_NODELAY on the accepted socket, every request after the first waits ~40 ms for a delayed ACK."""
    run = make_server([spare_pipeline])
    conn = http.client.HTTPConnection("127.0.0.1", run.port, timeout=30)
    body = json.dumps({"prompt": "Hi", "max_tokens": 1})
    overheads = []
    try:
        for _ in range(21):
            t0 = time.perf_counter()
            conn.request("POST", "/v1/generate", body=body, headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            data = json.loads(resp.read())
            wall_ms = (time.perf_counter() - t0) * 1000.0
            assert resp.status == 200, data
            assert not resp.will_close, "the server closed the kept-alive connection"
            overheads.append(wall_ms - data["latency_ms"])
    finally:
        conn.close()
    reused = overheads[1:]  # the first request opened the connection
    assert statistics.median(reused) < 5.0, f"per-request overhead (ms) beyond generation: {reused}"


# ---------------------------------------------------------------------------------------------- item 8
async def _serving(app):
    """Enter the app's lifespan (engine threads) and wait until every pipeline is warm."""
    import asyncio

    ctx = app.router.lifespan_context(app)
    await ctx.__aenter__()
    for w in app.state.service.workers.values():
        assert await asyncio.to_thread(w.ready.wait, 60) and w.state == "ready", w.error
    return ctx


def test_burst_admits_free_slots_plus_max_queued(spare_pipeline):
    """max_num_seqs 8, --max-queued-requests 4, 30 simultaneous requests while the engine thread is blocked
    (nothing is taken, nothing finishes): exactly 8 + 4 are admitted, the other 18 get 503 queue_full."""
    import asyncio
    import threading

    import httpx

    from tokenmill.serve import create_app

    app = create_app([spare_pipeline], max_queued_requests=4)
    service = app.state.service
    w = service.workers["spare"]
    assert w.limits.max_num_seqs == 8

    async def main():
        ctx = await _serving(app)
        gate = threading.Event()
        decided = asyncio.Event()  # every request was either submitted to the engine or answered
        tasks = []
        submit = w.submit

        def check(_=None):
            if w.posted + sum(t.done() for t in tasks) == 30:
                decided.set()

        def counting_submit(handles):
            submit(handles)
            check()

        w.submit = counting_submit
        blocked = w.call(lambda p: gate.wait(60))  # the engine thread takes no command until the gate opens
        try:
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=60) as ac:
                tasks += [asyncio.create_task(ac.post("/v1/generate", json={"prompt": PROMPT, "max_tokens": 2}))
                          for _ in range(30)]
                for t in tasks:
                    t.add_done_callback(check)
                await asyncio.wait_for(decided.wait(), 30)
                refused = [t.result() for t in tasks if t.done()]
                admitted = w.posted
                gate.set()
                await blocked
                answers = await asyncio.gather(*tasks)
        finally:
            gate.set()
            del w.submit
            await ctx.__aexit__(None, None, None)
        return refused, admitted, answers

    refused, admitted, answers = asyncio.run(main())
    assert admitted == 12, f"admitted {admitted} of 30 with 8 free slots and --max-queued-requests 4"
    assert len(refused) == 18 and all(r.status_code == 503 for r in refused)
    assert all(r.json()["error"]["code"] == "queue_full" for r in refused)
    assert sorted(r.status_code for r in answers) == [200] * 12 + [503] * 18


def test_token_rate_gauge_counts_the_last_window_and_decays_to_zero(make_server, spare_pipeline):
    """tokenmill_generation_tokens_per_second = tokens generated in the last window / window, so an idle server
    reads 0 (it used to report the engine's last steps' rate forever: 14-115 tok/s while idle)."""
    from tests.serve.helpers import metric

    run = make_server([spare_pipeline])
    now = [1000.0]
    metrics = run.app.state.metrics
    metrics.clock = lambda: now[0]  # the window's clock: no sleeps
    with run.client() as c:
        r = c.post("/v1/generate/batch", json={"prompts": [PROMPT, "Hello"], "max_tokens": 12, "ignore_eos": True})
        assert r.status_code == 200 and r.json()["tokens_generated"] == 24
        busy = metric(c.get("/metrics").text, "tokenmill_generation_tokens_per_second", pipeline="spare")
        now[0] += 3600.0  # an hour later, nothing generated since
        idle = metric(c.get("/metrics").text, "tokenmill_generation_tokens_per_second", pipeline="spare")
    assert idle == 0.0, f"the token rate reads {idle} tok/s on an idle server"
    assert busy == pytest.approx(24 / metrics.token_rate_window_s)


def test_sliding_rate_counts_the_window_only():
    from tokenmill.serve.metrics import SlidingRate

    rate = SlidingRate(window_s=10.0)
    assert rate.rate(0.0) == 0.0
    rate.add(30, now=1.0)
    rate.add(20, now=6.0)
    assert rate.rate(6.0) == pytest.approx(5.0)
    assert rate.rate(10.9) == pytest.approx(5.0)
    assert rate.rate(11.0) == pytest.approx(2.0)   # the 30 tokens at t=1 left the window (1, 11]
    assert rate.rate(16.0) == 0.0
    rate.add(0, now=17.0)
    assert rate.rate(17.0) == 0.0
    with pytest.raises(ValueError, match="window_s must be > 0"):
        SlidingRate(window_s=0)


# ---------------------------------------------------------------------------------------------- item 3
def test_every_5xx_of_a_generation_request_is_counted(make_server, spare_pipeline):
    """A generation request answered 5xx is counted in tokenmill_requests_total, whatever produced the 5xx: an
    unhandled exception in the handler (500, outcome error) or a refusal before admission (draining: 503,
    outcome overloaded); tokenmill_http_requests_total has the same statuses."""
    from tests.serve.helpers import metric

    run = make_server([spare_pipeline])
    service = run.service

    def bug(*args, **kwargs):
        raise RuntimeError("injected bug")

    chat = {"model": "spare", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    with run.client() as c:
        before = c.get("/metrics").text
        service.check_max_tokens = bug  # raises inside the handlers, before anything is submitted
        try:
            r1 = c.post("/v1/generate", json={"prompt": PROMPT, "max_tokens": 2})
            r2 = c.post("/v1/chat/completions", json=chat)
        finally:
            del service.check_max_tokens
        service.draining = True  # refused by the handlers' readiness check
        try:
            r3 = c.post("/v1/generate", json={"prompt": PROMPT, "max_tokens": 2})
            r4 = c.post("/v1/completions", json={"model": "spare", "prompt": PROMPT, "max_tokens": 2})
        finally:
            service.draining = False
        after = c.get("/metrics").text
    assert [r.status_code for r in (r1, r2, r3, r4)] == [500, 500, 503, 503]
    assert "injected bug" in r1.json()["error"]["message"]

    def delta(name, **labels):
        return metric(after, name, **labels) - metric(before, name, **labels)

    assert delta("tokenmill_requests_total", pipeline="spare", outcome="error") == 2
    assert delta("tokenmill_requests_total", pipeline="spare", outcome="overloaded") == 2
    assert delta("tokenmill_http_requests_total", route="/v1/generate", method="POST", status="500") == 1
    assert delta("tokenmill_http_requests_total", route="/v1/chat/completions", method="POST", status="500") == 1
    assert delta("tokenmill_http_requests_total", route="/v1/generate", method="POST", status="503") == 1


# ---------------------------------------------------------------------------------------------- item 2
def _stream_gaps(run, during):
    """Stream a long generation; once it runs, call ``during()`` on another thread. Returns (the longest gap
    between the stream's events in seconds, during's result, the events)."""
    import threading

    from tests.serve.helpers import sse_events

    result = {}
    gaps, lines, last = [], [], None
    worker = None
    with run.client() as c, c.stream("POST", "/v1/generate", json={"prompt": PROMPT, "max_tokens": 120,
                                                                      "ignore_eos": True, "stream": True}) as s:
        assert s.status_code == 200
        for line in s.iter_lines():
            lines.append(line)
            if not line.startswith("data:"):
                continue
            now = time.perf_counter()
            if last is not None:
                gaps.append(now - last)
            last = now
            if worker is None and len(gaps) >= 3:
                worker = threading.Thread(target=lambda: result.setdefault("r", during()))
                worker.start()
    worker.join(60)
    events = sse_events(lines)
    assert events[-1][0] == "done", events[-1]
    return max(gaps), result["r"], events


def test_ten_megabyte_prompt_fails_fast_without_stalling_streams(make_server, spare_pipeline):
    """While a stream runs, a 10 MB prompt gets its 400 at once (its length alone proves it cannot fit the
    256-token context) and the stream never pauses for a second: it used to be tokenized on the engine thread."""
    run = make_server([spare_pipeline])
    Slow.delay = 0.02  # a stream of 120 tokens lasts a few seconds
    huge = "hello world " * (10 * 2**20 // 12)

    def post_huge():
        t0 = time.perf_counter()
        with run.client() as c:
            r = c.post("/v1/generate", json={"prompt": huge, "max_tokens": 8})
        return r, time.perf_counter() - t0

    gap, (r, seconds), _ = _stream_gaps(run, post_huge)
    assert gap < 1.0, f"the stream paused {gap:.2f} s while the 10 MB prompt was handled ({seconds:.2f} s): {r.text}"
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == "prompt" and err["code"] == "context_length_exceeded"
    assert f"its {len(huge)} characters" in err["message"] and "max_model_len 256" in err["message"]


def test_body_limit_refuses_large_bodies_with_413(make_server, spare_pipeline):
    """--max-body-bytes: a body over the limit is refused with 413 naming the limit, whether its size is
    declared (Content-Length) or only seen while it arrives (chunked); the connection stays usable."""
    from tests.serve.helpers import metric

    run = make_server([spare_pipeline], max_body_bytes=2**20)
    body = json.dumps({"prompt": "x" * (2 * 2**20), "max_tokens": 2}).encode()

    def chunks():
        for i in range(0, len(body), 65536):
            yield body[i:i + 65536]

    with run.client() as c:
        declared = c.post("/v1/generate", content=body, headers={"Content-Type": "application/json"})
        chunked = c.post("/v1/completions", content=chunks(), headers={"Content-Type": "application/json"})
        ok = c.post("/v1/generate", json={"prompt": PROMPT, "max_tokens": 2})
        text = c.get("/metrics").text
    for r in (declared, chunked):
        assert r.status_code == 413, r.text
        err = r.json()["error"]
        assert err["code"] == "body_too_large" and "1048576 bytes" in err["message"]
        assert "--max-body-bytes" in err["message"]
    assert f"is {len(body)} bytes" in declared.json()["error"]["message"]
    assert ok.status_code == 200, ok.text
    assert metric(text, "tokenmill_http_requests_total", route="unmatched", method="POST", status="413") == 2
    with pytest.raises(ValueError, match="max_body_bytes must be a positive number of bytes, got 0"):
        from tokenmill.serve import create_app
        create_app([spare_pipeline], max_body_bytes=0)


def test_prompts_are_tokenized_off_the_engine_thread(make_server, spare_pipeline, monkeypatch):
    import threading

    run = make_server([spare_pipeline])
    threads = []
    encode = spare_pipeline.encode

    def spy(prompt, **kwargs):
        if not (isinstance(prompt, list) and all(isinstance(t, int) for t in prompt)):  # ids pass through
            threads.append(threading.current_thread().name)
        return encode(prompt, **kwargs)

    monkeypatch.setattr(spare_pipeline, "encode", spy)
    with run.client() as c:
        assert c.post("/v1/generate", json={"prompt": PROMPT, "max_tokens": 2}).status_code == 200
        assert c.post("/v1/generate/batch", json={"prompts": ["a", "b"], "max_tokens": 2}).status_code == 200
        chat = c.post("/v1/chat/completions", json={"model": "spare", "max_tokens": 2,
                                                    "messages": [{"role": "user", "content": "Hi"}]})
        assert chat.status_code == 200, chat.text
        bad = c.post("/v1/generate/batch", json={"prompts": ["ok", "x" * 30000], "max_tokens": 2})
    assert len(threads) == 4 and not any(t.startswith("tokenmill-engine") for t in threads), threads
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "prompts[1]"


def test_char_bound_is_a_lower_bound_on_tokens(spare_pipeline):
    import math
    import random

    from tokenmill.serve.prompt_limits import max_token_chars

    tok = spare_pipeline.tokenizer
    bound = max_token_chars(tok)
    assert bound == max(len(t) for t in tok.get_vocab())
    rng = random.Random(0)
    pieces = [t for t in tok.get_vocab() if len(t) >= bound - 8] + ["\n", " ", "é", "😀", "ab"]
    for _ in range(20):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(1, 50)))
        assert len(tok.encode(text, add_special_tokens=False)) >= math.ceil(len(text) / bound), text


def test_cli_passes_max_body_bytes(tiny_llama_dir, tmp_path, monkeypatch):
    from tokenmill.cli import main

    yaml = tmp_path / "tiny.yaml"
    yaml.write_text(f"name: tiny-cli\nmodel: {tiny_llama_dir}\ndtype: float32\ndevice: cpu\n")
    seen = {}

    class Done:
        load_failed = False

    def fake_serve(pipelines, **kwargs):
        seen.update(kwargs)
        kwargs["sock"].close()
        return Done()

    monkeypatch.setattr("tokenmill.serve.server.serve", fake_serve)
    assert main(["serve", str(yaml), "--port", "0", "--max-body-bytes", "12345", "--log-level", "warning"]) == 0
    assert seen["config"].max_body_bytes == 12345
    assert seen["sock"].proto == __import__("socket").IPPROTO_TCP
    assert main(["serve", str(yaml), "--port", "0", "--max-body-bytes", "0"]) == 2
