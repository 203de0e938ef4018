"""The built-in ``logits_processors`` end to end: greedy output token-identical to HF ``generate`` with HF's
processors, alone, batched with unconstrained requests and under speculative drafts; requests refused at
submit. Row-level checks are in test_processor_rows.py."""
from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM, LogitsProcessor, LogitsProcessorList

from tests.conftest import tiny_pipeline_dict
from tokenmill import Pipeline, Plugin, RequestError, SamplingParams, hookimpl
from tokenmill.host import PluginEntry, discover_plugins
from tokenmill.speculation import Draft

PROMPTS = ["Paris is", "<html>", "The weather today"]  # the tiny model revisits its context within N tokens
N = 12
LOOKUP = {"prompt_lookup": {"num_speculative_tokens": 3, "adaptive": False, "min_ngram": 1}}
CASES = ["repetition_penalty", "presence_penalty", "frequency_penalty", "logit_bias", "bad_words_ids", "bad_words",
         "min_tokens_stop_ids"]
DRAFTED = ["repetition_penalty", "frequency_penalty", "bad_words_ids", "min_tokens_stop_ids"]  # context-dependent


class OpenAIPenalties(LogitsProcessor):
    """The OpenAI presence / frequency penalty over the generated tokens, written densely for HF."""

    def __init__(self, prompt_len: int, presence: float, frequency: float) -> None:
        self.prompt_len, self.presence, self.frequency = prompt_len, presence, frequency

    def __call__(self, input_ids, scores):
        for b in range(scores.shape[0]):
            counts = torch.bincount(input_ids[b, self.prompt_len:], minlength=scores.shape[-1])[:scores.shape[-1]]
            scores[b] -= self.frequency * counts + self.presence * (counts > 0)
        return scores


class Oracle(Plugin):
    """Drafts the *unconstrained* greedy continuation (``CONTINUATIONS``: prompt ids -> prompt + output), as a
    chain or as a tree behind a decoy root: exactly what verification would accept if draft rows were left
    unprocessed, so a processor that skips them or reads the wrong context changes the output."""

    name = "oracle"

    @dataclass(slots=True)
    class Options:
        tree: bool = False

    @hookimpl
    def propose_tokens(self, seqs):
        out = []
        for seq in seqs:
            chain = CONTINUATIONS.get(tuple(seq.prompt_token_ids), [])[seq.num_tokens:seq.num_tokens + 3]
            if self.options.tree and chain:
                out.append(Draft([chain[0] + 1] + chain, parents=[-1, -1, 1, 2][:1 + len(chain)]))
            else:
                out.append(Draft(chain))
        return out


CONTINUATIONS: dict[tuple[int, ...], list[int]] = {}


def hf_generate(model, ids: list[int], n: int, eos: list[int] | None = None, **kwargs) -> list[int]:
    """HF greedy continuation (at most ``n`` tokens; EOS only the ``eos`` ids, stopping there)."""
    model.generation_config.eos_token_id = eos
    out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, pad_token_id=0, **kwargs)
    return out[0, len(ids):].tolist()


@pytest.fixture(scope="module")
def pipe(tiny_llama_dir):
    return Pipeline.from_dict(tiny_pipeline_dict(tiny_llama_dir), progress=False)


@pytest.fixture(scope="module")
def hf(tiny_llama_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def plain(pipe) -> list[list[int]]:
    """The unconstrained greedy outputs, from which the tests pick tokens to bias and ban."""
    return [r.token_ids for r in pipe.generate(PROMPTS, SamplingParams(max_tokens=N, ignore_eos=True))]


@pytest.fixture(scope="module")
def early_eos(plain, tokenizer) -> list[int]:
    """EOS ids the unconstrained run emits early: each prompt's second token, and the tokenizer's EOS."""
    return sorted({tokenizer.eos_token_id} | {out[1] for out in plain})


def spaced_word(tokenizer, tokens: list[int]) -> str:
    """The first output token that decodes to ' <letters>', as a bare word."""
    for t in tokens:
        text = tokenizer.decode([t])
        if re.fullmatch(r" [A-Za-z]{3,}", text):
            return text[1:]
    raise AssertionError("no word token in the output")


@pytest.fixture(scope="module")
def cases(plain, early_eos, tokenizer) -> dict[str, tuple[dict, object]]:
    """Per case: the SamplingParams fields, and the HF generate kwargs for a prompt of that many tokens."""
    a, b, c = plain
    words = [spaced_word(tokenizer, out) for out in plain]
    word_ids = [tokenizer.encode(t, add_special_tokens=False) for w in words for t in (w, " " + w)]
    bias = {a[0]: -10.0, b[0]: -10.0, c[0]: -10.0, 1234: 2.5}
    banned = [[a[0]], [b[2], b[3]], [c[4], c[5], c[6]]]
    return {
        "repetition_penalty": ({"repetition_penalty": 1.6}, lambda n: {"repetition_penalty": 1.6}),
        "presence_penalty": ({"presence_penalty": 1.5},
                             lambda n: {"logits_processor": LogitsProcessorList([OpenAIPenalties(n, 1.5, 0.0)])}),
        "frequency_penalty": ({"frequency_penalty": 2.0, "presence_penalty": -0.5},
                              lambda n: {"logits_processor": LogitsProcessorList([OpenAIPenalties(n, -0.5, 2.0)])}),
        "logit_bias": ({"logit_bias": bias}, lambda n: {"sequence_bias": {(t,): v for t, v in bias.items()}}),
        "bad_words_ids": ({"bad_words_ids": banned}, lambda n: {"bad_words_ids": banned}),
        "bad_words": ({"bad_words": words}, lambda n: {"bad_words_ids": word_ids}),
        "min_tokens_stop_ids": ({"min_tokens": 2, "stop_token_ids": early_eos},
                                lambda n: {"min_new_tokens": 2, "eos": early_eos}),
    }


@pytest.fixture(scope="module")
def expected(cases, hf, pipe) -> dict[str, list[list[int]]]:
    out = {}
    for name, (_, hf_kwargs) in cases.items():
        outs = []
        for prompt in PROMPTS:
            ids = pipe.encode(prompt)
            kwargs = dict(hf_kwargs(len(ids)))
            outs.append(hf_generate(hf, ids, N, eos=kwargs.pop("eos", None), **kwargs))
        out[name] = outs
    return out


def params_of(fields: dict) -> SamplingParams:
    return SamplingParams(max_tokens=N, ignore_eos="stop_token_ids" not in fields, **fields)


@pytest.mark.parametrize("case", CASES)
def test_matches_hf_and_changes_the_output(pipe, cases, expected, plain, early_eos, case):
    fields = cases[case][0]
    got = [r.token_ids for r in pipe.generate(PROMPTS, params_of(fields))]
    assert got == expected[case]
    if "stop_token_ids" in fields:  # what min_tokens changes: the same stop ids without it end at once
        plain = [r.token_ids for r in pipe.generate(PROMPTS, params_of({"stop_token_ids": early_eos}))]
        assert all(len(p) <= fields["min_tokens"] for p in plain)
    changed = [g != p for g, p in zip(got, plain)]
    assert all(changed), f"{case} left prompts {[i for i, c in enumerate(changed) if not c]} unchanged"
    assert not pipe.plugins["logits_processors"].requests  # per-request state dropped at the finish


def test_min_tokens_bans_the_models_eos(tiny_llama_dir, tmp_path, early_eos, expected):
    """EOS comes from the model (``PipelineContext.eos_token_ids``): a copy whose EOS ids it emits early. HF's
    run is the stop-ids case's (the same EOS ids, ``min_new_tokens=2``)."""
    model_dir = tmp_path / "early-eos"
    shutil.copytree(tiny_llama_dir, model_dir)
    gen = json.loads((model_dir / "generation_config.json").read_text())
    (model_dir / "generation_config.json").write_text(json.dumps(dict(gen, eos_token_id=early_eos)))
    eos_pipe = Pipeline.from_dict(tiny_pipeline_dict(model_dir), progress=False)
    free = eos_pipe.generate(PROMPTS, SamplingParams(max_tokens=3))
    held = eos_pipe.generate(PROMPTS, SamplingParams(max_tokens=N, min_tokens=2))
    for f, h, hf_out in zip(free, held, expected["min_tokens_stop_ids"]):
        assert f.finish_reason == "stop" and f.num_output_tokens <= 2  # without min_tokens it ends at once
        assert h.num_output_tokens >= 3 and not set(h.token_ids[:2]) & set(early_eos)
        assert h.token_ids == hf_out


def test_only_repetition_penalty_counts_the_prompt(pipe, hf, plain):
    """A prompt that stops where the model is about to repeat one of the prompt's own tokens: the repetition
    penalty counts it, presence and frequency (generated tokens only) do not; both as HF."""
    ids = pipe.encode(PROMPTS[1]) + plain[1][:4]
    rest = plain[1][4:]
    first = next(j for j, t in enumerate(rest) if t in ids + rest[:j])
    assert rest[first] in ids and rest[first] not in rest[:first]  # a prompt token comes back first
    rep = pipe.generate([ids], SamplingParams(max_tokens=N, ignore_eos=True, repetition_penalty=1.6))[0].token_ids
    assert rep[:first] == rest[:first] and rep != rest[:N]
    assert rep == hf_generate(hf, ids, N, repetition_penalty=1.6)
    params = SamplingParams(max_tokens=N, ignore_eos=True, presence_penalty=1.5, frequency_penalty=0.5)
    got = pipe.generate([ids], params)[0].token_ids
    assert got[:first + 1] == rest[:first + 1]  # the prompt token is not penalised
    openai = LogitsProcessorList([OpenAIPenalties(len(ids), 1.5, 0.5)])
    assert got == hf_generate(hf, ids, N, logits_processor=openai)


def test_batched_with_unconstrained_requests(pipe, cases, expected, plain):
    prompts = [p for _ in CASES for p in PROMPTS] + PROMPTS
    params = [params_of(cases[n][0]) for n in CASES for _ in PROMPTS] + [SamplingParams(max_tokens=N, ignore_eos=True)] * 3
    steps = pipe.engine.stats.steps
    got = [r.token_ids for r in pipe.generate(prompts, params)]
    assert got == [out for n in CASES for out in expected[n]] + plain
    assert pipe.engine.stats.steps - steps < N * len(prompts) / 4  # really batched (8 at a time)


def test_prompt_lookup_drafts_keep_outputs_exact(tiny_llama_dir, pipe, cases, expected):
    spec = Pipeline.from_dict(tiny_pipeline_dict(tiny_llama_dir, plugins=[LOOKUP]), loaded=pipe.loaded,
                              progress=False)
    prompts = [p for _ in DRAFTED for p in PROMPTS]
    got = [r.token_ids for r in spec.generate(prompts, [params_of(cases[n][0]) for n in DRAFTED for _ in PROMPTS])]
    assert got == [out for n in DRAFTED for out in expected[n]]
    stats = spec.stats()["spec"]
    assert stats["draft_tokens"] > 0 and 0 < stats["accepted_tokens"] < stats["draft_tokens"]


@pytest.mark.parametrize("tree", [False, True], ids=["chain", "tree"])
def test_drafts_of_the_unconstrained_output_are_rejected_exactly(tiny_llama_dir, pipe, plain, cases, expected,
                                                                 monkeypatch, tree):
    catalog = discover_plugins()
    catalog[Oracle.name] = PluginEntry(Oracle.name, f"{__name__}:Oracle", "tests")
    monkeypatch.setattr("tokenmill.spec.discover_plugins", lambda: catalog)
    monkeypatch.setattr("tokenmill.host.discover_plugins", lambda: catalog)
    for prompt, out in zip(PROMPTS, plain):
        ids = pipe.encode(prompt)
        monkeypatch.setitem(CONTINUATIONS, tuple(ids), ids + out)
    spec = Pipeline.from_dict(tiny_pipeline_dict(tiny_llama_dir, plugins=[{"oracle": {"tree": tree}}]),
                              loaded=pipe.loaded, progress=False)
    prompts = [p for _ in DRAFTED for p in PROMPTS]
    got = [r.token_ids for r in spec.generate(prompts, [params_of(cases[n][0]) for n in DRAFTED for _ in PROMPTS])]
    assert got == [out for n in DRAFTED for out in expected[n]]
    stats = spec.stats()["spec"]
    assert 0 < stats["accepted_tokens"] < stats["draft_tokens"]


# ----------------------------------------------------------------------------------------- validation
def test_token_ids_outside_the_vocabulary_are_refused(pipe):
    vocab = pipe.engine.vocab_size
    for fields, field in (({"logit_bias": {vocab: 1.0}}, "logit_bias"), ({"bad_words_ids": [[1, vocab]]},
                                                                        "bad_words_ids")):
        with pytest.raises(RequestError, match=f"{field} names token id {vocab}"):
            pipe.submit("hello", SamplingParams(**fields))
    assert not pipe.engine.has_unfinished()


def test_a_bad_word_with_no_tokens_is_refused_naming_it(pipe, monkeypatch):
    plugin = pipe.plugins["logits_processors"]
    real = plugin.tokenizer
    silent = SimpleNamespace(encode=lambda text, **kw: [] if text.strip() == "zzz" else real.encode(text, **kw))
    monkeypatch.setattr(plugin, "tokenizer", silent)
    with pytest.raises(RequestError, match=r"plugin 'logits_processors' refused the request: bad_words entry 'zzz'"):
        pipe.submit("hello", SamplingParams(bad_words=["fine", "zzz"]))
    assert not plugin.requests and not pipe.engine.has_unfinished()
