"""The plugin host: discovery, environment filters, per-pipeline managers, hook order, autoload, CLI."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

import tokenmill.host as host
from tokenmill import PipelineError, Plugin, hookimpl
from tokenmill.cli import main
from tokenmill.hooktypes import ScheduleInput, SchedulerLimits, SchedulerOutput
from tokenmill.host import (DEFAULT_PLUGINS, FIRSTRESULT_HOOKS, PluginEntry, discover_plugins, hooks_implemented,
                            make_plugin_manager)

REPO = Path(__file__).resolve().parents[1]

BUILTIN_HOOKS = {
    "fcfs": ["schedule"],
    "contiguous_kv": ["allocate_kv", "free_kv", "init_kv_cache", "kv_stats", "trim_kv"],
    "sampler": ["verify_tokens"],
    "logits_processors": ["check_request", "configure", "process_logits", "request_finished"],
    "structured_output": ["check_request", "configure", "process_logits", "request_args", "request_finished",
                          "shutdown"],
}


# ----------------------------------------------------------------------------------------- inline plugins
class Answer(Plugin):
    """Answers ``schedule`` with a fixed value (None declines) and records that it was asked."""

    def __init__(self, answer=None) -> None:
        super().__init__()
        self.answer = answer
        self.asked = 0

    @hookimpl
    def schedule(self, state):
        self.asked += 1
        return self.answer


class LateAnswer(Answer):
    """Marks its hookimpl trylast: a plugin named in a pipeline is ordered by the pipeline anyway."""

    @hookimpl(trylast=True)
    def schedule(self, state):
        self.asked += 1
        return self.answer


class AutoObserver(Plugin):
    """A cross-cutting plugin that joins every pipeline without being named."""

    name = "auto_observer"
    autoload = True

    def __init__(self, options=None) -> None:
        super().__init__(options)
        self.seen: list = []

    @hookimpl
    def step_end(self, stats):
        self.seen.append(stats)


class AutoScheduler(Plugin):
    """An autoload plugin that also answers ``schedule`` (without tryfirst/trylast marks)."""

    name = "auto_scheduler"
    autoload = True

    @hookimpl
    def schedule(self, state):
        return "autoload"


class NotAutoloaded(AutoObserver):
    autoload = False


class Timer(Plugin):
    """Wraps ``schedule`` (``wrapper=True``): it sees the answer but does not give one."""

    def __init__(self, options=None) -> None:
        super().__init__(options)
        self.answers: list = []

    @hookimpl(wrapper=True)
    def schedule(self, state):
        answer = yield
        self.answers.append(answer)
        return answer


class Broken(Plugin):
    """Raises from ``configure`` and ``step_end``."""

    @hookimpl
    def configure(self, context):
        raise RuntimeError("configure bug")

    @hookimpl
    def step_end(self, stats):
        raise KeyError(stats)


def empty_state() -> ScheduleInput:
    """A step with nothing to do: the built-in FCFS answers it without touching the KV handle."""
    return ScheduleInput(waiting=(), running=(), limits=SchedulerLimits(4, 64, 128), kv=None, now=0.0)


def entry(name: str, cls: type) -> PluginEntry:
    return PluginEntry(name, f"{__name__}:{cls.__name__}", "tokenmill-tests")


def catalog_with(**extra: type) -> dict[str, PluginEntry]:
    cat = dict(discover_plugins())
    cat.update({name: entry(name, cls) for name, cls in extra.items()})
    return cat


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for var in ("TOKENMILL_PLUGINS", "TOKENMILL_DISABLE_PLUGINS", "TOKENMILL_DISABLE_PLUGIN_AUTOLOAD"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture
def extra_plugins(monkeypatch):
    """Two extra discoverable (non-default) plugins, registered as if built in."""
    monkeypatch.setitem(host.BUILTIN_PLUGINS, "extra_a", f"{__name__}:Answer")
    monkeypatch.setitem(host.BUILTIN_PLUGINS, "extra_b", f"{__name__}:LateAnswer")
    return ("extra_a", "extra_b")


# ----------------------------------------------------------------------------------------- discovery
def test_discovery_includes_builtins_with_their_hooks():
    found = discover_plugins()
    for name, hooks in BUILTIN_HOOKS.items():
        assert name in found
        e = found[name]
        assert e.name == name
        assert e.value == host.BUILTIN_PLUGINS[name]
        assert e.distribution in ("tokenmill", "tokenmill (built-in)")
        assert hooks_implemented(e.load()) == hooks
    assert set(DEFAULT_PLUGINS) == set(BUILTIN_HOOKS)


def test_builtin_registry_matches_the_declared_entry_points():
    tomllib = pytest.importorskip("tomllib")
    with open(REPO / "pyproject.toml", "rb") as fh:
        declared = tomllib.load(fh)["project"]["entry-points"][host.ENTRY_POINT_GROUP]
    assert declared == host.BUILTIN_PLUGINS


def test_firstresult_hooks():
    assert set(FIRSTRESULT_HOOKS) == {"schedule", "init_kv_cache", "allocate_kv", "kv_stats", "quantize_layer",
                                      "propose_tokens", "verify_tokens", "match_prefix", "clear_prefix_cache"}
    assert "free_kv" not in FIRSTRESULT_HOOKS and "step_end" not in FIRSTRESULT_HOOKS


def test_hooks_implemented_on_class_instance_and_nothing():
    assert hooks_implemented(Answer) == ["schedule"]
    assert hooks_implemented(Answer("x")) == ["schedule"]
    assert hooks_implemented(AutoObserver) == ["step_end"]
    assert hooks_implemented(object()) == []


def test_allowlist_filters_discovery(monkeypatch, extra_plugins):
    assert set(extra_plugins) <= set(discover_plugins())
    monkeypatch.setenv("TOKENMILL_PLUGINS", " extra_a , ")
    found = discover_plugins()
    assert "extra_a" in found
    assert "extra_b" not in found
    assert "sjf" not in found  # the installed example is hidden too
    assert set(DEFAULT_PLUGINS) <= set(found)  # the engine's defaults are never hidden


def test_denylist_filters_discovery(monkeypatch, extra_plugins):
    monkeypatch.setenv("TOKENMILL_DISABLE_PLUGINS", "extra_a,fcfs")
    found = discover_plugins()
    assert "extra_a" not in found
    assert "extra_b" in found
    assert "fcfs" in found  # a default cannot be denied: every pipeline needs it


def test_denylist_wins_over_allowlist(monkeypatch, extra_plugins):
    monkeypatch.setenv("TOKENMILL_PLUGINS", "extra_a,extra_b")
    monkeypatch.setenv("TOKENMILL_DISABLE_PLUGINS", "extra_b")
    found = discover_plugins()
    assert "extra_a" in found and "extra_b" not in found


def test_hidden_plugin_is_unknown_to_specs(monkeypatch, extra_plugins):
    from tokenmill import load_spec

    monkeypatch.setenv("TOKENMILL_DISABLE_PLUGINS", "extra_a")
    with pytest.raises(PipelineError, match="unknown plugin 'extra_a'"):
        load_spec({"model": "m", "plugins": ["extra_a"]})
    monkeypatch.delenv("TOKENMILL_DISABLE_PLUGINS")
    assert [p.name for p in load_spec({"model": "m", "plugins": ["extra_a"]}).plugins] == ["extra_a"]


# ----------------------------------------------------------------------------------------- managers
def test_each_call_builds_a_fresh_manager():
    pm1 = make_plugin_manager([])
    pm2 = make_plugin_manager([])
    assert pm1 is not pm2
    for name in DEFAULT_PLUGINS:
        p1, p2 = pm1.get_plugin(f"default:{name}"), pm2.get_plugin(f"default:{name}")
        assert p1 is not None and p2 is not None
        assert p1 is not p2
    objs1 = {id(p) for p in pm1.get_plugins()}
    assert not objs1 & {id(p) for p in pm2.get_plugins()}


def test_defaults_answer_when_nothing_is_named():
    pm = make_plugin_manager([])
    out = pm.hook.schedule(state=empty_state())
    assert isinstance(out, SchedulerOutput) and out.scheduled == []
    impls = pm.hook.schedule.get_hookimpls()
    assert [i.plugin_name for i in impls] == ["default:fcfs"]
    assert impls[0].trylast


def test_named_default_replaces_its_default_registration():
    fcfs = discover_plugins()["fcfs"].load()()
    pm = make_plugin_manager([("fcfs", fcfs)])
    assert pm.get_plugin("fcfs") is fcfs
    assert pm.get_plugin("default:fcfs") is None
    assert pm.get_plugin("default:contiguous_kv") is not None


def test_order_decides_which_plugin_answers():
    a, b = Answer("from-a"), Answer("from-b")
    pm = make_plugin_manager([("a", a), ("b", b)], {"schedule": ["b", "a"]})
    assert pm.hook.schedule(state=empty_state()) == "from-b"
    assert (a.asked, b.asked) == (0, 1)

    a2, b2 = Answer("from-a"), Answer("from-b")
    pm = make_plugin_manager([("a", a2), ("b", b2)], {"schedule": ["a", "b"]})
    assert pm.hook.schedule(state=empty_state()) == "from-a"
    assert (a2.asked, b2.asked) == (1, 0)


def test_returning_none_defers_to_the_next_plugin():
    first, second = Answer(None), Answer("from-second")
    pm = make_plugin_manager([("first", first), ("second", second)], {"schedule": ["first", "second"]})
    assert pm.hook.schedule(state=empty_state()) == "from-second"
    assert (first.asked, second.asked) == (1, 1)


def test_all_named_decline_then_the_default_answers():
    first, second = Answer(None), Answer(None)
    pm = make_plugin_manager([("first", first), ("second", second)], {"schedule": ["second", "first"]})
    out = pm.hook.schedule(state=empty_state())
    assert isinstance(out, SchedulerOutput)
    assert (first.asked, second.asked) == (1, 1)
    assert [i.plugin_name for i in reversed(pm.hook.schedule.get_hookimpls())] == ["second", "first", "default:fcfs"]


def test_unordered_claimants_are_refused():
    with pytest.raises(PipelineError, match=r"all answer the choose-one hook 'schedule'"):
        make_plugin_manager([("a", Answer("a")), ("b", Answer("b"))])


def test_a_wrapper_does_not_count_as_answering_a_choose_one_hook(extra_plugins, monkeypatch):
    from tokenmill import load_spec

    timer = Timer()
    pm = make_plugin_manager([("timer", timer), ("a", Answer("from-a"))])  # no `order` needed
    assert pm.hook.schedule(state=empty_state()) == "from-a"
    assert timer.answers == ["from-a"]
    assert hooks_implemented(Timer) == [] and host.hooks_wrapped(Timer) == ["schedule"]
    monkeypatch.setitem(host.BUILTIN_PLUGINS, "timer", f"{__name__}:Timer")
    spec = load_spec({"model": "m", "plugins": ["timer", "extra_a"]})
    assert [p.name for p in spec.plugins] == ["timer", "extra_a"]


def test_contradicting_order_is_refused():
    with pytest.raises(PipelineError, match="contradict"):
        host.call_order(["a", "b"], {"a": ["schedule", "verify_tokens"], "b": ["schedule", "verify_tokens"]},
                        {"schedule": ["a", "b"], "verify_tokens": ["b", "a"]})


def test_named_trylast_plugin_is_asked_before_defaults_and_autoload():
    late = LateAnswer("named")
    pm = make_plugin_manager([("late", late)], catalog=catalog_with(auto_scheduler=AutoScheduler))
    assert pm.get_plugin("autoload:auto_scheduler") is not None
    assert pm.hook.schedule(state=empty_state()) == "named"
    assert late.asked == 1
    asked = [i.plugin_name for i in reversed(pm.hook.schedule.get_hookimpls())]
    assert asked == ["late", "autoload:auto_scheduler", "default:fcfs"]
    impl = {i.plugin_name: i for i in pm.hook.schedule.get_hookimpls()}
    assert not impl["late"].trylast  # the pipeline orders named plugins; their own mark is dropped
    assert impl["default:fcfs"].trylast


def test_named_trylast_plugin_beats_the_default_when_it_answers_alone():
    late = LateAnswer("named")
    pm = make_plugin_manager([("late", late)])
    assert pm.hook.schedule(state=empty_state()) == "named"


def test_autoload_plugin_is_registered():
    cat = catalog_with(auto_observer=AutoObserver, not_autoloaded=NotAutoloaded)
    pm1 = make_plugin_manager([], catalog=cat)
    pm2 = make_plugin_manager([], catalog=cat)
    obs1, obs2 = pm1.get_plugin("autoload:auto_observer"), pm2.get_plugin("autoload:auto_observer")
    assert isinstance(obs1, AutoObserver) and isinstance(obs2, AutoObserver)
    assert obs1 is not obs2  # one instance per pipeline
    assert pm1.get_plugin("autoload:not_autoloaded") is None
    pm1.hook.step_end(stats="step-1")
    assert obs1.seen == ["step-1"] and obs2.seen == []


def test_autoload_plugin_named_by_the_pipeline_is_registered_once():
    named = AutoObserver()
    pm = make_plugin_manager([("auto_observer", named)], catalog=catalog_with(auto_observer=AutoObserver))
    assert pm.get_plugin("auto_observer") is named
    assert pm.get_plugin("autoload:auto_observer") is None
    pm.hook.step_end(stats="s")
    assert named.seen == ["s"]


@pytest.mark.parametrize("value", ["1", "true", "yes"])
def test_disable_autoload_env(monkeypatch, value):
    monkeypatch.setenv("TOKENMILL_DISABLE_PLUGIN_AUTOLOAD", value)
    pm = make_plugin_manager([], catalog=catalog_with(auto_observer=AutoObserver))
    assert pm.get_plugin("autoload:auto_observer") is None
    assert pm.get_plugin("default:fcfs") is not None


# ----------------------------------------------------------------------------------------- failures
def test_an_exception_leaving_a_hook_names_its_plugin_and_hook():
    pm = make_plugin_manager([("broken", Broken())])
    with pytest.raises(RuntimeError, match="configure bug") as info:
        pm.hook.configure(context=None)  # outside call_each: raised as pluggy does, tagged
    failure = host.blame(info.value, "configure")
    assert (failure.plugin, failure.hook) == ("broken", "configure")
    assert str(failure) == "plugin 'broken' failed in configure: RuntimeError: configure bug"
    assert "(raised by plugin 'broken' in the configure hook)" in info.value.__notes__
    assert host.blame(ValueError("x"), "schedule").plugin is None  # not from a hook implementation


def test_call_each_runs_every_observer_and_returns_every_failure():
    first, last = AutoObserver(), AutoObserver()
    pm = make_plugin_manager([("first", first), ("broken_a", Broken()), ("broken_b", Broken()), ("last", last)])
    failures = host.call_each(pm, "step_end", stats="s")
    assert [(f.plugin, f.hook, type(f.error)) for f in failures] == [("broken_a", "step_end", KeyError),
                                                                      ("broken_b", "step_end", KeyError)]
    assert first.seen == ["s"] and last.seen == ["s"]
    with pytest.raises(KeyError):  # a plain hook call keeps pluggy's behaviour
        pm.hook.step_end(stats="t")


# ----------------------------------------------------------------------------------------- CLI
def plugin_rows(out: str) -> dict[str, tuple[str, str]]:
    lines = out.strip().splitlines()
    assert re.split(r"\s{2,}", lines[0].strip()) == ["PLUGIN", "DISTRIBUTION", "HOOKS"]
    rows = {}
    for line in lines[1:]:
        name, dist, hooks = re.split(r"\s{2,}", line.strip(), maxsplit=2)
        rows[name] = (dist, hooks)
    return rows


def test_cli_plugins_lists_builtins(capsys):
    assert main(["plugins"]) == 0
    rows = plugin_rows(capsys.readouterr().out)
    for name, hooks in BUILTIN_HOOKS.items():
        dist, listed = rows[f"{name} (default)"]
        assert dist in ("tokenmill", "tokenmill (built-in)")
        assert listed == ", ".join(hooks)


def test_cli_plugins_lists_a_broken_plugin_without_failing(capsys, monkeypatch):
    monkeypatch.setitem(host.BUILTIN_PLUGINS, "broken", "tokenmill_no_such_module_xyz:Thing")
    assert main(["plugins"]) == 0
    rows = plugin_rows(capsys.readouterr().out)
    assert rows["broken"][1].startswith("<failed to load: ModuleNotFoundError")
    assert "fcfs (default)" in rows


def test_cli_plugins_marks_wrappers(capsys, monkeypatch):
    monkeypatch.setitem(host.BUILTIN_PLUGINS, "timer", f"{__name__}:Timer")
    monkeypatch.setitem(host.BUILTIN_PLUGINS, "broken", f"{__name__}:Broken")
    assert main(["plugins"]) == 0
    rows = plugin_rows(capsys.readouterr().out)
    assert rows["timer"][1] == "schedule (wrapper)"
    assert rows["broken"][1] == "configure, step_end"


def test_cli_validate_default_pipeline(capsys):
    path = REPO / "pipelines" / "default.yaml"
    assert main(["validate", str(path)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"OK {path}: 'default'")
    assert "model=smollm2-135m-instruct" in out and "plugins=[fcfs, contiguous_kv]" in out


def test_cli_validate_bad_file(capsys, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad\nmodel: m\nplugins:\n  - fcfss\n", encoding="utf-8")
    good = REPO / "pipelines" / "default.yaml"
    assert main(["validate", str(bad), str(good)]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith(f"INVALID {bad}:4: unknown plugin 'fcfss' (did you mean 'fcfs'?)")
    assert "available plugins:" in captured.err
    assert f"OK {good}" in captured.out  # later files are still checked
