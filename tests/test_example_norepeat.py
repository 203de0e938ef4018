"""The example third-party logits processor (examples/tokenmill-norepeat): found through its entry point, named
in a pipeline, token-identical to HF ``generate(no_repeat_ngram_size=n)``, its argument checked at submit."""
from __future__ import annotations

import random
import re
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.generation.logits_process import NoRepeatNGramLogitsProcessor

from conftest import tiny_pipeline_dict
from tokenmill import Pipeline, RequestError, SamplingParams
from tokenmill.host import discover_plugins, hooks_implemented

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "tokenmill-norepeat"
INSTALL_HINT = "pip install -e examples/tokenmill-norepeat --no-deps"
PROMPTS = ["Paris is", "The weather today", "abc abc abc abc"]
N = 16
LOOKUP = {"prompt_lookup": {"num_speculative_tokens": 3, "adaptive": False, "min_ngram": 1}}


def norepeat_or_fail():
    """The discovered entry point and its class; the calling test fails (never skips) when the example is not
    installed."""
    found = discover_plugins()
    if "norepeat" not in found:
        pytest.fail(f"the example plugin 'norepeat' is not installed: run `{INSTALL_HINT}` from the repository "
                    f"root (discovered plugins: {', '.join(sorted(found))})", pytrace=False)
    return found["norepeat"], found["norepeat"].load()


def test_entry_point_is_discovered_from_this_checkout():
    entry, cls = norepeat_or_fail()
    text = (EXAMPLE / "pyproject.toml").read_text(encoding="utf-8")
    dist = re.search(r'^name\s*=\s*"([^"]+)"', text, re.M).group(1)
    assert entry.value == "tokenmill_norepeat:NoRepeatNGram"
    assert re.sub(r"[-_.]+", "-", entry.distribution).lower() == dist
    assert hooks_implemented(cls) == ["check_request", "process_logits", "request_args", "request_finished"]
    import tokenmill_norepeat

    assert Path(tokenmill_norepeat.__file__).resolve().is_relative_to(EXAMPLE.resolve()), (
        f"tokenmill_norepeat is imported from {tokenmill_norepeat.__file__}, not this checkout; run `{INSTALL_HINT}`")


def test_banned_tokens_match_hfs_processor_on_random_contexts():
    """``NGrams.banned(tokens, follows)``, caught up in uneven steps, is what HF's processor bans after
    ``tokens + follows``: n-grams inside the drafts count too."""
    norepeat_or_fail()
    from tokenmill_norepeat import NGrams

    rng = random.Random(0)
    for _ in range(300):
        n = rng.randint(1, 4)
        tokens = [rng.randrange(5) for _ in range(rng.randint(1, 10))]
        follows = [rng.randrange(5) for _ in range(rng.randint(0, 5))]
        ngrams = NGrams(n)
        for cut in sorted(rng.sample(range(len(tokens) + 1), 2)):
            ngrams.catch_up(tokens[:cut])
        ngrams.catch_up(tokens)
        scores = NoRepeatNGramLogitsProcessor(n)(torch.tensor([tokens + follows]), torch.zeros(1, 5))
        assert ngrams.banned(tokens, follows) == set(torch.isinf(scores[0]).nonzero().flatten().tolist()), \
            (n, tokens, follows)


@pytest.fixture(scope="module")
def pipes(tiny_llama_dir):
    norepeat_or_fail()
    plain = Pipeline.from_dict(tiny_pipeline_dict(tiny_llama_dir, plugins=["norepeat"]), progress=False)
    spec = Pipeline.from_dict(tiny_pipeline_dict(tiny_llama_dir, plugins=["norepeat", LOOKUP]), loaded=plain.loaded,
                              progress=False)
    return plain, spec


def hf_no_repeat(model, ids: list[int], size: int | None) -> list[int]:
    model.generation_config.eos_token_id = None
    extra = {} if size is None else {"no_repeat_ngram_size": size}
    out = model.generate(torch.tensor([ids]), max_new_tokens=N, do_sample=False, pad_token_id=0, **extra)
    return out[0, len(ids):].tolist()


@pytest.mark.parametrize("size", [1, 2, 3])
def test_greedy_output_matches_hf_no_repeat_ngram_size(pipes, tiny_llama_dir, size):
    pipe, spec = pipes
    hf = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    params = SamplingParams(max_tokens=N, ignore_eos=True, plugin_args={"no_repeat_ngram_size": size})
    free = SamplingParams(max_tokens=N, ignore_eos=True)
    # batched with a request that does not ask for it, and again under prompt-lookup drafts
    got = pipe.generate(PROMPTS + PROMPTS, [params] * 3 + [free] * 3)
    drafted = spec.generate(PROMPTS, params)
    changed = 0
    for prompt, res, plain, draft_res in zip(PROMPTS, got[:3], got[3:], drafted):
        ids = pipe.encode(prompt)
        assert res.token_ids == hf_no_repeat(hf, ids, size), prompt
        assert plain.token_ids == hf_no_repeat(hf, ids, None)
        assert draft_res.token_ids == res.token_ids
        changed += res.token_ids != plain.token_ids
    assert changed  # the processor really decided some tokens
    if size > 1:  # (size 1 bans every token of the context, so prompt lookup never finds a match to draft from)
        assert spec.stats()["spec"]["draft_tokens"] > 0
    assert not pipe.plugins["norepeat"].requests and not spec.plugins["norepeat"].requests


@pytest.mark.parametrize("value", [0, -2, "3", 2.0, True, None])
def test_a_bad_size_is_refused_at_submit_naming_the_plugin_and_key(pipes, value):
    pipe = pipes[0]
    with pytest.raises(RequestError, match=r"plugin 'norepeat' refused the request: "
                                           r"plugin_args\['no_repeat_ngram_size'\] must be an integer >= 1") as err:
        pipe.submit("hello", SamplingParams(plugin_args={"no_repeat_ngram_size": value}))
    assert err.value.plugin == "norepeat"
    assert not pipe.engine.has_unfinished() and not pipe.plugins["norepeat"].requests


def test_a_pipeline_without_the_plugin_refuses_the_key(pipes, tiny_llama_dir):
    bare = Pipeline.from_dict(tiny_pipeline_dict(tiny_llama_dir), loaded=pipes[0].loaded, progress=False)
    with pytest.raises(RequestError, match="plugin_args names 'no_repeat_ngram_size', which no plugin"):
        bare.submit("hello", SamplingParams(plugin_args={"no_repeat_ngram_size": 2}))
