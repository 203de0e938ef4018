"""Speculative decoding: exact greedy equality with every drafter, exact sampling law, KV rollback."""
from __future__ import annotations

import pytest
import torch

from tests.conftest import make_tiny_model, tiny_pipeline_dict
from tokenmill import Pipeline, SamplingParams
from tokenmill.plugins.speculative.prompt_lookup import lookup
from tokenmill import sampling, speculation
from tokenmill.plugin import hookimpl

PROMPTS = ["one two three one two three one two", "abc abc abc abc", "x", "The cat sat on the mat. The cat"]
PAGED = [{"continuous_batching": {}}, {"paged_kv": {"block_size": 4, "num_blocks": 96}}]


@pytest.fixture(scope="module")
def other_tiny(tmp_path_factory, tokenizer):
    """A second random model with the same tokenizer: a weak but valid draft model."""
    return make_tiny_model("llama", tmp_path_factory.mktemp("draft"), tokenizer, num_hidden_layers=1,
                           hidden_size=32, intermediate_size=64)


@pytest.fixture(scope="module")
def reference(tiny_llama_dir):
    pipe = Pipeline.from_dict(tiny_pipeline_dict(tiny_llama_dir), progress=False)
    return [r.token_ids for r in pipe.generate(PROMPTS, SamplingParams(max_tokens=16, ignore_eos=True))]


def drafters(tiny_llama_dir, other_tiny):
    return {
        "prompt_lookup": {"prompt_lookup": {"num_speculative_tokens": 3, "adaptive": False, "min_ngram": 1}},
        "draft_model_self": {"speculative": {"draft": str(tiny_llama_dir), "adaptive": False}},
        "draft_model_other": {"speculative": {"draft": str(other_tiny), "num_speculative_tokens": 3,
                                              "adaptive": False}},
        "draft_model_lookup": {"speculative": {"draft": str(other_tiny), "num_speculative_tokens": 3,
                                               "adaptive": False, "lookup_ngram": 2, "lookup_tokens": 5}},
    }


@pytest.mark.parametrize("drafter", ["prompt_lookup", "draft_model_self", "draft_model_other", "draft_model_lookup"])
@pytest.mark.parametrize("batching", ["fcfs", "continuous"])
def test_greedy_identical_to_plain(tiny_llama_dir, other_tiny, reference, drafter, batching):
    plugins = [drafters(tiny_llama_dir, other_tiny)[drafter]] + (PAGED if batching == "continuous" else [])
    pipe = Pipeline.from_dict(tiny_pipeline_dict(tiny_llama_dir, plugins=plugins), progress=False)
    params = SamplingParams(max_tokens=16, ignore_eos=True)
    if batching == "fcfs":  # batch 1
        out = [pipe.generate(p, params)[0].token_ids for p in PROMPTS]
    else:                   # mixed requests in one continuous batch
        out = [r.token_ids for r in pipe.generate(PROMPTS, params)]
    assert out == reference
    spec = pipe.stats()["spec"]
    if drafter == "draft_model_self":
        assert spec["acceptance_rate"] == 1.0 and spec["mean_tokens_per_step"] > 4
    if drafter != "prompt_lookup":
        assert spec["draft_tokens"] > 0
    assert pipe.stats()["kv"]["used_blocks"] == 0
    if batching == "continuous":
        pipe.pm.get_plugin("paged_kv").manager.check()


def test_rejected_drafts_are_rolled_back_in_paged_kv(tiny_llama_dir, other_tiny):
    plugins = [drafters(tiny_llama_dir, other_tiny)["draft_model_other"]] + PAGED
    pipe = Pipeline.from_dict(tiny_pipeline_dict(tiny_llama_dir, plugins=plugins), progress=False)
    manager = pipe.pm.get_plugin("paged_kv").manager
    rid = pipe.submit("roll back please", SamplingParams(max_tokens=12, ignore_eos=True))
    while pipe.engine.has_unfinished():
        pipe.step()
        seq = pipe.engine.requests[rid]
        if not seq.is_finished:  # never more blocks than the accepted tokens need
            assert len(manager.tables[seq.seq_id]) == -(-seq.num_computed_tokens // 4)
            assert seq.block_table == manager.tables[seq.seq_id]  # the engine's view drops the released blocks
        manager.check()
    spec = pipe.stats()["spec"]
    assert spec["accepted_tokens"] < spec["draft_tokens"]  # some drafts really were rejected


def test_prompt_lookup_finds_latest_longest_match():
    assert lookup([1, 2, 3, 9, 1, 2, 3, 7, 1, 2, 3], 3, 1, 2, 100) == [7, 1]
    assert lookup([4, 5, 6], 3, 1, 2, 100) == []
    assert lookup([5, 1, 5], 2, 1, 3, 100) == [1, 5]


# ----------------------------------------------------------------- the sampling law
V = 12


def tables(seed: int):
    g = torch.Generator().manual_seed(seed)
    target1 = torch.randn(V, generator=g) * 1.5
    target2 = torch.randn(V, V, generator=g) * 1.5       # row x: logits of the 2nd token after 1st = x
    draft1 = torch.randn(V, generator=g)
    draft2 = torch.randn(V, V, generator=g)
    return target1, target2, draft1, draft2


def emitted_pairs(n: int, params: SamplingParams, seed: int = 0):
    """Run speculative verification for n request seeds with k=2 drafts drawn (from another distribution)
    with the request's noise; return (first, second) token pairs, where a missing second token is drawn the
    way the next engine step would (from the target, at position 1)."""
    t1, t2, d1, d2 = tables(seed)
    q1 = sampling.filtered_probs(d1, params)
    firsts, pairs, accepted = [], [], 0
    for req in range(n):
        x1 = sampling.draw(q1, req, 0)
        x2 = sampling.draw(sampling.filtered_probs(d2[x1], params), req, 1)
        logits = torch.stack([t1, t2[x1], torch.zeros(V)])
        out = speculation.verify_drafts(logits, [x1, x2], params, req, 0)
        accepted += len(out) - 1
        if len(out) == 1:
            out.append(sampling.draw(sampling.filtered_probs(t2[out[0]], params), req, 1))
        firsts.append(out[0])
        pairs.append((out[0], out[1]))
    assert accepted > n // 10  # the coupled drafts really are accepted, often
    return firsts, pairs


def chi2_stat(counts: torch.Tensor, probs: torch.Tensor) -> tuple[float, int]:
    keep = probs * counts.sum() >= 5  # classes with enough expected mass
    expected = probs[keep] * counts.sum()
    observed = counts[keep].float()
    rest_e = counts.sum() - expected.sum()
    rest_o = counts.sum() - observed.sum()
    stat = float(((observed - expected) ** 2 / expected).sum())
    if rest_e >= 5:
        stat += float((rest_o - rest_e) ** 2 / rest_e)
    return stat, int(keep.sum())


def law_statistics(params: SamplingParams, n: int = 20_000) -> list[tuple[float, int]]:
    t1, t2, _, _ = tables(0)
    firsts, pairs = emitted_pairs(n, params)
    out = [chi2_stat(torch.bincount(torch.tensor(firsts), minlength=V), sampling.filtered_probs(t1, params))]
    top = max(range(V), key=lambda x: firsts.count(x))  # condition on the most frequent first token
    seconds = [b for a, b in pairs if a == top]
    out.append(chi2_stat(torch.bincount(torch.tensor(seconds), minlength=V),
                         sampling.filtered_probs(t2[top], params)))
    return out


# 99.9th percentile of chi-square with df = classes - 1 (+1 for the lumped rest): generous for <= 13 classes
CRIT = {d: c for d, c in zip(range(1, 14), [10.8, 13.8, 16.3, 18.5, 20.5, 22.5, 24.3, 26.1, 27.9, 29.6, 31.3,
                                              32.9, 34.5])}


@pytest.mark.parametrize("params", [SamplingParams(temperature=1.0), SamplingParams(temperature=1.0, top_p=0.8)])
def test_speculative_sampling_keeps_the_target_law(params):
    for stat, classes in law_statistics(params):
        assert stat < CRIT[classes], (stat, classes)


def test_law_test_catches_a_verifier_that_trusts_the_drafts(monkeypatch):
    # accepting every draft emits the draft's law, not the target's: the chi-square test must see it
    monkeypatch.setattr(speculation.accept, "verify_tree", lambda logits, drafts, *a: list(drafts) + [0])
    stats = law_statistics(SamplingParams(temperature=1.0))
    assert any(stat > 3 * CRIT[classes] for stat, classes in stats), stats


def test_draws_are_a_function_of_seed_and_position_only():
    probs = torch.softmax(torch.randn(50, generator=torch.Generator().manual_seed(3)), -1)
    a = [sampling.draw(probs, 7, pos) for pos in range(40)]
    assert a == [sampling.draw(probs.clone(), 7, pos) for pos in range(40)]  # no hidden stream state
    assert a != [sampling.draw(probs, 8, pos) for pos in range(40)]
    assert len(set(a)) > 5                                                   # positions differ
    zeroed = probs.clone()
    zeroed[a[0]] = 0.0
    assert sampling.draw(zeroed / zeroed.sum(), 7, 0) != a[0]                 # a zero-probability token never wins


def ask(drafter, seqs, num_tokens):
    """``propose_tokens`` as the engine calls it, for sequences without hidden states and no KV to reserve."""
    return drafter.propose_tokens(seqs=seqs, num_tokens=num_tokens, hidden=[None] * len(seqs), kv=None)


def test_adaptive_drafter_learns_acceptance_per_sequence_and_plans_depths():
    """``adaptive``: the drafter learns each sequence's acceptance from the tokens it gained after a draft,
    feeds the step-cost curve from ``step_end``, and gives a sequence whose drafts keep failing no draft while
    one whose drafts land keeps drafting; a compute-bound batch drafts nothing."""
    from tokenmill.hooktypes import StepStats
    from tokenmill.plugins.speculative.base import DrafterPlugin
    from tokenmill.sequence import Sequence, SeqStatus

    class Fives(DrafterPlugin):
        name = "fives"

        def draft(self, seqs, depth, *, hidden, kv):
            return [[5] * depth for _ in seqs]

    plugin = Fives(DrafterPlugin.Options(num_speculative_tokens=4))
    good = Sequence(0, "good", [1, 2, 3], SamplingParams(max_tokens=64), 0.0)
    bad = Sequence(1, "bad", [7, 8, 9], SamplingParams(max_tokens=64), 0.0)
    for s in (good, bad):
        s.token_ids.append(4)  # one output token each: both decode
    for n in (2, 4, 8, 16):  # a verify token costs a tenth of a decode step
        plugin.step_end(StepStats(1, 2, 0, 2, 2, 64, 0.0, 0.1 + 0.01 * n, 0, 2, 0, num_forward_tokens=n))
    for _ in range(6):
        drafts = ask(plugin, [good, bad], 2)
        assert drafts is not None
        good.token_ids += drafts[0].tokens + [0]  # every draft of `good` accepted
        bad.token_ids += [0]  # every draft of `bad` rejected at its first token
    assert plugin.acceptance.rate(good.seq_id) > 0.8 > 0.4 > plugin.acceptance.rate(bad.seq_id)
    drafts = ask(plugin, [good, bad], 2)
    assert len(drafts[0].tokens) == 4 and drafts[1].tokens == []
    # a batch of 64 where every forwarded token costs as much as a decode row: no speculation at all
    for n in (64, 128, 256, 512):
        plugin.step_end(StepStats(1, 64, 0, 64, 64, 512, 0.0, 0.01 * n, 0, 64, 0, num_forward_tokens=n))
    before = plugin.steps_off
    assert ask(plugin, [good] * 64, 64) is None and plugin.steps_off == before + 1
    # a step that also computes another request's prompt tokens drafts nothing, however cheap drafts look
    assert ask(plugin, [good], 1) is not None
    assert ask(plugin, [good], 1 + 300) is None and plugin.steps_off == before + 2
    good.status = bad.status = SeqStatus.FINISHED
    ask(plugin, [], 0)
    assert not plugin._drafted  # finished sequences are forgotten


def test_compiled_self_draft_is_exact_and_accepted(tiny_llama_dir, reference):
    """``compile_draft``: the draft's single-token steps run through torch.compile (bucketed batches); the
    self_int8 draft of a tiny model agrees with its target almost always, and output stays exact."""
    plugins = [{"speculative": {"draft": "self_int8", "compile_draft": True, "adaptive": False}}] + PAGED
    pipe = Pipeline.from_dict(tiny_pipeline_dict(tiny_llama_dir, plugins=plugins), progress=False)
    assert pipe.wait_ready()  # the draft compiles in the background; wait so every step may speculate
    out = [r.token_ids for r in pipe.generate(PROMPTS, SamplingParams(max_tokens=16, ignore_eos=True))]
    assert out == reference
    drafter = pipe.pm.get_plugin("speculative")
    assert drafter.runner.runner.compiled
    spec = pipe.stats()["spec"]
    assert spec["draft_tokens"] > 0 and spec["acceptance_rate"] > 0.5
    assert pipe.stats()["kv"]["used_blocks"] == 0
    # above the compiled draft's largest bucket there is no speculation (the eager draft is slower there)
    from types import SimpleNamespace

    assert drafter.batch_limit == 16
    seqs = [SimpleNamespace(seq_id=i, num_tokens=4, num_output_tokens=1) for i in range(17)]
    assert ask(drafter, seqs, 17) is None


def test_self_draft_defaults_and_overrides():
    from tokenmill.plugins.speculative.draft_model import Speculative, self_draft_options

    assert self_draft_options("int4", 1000, None) == {"group_size": 32, "lm_head_int8_rows": 1000}
    assert self_draft_options("int4", 1000, {"group_size": 64}) == {"group_size": 64, "lm_head_int8_rows": 1000}
    assert self_draft_options("int8", 1000, None) == {}
    with pytest.raises(ValueError, match="compile_mode must be one of"):
        Speculative.Options(compile_mode="fastest")


def test_prompt_lookup_caps_drafts_of_short_matches():
    from tokenmill.plugins.speculative.prompt_lookup import PromptLookup, lookup_match
    from tokenmill.sequence import Sequence

    assert lookup_match([1, 2, 3, 9, 1, 2, 3, 7, 8, 1, 2, 3], 3, 1, 4, 100) == ([7, 8, 1, 2], 3)
    assert lookup_match([5, 6, 7, 5], 3, 1, 4, 100) == ([6, 7, 5], 1)
    plugin = PromptLookup(PromptLookup.Options(num_speculative_tokens=4, short_draft_tokens=1, adaptive=False))
    strong = Sequence(0, "a", [1, 2, 3, 9, 1, 2, 3, 7, 8, 1, 2, 3], SamplingParams(max_tokens=4), 0.0)
    weak = Sequence(1, "b", [5, 6, 7, 5], SamplingParams(max_tokens=4), 0.0)
    Draft = speculation.Draft
    assert plugin.copies([strong, weak], 4) == [Draft([7, 8, 1, 2], kind=3), Draft([6], kind=1)]  # kind: the n-gram
    assert plugin.copies([strong, weak], 2) == [Draft([7, 8], kind=3), Draft([6], kind=1)]
    with pytest.raises(ValueError, match="short_draft_tokens must be >= 1"):
        PromptLookup.Options(short_draft_tokens=0)
    with pytest.raises(ValueError, match="full_draft_ngram must be in 1..max_ngram"):
        PromptLookup.Options(full_draft_ngram=5)


class TreeOracle:
    """An inline drafter proposing a draft *tree* whose true path (from ``reference``) hides among wrong
    siblings and takes non-consecutive slots, so the engine must mask by ancestry and move the path's K/V."""

    name = "tree_oracle"

    def __init__(self, reference: dict, vocab: int) -> None:
        self.reference, self.vocab = reference, vocab

    @hookimpl
    def propose_tokens(self, seqs):
        from tokenmill.speculation import Draft

        out = []
        for seq in seqs:
            ref = self.reference.get(tuple(seq.prompt_token_ids), [])
            t = ref[seq.num_output_tokens:seq.num_output_tokens + 3]
            if len(t) < 3:
                out.append(Draft([]))
                continue
            w = [(x + 1) % self.vocab for x in t]
            #       wrong  true  (under wrong) true  wrong  wrong  true
            tokens = [w[0], t[0], t[1], t[1], w[1], w[2], t[2]]
            out.append(Draft(tokens, parents=[-1, -1, 0, 1, 1, 3, 3]))
        return out


@pytest.mark.parametrize("batching", ["fcfs", "continuous"])
def test_draft_tree_is_exact_and_moves_accepted_kv(tiny_llama_dir, reference, batching):
    plugins = PAGED if batching == "continuous" else []
    pipe = Pipeline.from_dict(tiny_pipeline_dict(tiny_llama_dir, plugins=plugins), progress=False)
    params = SamplingParams(max_tokens=16, ignore_eos=True)
    ids = [tuple(pipe.tokenizer(p)["input_ids"]) for p in PROMPTS]
    pipe.pm.register(TreeOracle(dict(zip(ids, reference)), pipe.loaded.model.config.vocab_size))
    if batching == "fcfs":
        out = [pipe.generate(p, params)[0].token_ids for p in PROMPTS]
    else:
        out = [r.token_ids for r in pipe.generate(PROMPTS, params)]
    assert out == reference
    spec = pipe.stats()["spec"]
    # every tree holds the true path at depth 3: 3 accepted + 1 per step
    assert spec["acceptance_rate"] == 1.0 and spec["mean_tokens_per_step"] > 3
    assert pipe.stats()["kv"]["used_blocks"] == 0


def test_tree_verification_follows_the_targets_choice():
    logits = torch.full((5, 8), -5.0)
    for row, best in enumerate([2, 0, 6, 0, 7]):  # root, then after drafts 0..3
        logits[row, best] = 5.0
    drafts, parents = [5, 2, 3, 6], [-1, -1, 1, 1]   # root -> {5, 2}; 2 -> {3, 6}
    assert speculation.verify_tree(logits, drafts, parents, SamplingParams(), 0, 0) == [2, 6, 7]
    assert speculation.tree_path(drafts, parents, [2, 6, 7]) == [1, 3]
    assert speculation.verify_tree(logits, [4], [-1], SamplingParams(), 0, 0) == [2]


def test_malformed_draft_tree_costs_speed_not_the_request(tiny_llama_dir, reference):
    from tokenmill.speculation import Draft

    class BadTree:
        @hookimpl
        def propose_tokens(self, seqs):
            return [Draft([1, 1], parents=[-1, -1]) for _ in seqs]  # siblings repeat a token

    pipe = Pipeline.from_dict(tiny_pipeline_dict(tiny_llama_dir, plugins=PAGED), progress=False)
    pipe.pm.register(BadTree())
    with pytest.warns(RuntimeWarning, match="repeat a token"):
        out = [r.token_ids for r in pipe.generate(PROMPTS, SamplingParams(max_tokens=16, ignore_eos=True))]
    assert out == reference and pipe.stats()["spec"]["draft_tokens"] == 0
    assert Draft([5, 6, 7], parents=[-1, 0, 0]).cut(1) == Draft([5], parents=[-1])
    with pytest.raises(ValueError, match="earlier parent"):
        Draft([5, 6], parents=[-1, 1]).cut(4)


def test_draft_model_copies_long_ngram_matches_instead_of_drafting(tiny_llama_dir, other_tiny, reference):
    """With ``lookup_ngram`` a sequence whose last n-gram occurred before gets the copied continuation and the
    draft model is not run for it that round; output stays exact."""
    opts = {"draft": str(other_tiny), "num_speculative_tokens": 3, "adaptive": False, "lookup_ngram": 2,
            "lookup_tokens": 6}
    pipe = Pipeline.from_dict(tiny_pipeline_dict(tiny_llama_dir, plugins=[{"speculative": opts}]), progress=False)
    plugin = pipe.pm.get_plugin("speculative")
    drafted, copied = [], []
    inner_propose, inner_cheap = plugin.runner.propose, plugin.cheap_drafts

    def propose(seqs, k, *rest):
        drafted.append(len(seqs))
        return inner_propose(seqs, k, *rest)

    def cheap_drafts(seqs):
        out = inner_cheap(seqs)
        copied.append(sum(1 for d in out if d is not None and len(d.tokens) > 3))  # only copies exceed k
        return out

    plugin.runner.propose, plugin.cheap_drafts = propose, cheap_drafts
    params = SamplingParams(max_tokens=16, ignore_eos=True)
    out = [pipe.generate(p, params)[0].token_ids for p in PROMPTS]
    assert out == reference
    assert sum(copied) > 0 and len(drafted) < len(copied)
    with pytest.raises(Exception, match="lookup_ngram must be in 1..16"):
        Pipeline.from_dict(tiny_pipeline_dict(tiny_llama_dir, plugins=[{"speculative": dict(opts, lookup_ngram=0)}]),
                           progress=False)


def test_draft_model_skips_sequences_whose_catch_up_would_not_pay(tiny_llama_dir, other_tiny):
    """A long prompt with few tokens left to generate is not drafted for (the draft would first have to prefill
    the whole prompt); with ``max_catch_up_ratio: null`` it is. Output is the same either way."""
    prompt = list(range(10, 70))  # 60 tokens, 8 to generate: 60 > 4 x 7
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    outs, drafts = [], []
    for ratio in (4.0, None):
        opts = {"draft": str(other_tiny), "adaptive": False, "max_catch_up_ratio": ratio}
        pipe = Pipeline.from_dict(tiny_pipeline_dict(tiny_llama_dir, plugins=[{"speculative": opts}]),
                                  progress=False)
        outs.append(pipe.generate([prompt], params)[0].token_ids)
        drafts.append(pipe.stats()["spec"]["draft_tokens"])
    assert outs[0] == outs[1]
    assert drafts[0] == 0 and drafts[1] > 0


@pytest.mark.parametrize("layout", ["paged", "contiguous"])
def test_self_draft_shares_the_targets_kv(tiny_llama_dir, reference, layout):
    """A self-draft runs on the target's own K/V layers: it keeps no KV of its own, never runs more than
    SHARED_MAX_NEW tokens per sequence in a forward (no prompt prefill, no catch-up), and greedy output equals
    plain decoding (batch 1 and mixed) although its drafts' K/V go to the target's slots ahead of the verify."""
    from tokenmill.plugins.speculative.draft_runner import SHARED_MAX_NEW

    plugins = [{"speculative": {"draft": "self_int8", "adaptive": False}}] + (PAGED if layout == "paged" else [])
    pipe = Pipeline.from_dict(tiny_pipeline_dict(tiny_llama_dir, plugins=plugins), progress=False)
    runner = pipe.pm.get_plugin("speculative").runner
    assert runner.shared and runner.runner.pool is pipe.runner.pool
    kv = pipe.stats()["kv"]
    assert kv["extra_bytes"] == {} and kv["pool_bytes"] == pipe.runner.pool.nbytes
    widths = []
    forward = runner._forward

    def spy(items):
        widths.extend(len(toks) for toks, *_ in items)
        return forward(items)

    runner._forward = spy
    params = SamplingParams(max_tokens=16, ignore_eos=True)
    if layout == "paged":
        out = [r.token_ids for r in pipe.generate(PROMPTS, params)]
    else:
        out = [pipe.generate(p, params)[0].token_ids for p in PROMPTS]
    assert out == reference
    assert widths and max(widths) <= SHARED_MAX_NEW
    spec = pipe.stats()["spec"]
    assert spec["draft_tokens"] > 0 and spec["acceptance_rate"] > 0.5
    assert pipe.stats()["kv"]["used_blocks"] == 0


def test_draft_models_kv_lives_in_the_pipelines_blocks_and_budget(tiny_llama_dir, other_tiny):
    """A draft model declares its K/V layers (``kv_layers``): they are allocated beside the target's, over the
    same blocks, so ``kv_stats`` counts them and a memory budget pays for them (fewer blocks fit)."""
    budget = {"paged_kv": {"block_size": 4, "kv_memory_gb": 0.001}}
    plain = Pipeline.from_dict(tiny_pipeline_dict(tiny_llama_dir, plugins=[{"continuous_batching": {}}, budget]),
                               progress=False)
    plugins = [{"speculative": {"draft": str(other_tiny), "adaptive": False}}, {"continuous_batching": {}}, budget]
    pipe = Pipeline.from_dict(tiny_pipeline_dict(tiny_llama_dir, plugins=plugins), progress=False)
    draft = pipe.runner.pool.extra["speculative"]
    assert pipe.pm.get_plugin("speculative").runner.runner.pool is draft
    assert len(draft.k) == 1 and draft.k[0].shape[0] == pipe.runner.pool.k[0].shape[0]  # the draft's 1 layer
    kv, kv_plain = pipe.stats()["kv"], plain.stats()["kv"]
    assert kv["extra_bytes"] == {"speculative": draft.nbytes} and kv["pool_bytes"] == pipe.runner.pool.nbytes
    assert kv["num_blocks"] < kv_plain["num_blocks"] and kv["pool_bytes"] <= 0.001 * 2**30
    # a self-draft that does not share keeps the target's layout in its own layers
    own = Pipeline.from_dict(tiny_pipeline_dict(tiny_llama_dir, plugins=[
        {"speculative": {"draft": "self_int8", "share_kv": False, "adaptive": False}}] + PAGED), progress=False)
    assert len(own.runner.pool.extra["speculative"].k) == len(own.runner.pool.k)


@pytest.mark.parametrize("drafter", ["draft_model_other", "self_shared"])
def test_random_aborts_leak_no_kv_and_keep_survivors_exact(tiny_llama_dir, other_tiny, reference, drafter):
    """200 random aborts amid speculating requests (own draft layers, or a self-draft on the target's layers):
    every block comes back, the draft forgets every sequence, and the requests left alone stay exact."""
    import random

    spec = drafters(tiny_llama_dir, other_tiny)["draft_model_other"] if drafter == "draft_model_other" else \
        {"speculative": {"draft": "self_int8", "adaptive": False}}
    pipe = Pipeline.from_dict(tiny_pipeline_dict(tiny_llama_dir, plugins=[spec] + PAGED), progress=False)
    runner, manager = pipe.pm.get_plugin("speculative").runner, pipe.pm.get_plugin("paged_kv").manager
    rng = random.Random(0)
    params = SamplingParams(max_tokens=16, ignore_eos=True)
    which, aborted, done = {}, 0, []
    while aborted < 200:
        while len(pipe.engine.waiting) + len(pipe.engine.running) < 6:
            i = rng.randrange(len(PROMPTS))
            which[pipe.submit(PROMPTS[i], params)] = i
        pipe.step()
        live = [s.request_id for s in pipe.engine.running if not s.is_finished]
        for rid in rng.sample(live, k=min(len(live), rng.choice([0, 0, 1, 2]))):
            aborted += pipe.abort(rid)
        for rid, seq in list(pipe.engine.requests.items()):
            if seq.is_finished:
                out = pipe.collect(rid)
                if out.finish_reason != "abort":
                    done.append((which[rid], out.token_ids))
        manager.check()
    while pipe.engine.has_unfinished():
        pipe.step()
    for rid in list(pipe.engine.requests):
        out = pipe.collect(rid)
        if out.finish_reason != "abort":
            done.append((which[rid], out.token_ids))
    assert pipe.stats()["kv"]["used_blocks"] == 0
    manager.check()
    assert runner.seen == {}
    assert len(done) > 20 and all(tokens == reference[i] for i, tokens in done)
    assert pipe.stats()["spec"]["draft_tokens"] > 0


def test_share_kv_needs_a_self_draft(tiny_llama_dir, other_tiny):
    from tokenmill.errors import PipelineError

    plugins = [{"speculative": {"draft": str(other_tiny), "share_kv": True}}]
    with pytest.raises(PipelineError, match="share_kv: true needs a self-draft"):
        Pipeline.from_dict(tiny_pipeline_dict(tiny_llama_dir, plugins=plugins), progress=False)
    plugins = [{"speculative": {"draft": str(other_tiny)}}]
    pipe = Pipeline.from_dict(tiny_pipeline_dict(tiny_llama_dir, plugins=plugins), progress=False)
    assert not pipe.pm.get_plugin("speculative").runner.shared


# ----------------------------------------------------------------- seeded sampling under speculation
SEEDED = [(p, SamplingParams(max_tokens=12, temperature=0.8, seed=100 + i, ignore_eos=True))
          for i, p in enumerate(PROMPTS)]
OTHERS = [("an unrelated request " * (i + 1), SamplingParams(max_tokens=20, temperature=1.0, ignore_eos=True))
          for i in range(3)]


def seeded_runs(pipe) -> dict[str, list[list[int]]]:
    """The seeded requests' tokens alone, in one batch with others, and with the others aborted mid-way."""
    alone = [pipe.generate(p, params)[0].token_ids for p, params in SEEDED]
    mixed = [r.token_ids for r in pipe.generate([p for p, _ in OTHERS + SEEDED],
                                                [s for _, s in OTHERS + SEEDED])][len(OTHERS):]
    others = [pipe.submit(p, params) for p, params in OTHERS]
    mine = [pipe.submit(p, params) for p, params in SEEDED]
    for _ in range(3):
        pipe.step()
    for rid in others:
        pipe.abort(rid)
    while pipe.engine.has_unfinished():
        pipe.step()
    aborted = [pipe.collect(rid).token_ids for rid in mine]
    for rid in others:
        pipe.collect(rid)
    assert pipe.stats()["kv"]["used_blocks"] == 0
    return {"alone": alone, "mixed": mixed, "aborted": aborted}


@pytest.fixture(scope="module")
def plain_seeded(tiny_llama_dir):
    pipe = Pipeline.from_dict(tiny_pipeline_dict(tiny_llama_dir, plugins=PAGED), progress=False)
    return seeded_runs(pipe)


def test_plain_seeded_sampling_is_batch_invariant(plain_seeded):
    assert plain_seeded["alone"] == plain_seeded["mixed"] == plain_seeded["aborted"]


@pytest.mark.parametrize("drafter", ["prompt_lookup", "draft_model_self", "draft_model_other", "draft_model_lookup"])
def test_seeded_sampling_under_speculation_is_plain_sampling(tiny_llama_dir, other_tiny, plain_seeded, drafter):
    """Alone, beside other requests, or with those aborted: a seeded request samples the very tokens the plain
    pipeline samples for it (each draw is a function of seed and position; verification is coupled to it)."""
    plugins = [drafters(tiny_llama_dir, other_tiny)[drafter]] + PAGED
    pipe = Pipeline.from_dict(tiny_pipeline_dict(tiny_llama_dir, plugins=plugins), progress=False)
    runs = seeded_runs(pipe)
    for how, tokens in runs.items():
        assert tokens == plain_seeded["alone"], how
    spec = pipe.stats()["spec"]
    if drafter == "draft_model_self":  # the same model drawing with the same noise: every draft is accepted
        assert spec["acceptance_rate"] == 1.0
    if drafter != "prompt_lookup":
        assert spec["accepted_tokens"] > 0


def test_compiled_draft_warms_up_in_the_background(tiny_llama_dir, reference, monkeypatch, capsys):
    """The build returns while the draft compiles; requests run (without speculation) meanwhile, and
    speculation starts once it is done; a failed compile costs speculation, not requests."""
    import threading

    from tokenmill.plugins.speculative.draft_runner import DraftModelRunner

    release, real = threading.Event(), DraftModelRunner.warm_up
    monkeypatch.setattr(DraftModelRunner, "warm_up", lambda self: (release.wait(), real(self)))
    plugins = [{"speculative": {"draft": "self_int8", "compile_draft": True, "adaptive": False}}] + PAGED
    pipe = Pipeline.from_dict(tiny_pipeline_dict(tiny_llama_dir, plugins=plugins))
    assert "compiling the draft's decode graphs in the background" in capsys.readouterr().err
    assert pipe.wait_ready(timeout=0) is False
    params = SamplingParams(max_tokens=16, ignore_eos=True)
    assert [r.token_ids for r in pipe.generate(PROMPTS, params)] == reference
    assert pipe.stats()["spec"]["draft_tokens"] == 0  # still compiling: no speculation
    release.set()
    assert pipe.wait_ready()
    assert "draft compiled in" in capsys.readouterr().err
    assert [r.token_ids for r in pipe.generate(PROMPTS, params)] == reference
    assert pipe.stats()["spec"]["draft_tokens"] > 0
    pipe.close()

    def broken(self):
        raise RuntimeError("inductor exploded")

    monkeypatch.setattr(DraftModelRunner, "warm_up", broken)
    pipe = Pipeline.from_dict(tiny_pipeline_dict(tiny_llama_dir, plugins=plugins), progress=False)
    assert pipe.wait_ready()
    with pytest.warns(RuntimeWarning, match="plugin 'speculative' failed to compile its draft .*inductor exploded"):
        assert [r.token_ids for r in pipe.generate(PROMPTS, params)] == reference
    assert pipe.stats()["spec"]["draft_tokens"] == 0


def test_a_draft_warmed_up_in_the_background_is_timed_on_the_engines_thread(tiny_llama_dir, reference,
                                                                            monkeypatch):
    """``adaptive`` with a background warm-up: the draft's step cost is timed once, on the thread that runs the
    steps, when it first finds the draft ready, and seeds the planner's draft cost for every batch bucket before
    any draft is made (else batch sizes no draft ran at yet are priced linearly from those that did)."""
    import threading

    from tokenmill.plugins.speculative.draft_runner import DraftModelRunner

    calls, real = [], DraftModelRunner.step_seconds

    def timed(self, batches, runs=3):
        calls.append(threading.current_thread())
        return real(self, batches, runs)

    monkeypatch.setattr(DraftModelRunner, "step_seconds", timed)
    plugins = [{"speculative": {"draft": "self_int8", "compile_draft": True, "adaptive": True}}] + PAGED
    limits = {"max_model_len": 512, "max_num_seqs": 8, "max_num_batched_tokens": 512}  # past WARM_UP_POSITION
    pipe = Pipeline.from_dict(tiny_pipeline_dict(tiny_llama_dir, plugins=plugins, limits=limits), progress=False)
    assert pipe.wait_ready()
    plugin = pipe.plugins["speculative"]
    assert calls == [] and plugin.draft_cost.per_depth == {}  # nothing timed on the warm-up thread
    observed = []
    monkeypatch.setattr(plugin.draft_cost, "observe", lambda b, d, s: observed.append((b, d)))
    # every step drafts in full: whether drafting pays on the tiny model depends on this machine's timings
    monkeypatch.setattr(plugin, "_plan", lambda seqs, *_: [plugin.options.num_speculative_tokens] * len(seqs))
    out = pipe.generate(PROMPTS, SamplingParams(max_tokens=16, ignore_eos=True))
    assert [r.token_ids for r in out] == reference  # timed between steps on scratch K/V: nothing disturbed
    assert calls == [threading.main_thread()]
    assert observed[:5] == [(b, 1) for b in (1, 2, 4, 8, 16)]  # the timed buckets, before any draft's own
    assert len(observed) > 5  # then the drafts' own costs
    pipe.close()


def test_adaptive_drafter_calibrates_its_step_cost_at_build(tiny_llama_dir, monkeypatch):
    """``adaptive``: the step-cost curves start from forwards timed at build (``PipelineContext.time_forward``):
    per sequence count up to max_num_seqs, one token each and up to one plus a full draft (3 + 1 here); after
    the build, when the KV pool is in use, ``time_forward`` refuses."""
    from tokenmill.plugins.speculative.prompt_lookup import PromptLookup

    seen, calibrate = {}, PromptLookup.calibrate

    def keep(self, context):
        seen["context"] = context
        return calibrate(self, context)

    monkeypatch.setattr(PromptLookup, "calibrate", keep)
    plugins = [{"prompt_lookup": {"num_speculative_tokens": 3}}] + PAGED
    pipe = Pipeline.from_dict(tiny_pipeline_dict(tiny_llama_dir, plugins=plugins), progress=False)
    cost = pipe.plugins["prompt_lookup"].step_cost
    assert sorted(cost.calibrated) == [1, 2, 4, 8]  # max_num_seqs 8
    for b in cost.calibrated:
        ns, ts = cost.points(b)
        assert ns == [b * w for w in (1, 2, 3)] and all(t > 0 for t in ts)  # widths up to 1 + 3, not 5
    with pytest.raises(RuntimeError, match="time_forward is for configure"):
        seen["context"].time_forward(4, 1)
    runner = pipe.runner  # what cannot be timed is None, never a failed build
    assert runner.time_forward(1, runner.layout.max_model_len + 1) is None
