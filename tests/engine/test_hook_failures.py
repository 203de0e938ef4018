"""What happens when a plugin's hook raises during a step: the plugin is named, the engine carries on.

The rule is in docs/architecture.md ("Error handling"). One pipeline with inline plugins serves every test;
each plugin misbehaves only for requests whose first prompt token is its own poison.
"""
from __future__ import annotations

import warnings

import pytest

from tests.conftest import tiny_pipeline_dict
from tokenmill import Pipeline, Plugin, SamplingParams, hookimpl
from tokenmill.host import PluginEntry, discover_plugins

POISON_SCHEDULE, POISON_ALLOC, POISON_VERIFY, POISON_DRAFT, POISON_FREE = 101, 102, 103, 104, 105
PARAMS = SamplingParams(max_tokens=4, ignore_eos=True)


def poisoned(seqs, token) -> bool:
    return any(s.prompt_token_ids[0] == token for s in seqs)


class FlakyScheduler(Plugin):
    """Declines (FCFS answers) until a poisoned request is running: then reserves KV and raises."""

    name = "flaky_scheduler"

    @hookimpl
    def schedule(self, state):
        if any(s.prompt_token_ids[0] == POISON_SCHEDULE and s.num_output_tokens for s in state.running):
            for seq in state.running:
                state.kv.allocate(seq, seq.num_uncomputed_tokens)
            raise RuntimeError("scheduler bug")
        return None


class BadAllocator(Plugin):
    """Raises inside ``allocate_kv`` (called from the scheduler through the KV handle) for its poison."""

    name = "bad_allocator"

    @hookimpl
    def allocate_kv(self, seq, num_new_tokens, num_cached_tokens):
        if seq.prompt_token_ids[0] == POISON_ALLOC:
            raise ValueError("allocator bug")
        return None


class BadVerifier(Plugin):
    name = "bad_verifier"

    @hookimpl
    def verify_tokens(self, batch):
        if poisoned(batch.seqs, POISON_VERIFY):
            raise RuntimeError("verifier bug")
        return None


class BadDrafter(Plugin):
    name = "bad_drafter"

    @hookimpl
    def propose_tokens(self, seqs):
        if poisoned(seqs, POISON_DRAFT):
            raise RuntimeError("drafter bug")
        return None


class BadFreer(Plugin):
    """Listed before the KV plugin's own ``free_kv`` (the default, asked last): raises for its poison."""

    name = "bad_freer"

    @hookimpl
    def free_kv(self, seq, reusable):
        if seq.prompt_token_ids[0] == POISON_FREE:
            raise RuntimeError("freer bug")


class BrokenObserverA(Plugin):
    name = "broken_a"
    armed = False

    @hookimpl
    def step_end(self, stats):
        if self.armed:
            raise RuntimeError("observer A bug")


class BrokenObserverB(BrokenObserverA):
    name = "broken_b"

    @hookimpl
    def step_end(self, stats):
        if self.armed:
            raise KeyError("observer B bug")


class CountingObserver(Plugin):
    name = "counting"

    def __init__(self, options=None) -> None:
        super().__init__(options)
        self.steps: list[int] = []

    @hookimpl
    def step_end(self, stats):
        self.steps.append(stats.step)


PLUGINS = (FlakyScheduler, BadAllocator, BadVerifier, BadDrafter, BadFreer, BrokenObserverA, BrokenObserverB,
           CountingObserver)


@pytest.fixture(scope="module")
def pipe(tiny_llama_dir):
    catalog = discover_plugins()
    for cls in PLUGINS:
        catalog[cls.name] = PluginEntry(cls.name, f"{__name__}:{cls.__name__}", "tests")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("tokenmill.spec.discover_plugins", lambda: catalog)
        mp.setattr("tokenmill.host.discover_plugins", lambda: catalog)
        # observers listed in this order: the counting one is asked after both broken ones
        return Pipeline.from_dict(tiny_pipeline_dict(tiny_llama_dir, plugins=[c.name for c in PLUGINS]),
                                  progress=False)


def run(pipe, prompts, max_steps=50):
    """Submit ``prompts`` and step until they finish (bounded: a wedged engine fails the test, not hangs)."""
    ids = [pipe.submit(p, PARAMS) for p in prompts]
    for _ in range(max_steps):
        if not pipe.engine.has_unfinished():
            break
        pipe.step()
    assert not pipe.engine.has_unfinished(), "requests still in flight after max_steps"
    return [pipe.collect(r) for r in ids]


def assert_idle_and_freed(pipe):
    assert not pipe.engine.running and not pipe.engine.waiting
    assert pipe.stats()["kv"]["used_blocks"] == 0


def test_raising_schedule_fails_the_requests_it_was_shown_frees_their_kv_and_the_engine_carries_on(pipe):
    bad, other = run(pipe, [[POISON_SCHEDULE, 5, 6], [7, 8, 9]])
    for res in (bad, other):  # the scheduler saw both: neither can be trusted to continue
        assert res.finish_reason == "error"
        assert res.error == "plugin 'flaky_scheduler' failed in schedule: RuntimeError: scheduler bug"
    assert_idle_and_freed(pipe)
    (ok,) = run(pipe, [[7, 8, 9]])  # later requests run normally
    assert ok.finish_reason == "length" and len(ok.token_ids) == 4


def test_raising_allocate_kv_inside_schedule_names_the_kv_plugin(pipe):
    (bad,) = run(pipe, [[POISON_ALLOC, 5, 6]])
    assert bad.finish_reason == "error"
    assert bad.error == "plugin 'bad_allocator' failed in allocate_kv: ValueError: allocator bug"
    assert_idle_and_freed(pipe)
    (ok,) = run(pipe, [[7, 8, 9]])
    assert ok.finish_reason == "length"


def test_raising_verify_tokens_fails_only_its_request_naming_the_plugin(pipe):
    bad, ok = run(pipe, [[POISON_VERIFY, 5, 6], [7, 8, 9]])
    assert bad.finish_reason == "error"
    assert bad.error == "plugin 'bad_verifier' failed in verify_tokens: RuntimeError: verifier bug"
    assert ok.finish_reason == "length"
    assert_idle_and_freed(pipe)


def test_raising_propose_tokens_costs_drafts_not_requests_and_warns_naming_the_plugin(pipe):
    with pytest.warns(RuntimeWarning) as record:
        (res,) = run(pipe, [[POISON_DRAFT, 5, 6]])
    assert res.finish_reason == "length"
    messages = [str(w.message) for w in record]
    assert any(m.startswith("plugin 'bad_drafter' failed in propose_tokens: RuntimeError: drafter bug")
               for m in messages), messages


def test_raising_free_kv_is_reported_and_the_other_free_kv_implementations_still_run(pipe):
    with pytest.warns(RuntimeWarning) as record:
        (res,) = run(pipe, [[POISON_FREE, 5, 6]])
    assert res.finish_reason == "length"
    messages = [str(w.message) for w in record]
    assert any(m.startswith("plugin 'bad_freer' failed in free_kv: RuntimeError: freer bug") for m in messages)
    assert_idle_and_freed(pipe)  # contiguous_kv's free_kv ran after the failing one


def test_failing_step_end_observers_do_not_skip_the_rest_and_each_is_reported(pipe):
    counting = pipe.plugins["counting"]
    before = len(counting.steps)
    BrokenObserverA.armed = True
    try:
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            (res,) = run(pipe, [[7, 8, 9]])
    finally:
        BrokenObserverA.armed = False
    assert res.finish_reason == "length"  # observers never fail requests
    steps = len(counting.steps) - before
    assert steps == 4  # the observer after the two failing ones ran at every step
    messages = [str(w.message) for w in record if issubclass(w.category, RuntimeWarning)]
    a = [m for m in messages if m.startswith("plugin 'broken_a' failed in step_end: RuntimeError: observer A bug")]
    b = [m for m in messages if m.startswith("plugin 'broken_b' failed in step_end: KeyError: 'observer B bug'")]
    assert len(a) == steps and len(b) == steps, messages  # every failure of every observer is reported
