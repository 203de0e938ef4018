"""Pipelines built from dicts, with inline plugins registered through the public plugin API."""
from __future__ import annotations

from dataclasses import dataclass

import pytest

from tests.conftest import tiny_pipeline_dict
from tokenmill import Pipeline, PipelineError, Plugin, RequestError, SamplingParams, hookimpl, load_spec
from tokenmill.hooktypes import ScheduledSeq, SchedulerOutput
from tokenmill.host import PluginEntry, discover_plugins


class LastComeFirstServed(Plugin):
    """Admits the newest waiting request first, one at a time; counts its calls."""

    name = "lcfs"

    @dataclass(slots=True)
    class Options:
        note: str = ""

    def __init__(self, options=None):
        super().__init__(options)
        self.calls = 0

    @hookimpl
    def schedule(self, state):
        self.calls += 1
        out = SchedulerOutput()
        for seq in state.running:
            assert state.kv.allocate(seq, seq.num_uncomputed_tokens)
            out.scheduled.append(ScheduledSeq(seq, seq.num_uncomputed_tokens))
        if not state.running and state.waiting:
            seq = state.waiting[-1]
            if state.kv.allocate(seq, seq.num_uncomputed_tokens):
                out.scheduled.append(ScheduledSeq(seq, seq.num_uncomputed_tokens))
        return out


class ExplodingVerifier(Plugin):
    """Fails the step whenever a request with a poisoned first prompt token is being decoded."""

    name = "exploding"
    poison = None

    @hookimpl
    def verify_tokens(self, batch):
        if any(s.prompt_token_ids[0] == self.poison for s in batch.seqs):
            raise RuntimeError("injected failure")
        return None


class Closer(Plugin):
    """Records its ``shutdown`` in a log shared with the other closers."""

    name = "closer"
    log: list = []

    @hookimpl
    def shutdown(self):
        Closer.log.append(self.name)


class BrokenCloser(Plugin):
    name = "broken_closer"

    @hookimpl
    def shutdown(self):
        raise OSError("disk gone")


class NeedsPath(Plugin):
    name = "needs_path"

    @dataclass(slots=True)
    class Options:
        path: str
        mode: str = "r"


class SlotWatcher(Plugin):
    """Declines ``schedule`` (FCFS answers) after noting what the KV handle says about the running sequences."""

    name = "slot_watcher"

    def __init__(self, options=None):
        super().__init__(options)
        self.seen: list = []

    @hookimpl
    def schedule(self, state):
        self.seen.append((state.kv.block_size, [state.kv.num_slots(s) for s in state.running]))
        return None


def catalog_with(*classes):
    catalog = discover_plugins()
    for cls in classes:
        catalog[cls.name] = PluginEntry(cls.name, f"{__name__}:{cls.__name__}", "tests")
    return catalog


def test_inline_scheduler_overrides_default_on_real_path(tiny_llama_dir, monkeypatch):
    catalog = catalog_with(LastComeFirstServed)
    monkeypatch.setattr("tokenmill.spec.discover_plugins", lambda: catalog)
    monkeypatch.setattr("tokenmill.host.discover_plugins", lambda: catalog)
    pipe = Pipeline.from_dict(tiny_pipeline_dict(tiny_llama_dir, plugins=[{"lcfs": {"note": "x"}}]),
                              progress=False)
    plugin = pipe.plugins["lcfs"]
    params = SamplingParams(max_tokens=3, ignore_eos=True)
    ids = [pipe.submit(p, params) for p in ("one", "two", "three")]
    order = []
    while pipe.engine.has_unfinished():
        order += [c.request_id for c in pipe.step() if c.finished]
    assert order == list(reversed(ids))  # the inline policy, not FCFS, decided
    assert plugin.calls == pipe.engine.step_count


def test_failing_step_fails_its_requests_and_engine_carries_on(tiny_llama_dir, monkeypatch):
    catalog = catalog_with(ExplodingVerifier)
    monkeypatch.setattr("tokenmill.spec.discover_plugins", lambda: catalog)
    monkeypatch.setattr("tokenmill.host.discover_plugins", lambda: catalog)
    pipe = Pipeline.from_dict(tiny_pipeline_dict(tiny_llama_dir, plugins=["exploding"]), progress=False)
    poisoned = pipe.encode("poison")
    pipe.plugins["exploding"].poison = poisoned[0]
    res = pipe.generate([poisoned], SamplingParams(max_tokens=4))[0]
    assert res.finish_reason == "error" and "injected failure" in res.error
    assert pipe.stats()["kv"]["used_blocks"] == 0
    ok = pipe.generate("fine", SamplingParams(max_tokens=4, ignore_eos=True))[0]
    assert ok.finish_reason == "length"


def test_two_pipelines_do_not_share_state(tiny_llama_dir):
    a = Pipeline.from_dict(tiny_pipeline_dict(tiny_llama_dir), progress=False)
    b = Pipeline.from_dict(tiny_pipeline_dict(tiny_llama_dir), progress=False)
    assert a.pm is not b.pm and a.runner.pool is not b.runner.pool
    a.submit("x", SamplingParams(max_tokens=2))
    assert not b.engine.has_unfinished()


def test_info_reports_model(tiny_pipeline):
    info = tiny_pipeline.info()
    assert info["architecture"] == "llama" and info["params"] > 0 and info["params"] * 4 <= info["weight_bytes"] < info["params"] * 4 * 1.01
    assert info["max_model_len"] == 256


def test_quantize_layer_hook_swaps_modules(tiny_llama_dir, monkeypatch):
    import torch

    class Doubler(Plugin):
        name = "doubler"

        @hookimpl
        def quantize_layer(self, name, module, model_config):
            if name.endswith("mlp.down_proj"):
                new = torch.nn.Linear(module.in_features, module.out_features, bias=False)
                new.weight.data = module.weight.data * 0
                return new
            return None

    globals()["Doubler"] = Doubler
    catalog = catalog_with(Doubler)
    monkeypatch.setattr("tokenmill.spec.discover_plugins", lambda: catalog)
    monkeypatch.setattr("tokenmill.host.discover_plugins", lambda: catalog)
    pipe = Pipeline.from_dict(tiny_pipeline_dict(tiny_llama_dir, plugins=["doubler"]), progress=False)
    assert len(pipe.quantized_layers) == 2
    assert all(n.endswith("down_proj") for n in pipe.quantized_layers)


@pytest.mark.parametrize("bad", [{"limits": {"max_num_seqs": 0}}, {"plugins": ["nope"]}])
def test_bad_dict_raises(tiny_llama_dir, bad):
    from tokenmill import PipelineError

    with pytest.raises(PipelineError):
        Pipeline.from_dict(tiny_pipeline_dict(tiny_llama_dir, **bad), progress=False)


def use_catalog(monkeypatch, *classes):
    catalog = catalog_with(*classes)
    monkeypatch.setattr("tokenmill.spec.discover_plugins", lambda: catalog)
    monkeypatch.setattr("tokenmill.host.discover_plugins", lambda: catalog)


def test_plugins_is_a_read_only_mapping_of_every_plugin_instance(tiny_pipeline):
    plugins = tiny_pipeline.plugins
    assert {"fcfs", "contiguous_kv", "sampler"} <= set(plugins)  # the defaults take part, so they are listed
    assert plugins["sampler"] is tiny_pipeline.pm.get_plugin("default:sampler")
    with pytest.raises(TypeError):
        plugins["x"] = object()


def test_close_calls_every_shutdown_once_and_reports_failures_by_plugin(tiny_llama_dir, monkeypatch):
    use_catalog(monkeypatch, BrokenCloser, Closer)
    Closer.log.clear()
    with Pipeline.from_dict(tiny_pipeline_dict(tiny_llama_dir, plugins=["broken_closer", "closer"]),
                            progress=False) as pipe:
        rid = pipe.submit("hello", SamplingParams(max_tokens=8, ignore_eos=True))
        pipe.step()
        with pytest.warns(RuntimeWarning, match=r"^plugin 'broken_closer' failed in shutdown: OSError: disk gone"):
            pipe.close()
        assert Closer.log == ["closer"]  # ran although the shutdown before it failed
        assert pipe.collect(rid).finish_reason == "abort"  # close aborts what is in flight, freeing its KV
        assert pipe.stats()["kv"]["used_blocks"] == 0
        with pytest.raises(RequestError, match="closed"):
            pipe.submit("again")
    assert Closer.log == ["closer"]  # leaving the with block closes again: a no-op


@pytest.mark.parametrize("entry", ["needs_path", {"needs_path": {"mode": "w"}}])
def test_an_option_without_a_default_is_required(monkeypatch, entry):
    use_catalog(monkeypatch, NeedsPath)
    with pytest.raises(PipelineError, match=r"option 'path' of plugin 'needs_path' is required$"):
        load_spec({"model": "m", "plugins": [entry]})
    assert load_spec({"model": "m", "plugins": [{"needs_path": {"path": "x"}}]}).plugins[0].options.path == "x"


def test_kv_handle_tells_the_block_size_and_the_slots_a_sequence_holds(tiny_llama_dir, monkeypatch):
    use_catalog(monkeypatch, SlotWatcher)
    pipe = Pipeline.from_dict(tiny_pipeline_dict(tiny_llama_dir, plugins=[
        "slot_watcher", {"paged_kv": {"block_size": 4, "num_blocks": 64}}]), progress=False)
    (res,) = pipe.generate([[5, 6, 7, 8, 9, 10]], SamplingParams(max_tokens=3, ignore_eos=True))
    assert res.finish_reason == "length"
    # 6 prompt tokens, then 7 and 8 tokens: two blocks of 4 each time it runs
    assert pipe.plugins["slot_watcher"].seen == [(4, []), (4, [8]), (4, [8])]
