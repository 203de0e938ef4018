"""The logits phase: ``process_logits`` (draft rows, in-place edits, failure isolation), per-request
``plugin_args`` (``request_args`` / ``check_request``), ``request_finished``, and raw-logit logprobs."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.conftest import tiny_pipeline_dict
from tests.engine.test_hf_equality import hf_greedy
from tokenmill import Pipeline, Plugin, RequestError, SamplingParams, hookimpl
from tokenmill.host import PluginEntry, discover_plugins

PROMPTS = ["one two three one two three one two", "The cat sat on the mat. The cat", "In 1492, a sailor named"]
LOOKUP = {"prompt_lookup": {"num_speculative_tokens": 3, "adaptive": False, "min_ngram": 1}}


class Banner(Plugin):
    """For requests with ``plugin_args={"ban": token}``, bans that token at every row; with ``{"ban_at": [n,
    token]}`` bans it only as output token ``n`` (0-based), which on a draft row needs ``follows`` to be right.
    Logs the rows that follow drafts, the rows ``ban_at`` fired on, and which requests finished."""

    name = "banner"

    def __init__(self, options=None) -> None:
        super().__init__(options)
        self.draft_rows = 0
        self.fired: list[list[int]] = []  # the drafts the row followed, each time ban_at fired
        self.finished: list[tuple[str, str]] = []

    @hookimpl
    def request_args(self):
        return {"ban": "a token id never generated", "ban_at": "[n, token]: never output token n",
                "explode": "a processor failure (testing)"}

    @hookimpl
    def check_request(self, seq):
        ban = seq.params.plugin_args.get("ban")
        if ban is not None and (not isinstance(ban, int) or ban < 0):
            raise ValueError(f"plugin_args['ban'] must be a token id (integer >= 0), got {ban!r}")

    @hookimpl
    def process_logits(self, batch):
        for i, seq in enumerate(batch.seqs):
            args = seq.params.plugin_args
            if args.get("explode"):
                raise RuntimeError("processor bug")
            for k in range(1 + len(batch.drafts[i])):
                follows = batch.follows(i, k)
                self.draft_rows += bool(follows)
                row = batch.logits[batch.row_start[i] + k]
                if "ban" in args:
                    row[args["ban"]] = float("-inf")
                if "ban_at" in args and seq.num_output_tokens + len(follows) == args["ban_at"][0]:
                    row[args["ban_at"][1]] = float("-inf")
                    self.fired.append(follows)

    @hookimpl
    def request_finished(self, seq):
        self.finished.append((seq.request_id, seq.finish_reason))


def build(tiny_llama_dir, monkeypatch, *plugins):
    catalog = discover_plugins()
    catalog[Banner.name] = PluginEntry(Banner.name, f"{__name__}:Banner", "tests")
    monkeypatch.setattr("tokenmill.spec.discover_plugins", lambda: catalog)
    monkeypatch.setattr("tokenmill.host.discover_plugins", lambda: catalog)
    paged = [{"continuous_batching": {}}, {"paged_kv": {"block_size": 4, "num_blocks": 96}}]
    return Pipeline.from_dict(tiny_pipeline_dict(tiny_llama_dir, plugins=["banner", *plugins, *paged]),
                              progress=False)


@pytest.fixture(scope="module")
def plain(tiny_llama_dir):
    pipe = Pipeline.from_dict(tiny_pipeline_dict(tiny_llama_dir), progress=False)
    return [r.token_ids for r in pipe.generate(PROMPTS, SamplingParams(max_tokens=16, ignore_eos=True))]


def test_a_processor_edit_decides_the_tokens(tiny_llama_dir, monkeypatch, plain):
    pipe = build(tiny_llama_dir, monkeypatch)
    banned = plain[0][3]
    params = [SamplingParams(max_tokens=16, ignore_eos=True, plugin_args={"ban": banned}),
              SamplingParams(max_tokens=16, ignore_eos=True), SamplingParams(max_tokens=16, ignore_eos=True)]
    out = [r.token_ids for r in pipe.generate(PROMPTS, params)]
    assert banned not in out[0] and out[0][:3] == plain[0][:3]
    assert out[1:] == plain[1:]  # its neighbours in the batch are untouched
    hf = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = None
    prompt = pipe.encode(PROMPTS[0])
    ref = hf.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False, pad_token_id=0,
                      bad_words_ids=[[banned]])[0, len(prompt):].tolist()
    assert out[0] == ref
    assert [reason for _, reason in pipe.plugins["banner"].finished] == ["length"] * 3
    assert pipe.stats()["kv"]["used_blocks"] == 0


def test_draft_rows_are_processed_at_the_positions_they_predict(tiny_llama_dir, monkeypatch):
    """Output token n is banned; prompt lookup drafts it after a repeated token, so the row deciding it follows
    a draft: the speculative run must equal plain decoding under the same processor."""
    prompt = "abc abc abc abc"
    unconstrained = build(tiny_llama_dir, monkeypatch).generate(prompt, SamplingParams(max_tokens=20,
                                                                                      ignore_eos=True))[0].token_ids
    # a token whose earlier occurrence is followed by the same two tokens: prompt lookup drafts those two
    k = next(k for k in range(1, 17) for j in range(k)
             if unconstrained[j:j + 3] == unconstrained[k:k + 3])
    n, token = k + 2, unconstrained[k + 2]
    params = SamplingParams(max_tokens=20, ignore_eos=True, plugin_args={"ban_at": [n, token]})
    plain = build(tiny_llama_dir, monkeypatch).generate(prompt, params)[0].token_ids
    assert plain[:n] == unconstrained[:n] and plain[n] != token
    spec = build(tiny_llama_dir, monkeypatch, LOOKUP)
    assert spec.generate(prompt, params)[0].token_ids == plain
    banner = spec.plugins["banner"]
    assert banner.draft_rows > 0 and any(banner.fired), "the ban never fired on a row that follows drafts"


def test_a_failing_processor_fails_only_its_request(tiny_llama_dir, monkeypatch, plain):
    pipe = build(tiny_llama_dir, monkeypatch)
    params = [SamplingParams(max_tokens=16, ignore_eos=True, plugin_args={"explode": True}),
              SamplingParams(max_tokens=16, ignore_eos=True), SamplingParams(max_tokens=16, ignore_eos=True)]
    bad, *ok = pipe.generate(PROMPTS, params)
    assert bad.finish_reason == "error"
    assert bad.error == "plugin 'banner' failed in process_logits: RuntimeError: processor bug"
    assert [r.token_ids for r in ok] == plain[1:]
    assert pipe.stats()["kv"]["used_blocks"] == 0
    assert sorted(reason for _, reason in pipe.plugins["banner"].finished) == ["error", "length", "length"]


def test_plugin_args_are_checked_at_submit_and_nothing_is_queued(tiny_llama_dir, monkeypatch):
    pipe = build(tiny_llama_dir, monkeypatch)
    with pytest.raises(RequestError, match=r"plugin_args names 'priority', which no plugin of this pipeline "
                                           r"reads; the plugin arguments it accepts: 'ban' \("):
        pipe.submit("hi", SamplingParams(plugin_args={"priority": 3}))
    with pytest.raises(RequestError, match=r"plugin 'banner' refused the request: plugin_args\['ban'\] must be a "
                                           r"token id \(integer >= 0\), got -1"):
        pipe.submit("hi", SamplingParams(plugin_args={"ban": -1}))
    assert not pipe.engine.waiting and not pipe.engine.requests
    assert [reason for _, reason in pipe.plugins["banner"].finished] == ["error"]  # told, to drop its state


def test_token_ids_outside_the_vocabulary_are_refused(tiny_pipeline):
    vocab = tiny_pipeline.engine.vocab_size
    for params, field in ((SamplingParams(logit_bias={vocab: 1.0}), "logit_bias"),
                          (SamplingParams(stop_token_ids=[vocab + 5]), "stop_token_ids"),
                          (SamplingParams(bad_words_ids=[[1, vocab]]), "bad_words_ids")):
        with pytest.raises(RequestError, match=f"{field} names token id .* outside this model's vocabulary"):
            tiny_pipeline.submit("hi", params)
    assert not tiny_pipeline.engine.waiting


@pytest.mark.parametrize("drafts", [False, True])
def test_logprobs_are_the_raw_models_log_softmax(tiny_llama_dir, monkeypatch, drafts):
    pipe = build(tiny_llama_dir, monkeypatch, *([LOOKUP] if drafts else []))
    hf = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    params = SamplingParams(max_tokens=20, ignore_eos=True, logprobs=3)
    prompts = ["abc abc abc abc", PROMPTS[1], PROMPTS[2]]  # the first repeats itself: drafts get accepted
    results = pipe.generate(prompts, [params, SamplingParams(max_tokens=20, ignore_eos=True), params])
    assert results[1].logprobs is None
    for res in results[::2]:
        ids = res.prompt_token_ids + res.token_ids
        with torch.no_grad():
            ref = torch.log_softmax(hf(torch.tensor([ids])).logits[0].float(), -1)
        assert res.token_ids == hf_greedy(hf, res.prompt_token_ids, 20)
        assert [lp.token_id for lp in res.logprobs] == res.token_ids
        for j, lp in enumerate(res.logprobs):
            row = ref[len(res.prompt_token_ids) - 1 + j]
            assert abs(lp.logprob - float(row[lp.token_id])) < 1e-4
            top = row.topk(3)
            assert [t for t, _ in lp.top] == top.indices.tolist()
            assert max(abs(v - float(w)) for (_, v), w in zip(lp.top, top.values)) < 1e-4
    if drafts:
        assert pipe.stats()["spec"]["accepted_tokens"] > 0


def test_logprobs_follow_the_stream(tiny_pipeline):
    chunks = list(tiny_pipeline.stream("hello there", SamplingParams(max_tokens=6, ignore_eos=True, logprobs=0)))
    streamed = [lp for c in chunks for lp in (c.logprobs or [])]
    final = chunks[-1].output
    assert [lp.token_id for lp in streamed] == final.token_ids == [lp.token_id for lp in final.logprobs]
    assert all(lp.top == [] and lp.logprob <= 0 for lp in streamed)
