"""The plugin host: discovery of installed plugins and one PluginManager per pipeline.

Plugins are found through the entry-point group ``tokenmill.plugins`` (tokenmill's built-ins are declared
there too). ``BUILTIN_PLUGINS`` is the built-in registry, used when tokenmill runs from a source tree that
was not installed. Environment:

- ``TOKENMILL_PLUGINS``: comma-separated allowlist of discovered plugin names (others are hidden);
- ``TOKENMILL_DISABLE_PLUGINS``: comma-separated denylist;
- ``TOKENMILL_DISABLE_PLUGIN_AUTOLOAD=1``: never register ``autoload`` plugins that a pipeline does not name.

The engine's defaults (``DEFAULT_PLUGINS``) are exempt from the allow and deny lists: they are its baseline.
"""
from __future__ import annotations

import functools
import importlib
import importlib.metadata as md
import os
import warnings
from dataclasses import dataclass
from typing import Any, Iterable

import pluggy

from tokenmill import hookspecs
from tokenmill.errors import PipelineError

ENTRY_POINT_GROUP = "tokenmill.plugins"

BUILTIN_PLUGINS: dict[str, str] = {
    "fcfs": "tokenmill.plugins.batching.fcfs:FCFSScheduler",
    "contiguous_kv": "tokenmill.plugins.kv.contiguous:ContiguousKV",
    "sampler": "tokenmill.plugins.sampling.sampler:Sampler",
    "logits_processors": "tokenmill.plugins.sampling.processors:LogitsProcessors",
    "paged_kv": "tokenmill.plugins.kv.paged:PagedKV",
    "continuous_batching": "tokenmill.plugins.batching.continuous:ContinuousBatching",
    "dynamic_batching": "tokenmill.plugins.batching.dynamic:DynamicBatching",
    "prompt_lookup": "tokenmill.plugins.speculative.prompt_lookup:PromptLookup",
    "speculative": "tokenmill.plugins.speculative.draft_model:Speculative",
    "medusa": "tokenmill.plugins.speculative.medusa:Medusa",
    "int8": "tokenmill.plugins.quant.int8:Int8",
    "int4": "tokenmill.plugins.quant.int4:Int4",
    "nf4": "tokenmill.plugins.quant.nf4:NF4",
    "gguf": "tokenmill.plugins.quant.gguf:GGUF",
    "structured_output": "tokenmill.plugins.structured:StructuredOutput",
}
# Registered in every pipeline with trylast hookimpls: the engine's baseline behaviour.
DEFAULT_PLUGINS: tuple[str, ...] = ("fcfs", "contiguous_kv", "sampler", "logits_processors", "structured_output")

FIRSTRESULT_HOOKS: tuple[str, ...] = tuple(
    name for name in dir(hookspecs)
    if getattr(getattr(hookspecs, name), "tokenmill_spec", {}).get("firstresult")
)


@dataclass(slots=True)
class PluginEntry:
    """One discoverable plugin: its name, where it comes from, and how to load it."""

    name: str
    value: str
    distribution: str

    def load(self) -> Any:
        mod_name, _, attr = self.value.partition(":")
        obj = importlib.import_module(mod_name)
        for part in filter(None, attr.split(".")):
            obj = getattr(obj, part)
        return obj


def _env_names(var: str) -> set[str] | None:
    raw = os.environ.get(var, "").strip()
    return {n.strip() for n in raw.split(",") if n.strip()} if raw else None


def discover_plugins() -> dict[str, PluginEntry]:
    """Every plugin visible to this process, after the allow/deny environment filters."""
    found: dict[str, PluginEntry] = {
        name: PluginEntry(name, value, "tokenmill (built-in)") for name, value in BUILTIN_PLUGINS.items()
    }
    for ep in md.entry_points(group=ENTRY_POINT_GROUP):
        dist = ep.dist.name if ep.dist is not None else "?"
        found[ep.name] = PluginEntry(ep.name, ep.value, dist)
    allow = _env_names("TOKENMILL_PLUGINS")
    deny = _env_names("TOKENMILL_DISABLE_PLUGINS") or set()
    return {
        n: e for n, e in found.items()
        if n in DEFAULT_PLUGINS or ((allow is None or n in allow) and n not in deny)
    }


def _hook_impls(plugin: Any) -> list[tuple[str, dict]]:
    """``(hook name, hookimpl options)`` for each tokenmill hook implementation of a plugin (``specname``
    honoured)."""
    found = []
    for attr in dir(plugin):
        if attr.startswith("_"):
            continue
        opts = getattr(getattr(plugin, attr, None), "tokenmill_impl", None)
        if not isinstance(opts, dict):
            continue
        hook = opts.get("specname") or attr
        if hasattr(hookspecs, hook):
            found.append((hook, opts))
    return found


def hooks_implemented(plugin: Any) -> list[str]:
    """Names of the tokenmill hooks a plugin (class, instance or module) answers: its implementations that
    are not wrappers. Only these count for the ``order`` rule of choose-one hooks."""
    return sorted(h for h, opts in _hook_impls(plugin) if not (opts.get("wrapper") or opts.get("hookwrapper")))


def hooks_wrapped(plugin: Any) -> list[str]:
    """Names of the tokenmill hooks a plugin wraps (``hookimpl(wrapper=True)`` or ``hookwrapper=True``):
    it runs around the other implementations and never counts as answering."""
    return sorted(h for h, opts in _hook_impls(plugin) if opts.get("wrapper") or opts.get("hookwrapper"))


def instantiate(obj: Any, options: Any) -> Any:
    """Make a per-pipeline plugin object: classes get their options, modules are used as they are."""
    return obj(options) if isinstance(obj, type) else obj


@dataclass(slots=True)
class HookFailure:
    """One hook implementation that raised: the plugin's name, the hook, and the exception.

    ``str()`` is the message tokenmill reports: ``plugin 'NAME' failed in HOOK: Type: message``.
    """

    plugin: str | None
    hook: str
    error: BaseException

    def __str__(self) -> str:
        who = f"plugin '{self.plugin}'" if self.plugin is not None else "a plugin"
        return f"{who} failed in {self.hook}: {type(self.error).__name__}: {self.error}"


_FAILURE_ATTR = "__tokenmill_failure__"


def blame(exc: BaseException, hook: str) -> HookFailure:
    """Which plugin ``exc`` came from: the innermost hook implementation it left (a KV plugin's
    ``allocate_kv`` called from a scheduler, say, rather than the scheduler). ``hook`` is the hook the caller
    called, used when no implementation raised it (the plugin is then unknown)."""
    found = getattr(exc, _FAILURE_ATTR, None)
    return found if found is not None else HookFailure(None, hook, exc)


def _mark(exc: Exception, plugin: str, hook: str) -> HookFailure:
    found = getattr(exc, _FAILURE_ATTR, None)
    if found is None:
        found = HookFailure(plugin, hook, exc)
        try:
            setattr(exc, _FAILURE_ATTR, found)
            exc.add_note(f"(raised by plugin '{plugin}' in the {hook} hook)")
        except (AttributeError, TypeError):  # an exception type that takes no attributes stays unnamed
            pass
    return found


def _display_name(plugin: Any, name: str | None) -> str:
    if name is not None:
        return name.partition(":")[2] if name.startswith(("default:", "autoload:")) else name
    return getattr(plugin, "name", None) or getattr(plugin, "__name__", None) or type(plugin).__name__


class _PipelinePluginManager(pluggy.PluginManager):
    """A PluginManager where plugins named by the pipeline are ordered by the pipeline alone.

    Their own tryfirst/trylast marks are dropped; built-in defaults keep theirs (trylast). Every hook
    implementation registered here is wrapped so that an exception leaving it records the plugin and hook
    (:func:`blame`), and so that :func:`call_each` can run the remaining implementations of an observer hook
    after one fails. For choose-one hooks it also records which plugin answered (:func:`answered_by`).
    """

    def __init__(self) -> None:
        super().__init__(hookspecs.PROJECT)
        self.named_ids: set[int] = set()
        self.isolated: dict[str, list[HookFailure]] = {}  # hook -> failures, while call_each runs it
        self.answered: dict[str, str] = {}  # choose-one hook -> the plugin whose answer was taken last

    def parse_hookimpl_opts(self, plugin, name):
        opts = super().parse_hookimpl_opts(plugin, name)
        if opts is not None and id(plugin) in self.named_ids:
            opts = dict(opts, tryfirst=False, trylast=False)
        return opts

    def register(self, plugin, name=None):
        registered = super().register(plugin, name)
        if registered is not None:
            label = _display_name(plugin, name)
            for caller in self.get_hookcallers(plugin) or []:
                for impl in caller.get_hookimpls():
                    if impl.plugin is plugin:
                        impl.function = self._watched(impl.function, label, caller.name,
                                                      impl.wrapper or impl.hookwrapper)
        return registered

    def _watched(self, fn, plugin: str, hook: str, wrapper: bool):
        if wrapper:  # a generator: pluggy drives it around the other implementations
            @functools.wraps(fn)
            def watched_wrapper(*args):
                try:
                    return (yield from fn(*args))
                except Exception as exc:
                    _mark(exc, plugin, hook)
                    raise
            return watched_wrapper

        firstresult = hook in FIRSTRESULT_HOOKS

        @functools.wraps(fn)
        def watched(*args):
            try:
                result = fn(*args)
            except Exception as exc:
                failure = _mark(exc, plugin, hook)
                sink = self.isolated.get(hook)
                if sink is None:
                    raise
                sink.append(failure)  # call_each: report it and let the next implementation run
                return None
            if firstresult and result is not None:
                self.answered[hook] = plugin
            return result
        return watched


def call_each(pm: pluggy.PluginManager, hook: str, **kwargs: Any) -> list[HookFailure]:
    """Call an observer hook so that every implementation runs, even after one raises.

    :return: one :class:`HookFailure` per implementation that raised, in call order (empty when none did).
        A manager not made by :func:`make_plugin_manager` stops at the first failure, as pluggy does.
    """
    failures: list[HookFailure] = []
    isolated = getattr(pm, "isolated", None)
    outer = isolated.get(hook) if isolated is not None else None
    if isolated is not None:
        isolated[hook] = failures
    try:
        getattr(pm.hook, hook)(**kwargs)
    except Exception as exc:  # a wrapper raised, or the manager does not isolate implementations
        failures.append(blame(exc, hook))
    finally:
        if isolated is not None:
            if outer is None:
                del isolated[hook]
            else:
                isolated[hook] = outer
    return failures


def answered_by(pm: pluggy.PluginManager, hook: str) -> str | None:
    """The plugin whose answer to the choose-one ``hook`` was taken most recently (None when unknown)."""
    return getattr(pm, "answered", {}).get(hook)


def call_order(names: list[str], impls: dict[str, list[str]], order: dict[str, list[str]]) -> list[str]:
    """The order in which named plugins are asked, from the YAML list and its ``order:`` constraints.

    :param names: plugin names as listed in the pipeline.
    :param impls: for each name, the hooks it answers (:func:`hooks_implemented`: wrappers do not count).
    :param order: hook name -> plugin names, first asked first.
    :raises PipelineError: two plugins answer one firstresult hook and ``order`` does not rank them, or the
        constraints contradict each other.
    """
    for hook, ranked in order.items():
        unknown = [n for n in ranked if n not in impls]
        if unknown:
            raise PipelineError(f"`order.{hook}` names {unknown}, not among the pipeline's plugins {names}")
    for hook in FIRSTRESULT_HOOKS:
        claimants = [n for n in names if hook in impls[n]]
        ranked = order.get(hook, [])
        unranked = [n for n in claimants if n not in ranked]
        if len(claimants) > 1 and unranked:
            raise PipelineError(
                f"plugins {claimants} all answer the choose-one hook '{hook}'; say which is asked first "
                f"with `order: {{{hook}: [{', '.join(claimants)}]}}` (first non-None result wins)"
            )
    before: dict[str, set[str]] = {n: set() for n in names}
    for hook, ranked in order.items():
        for i, later in enumerate(ranked):
            before[later].update(ranked[:i])
    result: list[str] = []
    pending = list(names)
    while pending:
        ready = next((n for n in pending if before[n] <= set(result)), None)
        if ready is None:
            raise PipelineError(f"`order` constraints contradict each other among {pending}")
        result.append(ready)
        pending.remove(ready)
    return result


def make_plugin_manager(
    named: Iterable[tuple[str, Any]],
    order: dict[str, list[str]] | None = None,
    *,
    catalog: dict[str, PluginEntry] | None = None,
) -> pluggy.PluginManager:
    """Build the PluginManager for one pipeline.

    :param named: ``(name, plugin object)`` pairs the pipeline names, in YAML order, already instantiated.
    :param order: per firstresult hook, the names in the order they are asked.
    :param catalog: discovered plugins (defaults to :func:`discover_plugins`), for defaults and autoload.
    :return: a fresh manager with the hookspecs, the named plugins, autoload plugins and the defaults.
    """
    named = list(named)
    catalog = discover_plugins() if catalog is None else catalog
    pm = _PipelinePluginManager()
    pm.add_hookspecs(hookspecs)
    names = [n for n, _ in named]
    for default in DEFAULT_PLUGINS:
        if default not in names:
            pm.register(instantiate(catalog[default].load(), None), name=f"default:{default}")
    if os.environ.get("TOKENMILL_DISABLE_PLUGIN_AUTOLOAD", "") not in ("1", "true", "yes"):
        for entry in catalog.values():
            if entry.name in names or entry.name in DEFAULT_PLUGINS:
                continue
            try:
                obj = entry.load()
            except Exception as exc:  # one broken installed plugin must not break every pipeline
                warnings.warn(f"skipping plugin '{entry.name}' from {entry.distribution}: it failed to load "
                              f"({type(exc).__name__}: {exc})", RuntimeWarning, stacklevel=2)
                continue
            if getattr(obj, "autoload", False):
                pm.register(instantiate(obj, None), name=f"autoload:{entry.name}")
    impls = {n: hooks_implemented(p) for n, p in named}
    objects = dict(named)
    for name in reversed(call_order(names, impls, order or {})):  # pluggy asks the last registered first
        pm.named_ids.add(id(objects[name]))
        pm.register(objects[name], name=name)
    return pm
