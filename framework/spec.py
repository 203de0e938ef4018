"""Pipeline specs: YAML (or a dict) -> a validated :class:`PipelineSpec`.

Every problem is one :class:`PipelineError` naming the file, the line, what was wrong and what is allowed.
Relative paths (``model:`` and plugin options typed ``FilePath`` / ``ModelRef``) resolve against the pipeline
file's directory, or against the working directory for a dict.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Literal

from tokenmill.errors import PipelineError
from tokenmill.host import FIRSTRESULT_HOOKS, PluginEntry, discover_plugins, hooks_implemented
from tokenmill.options import OptionError, PathBase, build_options, closest

DTYPES = ("float32", "float16", "bfloat16", "auto")
CPU_GEMM = ("auto", "packed")  # cpu_gemm: float32 projections with one weight copy, or also packed for oneDNN


@dataclass(slots=True)
class CompileSpec:
    """``compile:`` — torch.compile of the model forward."""

    enabled: bool = False
    mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] | None = None
    fullgraph: bool = False
    dynamic: bool | None = None
    backend: str = "inductor"
    buckets: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16, 32, 64, 128, 256])
    kv_multiple: int = 64

    def __post_init__(self) -> None:
        if self.kv_multiple < 1:
            raise ValueError(f"kv_multiple must be >= 1, got {self.kv_multiple}")
        if sorted(set(self.buckets)) != list(self.buckets) or not self.buckets or self.buckets[0] < 1:
            raise ValueError(f"buckets must be increasing positive integers, got {self.buckets}")


@dataclass(slots=True)
class LimitsSpec:
    """``limits:`` — bounds of the engine."""

    max_model_len: int = 2048
    max_num_seqs: int = 16
    max_num_batched_tokens: int = 2048

    def __post_init__(self) -> None:
        for key in ("max_model_len", "max_num_seqs", "max_num_batched_tokens"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be >= 1, got {getattr(self, key)}")


@dataclass(slots=True)
class ParallelSpec:
    """``parallel:`` — tensor parallelism over ``torch.distributed`` (docs/distributed.md)."""

    tensor_parallel_size: int = 1  # ranks the layers are split over (1: no split); the driver is rank 0

    def __post_init__(self) -> None:
        if not isinstance(self.tensor_parallel_size, int) or self.tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be an integer >= 1, got {self.tensor_parallel_size!r}")


@dataclass(slots=True)
class PluginSpec:
    name: str
    options: Any
    entry: PluginEntry
    obj: Any  # the loaded class or module


@dataclass(slots=True)
class PipelineSpec:
    model: str
    name: str = "pipeline"
    description: str = ""
    dtype: str = "float32"
    device: str = "cpu"
    seed: int = 0
    threads: int | None = None
    attention: str = "auto"
    cpu_gemm: str = "auto"
    plugins: list[PluginSpec] = field(default_factory=list)
    order: dict[str, list[str]] = field(default_factory=dict)
    compile: CompileSpec = field(default_factory=CompileSpec)
    limits: LimitsSpec = field(default_factory=LimitsSpec)
    parallel: ParallelSpec = field(default_factory=ParallelSpec)
    source: str = "<dict>"
    raw: dict = field(default_factory=dict)


TOP_KEYS: dict[str, str] = {
    "name": "str", "description": "str", "model": "str (alias, HF directory, .gguf file or hub id)",
    "dtype": " | ".join(DTYPES), "device": "cpu | cuda | cuda:N | mps | auto", "seed": "int",
    "threads": "int | null", "attention": "auto | an attention backend name (tokenmill.attention entry points)",
    "cpu_gemm": " | ".join(CPU_GEMM),
    "plugins": "list", "order": "mapping hook -> [plugin, ...]",
    "compile": "mapping", "limits": "mapping", "parallel": "mapping",
}


def load_spec(source: str | os.PathLike | dict, *, catalog: dict[str, PluginEntry] | None = None) -> PipelineSpec:
    """Load and validate a pipeline from a YAML path or an already-parsed dict."""
    from tokenmill.yamlsrc import load_with_lines

    if isinstance(source, dict):
        data, lines, where = source, {}, "<dict>"
    else:
        where = os.fspath(source)
        try:
            with open(where, encoding="utf-8") as fh:
                text = fh.read()
        except OSError as exc:
            raise PipelineError(f"cannot read pipeline file: {exc.strerror}", source=where) from None
        data, lines = load_with_lines(text, where)
    catalog = discover_plugins() if catalog is None else catalog

    def fail(msg: str, path: tuple = ()) -> PipelineError:
        line = None
        while path and line is None:
            line = lines.get(path)
            path = path[:-1]
        return PipelineError(msg, source=where, line=line or lines.get(()))

    if not isinstance(data, dict):
        raise fail(f"a pipeline must be a mapping with keys {', '.join(TOP_KEYS)}; got {type(data).__name__}")
    for key in data:
        if key not in TOP_KEYS:
            raise fail(f"unknown key '{key}'{closest(key, list(TOP_KEYS))}; allowed keys: "
                       + ", ".join(TOP_KEYS), (key,))
    if "model" not in data or not isinstance(data["model"], str) or not data["model"].strip():
        raise fail("'model' is required: a model alias (e.g. smollm2-135m-instruct), an HF model directory, "
                   "a .gguf file or a hub id", ("model",))
    paths = PathBase.for_source(None if isinstance(source, dict) else where)
    spec = PipelineSpec(model=paths.resolve(data["model"], "model"), source=where, raw=dict(data))
    for key, tp in (("name", str), ("description", str), ("device", str), ("attention", str), ("cpu_gemm", str)):
        if key in data:
            if not isinstance(data[key], tp):
                raise fail(f"'{key}' must be {TOP_KEYS[key]}, got {data[key]!r}", (key,))
            setattr(spec, key, data[key])
    if "dtype" in data:
        if data["dtype"] not in DTYPES:
            raise fail(f"'dtype' must be one of {', '.join(DTYPES)}; got {data['dtype']!r}", ("dtype",))
        spec.dtype = data["dtype"]
    if not (spec.device in ("cpu", "cuda", "mps", "auto") or spec.device.startswith("cuda:")):
        raise fail(f"'device' must be {TOP_KEYS['device']}; got {spec.device!r}", ("device",))
    if spec.attention != "auto":
        from tokenmill.model.attention import discover_backends

        backends = discover_backends()
        if spec.attention not in backends:
            raise fail(f"unknown attention backend '{spec.attention}'{closest(spec.attention, list(backends))}; "
                       "allowed: auto, " + ", ".join(sorted(backends)), ("attention",))
    if spec.cpu_gemm not in CPU_GEMM:
        raise fail(f"'cpu_gemm' must be {TOP_KEYS['cpu_gemm']}; got {spec.cpu_gemm!r}", ("cpu_gemm",))
    for key in ("seed", "threads"):
        if key in data:
            val = data[key]
            if (val is None and key == "threads") or (isinstance(val, int) and not isinstance(val, bool)):
                if isinstance(val, int) and key == "threads" and val < 1:
                    raise fail(f"'threads' must be >= 1 or null, got {val}", (key,))
                setattr(spec, key, val)
            else:
                raise fail(f"'{key}' must be {TOP_KEYS[key]}, got {val!r}", (key,))
    for key, cls in (("compile", CompileSpec), ("limits", LimitsSpec), ("parallel", ParallelSpec)):
        if key in data:
            try:
                setattr(spec, key, build_options(cls, data[key], f"'{key}'"))
            except OptionError as exc:
                raise fail(str(exc), (key, exc.key) if exc.key else (key,)) from None

    if spec.parallel.tensor_parallel_size > 1 and spec.compile.enabled:
        raise fail("'compile' cannot be enabled with parallel.tensor_parallel_size > 1 (the compiled graphs do not "
                   "hold the collectives yet); drop one of them", ("compile",))
    raw_plugins = data.get("plugins") or []
    if not isinstance(raw_plugins, list):
        raise fail("'plugins' must be a list of plugin names or {name: {options}} entries", ("plugins",))
    names: list[str] = []
    for i, item in enumerate(raw_plugins):
        path = ("plugins", i)
        if isinstance(item, str):
            name, opts = item, None
        elif isinstance(item, dict) and len(item) == 1:
            name, opts = next(iter(item.items()))
        else:
            raise fail("each plugin entry is a name or a one-key mapping {name: {option: value}}; got "
                       f"{item!r}", path)
        if name not in catalog:
            raise fail(f"unknown plugin '{name}'{closest(name, list(catalog))}; available plugins: "
                       + ", ".join(sorted(catalog)), path)
        if name in names:
            raise fail(f"plugin '{name}' is listed twice", path)
        names.append(name)
        entry = catalog[name]
        try:
            obj = entry.load()
        except Exception as exc:
            raise fail(f"plugin '{name}' (from {entry.distribution}, {entry.value}) failed to load: "
                       f"{type(exc).__name__}: {exc}", path) from None
        opts_cls = getattr(obj, "Options", None) if isinstance(obj, type) else None
        try:
            if opts_cls is None:
                if opts:
                    raise OptionError(f"plugin '{name}' takes no options, got {sorted(opts)}")
                options = None
            else:
                options = build_options(opts_cls, opts, f"plugin '{name}'", paths=paths)
        except OptionError as exc:
            opath = path + (name, exc.key) if exc.key else path + (name,)
            raise fail(str(exc), opath) from None
        spec.plugins.append(PluginSpec(name, options, entry, obj))

    order = data.get("order") or {}
    if not isinstance(order, dict):
        raise fail("'order' must map a hook name to a list of plugin names", ("order",))
    for hook, ranked in order.items():
        if hook not in FIRSTRESULT_HOOKS:
            raise fail(f"'order' names unknown choose-one hook '{hook}'{closest(hook, list(FIRSTRESULT_HOOKS))}; "
                       f"allowed: {', '.join(FIRSTRESULT_HOOKS)}", ("order", hook))
        if not isinstance(ranked, list) or not all(isinstance(n, str) for n in ranked):
            raise fail(f"'order.{hook}' must be a list of plugin names", ("order", hook))
        for n in ranked:
            if n not in names:
                raise fail(f"'order.{hook}' names '{n}', which is not in this pipeline's plugins "
                           f"({', '.join(names) or 'none'})", ("order", hook))
    spec.order = order
    from tokenmill.host import call_order
    impls = {p.name: hooks_implemented(p.obj) for p in spec.plugins}
    try:
        call_order(names, impls, order)
    except PipelineError as exc:
        raise fail(str(exc), ("order",) if order else ("plugins",)) from None
    return spec
