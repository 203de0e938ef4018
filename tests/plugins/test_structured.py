"""structured_output: constrained requests only emit what their grammar allows (choices, regexes, JSON schemas,
EBNF), alone, batched with unconstrained requests, preempted and under speculation; bad specs are refused."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from tests.conftest import make_tiny_model, tiny_pipeline_dict
from tokenmill import Pipeline, SamplingParams
from tokenmill.errors import RequestError
from tokenmill.hooktypes import VerifyInput
from tokenmill.plugins.structured.spec import parse_spec
from tokenmill.sequence import Sequence

jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("xgrammar")

PAGED = [{"continuous_batching": {}}, {"paged_kv": {"block_size": 4, "num_blocks": 256}}]
PROMPTS = ["Answer:", "The weather today is", "x y z", "Give me JSON. JSON: {"]
CHOICES = ["yes", "no", 'a "quoted" one', "back\\slash", "two\nlines", "ünïcödé ✓"]
REGEX = r"[a-z]{2,6}-[0-9]{1,3}(\.[0-9])?"
EBNF = 'root ::= "(" num (" + " num)* ")"\nnum ::= [1-9] [0-9]?'
SCHEMAS = [
    {"type": "object", "properties": {"label": {"enum": ["pos", "neg", "neutral"]},
                                      "score": {"type": "integer", "minimum": -5, "maximum": 5}},
     "required": ["label", "score"], "additionalProperties": False},
    {"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 8},
        "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3},
        "owner": {"type": "object", "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 999},
                                                   "admin": {"type": "boolean"}},
                  "required": ["id", "admin"], "additionalProperties": False}},
     "required": ["name", "tags", "owner"], "additionalProperties": False},
]


def so(kind: str, body=None) -> dict:
    field = {"json_schema": "schema", "regex": "pattern", "choice": "choices", "grammar": "grammar"}.get(kind)
    return {"structured_output": {"type": kind, **({field: body} if field else {})}}


def constrained(kind: str, body=None, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=kw.pop("max_tokens", 96), plugin_args=so(kind, body), **kw)


def plugin_of(pipe: Pipeline):
    return pipe.pm.get_plugin("default:structured_output")


@pytest.fixture(scope="module")
def pipe(tiny_llama_dir):
    return Pipeline.from_dict(tiny_pipeline_dict(tiny_llama_dir, plugins=PAGED), progress=False)


@pytest.fixture(scope="module")
def draft_dir(tmp_path_factory, tokenizer):
    return make_tiny_model("llama", tmp_path_factory.mktemp("so-draft"), tokenizer, num_hidden_layers=1,
                           hidden_size=32, intermediate_size=64)


SAMPLED = [dict(), dict(temperature=1.0, seed=1)]


def test_choice_regex_and_ebnf_outputs_follow_their_grammar(pipe):
    cases = [("choice", CHOICES, lambda t: t in CHOICES), ("regex", REGEX, lambda t: re.fullmatch(REGEX, t)),
             ("grammar", EBNF, lambda t: re.fullmatch(r"\([1-9][0-9]?( \+ [1-9][0-9]?)*\)", t))]
    for kind, body, ok in cases:
        params = [constrained(kind, body, max_tokens=40, **s) for s in SAMPLED for _ in PROMPTS]
        outs = pipe.generate(PROMPTS * len(SAMPLED), params)
        for o in outs:
            if kind == "grammar" and o.finish_reason == "length":  # "+ num" may repeat: a prefix of a sentence
                assert re.fullmatch(r"\(([1-9][0-9]?( \+ [1-9][0-9]?)*( \+ ?)?)?", o.text), o.text
                continue
            assert o.finish_reason == "stop" and ok(o.text), (kind, o.text, o.finish_reason)
    assert not plugin_of(pipe).states  # every matcher dropped at the end


def test_json_outputs_parse_and_validate(pipe):
    for schema in SCHEMAS:
        params = [constrained("json_schema", schema)] * 4 + [constrained("json_schema", schema, temperature=1.0,
                                                                         seed=s) for s in (1, 2)]
        outs = pipe.generate(PROMPTS + PROMPTS[:2], params)
        for o in outs:
            assert o.finish_reason == "stop", o.text
            jsonschema.validate(json.loads(o.text), schema)
    outs = pipe.generate(PROMPTS, constrained("json_object", max_tokens=32))  # an object may go on and on
    for o in outs:
        assert not re.search(r"[\x00-\x1f]", o.text), o.text
        assert isinstance(json.loads(o.text), dict), o.text  # closed before the budget ran out
    assert any(o.finish_reason == "stop" for o in outs)


BUDGETS = [6, 9, 16, 40]


def test_json_answers_close_before_max_tokens(pipe):
    # a random model writes strings and nestings that never end: each answer is closed in the tokens left
    for spec, budgets in [(("json_object",), BUDGETS), (("json_schema", SCHEMAS[1]), [40, 64])]:
        params = [constrained(*spec, max_tokens=n, **s) for n in budgets for s in SAMPLED + [dict(temperature=1.5,
                                                                                               seed=7)]]
        outs = pipe.generate([PROMPTS[i % len(PROMPTS)] for i in range(len(params))], params)
        for p, o in zip(params, outs):
            assert len(o.token_ids) <= p.max_tokens
            value = json.loads(o.text)  # parses even where finish_reason is "length"
            if spec[0] == "json_schema":
                jsonschema.validate(value, spec[1])
        assert any(o.finish_reason == "length" for o in outs), [o.text for o in outs]


def test_closing_keeps_the_greedy_tokens_that_fit(pipe):
    roomy = pipe.generate(PROMPTS, constrained("json_object", max_tokens=64))
    for o in roomy:
        if o.finish_reason == "stop":  # it ended by itself: a budget of exactly its length changes nothing
            tight = pipe.generate(PROMPTS[roomy.index(o)], constrained("json_object", max_tokens=len(o.token_ids)))
            assert tight[0].token_ids == o.token_ids


def test_compiled_grammars_are_cached_by_spec(tiny_llama_dir):
    pipe = Pipeline.from_dict(tiny_pipeline_dict(tiny_llama_dir, plugins=[{"structured_output": {"cache_size": 2}}]),
                              progress=False)
    cache = pipe.plugins["structured_output"].grammars
    pipe.generate("hi", SamplingParams(max_tokens=4))
    assert cache.compiler is None  # a pipeline without constrained requests never sets xgrammar up
    for spec in [("regex", "a+"), ("regex", "a+"), ("choice", ["x"]), ("regex", "b+"), ("regex", "a+")]:
        pipe.generate("hi", constrained(*spec, max_tokens=4))
    assert (cache.hits, cache.misses) == (1, 4)  # "a+" again, then evicted by "x" and "b+" and compiled anew
    assert list(cache.grammars) == [("regex", '"b+"'), ("regex", '"a+"')]


def test_constrained_requests_leave_the_unconstrained_ones_of_a_batch_unchanged(pipe):
    plain = SamplingParams(max_tokens=16, ignore_eos=True)
    alone_plain = [pipe.generate(p, plain)[0].token_ids for p in PROMPTS]
    specs = [constrained("json_schema", SCHEMAS[1]), constrained("choice", CHOICES), constrained("regex", REGEX),
             constrained("json_schema", SCHEMAS[0], temperature=1.0, seed=3)]
    alone_constrained = [pipe.generate(p, s)[0].token_ids for p, s in zip(PROMPTS, specs)]
    outs = pipe.generate(PROMPTS + PROMPTS, [plain] * 4 + specs)
    assert [o.token_ids for o in outs[:4]] == alone_plain
    assert [o.token_ids for o in outs[4:]] == alone_constrained
    assert alone_plain[0][:len(alone_constrained[0])] != alone_constrained[0]  # the grammar did change tokens


def test_preempted_requests_resume_their_grammar(pipe, tiny_llama_dir):
    params = [constrained("json_schema", SCHEMAS[1], max_tokens=40)] * 3 + [constrained("regex", REGEX, max_tokens=40)]
    reference = [o.token_ids for o in pipe.generate(PROMPTS, params)]
    tight = Pipeline.from_dict(tiny_pipeline_dict(
        tiny_llama_dir, limits={"max_model_len": 256, "max_num_seqs": 8, "max_num_batched_tokens": 64},
        plugins=[{"continuous_batching": {}}, {"paged_kv": {"block_size": 4, "num_blocks": 16}}]), progress=False)
    outs = tight.generate(PROMPTS, params)
    assert tight.stats()["preemptions"] > 0
    assert [o.token_ids for o in outs] == reference


def drafter_plugins(kind: str, tiny_llama_dir, draft_dir) -> list:
    return {"prompt_lookup": [{"prompt_lookup": {"num_speculative_tokens": 4, "adaptive": False, "min_ngram": 1}}],
            "self_draft": [{"speculative": {"draft": str(tiny_llama_dir), "adaptive": False}}],
            "other_draft": [{"speculative": {"draft": str(draft_dir), "num_speculative_tokens": 3,
                                             "adaptive": False}}]}[kind] + PAGED


SPEC_PARAMS = [constrained("json_schema", SCHEMAS[1]), constrained("json_schema", SCHEMAS[0]),
               constrained("regex", REGEX), constrained("choice", CHOICES)]


@pytest.fixture(scope="module")
def plain_constrained(pipe):
    return pipe.generate(PROMPTS, SPEC_PARAMS)


@pytest.mark.parametrize("drafter", ["prompt_lookup", "self_draft", "other_draft"])
def test_speculation_gives_the_plain_constrained_tokens(pipe, plain_constrained, tiny_llama_dir, draft_dir, drafter):
    params, reference = SPEC_PARAMS, plain_constrained
    spec_pipe = Pipeline.from_dict(tiny_pipeline_dict(tiny_llama_dir, plugins=drafter_plugins(
        drafter, tiny_llama_dir, draft_dir)), progress=False)
    outs = spec_pipe.generate(PROMPTS, params)
    assert [o.token_ids for o in outs] == [r.token_ids for r in reference]
    jsonschema.validate(json.loads(outs[0].text), SCHEMAS[1])
    tight = [constrained("json_object", max_tokens=n) for n in BUDGETS]  # closing in time, drafts in the zone
    outs = spec_pipe.generate(PROMPTS, tight)
    assert [o.token_ids for o in outs] == [o.token_ids for o in pipe.generate(PROMPTS, tight)]
    assert all(isinstance(json.loads(o.text), dict) for o in outs)
    stats = spec_pipe.stats()["spec"]
    assert stats["draft_tokens"] > 0, stats
    if drafter != "other_draft":  # a weak random draft model is always rejected: the refused-draft path
        assert stats["accepted_tokens"] > 0, stats
    assert not plugin_of(spec_pipe).states


# ---------------------------------------------------------------- draft rows, directly (chains and trees)
def finite(row: torch.Tensor) -> set[int]:
    return set(torch.isfinite(row).nonzero().flatten().tolist())


def test_draft_rows_are_masked_along_their_path_and_unreachable_rows_left_alone(pipe, tokenizer):
    plugin = plugin_of(pipe)
    tok = {c: tokenizer.encode(c, add_special_tokens=False)[0] for c in "abcdx1"}
    seq = Sequence(seq_id=10**6, request_id="walk", prompt_token_ids=[5, 6], params=constrained("regex", "(ab|cd)1"),
                   arrival_time=0.0)
    plugin.check_request(seq=seq)
    vocab = pipe.engine.vocab_size

    def expect(path: list[int]) -> set[int]:  # what a fresh matcher walking ``path`` allows next
        m = plugin.grammars.matcher(plugin.grammars.get(parse_spec(seq.params.plugin_args["structured_output"])))
        assert all(m.accept_token(t) for t in path)
        masks = torch.zeros(1, plugin.masks.words, dtype=torch.int32)
        m.fill_next_token_bitmask(masks, 0)
        out = torch.zeros(1, vocab)
        plugin.masks.apply(out, masks, [0])
        return finite(out[0])

    a, b, c, d, x, one = (tok[k] for k in "abcdx1")
    # a tree: 0:a 1:c 2:a>b 3:a>x (refused) 4:a>b>1 5:a>x>b (under the refused node)
    batch = VerifyInput([seq], torch.zeros(7, vocab), [0], [[a, c, b, x, one, b]], [[-1, -1, 0, 0, 2, 3]])
    plugin.process_logits(batch=batch)
    rows = [finite(r) for r in batch.logits]
    assert rows[0] == expect([]) and rows[1] == expect([a]) and rows[2] == expect([c])
    assert rows[3] == expect([a, b]) and rows[5] == expect([a, b, one])
    assert rows[4] == rows[6] == set(range(vocab))  # after the refused x: unreachable, untouched
    assert rows[5] == set(pipe.engine.eos_token_ids)  # the grammar is complete: EOS only
    chain = VerifyInput([seq], torch.zeros(4, vocab), [0], [[a, x, b]])
    plugin.process_logits(batch=chain)
    rows = [finite(r) for r in chain.logits]
    assert rows[0] == expect([]) and rows[1] == expect([a]) and rows[2] == rows[3] == set(range(vocab))
    seq.token_ids += [c]  # the engine accepted "c": the matcher catches up, its draft walks rolled back
    again = VerifyInput([seq], torch.zeros(2, vocab), [0], [[d]])
    plugin.process_logits(batch=again)
    assert [finite(r) for r in again.logits] == [expect([c]), expect([c, d])]
    seq.token_ids += [x]  # a token the grammar refuses (its row was not masked): the request fails, naming it
    with pytest.raises(RuntimeError, match=f"emitted token {x} .* which its structured_output grammar does not"):
        plugin.process_logits(batch=VerifyInput([seq], torch.zeros(1, vocab), [0], [[]]))
    plugin.request_finished(seq=seq)
    assert seq.seq_id not in plugin.states



# ---------------------------------------------------------------- refusals and clean-up
BAD = [
    ("json", "structured_output must be an object"),
    ({"type": "xml"}, "structured_output.type must be one of 'json_object', 'json_schema', 'regex'"),
    ({"type": "json_schema"}, "of type 'json_schema' needs 'schema'"),
    ({"type": "json_schema", "schema": "{}"}, "structured_output.schema must be a JSON schema object"),
    ({"type": "json_schema", "schema": {"type": "foo"}}, 'invalid JSON schema: Unsupported type "foo"'),
    ({"type": "json_schema", "schema": {"type": "integer", "minimum": 5, "maximum": 1}},
     "invalid JSON schema: Invalid range"),
    ({"type": "regex", "pattern": "[a-z"}, "invalid regex: .*Unclosed"),
    ({"type": "regex", "pattern": ""}, "structured_output.pattern must be a non-empty string"),
    ({"type": "choice", "choices": []}, "choices must be a non-empty list of non-empty strings"),
    ({"type": "choice", "choices": ["a", 3]}, "choices must be a non-empty list"),
    ({"type": "grammar", "grammar": "root ::= undefined_rule"}, 'invalid EBNF grammar: .*"undefined_rule" is not'),
    ({"type": "regex", "pattern": "a", "flags": "i"}, r"takes only \['pattern', 'type'\], got unknown \['flags'\]"),
]


@pytest.mark.parametrize("value,message", BAD, ids=[m[:24] for _, m in BAD])
def test_bad_specs_are_refused_at_submit_and_nothing_is_queued(pipe, value, message):
    with pytest.raises(RequestError, match="plugin 'structured_output' refused the request: .*" + message):
        pipe.submit("hi", SamplingParams(plugin_args={"structured_output": value}))
    assert not pipe.engine.waiting and not pipe.engine.running and not pipe.engine.requests
    assert not plugin_of(pipe).states


def test_min_tokens_is_refused_with_a_grammar(pipe):
    with pytest.raises(RequestError, match="structured_output cannot be combined with min_tokens"):
        pipe.submit("hi", constrained("choice", ["a"], min_tokens=3))
    assert not pipe.engine.requests and not plugin_of(pipe).states


def test_aborting_a_constrained_request_drops_its_matcher(pipe):
    rid = pipe.submit("hi", constrained("json_schema", SCHEMAS[1]))
    pipe.step()
    assert len(plugin_of(pipe).states) == 1
    assert pipe.abort(rid)
    assert not plugin_of(pipe).states
    assert pipe.collect(rid).finish_reason == "abort"


# ---------------------------------------------------------------- the default model
# the fast tests' two schemas, then six more (shared with scripts/json_schema_server_check.py)
SLOW_SCHEMAS = list(json.loads((Path(__file__).parents[2] / "benchmarks" / "data" /
                                "json_schemas_varied.json").read_text()).values())
SLOW_PROMPTS = ["Classify the sentiment of 'I love this!' as JSON.", "Describe a user named Bo as JSON.",
                "Give the weather in Paris as JSON.", "Describe a famous book as JSON.",
                "List the steps to make tea as JSON.", "Is the sky blue? Answer as JSON.",
                "Describe a person with an address as JSON.", "List some colors as JSON."]


@pytest.mark.slow
def test_default_model_json_schemas_always_parse_and_validate(default_model_dir):
    pipe = Pipeline.from_yaml(Path(__file__).parents[2] / "pipelines" / "default.yaml",
                              progress=False)
    assert len(SLOW_SCHEMAS) == len(SLOW_PROMPTS) == 8
    prompts = [pipe.apply_chat_template([{"role": "user", "content": p}]) for p in SLOW_PROMPTS]
    outs = pipe.generate(prompts, [constrained("json_schema", s, max_tokens=256) for s in SLOW_SCHEMAS])
    for schema, o in zip(SLOW_SCHEMAS, outs):
        assert o.finish_reason == "stop", o.text
        jsonschema.validate(json.loads(o.text), schema)
