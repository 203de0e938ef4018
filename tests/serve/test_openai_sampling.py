"""The sampling fields of the OpenAI and native routes, through the `openai` client against a real server: logprobs
(equal to HF's log_softmax), n choices (distinct, seeded, the prompt computed once), penalties / biases /
stop_token_ids / min_p / top_k (the same output as offline SamplingParams), plugin_args and priority (reaching
the plugins, refusals naming the field), stream_options.include_usage, and bad values refused by name."""
from __future__ import annotations

import httpx
import pytest
import torch

from tests.conftest import tiny_pipeline_dict
from tests.serve.helpers import PAGED, metric, sse_events, start_server, wait_until
from tokenmill import Pipeline, Plugin, SamplingParams, hookimpl
from tokenmill.host import PluginEntry, discover_plugins
from tokenmill.serve.responses import ChatCompletionResponse, CompletionResponse
from tokenmill.serve.sampling_fields import LOGITS_PLUGIN, plugin_names

openai = pytest.importorskip("openai")

LONG = ("The old lighthouse keeper climbed the spiral stairs every evening, counting the steps, listening to the "
        "sea, and thinking about")  # > 2 KV blocks of 8 tokens


class Recorder(Plugin):
    """Declares the plugin arguments ``priority`` and ``tag``, records what each request carries, refuses a
    negative priority."""

    name = "recorder"
    seen: list[dict] = []

    @hookimpl
    def request_args(self):
        return {"priority": "scheduling priority (test)", "tag": "any value (test)"}

    @hookimpl
    def check_request(self, seq):
        args = {k: v for k, v in seq.params.plugin_args.items() if k in ("priority", "tag")}
        if args:
            Recorder.seen.append(args)
        if args.get("priority", 0) < 0:
            raise ValueError(f"priority must be >= 0, got {args['priority']}")


def _build(model_dir, **extra) -> Pipeline:
    catalog = discover_plugins()
    catalog["recorder"] = PluginEntry("recorder", f"{__name__}:Recorder", "tests")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("tokenmill.spec.discover_plugins", lambda: catalog)
        mp.setattr("tokenmill.host.discover_plugins", lambda: catalog)
        return Pipeline.from_dict(tiny_pipeline_dict(model_dir, **extra), progress=False)


@pytest.fixture(scope="module")
def offline(tiny_llama_dir):
    """The same model and plugins as the served pipeline, for offline references (never served)."""
    return Pipeline.from_dict(tiny_pipeline_dict(tiny_llama_dir, name="offline", plugins=PAGED), progress=False)


@pytest.fixture(scope="module")
def served(tiny_llama_dir):
    samp = _build(tiny_llama_dir, name="samp", plugins=["recorder"] + PAGED)
    plain = Pipeline.from_dict(tiny_pipeline_dict(tiny_llama_dir, name="plain"), progress=False)
    run = start_server([samp, plain], max_queued_requests=8)
    yield run, samp
    run.stop()
    for pipe in (samp, plain):  # every KV block returned, no request state left
        assert pipe.stats()["kv"]["used_blocks"] == 0 and not pipe.engine.has_unfinished()


@pytest.fixture(scope="module")
def oc(served):
    run, _ = served
    with openai.OpenAI(base_url=run.base + "/v1", api_key="x", max_retries=0) as client:
        yield client


@pytest.fixture(scope="module")
def http(served):
    with served[0].client() as c:
        yield c


@pytest.fixture(scope="module")
def hf(tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()


def hf_logprobs(hf, prompt: list[int], generated: list[int]) -> torch.Tensor:
    """log_softmax of HF's logits at each generated position: row j is the distribution of ``generated[j]``."""
    with torch.no_grad():
        logits = hf(torch.tensor([prompt + generated])).logits[0].float()
    return torch.log_softmax(logits[len(prompt) - 1:len(prompt) - 1 + len(generated)], dim=-1)


def hf_greedy(hf, prompt: list[int], n: int) -> list[int]:
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(hf(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt):]


MESSAGES = [{"role": "user", "content": "Tell me about the sea."}]


def same_native(a: list[dict], b: list[dict], top: bool = True) -> bool:
    """Native logprobs that agree: the same tokens and alternatives, the numbers up to float rounding (a prompt
    that comes from the prefix cache is computed in other chunks)."""
    def flat(x):
        return [(e["token_id"], e["token"], [(t["token_id"], t["token"]) for t in e["top"]] if top else None)
                for e in x]

    def values(x):
        return [v for e in x for v in [e["logprob"]] + ([t["logprob"] for t in e["top"]] if top else [])]
    return flat(a) == flat(b) and values(a) == pytest.approx(values(b), abs=1e-5)


# ---------------------------------------------------------------------------------------------- logprobs
def test_chat_logprobs_are_hf_log_softmax(oc, served, hf):
    _, pipe = served
    out = oc.chat.completions.create(model="samp", messages=MESSAGES, max_tokens=8, temperature=0, logprobs=True,
                                     top_logprobs=3, extra_body={"ignore_eos": True})
    ChatCompletionResponse.model_validate(out.model_dump())
    prompt = pipe.apply_chat_template(MESSAGES)
    ids = hf_greedy(hf, prompt, 8)
    ref = hf_logprobs(hf, prompt, ids)
    content = out.choices[0].logprobs.content
    assert len(content) == 8
    tok = pipe.tokenizer
    for j, entry in enumerate(content):
        assert entry.token == tok.decode([ids[j]]), j
        assert abs(entry.logprob - ref[j, ids[j]].item()) < 1e-4, (j, entry.logprob, ref[j, ids[j]].item())
        values, alts = ref[j].topk(3)
        assert [t.token for t in entry.top_logprobs] == [tok.decode([a]) for a in alts.tolist()]
        assert max(abs(t.logprob - v) for t, v in zip(entry.top_logprobs, values.tolist())) < 1e-4
        if "\ufffd" not in entry.token:
            assert bytes(entry.bytes).decode("utf-8") == entry.token
    assert out.choices[0].message.content == tok.decode(ids, skip_special_tokens=True)

    stream = oc.chat.completions.create(model="samp", messages=MESSAGES, max_tokens=8, temperature=0, logprobs=True,
                                        top_logprobs=3, stream=True, extra_body={"ignore_eos": True})
    streamed = [e for c in stream if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [(e.token, [t.token for t in e.top_logprobs]) for e in streamed] == \
        [(e.token, [t.token for t in e.top_logprobs]) for e in content]
    # the prompt now comes from the prefix cache: the same numbers up to float rounding
    assert [e.logprob for e in streamed] == pytest.approx([e.logprob for e in content], abs=1e-5)


def test_sampled_logprobs_native_and_completions(http, oc, hf):
    prompt = list(range(100, 112))
    body = {"prompt": prompt, "max_tokens": 8, "temperature": 0.8, "seed": 11, "ignore_eos": True}
    r = http.post("/v1/generate", json=dict(body, logprobs=2))
    assert r.status_code == 200, r.text
    native = r.json()["logprobs"]
    ids = [e["token_id"] for e in native]
    assert len(ids) == 8 == r.json()["tokens_generated"]
    ref = hf_logprobs(hf, prompt, ids)
    for j, e in enumerate(native):
        assert abs(e["logprob"] - ref[j, ids[j]].item()) < 1e-4
        values, alts = ref[j].topk(2)
        assert [a["token_id"] for a in e["top"]] == alts.tolist()
        assert max(abs(a["logprob"] - v) for a, v in zip(e["top"], values.tolist())) < 1e-4

    out = oc.completions.create(model="samp", prompt=prompt, max_tokens=8, temperature=0.8, seed=11, logprobs=2,
                                extra_body={"ignore_eos": True})
    CompletionResponse.model_validate(out.model_dump())
    lp, text = out.choices[0].logprobs, out.choices[0].text
    assert text == r.json()["text"]
    assert lp.tokens == [e["token"] for e in native]
    assert lp.token_logprobs == pytest.approx([e["logprob"] for e in native], abs=1e-5)
    for j, top in enumerate(lp.top_logprobs):  # the top 2, and the sampled token always
        assert set(top) == {a["token"] for a in native[j]["top"]} | {native[j]["token"]}
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
    for token, offset in zip(lp.tokens, lp.text_offset):
        if "\ufffd" not in token:
            assert text.startswith(token, offset), (token, offset, text)

    stream = oc.completions.create(model="samp", prompt=prompt, max_tokens=8, temperature=0.8, seed=11, logprobs=2,
                                   stream=True, extra_body={"ignore_eos": True})
    chunks = [c.choices[0].logprobs for c in stream if c.choices and c.choices[0].logprobs]
    assert [t for c in chunks for t in c.tokens] == lp.tokens
    assert [o for c in chunks for o in c.text_offset] == lp.text_offset

    r = http.post("/v1/generate", json=dict(body, logprobs=2, stream=True))
    events = sse_events(r.text.splitlines())
    pieces = [lp for ev, d in events if ev == "message" for lp in d["logprobs"]]
    assert same_native(pieces, native) and same_native(events[-1][1]["logprobs"], native)

    batch = {k: v for k, v in body.items() if k != "prompt"}
    r = http.post("/v1/generate/batch", json=dict(batch, prompts=[prompt, "Hello"], logprobs=0))
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert same_native(results[0]["logprobs"], native, top=False)  # seeded: the same tokens as alone
    assert all(e["top"] == [] for e in results[0]["logprobs"])
    assert len(results[1]["logprobs"]) == results[1]["tokens_generated"] == 8


# ---------------------------------------------------------------------------------------------- n
def test_n_choices_are_distinct_and_the_prompt_is_computed_once(oc, http):
    messages = [{"role": "user", "content": LONG + " the ships."}]
    before = http.get("/v1/cache/stats").json()
    out = oc.chat.completions.create(model="samp", messages=messages, n=4, temperature=0.8, max_tokens=8,
                                     extra_body={"ignore_eos": True})
    after = http.get("/v1/cache/stats").json()
    assert [c.index for c in out.choices] == [0, 1, 2, 3]
    texts = [c.message.content for c in out.choices]
    assert len(set(texts)) == 4, texts
    prompt = out.usage.prompt_tokens  # counted once, as OpenAI bills n choices
    assert out.usage.completion_tokens == 32
    reused = (prompt - 1) // 8 * 8  # whole blocks, the last prompt token always computed
    first = out.usage.prompt_tokens_details.cached_tokens  # the first copy may reuse an earlier prompt's prefix
    assert after["queries"] - before["queries"] == 4 * prompt
    assert after["hits"] - before["hits"] == first + 3 * reused > 3 * 8  # copies 2..4 computed no prompt block
    text = http.get("/metrics").text
    assert metric(text, "tokenmill_prefix_cache_hits_total", pipeline="samp") == after["hits"]

    again = oc.chat.completions.create(model="samp", messages=messages, n=1, temperature=0.8, max_tokens=2)
    assert again.usage.prompt_tokens_details.cached_tokens == reused


def test_n_with_a_seed_is_reproducible(oc):
    kw = dict(model="samp", prompt="Once upon a time", max_tokens=6, temperature=0.9, seed=5,
              extra_body={"ignore_eos": True})
    a = oc.completions.create(n=3, **kw)
    b = oc.completions.create(n=3, **kw)
    one = oc.completions.create(n=1, **kw)
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    assert a.choices[0].text == one.choices[0].text  # the first copy keeps the request's own seed
    assert len({c.text for c in a.choices}) == 3
    two = oc.completions.create(model="samp", prompt=["Once upon a time", "1, 2, 3,"], n=2, max_tokens=3,
                                temperature=0.9, seed=5, extra_body={"ignore_eos": True})
    assert [c.index for c in two.choices] == [0, 1, 2, 3]
    assert two.choices[0].text == one.choices[0].text[:len(two.choices[0].text)]


def test_n_streams_an_index_per_choice_and_a_usage_chunk(oc):
    kw = dict(model="samp", messages=MESSAGES, n=3, max_tokens=5, temperature=0.8, seed=9,
              extra_body={"ignore_eos": True})
    unary = oc.chat.completions.create(**kw)
    chunks = list(oc.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    text, reasons = {0: "", 1: "", 2: ""}, {}
    for c in chunks[:-1]:
        assert c.usage is None and len(c.choices) == 1
        text[c.choices[0].index] += c.choices[0].delta.content or ""
        if c.choices[0].finish_reason:
            reasons[c.choices[0].index] = c.choices[0].finish_reason
    assert text == {c.index: c.message.content for c in unary.choices}
    assert reasons == {0: "length", 1: "length", 2: "length"}
    last = chunks[-1]
    assert last.choices == [] and last.usage.completion_tokens == 15
    assert last.usage.prompt_tokens == unary.usage.prompt_tokens

    stream = oc.completions.create(model="samp", prompt="Hi", max_tokens=3, stream=True, n=2,
                                   stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    chunks = list(stream)
    assert {c.choices[0].index for c in chunks[:-1]} == {0, 1}
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 6


def test_n_beyond_what_the_pipeline_admits_is_refused_naming_n(http):
    # room: 8 batch slots + --max-queued-requests 8
    r = http.post("/v1/completions", json={"model": "samp", "prompt": "x", "n": 17, "max_tokens": 2})
    assert r.status_code == 400 and r.json()["error"]["param"] == "n", r.text
    assert "more than pipeline 'samp' ever admits" in r.json()["error"]["message"]
    r = http.post("/v1/completions", json={"model": "samp", "prompt": ["x", "y"], "n": 9, "max_tokens": 2})
    assert r.status_code == 400 and "n = 9 x 2 prompts makes 18 requests" in r.json()["error"]["message"], r.text
    r = http.post("/v1/chat/completions", json={"model": "samp", "messages": MESSAGES, "n": 129})
    assert r.status_code == 400 and r.json()["error"]["param"] == "n", r.text


def test_a_refused_request_counts_every_copy(http):
    before = metric(http.get("/metrics").text, "tokenmill_requests_total", pipeline="samp", outcome="invalid")
    r = http.post("/v1/completions", json={"model": "samp", "prompt": "x", "n": 3, "stop_token_ids": [99999999]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "stop_token_ids", r.text
    after = metric(http.get("/metrics").text, "tokenmill_requests_total", pipeline="samp", outcome="invalid")
    assert after - before == 3


# ---------------------------------------------------------------------------------------------- sampling fields
PROMPT = "The quick brown fox"
BASE = dict(max_tokens=8, temperature=0.9, seed=3)


def _baseline(offline) -> list[int]:
    return offline.generate([PROMPT], SamplingParams(ignore_eos=True, **BASE))[0].token_ids


def _field_cases(base_ids: list[int], tokenizer=None):
    """(name, the fields sent); ``name`` is the field whose effect is checked (the others set the scene)."""
    first = tokenizer.decode([base_ids[0]]).strip() if tokenizer is not None else ""
    favoured = {"logit_bias": {"42": 12.0}}  # token 42 repeats, so the penalties have something to penalize
    return [
        ("presence_penalty", dict(favoured, presence_penalty=2.0)),
        ("frequency_penalty", dict(favoured, frequency_penalty=2.0)),
        ("repetition_penalty", {"repetition_penalty": 0.2}),
        ("logit_bias", {"logit_bias": {str(base_ids[0]): -100, "42": 5}}),
        ("bad_words", {"bad_words": [first]}),
        ("bad_words_ids", {"bad_words_ids": [[base_ids[0]]]}),
        ("stop_token_ids", {"stop_token_ids": [base_ids[2]]}),
        ("min_tokens", {"stop_token_ids": [base_ids[2]], "min_tokens": 5}),
        ("min_p", {"min_p": 0.5}),
        ("top_k", {"top_k": 2}),
    ]


NAMES = [c for c, _ in _field_cases([0, 0, 0])]


@pytest.mark.parametrize("name", NAMES)
def test_sampling_fields_give_the_offline_result(oc, http, served, offline, name):
    base = _baseline(offline)
    fields = dict(_field_cases(base, offline.tokenizer))[name]
    if name not in ("stop_token_ids", "min_p", "top_k") and \
            LOGITS_PLUGIN not in plugin_names(served[0].service.workers["samp"]):
        pytest.skip(f"the {LOGITS_PLUGIN} plugin is not in this pipeline")
    ignore_eos = "stop_token_ids" not in fields
    params = SamplingParams(ignore_eos=ignore_eos, **BASE, **fields)
    ref = offline.generate([PROMPT], params)[0]
    without = {k: v for k, v in fields.items() if k != name}
    # the field changes the output, so passing it through matters
    assert ref.token_ids != offline.generate([PROMPT], SamplingParams(ignore_eos=ignore_eos, **BASE,
                                                                      **without))[0].token_ids
    extra = {k: v for k, v in fields.items() if k not in ("presence_penalty", "frequency_penalty", "logit_bias")}
    out = oc.completions.create(model="samp", prompt=PROMPT, presence_penalty=fields.get("presence_penalty"),
                                frequency_penalty=fields.get("frequency_penalty"), logit_bias=fields.get("logit_bias"),
                                extra_body=dict(extra, ignore_eos=ignore_eos), **BASE)
    assert out.choices[0].text == ref.text and out.usage.completion_tokens == len(ref.token_ids)
    assert out.choices[0].finish_reason == ref.finish_reason
    r = http.post("/v1/generate", json=dict(prompt=PROMPT, ignore_eos=ignore_eos, **BASE, **fields))
    assert r.status_code == 200 and r.json()["text"] == ref.text, r.text
    chat = http.post("/v1/chat/completions", json=dict(model="samp", messages=MESSAGES, ignore_eos=ignore_eos,
                                                       **BASE, **fields))
    ref_chat = offline.generate([MESSAGES], params)[0]
    assert chat.status_code == 200 and chat.json()["choices"][0]["message"]["content"] == ref_chat.text, chat.text


def test_plugin_args_and_priority_reach_the_plugins(oc, http):
    Recorder.seen.clear()
    oc.completions.create(model="samp", prompt="x", max_tokens=1, extra_body={"priority": 3})
    oc.chat.completions.create(model="samp", messages=MESSAGES, max_tokens=1,
                               extra_body={"plugin_args": {"tag": [1, "a"], "priority": 1}})
    r = http.post("/v1/generate", json={"prompt": "x", "max_tokens": 1, "plugin_args": {"tag": "n"}})
    assert r.status_code == 200, r.text
    assert Recorder.seen == [{"priority": 3}, {"tag": [1, "a"], "priority": 1}, {"tag": "n"}]

    cases = [({"plugin_args": {"nope": 1}}, "plugin_args", "plugin_args names 'nope', which no plugin"),
             ({"plugin_args": {"priority": -1}}, "plugin_args", "plugin 'recorder' refused the request: priority"),
             ({"priority": -2}, "priority", "plugin 'recorder' refused the request: priority must be >= 0"),
             ({"priority": 1, "plugin_args": {"priority": 2}}, "priority", "priority (1) and plugin_args.priority"),
             ({"plugin_args": ["priority"]}, "plugin_args", "plugin_args")]
    for extra, param, message in cases:
        for route, body in (("/v1/completions", {"model": "samp", "prompt": "x"}), ("/v1/generate", {"prompt": "x"})):
            r = http.post(route, json=dict(body, max_tokens=1, **extra))
            assert r.status_code == 400 and r.json()["error"]["param"] == param, (route, extra, r.text)
            assert message in r.json()["error"]["message"], r.text
    r = http.post("/v1/completions", json={"model": "samp", "prompt": "x", "plugin_args": {"nope": 1}})
    assert "'priority' (scheduling priority (test))" in r.json()["error"]["message"]  # the accepted ones listed
    r = http.post("/v1/completions", json={"model": "plain", "prompt": "x", "priority": 2})
    assert r.status_code == 400 and r.json()["error"]["param"] == "priority", r.text
    assert "no plugin of it reads a priority" in r.json()["error"]["message"]
    for ok in ({"priority": 0}, {"plugin_args": {}}):
        r = http.post("/v1/completions", json=dict({"model": "plain", "prompt": "x", "max_tokens": 1}, **ok))
        assert r.status_code == 200, r.text


BAD = [  # (route, extra fields, the field named)
    ("/v1/completions", {"presence_penalty": 3}, "presence_penalty"),
    ("/v1/completions", {"frequency_penalty": -2.5}, "frequency_penalty"),
    ("/v1/completions", {"repetition_penalty": 0}, "repetition_penalty"),
    ("/v1/completions", {"logit_bias": {"x": 1}}, "logit_bias"),
    ("/v1/completions", {"logit_bias": {"5": 101}}, "logit_bias"),
    ("/v1/completions", {"logit_bias": {"99999999": 1}}, "logit_bias"),
    ("/v1/completions", {"min_tokens": -1}, "min_tokens"),
    ("/v1/completions", {"min_p": 1.5}, "min_p"),
    ("/v1/completions", {"bad_words": [""]}, "bad_words"),
    ("/v1/completions", {"stop_token_ids": [-1]}, "stop_token_ids"),
    ("/v1/completions", {"stop_token_ids": [99999999]}, "stop_token_ids"),
    ("/v1/completions", {"logprobs": 21}, "logprobs"),
    ("/v1/completions", {"n": 0}, "n"),
    ("/v1/chat/completions", {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ("/v1/chat/completions", {"top_logprobs": 2}, "top_logprobs"),
    ("/v1/chat/completions", {"logprobs": 3}, "logprobs"),
    ("/v1/generate", {"logprobs": -1}, "logprobs"),
    ("/v1/generate", {"presence_penalty": "a"}, "presence_penalty"),
    ("/v1/generate/batch", {"bad_words_ids": [[]]}, "bad_words_ids"),
]


@pytest.mark.parametrize("route,extra,param", BAD, ids=[f"{r}-{next(iter(e))}" for r, e, _ in BAD])
def test_bad_sampling_values_are_refused_naming_the_field(http, route, extra, param):
    body = {"/v1/completions": {"model": "samp", "prompt": "x"}, "/v1/generate": {"prompt": "x"},
            "/v1/chat/completions": {"model": "samp", "messages": MESSAGES},
            "/v1/generate/batch": {"prompts": ["x"]}}[route]
    r = http.post(route, json=dict(body, max_tokens=2, **extra))
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and param in err["message"], err


def test_processor_fields_without_the_plugin_are_refused(make_server, tiny_llama_dir, monkeypatch):
    from tokenmill import host

    monkeypatch.setattr(host, "DEFAULT_PLUGINS", tuple(p for p in host.DEFAULT_PLUGINS if p != LOGITS_PLUGIN))
    bare = Pipeline.from_dict(tiny_pipeline_dict(tiny_llama_dir, name="bare"), progress=False)
    run = make_server([bare])
    assert LOGITS_PLUGIN not in plugin_names(run.service.workers["bare"])
    with run.client() as c:
        r = c.post("/v1/completions", json={"model": "bare", "prompt": "x", "presence_penalty": 1})
        assert r.status_code == 400 and r.json()["error"]["param"] == "presence_penalty", r.text
        assert f"needs the {LOGITS_PLUGIN} plugin" in r.json()["error"]["message"]
        assert c.post("/v1/completions", json={"model": "bare", "prompt": "x", "max_tokens": 2}).status_code == 200


def test_copies_not_yet_submitted_are_dropped_with_their_call(make_server, spare_pipeline):
    """A call whose first copy times out before its first token never submits the others; one that times out
    after submits and aborts them: either way nothing is left running and every block is free."""
    from tests.serve.helpers import Slow

    run = make_server([spare_pipeline], request_timeout=0.25)
    with run.client() as c:
        for n, delay in ((4, 0.4), (2, 0.1)):  # the first token after / before the deadline
            Slow.delay = delay
            r = c.post("/v1/completions", json={"model": "spare", "prompt": LONG, "n": n, "max_tokens": 40,
                                                "ignore_eos": True})
            assert r.status_code == 504, r.text
    Slow.delay = 0.0
    w = run.service.workers["spare"]
    wait_until(lambda: run.service.inflight == 0 and w.num_running == 0 and w.posted == w.received,
               what="no request left")
    with run.client() as c:
        kv = c.get("/v1/cache/stats?optimization=spare").json()
        assert kv["used_blocks"] == 0, kv
        assert c.post("/v1/completions", json={"model": "spare", "prompt": "x", "n": 2,
                                               "max_tokens": 2}).status_code == 200
    requests = httpx.get(run.base + "/metrics").text  # each copy counted once, submitted or not
    assert metric(requests, "tokenmill_requests_total", pipeline="spare", outcome="timeout") == 6


def test_token_bytes_are_the_tokens_exact_bytes(tokenizer):
    """A token holding part of a character reads as U+FFFD, but its bytes are exact: joined, the bytes of a text's
    tokens are the text (byte-level BPE, and SentencePiece-style byte fallback)."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    from tokenmill.serve.logprob_format import TokenTexts

    text = " héllo’ 😀 ok"
    texts = TokenTexts(tokenizer)
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert any(texts.get(i)[0].endswith("\ufffd") for i in ids)  # the emoji is split over tokens
    assert bytes(b for i in ids for b in texts.get(i)[1]).decode("utf-8") == text
    assert texts.get(tokenizer.eos_token_id)[0] == tokenizer.eos_token  # special tokens by name

    vocab = {"<unk>": 0, **{f"<0x{b:02X}>": b + 1 for b in range(256)}, "h": 257, "i": 258, "hi": 259}
    sp = Tokenizer(models.BPE(vocab=vocab, merges=[("h", "i")], byte_fallback=True, unk_token="<unk>"))
    sp.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
    fast = PreTrainedTokenizerFast(tokenizer_object=sp, unk_token="<unk>")
    texts = TokenTexts(fast)
    ids = fast.encode("hi😀", add_special_tokens=False)
    assert ids[0] == 259 and len(ids) == 5  # "hi", then the emoji's four bytes
    assert [texts.get(i)[1] for i in ids] == [[104, 105], [240], [159], [152], [128]]
