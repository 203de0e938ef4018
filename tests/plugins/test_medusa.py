"""Medusa heads: training positions aligned with decoding, round trip, exact greedy decoding, typical acceptance,
trees from measured accuracy, clear errors."""
from __future__ import annotations

import pytest
import torch

from tests.conftest import tiny_pipeline_dict
from tokenmill import Pipeline, PipelineError, SamplingParams
from tokenmill.plugins.speculative import medusa_train
from tokenmill.plugins.speculative.medusa import MedusaHeads, best_tree
from tokenmill.speculation import typical_accept

PROMPTS = ["a b c d a b c d a b", "hello world", "x"]


@pytest.fixture(scope="module")
def trained_heads(tiny_llama_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("medusa")
    base = Pipeline.from_dict(tiny_pipeline_dict(tiny_llama_dir), progress=False)
    meta = medusa_train.train(base, out, num_heads=3, epochs=1, max_new_tokens=16, limit=20, vocab=64,
                              progress=False)
    assert meta["positions"] > 50 and meta["heldout_positions"] > 5 and len(meta["heldout_top1_per_head"]) == 3
    assert meta["draft_vocab"] == 64 and len(meta["heldout_rank_accuracy"][0]) == 16
    return out


def test_training_positions_are_the_generated_ones():
    """Head k learns, from the state at a generated position t (from the last prompt token on), the token at
    t + 2 + k: never from prompt positions, whose fixed chat template the first heads memorized (43 % top-1
    reported, 2.5 % of drafts accepted)."""
    t, idx = medusa_train.positions(prompt_len=5, length=10, num_heads=2)
    assert t.tolist() == [4, 5, 6, 7]
    assert idx.tolist() == [[6, 7], [7, 8], [8, 9], [9, medusa_train.IGNORE]]
    hid = [torch.randn(10, 4), torch.randn(6, 4)]
    seqs = [list(range(100, 110)), list(range(200, 206))]
    ex = medusa_train.build_examples(hid, seqs, [5, 6], num_heads=2)
    assert ex.rows.tolist() == [4, 5, 6, 7]  # the second sequence generated nothing: no positions
    assert ex.targets.tolist() == [[106, 107], [107, 108], [108, 109], [109, medusa_train.IGNORE]]
    assert ex.next_tokens.tolist() == [105, 106, 107, 108]


def test_heads_read_at_decode_what_they_were_trained_on(tiny_llama_dir, trained_heads):
    """Alignment: each time Medusa drafts, the state it reads is the trainer's final hidden state at the position
    before the decode token, and the token it embeds is that decode token."""
    seen = []
    pipe = Pipeline.from_dict(tiny_pipeline_dict(tiny_llama_dir, plugins=[
        {"medusa": {"heads": str(trained_heads), "adaptive": False}},
        {"continuous_batching": {}}, {"paged_kv": {"block_size": 4, "num_blocks": 96}}]), progress=False)
    medusa = pipe.plugins["medusa"]
    draft = medusa.draft

    def recording(seqs, depth, *, hidden, kv):
        seen.extend((list(s.token_ids), h.clone()) for s, h in zip(seqs, hidden) if h is not None)
        return draft(seqs, depth, hidden=hidden, kv=kv)

    medusa.draft = recording
    pipe.generate(PROMPTS, SamplingParams(max_tokens=12, ignore_eos=True))
    assert len(seen) > 10
    for ids, state in seen:
        ref = medusa_train.final_hidden(pipe.loaded.model, [ids], "cpu")[0]
        torch.testing.assert_close(state, ref[len(ids) - 2], atol=1e-4, rtol=1e-4)


def test_best_tree_follows_measured_accuracy():
    acc = [[0.5, 0.2, 0.1], [0.4, 0.3, 0.0]]
    assert best_tree(acc, 1) == [[0]]
    # values: [0] .5, [1] .2, [0,0] .2, [0,1] .15, [2] .1, [1,0] .08
    assert best_tree(acc, 4) == [[0], [0, 0], [1], [0, 1]]
    assert len(best_tree(acc, 50)) == 3 + 9  # every path of the two heads


def test_zero_initialised_heads_start_as_identity():
    heads = MedusaHeads(16, 3)
    h = torch.randn(5, 16)
    assert torch.equal(heads(h), h.expand(3, 5, 16))


TREE = [[0], [1], [2], [0, 0], [0, 1], [1, 0], [0, 0, 0]]


@pytest.mark.parametrize("tree", [None, TREE])
@pytest.mark.parametrize("acceptance", ["exact", "typical"])
def test_greedy_identical_with_medusa(tiny_llama_dir, trained_heads, acceptance, tree):
    base = Pipeline.from_dict(tiny_pipeline_dict(tiny_llama_dir), progress=False)
    params = SamplingParams(max_tokens=16, ignore_eos=True)
    ref = [r.token_ids for r in base.generate(PROMPTS, params)]
    pipe = Pipeline.from_dict(tiny_pipeline_dict(tiny_llama_dir, plugins=[
        {"medusa": {"heads": str(trained_heads), "adaptive": False, "acceptance": acceptance, "tree": tree}},
        {"continuous_batching": {}}, {"paged_kv": {"block_size": 4, "num_blocks": 96}}]), progress=False)
    assert [r.token_ids for r in pipe.generate(PROMPTS, params)] == ref
    spec = pipe.stats()["spec"]
    assert spec["draft_tokens"] > 0
    if tree:  # a tree counts its depth (3) as the positions drafted per step
        assert len(spec["acceptance_by_position"]) == 3
    assert pipe.stats()["kv"]["used_blocks"] == 0
    sampled = pipe.generate(PROMPTS, SamplingParams(max_tokens=10, temperature=0.7, seed=3, ignore_eos=True))
    assert all(len(r.token_ids) == 10 for r in sampled)


def test_typical_acceptance_rule():
    logits = torch.tensor([[5.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    from tokenmill import SamplingParams as SP

    # confident row 0 accepts its mode; flat row 1 (p = 0.25 each, H = ln 4) accepts anything above
    # min(0.09, 0.3 * exp(-ln 4)) = 0.075
    assert typical_accept(logits, [0, 3], SP(temperature=1.0), 0, 10, 0.09, 0.3)[:2] == [0, 3]
    out = typical_accept(logits, [2], SP(temperature=1.0), 0, 10, 0.09, 0.3)  # p(2) in row 0 is tiny: reject
    assert len(out) == 1


def test_heads_for_another_model_are_rejected(tiny_llama_dir, tmp_path):
    MedusaHeads(32, 2).save(tmp_path, {"vocab_size": 49152})
    with pytest.raises(PipelineError, match="hidden size 32"):
        Pipeline.from_dict(tiny_pipeline_dict(tiny_llama_dir, plugins=[{"medusa": {"heads": str(tmp_path)}}]),
                           progress=False)
    with pytest.raises(PipelineError, match="train-medusa"):
        Pipeline.from_dict(tiny_pipeline_dict(tiny_llama_dir, plugins=[{"medusa": {"heads": str(tmp_path / "x")}}]),
                           progress=False)


def test_tree_option_errors(tiny_llama_dir, trained_heads):
    for tree, msg in [([[0, 1]], "no parent path"), ([[]], "need 1"), ([[0], [0, 0], [0, 0, 0], [0, 0, 0, 0]],
                                                                         "need 1..3"), ([[99]], "need 1")]:
        with pytest.raises((PipelineError, ValueError), match=msg):
            Pipeline.from_dict(tiny_pipeline_dict(tiny_llama_dir, plugins=[
                {"medusa": {"heads": str(trained_heads), "tree": tree}}]), progress=False)


@pytest.mark.parametrize("tree", [None, TREE])
def test_seeded_sampling_with_exact_medusa_is_plain_sampling(tiny_llama_dir, trained_heads, tree):
    from tests.plugins.test_speculative import PAGED, seeded_runs

    plain = seeded_runs(Pipeline.from_dict(tiny_pipeline_dict(tiny_llama_dir, plugins=PAGED), progress=False))
    pipe = Pipeline.from_dict(tiny_pipeline_dict(tiny_llama_dir, plugins=[
        {"medusa": {"heads": str(trained_heads), "adaptive": False, "tree": tree}}] + PAGED), progress=False)
    for how, tokens in seeded_runs(pipe).items():
        assert tokens == plain["alone"], how
    assert pipe.stats()["spec"]["draft_tokens"] > 0


@pytest.mark.parametrize("tree", [None, TREE])
def test_constrained_output_under_medusa_is_the_plain_constrained_output(tiny_llama_dir, trained_heads, tree):
    """Grammar masks reach Medusa's draft rows (chain and tree): the tokens are those of plain constrained
    decoding, and the JSON answers parse and validate."""
    jsonschema = pytest.importorskip("jsonschema")
    pytest.importorskip("xgrammar")
    import json

    schema = {"type": "object", "properties": {"label": {"enum": ["pos", "neg"]},
                                               "score": {"type": "integer", "minimum": 0, "maximum": 9}},
              "required": ["label", "score"], "additionalProperties": False}
    specs = [{"type": "json_schema", "schema": schema}, {"type": "regex", "pattern": "[a-d]( [a-d]){3,6}"},
             {"type": "choice", "choices": ["yes", "no", "maybe"]}]
    params = [SamplingParams(max_tokens=48, plugin_args={"structured_output": s}) for s in specs]
    base = Pipeline.from_dict(tiny_pipeline_dict(tiny_llama_dir), progress=False)
    ref = [r.token_ids for r in base.generate(PROMPTS, params)]
    pipe = Pipeline.from_dict(tiny_pipeline_dict(tiny_llama_dir, plugins=[
        {"medusa": {"heads": str(trained_heads), "adaptive": False, "tree": tree}},
        {"continuous_batching": {}}, {"paged_kv": {"block_size": 4, "num_blocks": 96}}]), progress=False)
    out = pipe.generate(PROMPTS, params)
    assert [r.token_ids for r in out] == ref
    jsonschema.validate(json.loads(out[0].text), schema)
    assert out[2].text in ("yes", "no", "maybe")
    assert pipe.stats()["spec"]["draft_tokens"] > 0
    assert pipe.stats()["kv"]["used_blocks"] == 0
