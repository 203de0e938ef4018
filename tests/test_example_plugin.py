"""The example third-party plugin (examples/tokenmill-sjf): found through its entry point, used by name."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from conftest import tiny_pipeline_dict
from tokenmill import PipelineError, SamplingParams, load_spec
from tokenmill.host import discover_plugins, hooks_implemented
from tokenmill.hooktypes import ScheduleInput, SchedulerLimits
from tokenmill.sequence import Sequence

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "tokenmill-sjf"
INSTALL_HINT = "pip install -e examples/tokenmill-sjf --no-deps"


def example_dist_name() -> str:
    text = (EXAMPLE / "pyproject.toml").read_text(encoding="utf-8")
    match = re.search(r'^name\s*=\s*"([^"]+)"', text, re.M)
    assert match, "examples/tokenmill-sjf/pyproject.toml has no project name"
    return match.group(1)


def normalized(dist: str) -> str:
    return re.sub(r"[-_.]+", "-", dist).lower()


def sjf_or_fail():
    """The discovered entry point and its class. The example must be installed: if it is not, the calling
    test fails (in its body, so it reports as a failure, never a skip or a setup error)."""
    found = discover_plugins()
    if "sjf" not in found:
        pytest.fail(f"the example plugin 'sjf' is not installed: run `{INSTALL_HINT}` from the repository root "
                    f"(discovered plugins: {', '.join(sorted(found))})", pytrace=False)
    return found["sjf"], found["sjf"].load()


# ----------------------------------------------------------------------------------------- discovery
def test_entry_point_is_discovered():
    sjf_entry, sjf_cls = sjf_or_fail()
    assert sjf_entry.name == "sjf"
    assert sjf_entry.value == "tokenmill_sjf:ShortestJobFirst"
    assert normalized(sjf_entry.distribution) == normalized(example_dist_name())
    assert sjf_cls.__name__ == "ShortestJobFirst"
    assert hooks_implemented(sjf_cls) == ["schedule"]
    import tokenmill

    assert issubclass(sjf_cls, tokenmill.Plugin)


def test_installed_from_this_checkout():
    sjf_or_fail()
    import tokenmill_sjf

    assert Path(tokenmill_sjf.__file__).resolve().is_relative_to(EXAMPLE.resolve()), (
        f"tokenmill_sjf is imported from {tokenmill_sjf.__file__}, not this checkout; run `{INSTALL_HINT}`")


def test_options_are_validated():
    sjf_or_fail()
    spec = load_spec({"model": "m", "plugins": [{"sjf": {"max_prompt_tokens": 32}}]})
    assert spec.plugins[0].options.max_prompt_tokens == 32
    assert load_spec({"model": "m", "plugins": ["sjf"]}).plugins[0].options.max_prompt_tokens is None
    with pytest.raises(PipelineError, match="max_prompt_tokens must be >= 1"):
        load_spec({"model": "m", "plugins": [{"sjf": {"max_prompt_tokens": 0}}]})
    with pytest.raises(PipelineError, match="option 'max_prompt_tokens' of plugin 'sjf' must be int | null"):
        load_spec({"model": "m", "plugins": [{"sjf": {"max_prompt_tokens": "many"}}]})


# ----------------------------------------------------------------------------------------- scheduler unit
class FakeKV:
    """A KV handle with ``capacity`` token slots in all."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.held: dict[int, int] = {}

    def allocate(self, seq: Sequence, n: int) -> bool:
        need = seq.num_computed_tokens + n
        if sum(self.held.values()) - self.held.get(seq.seq_id, 0) + need > self.capacity:
            return False
        self.held[seq.seq_id] = need
        return True

    def free(self, seq: Sequence) -> None:
        self.held.pop(seq.seq_id, None)

    def num_free_tokens(self) -> int:
        return self.capacity - sum(self.held.values())


def seq(i: int, prompt_len: int, arrival: float) -> Sequence:
    return Sequence(seq_id=i, request_id=f"r{i}", prompt_token_ids=[1] * prompt_len, params=SamplingParams(),
                    arrival_time=arrival)


def ids(out) -> list[int]:
    return [s.seq.seq_id for s in out.scheduled]


def test_admits_shortest_first_ties_by_arrival():
    sjf_cls = sjf_or_fail()[1]
    plugin = sjf_cls()
    waiting = (seq(0, 9, 0.0), seq(1, 3, 1.0), seq(2, 5, 2.0), seq(3, 3, 0.5))
    out = plugin.schedule(state=ScheduleInput(waiting, (), SchedulerLimits(3, 100, 64), FakeKV(1000), 0.0))
    assert ids(out) == [3, 1, 2]  # max_num_seqs=3; the two 3-token prompts by arrival
    assert [s.num_new_tokens for s in out.scheduled] == [3, 3, 5]
    assert plugin.calls == 1 and not out.preempted and not out.rejected


def test_respects_token_budget_kv_and_running():
    sjf_cls = sjf_or_fail()[1]
    plugin = sjf_cls()
    running = seq(10, 4, 0.0)
    running.num_computed_tokens = 3  # decoding: one uncomputed token
    waiting = (seq(0, 6, 0.0), seq(1, 2, 1.0), seq(2, 4, 2.0))
    out = plugin.schedule(state=ScheduleInput(waiting, (running,), SchedulerLimits(8, 5, 64), FakeKV(1000), 0.0))
    assert ids(out) == [10, 1]  # budget 5: 1 (decode) + 2; the 4-token prompt no longer fits
    kv = FakeKV(capacity=4 + 3)
    out = plugin.schedule(state=ScheduleInput(waiting, (running,), SchedulerLimits(8, 100, 64), kv, 0.0))
    assert ids(out) == [10, 1]  # KV: 4 held by the running one + 2; the next (4) is refused
    assert plugin.calls == 2


def test_a_prompt_larger_than_the_budget_runs_alone():
    sjf_cls = sjf_or_fail()[1]
    out = sjf_cls().schedule(state=ScheduleInput((seq(0, 50, 0.0), seq(1, 60, 1.0)), (),
                                                 SchedulerLimits(8, 16, 128), FakeKV(1000), 0.0))
    assert ids(out) == [0] and out.scheduled[0].num_new_tokens == 50


def test_preempts_a_running_sequence_whose_kv_cannot_grow():
    sjf_cls = sjf_or_fail()[1]
    running = seq(10, 4, 0.0)
    running.num_computed_tokens = 3
    out = sjf_cls().schedule(state=ScheduleInput((), (running,), SchedulerLimits(8, 64, 64), FakeKV(2), 0.0))
    assert out.scheduled == [] and out.preempted == [running]


def test_rejects_prompts_over_max_prompt_tokens():
    sjf_cls = sjf_or_fail()[1]
    plugin = sjf_cls(sjf_cls.Options(max_prompt_tokens=4))
    long, short = seq(0, 5, 0.0), seq(1, 4, 1.0)
    out = plugin.schedule(state=ScheduleInput((long, short), (), SchedulerLimits(8, 64, 64), FakeKV(100), 0.0))
    assert ids(out) == [1]
    assert [(s.seq_id, "max_prompt_tokens" in why) for s, why in out.rejected] == [(0, True)]


# ----------------------------------------------------------------------------------------- in a pipeline
def finish_order(pipe, prompts: dict[str, str], params: SamplingParams, max_steps: int = 200) -> list[str]:
    for rid, text in prompts.items():
        pipe.submit(text, params, request_id=rid)
    order: list[str] = []
    for _ in range(max_steps):
        if len(order) == len(prompts):
            break
        for chunk in pipe.step():
            if chunk.finished:
                assert chunk.output.error is None, chunk.output.error
                order.append(chunk.request_id)
    assert sorted(order) == sorted(prompts), f"not all requests finished in {max_steps} steps: {order}"
    for rid in order:
        pipe.engine.pop_finished(rid)
    return order


PROMPTS = {  # submitted longest first, shortest last
    "long": "The quick brown fox jumps over the lazy dog while the cat watches from the warm window sill",
    "medium": "The quick brown fox jumps over the lazy dog",
    "short": "Hi",
}


def test_pipeline_runs_the_example_scheduler(tiny_llama_dir):
    sjf_cls = sjf_or_fail()[1]
    from tokenmill import Pipeline

    pipe = Pipeline.from_dict(tiny_pipeline_dict(tiny_llama_dir, plugins=["sjf"]), progress=False)
    plugin = pipe.plugins["sjf"]
    assert isinstance(plugin, sjf_cls)
    assert plugin.calls == 0
    outs = pipe.generate(["Hello there", "Hi"], SamplingParams(max_tokens=5, ignore_eos=True))
    assert [o.finish_reason for o in outs] == ["length", "length"]
    assert all(o.num_output_tokens == 5 for o in outs)
    assert plugin.calls >= 5
    assert plugin.admitted == 2


def test_shortest_prompt_finishes_first(tiny_llama_dir):
    sjf_or_fail()
    from tokenmill import Pipeline

    params = SamplingParams(max_tokens=3, ignore_eos=True)
    pipe = Pipeline.from_dict(tiny_pipeline_dict(tiny_llama_dir, plugins=["sjf"],
                                                 limits={"max_model_len": 256, "max_num_seqs": 1,
                                                         "max_num_batched_tokens": 512}), progress=False)
    lengths = {rid: len(pipe.encode(text)) for rid, text in PROMPTS.items()}
    assert lengths["short"] < lengths["medium"] < lengths["long"]
    assert finish_order(pipe, PROMPTS, params) == ["short", "medium", "long"]
    assert pipe.plugins["sjf"].calls > 0

    # The same submissions under the built-in FCFS finish in arrival order: the plugin made the difference.
    fcfs = Pipeline.from_dict(tiny_pipeline_dict(tiny_llama_dir, limits={"max_model_len": 256, "max_num_seqs": 1,
                                                                         "max_num_batched_tokens": 512}),
                              loaded=pipe.loaded, progress=False)
    assert finish_order(fcfs, PROMPTS, params) == ["long", "medium", "short"]


def test_max_prompt_tokens_rejects_in_a_pipeline(tiny_llama_dir):
    sjf_or_fail()
    from tokenmill import Pipeline

    pipe = Pipeline.from_dict(tiny_pipeline_dict(tiny_llama_dir, plugins=[{"sjf": {"max_prompt_tokens": 4}}]),
                              progress=False)
    long, short = pipe.generate([PROMPTS["medium"], "Hi"], SamplingParams(max_tokens=2, ignore_eos=True))
    assert long.finish_reason == "error" and "max_prompt_tokens" in long.error
    assert short.finish_reason == "length" and short.num_output_tokens == 2
