"""Save a quantized model once, load it without quantizing again.

``DIR/quantized.safetensors`` holds, per quantized matrix, its tensors in the portable layout (the int4 CPU
kernel layout depends on the CPU, so it is rebuilt at load); ``DIR/manifest.json`` says which module names
use which matrix (a tied embedding and LM head share one), the method and its settings (``gptq`` among them:
GPTQ output is other codes in the same format, and its ``calibration`` summary is recorded), and the source
model's config, so that loading into another model or with other settings fails with a clear message.
Float parts (norms, any layer left unquantized) come from the pipeline's own model as usual.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from tokenmill.errors import PipelineError
from tokenmill.options import SpecPath, describe_path
from tokenmill.plugins.quant.base import QuantizedEmbedding, QuantLinear, resolve_compute_dtype
from tokenmill.plugins.quant.quantizer import QuantPlugin

MANIFEST = "manifest.json"
WEIGHTS = "quantized.safetensors"
SEP = "::"  # tensor keys: "<group module name>::<tensor name>"
FORMAT = "tokenmill-quantized"
VERSION = 1
CONFIG_KEYS = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
               "num_attention_heads", "num_key_value_heads", "head_dim", "tie_word_embeddings")


def config_summary(config) -> dict:
    return {k: getattr(config, k, None) for k in CONFIG_KEYS}


def find_quant_plugin(pipe) -> QuantPlugin:
    found = [p for p in pipe.plugins.values() if isinstance(p, QuantPlugin)]
    if len(found) != 1:
        raise PipelineError(f"`tokenmill quantize` needs a pipeline with exactly one quantization plugin "
                            f"(int8, int4 or nf4); '{pipe.spec.name}' has {len(found)}", source=pipe.spec.source)
    return found[0]


def save_quantized(pipe, out_dir: str | os.PathLike, *, source_yaml: str | None = None) -> tuple[Path, Path]:
    """Write the pipeline's quantized layers to ``out_dir`` (created), plus ``pipeline.yaml``: the same
    pipeline with ``load: <out_dir>`` on its quantizer. Returns (manifest path, pipeline path)."""
    from safetensors.torch import save_file

    plugin = find_quant_plugin(pipe)
    if plugin.options.load:
        raise PipelineError("this pipeline loads a saved checkpoint already (`load:`); quantize from the float "
                            "model instead", source=pipe.spec.source)
    model = pipe.loaded.model
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    groups: dict[int, str] = {}
    tensors: dict[str, torch.Tensor] = {}
    manifest = {"format": FORMAT, "version": VERSION, "method": plugin.name, "settings": plugin.options.settings(),
                "model": {"name": pipe.loaded.name, "path": str(pipe.loaded.path),
                          "dtype": str(pipe.loaded.dtype).removeprefix("torch."),
                          "config": config_summary(model.config)},
                "torch": torch.__version__, "groups": {}, "layers": {}}
    if plugin.calibration:  # GPTQ: what the codes were fitted on (the settings themselves are in `settings`)
        manifest["calibration"] = plugin.calibration
    for name in pipe.quantized_layers:
        mod = model.get_submodule(name)
        if isinstance(mod, QuantizedEmbedding):
            q, entry = mod.table, {"module": "embedding", "num_embeddings": mod.num_embeddings,
                                   "embedding_dim": mod.embedding_dim, "padding_idx": mod.padding_idx}
        elif isinstance(mod, QuantLinear):
            q, entry = mod, {"module": "linear"}
        else:
            raise PipelineError(f"layer '{name}' was replaced by {type(mod).__name__}, which cannot be saved")
        if id(q) not in groups:
            groups[id(q)] = name
            meta, ts = q.portable_state()
            manifest["groups"][name] = meta
            for key, t in ts.items():
                tensors[f"{name}{SEP}{key}"] = t.detach().to("cpu").contiguous().clone()
        entry["group"] = groups[id(q)]
        manifest["layers"][name] = entry
    save_file(tensors, str(out / WEIGHTS), metadata={"format": FORMAT})
    path = out / MANIFEST
    path.write_text(json.dumps(manifest, indent=1))
    return path, write_loading_pipeline(pipe, plugin, out, source_yaml)


def write_loading_pipeline(pipe, plugin: QuantPlugin, out: Path, source_yaml: str | None) -> Path:
    """``out/pipeline.yaml``: the pipeline's spec with ``load: <out>`` added to its quantization plugin."""
    import yaml

    raw = dict(pipe.spec.raw)
    resolved = {p.name: p.options for p in pipe.spec.plugins}
    plugins = []
    for item in raw.get("plugins") or []:
        name, opts = (item, {}) if isinstance(item, str) else next(iter(item.items()))
        opts = dict(opts or {})
        for key in opts:  # relative paths were resolved against the source file: keep them valid from `out`
            value = getattr(resolved.get(name), key, None)
            if isinstance(value, SpecPath):
                opts[key] = str(value)
        if name == plugin.name:
            opts = dict(opts, load=str(out.resolve()))
        plugins.append({name: opts} if opts else name)
    raw["plugins"] = plugins
    if raw.get("name"):
        raw["name"] = f"{raw['name']}-saved"
    if isinstance(pipe.spec.model, SpecPath):  # a relative model path stays valid from the new location
        raw["model"] = str(pipe.spec.model)
    path = out / "pipeline.yaml"
    head = f"# written by `tokenmill quantize {source_yaml or ''}`: loads the quantized weights saved here\n"
    path.write_text(head + yaml.safe_dump(raw, sort_keys=False))
    return path


class CheckpointLoader:
    """Builds the quantized modules of a saved checkpoint, one per offered layer name (``load: DIR``)."""

    def __init__(self, directory: str, plugin: QuantPlugin, model_config) -> None:
        from safetensors import safe_open

        self.dir = Path(directory).expanduser()
        where = f"quantized checkpoint {describe_path(directory)}"
        mpath = self.dir / MANIFEST
        if not mpath.is_file() or not (self.dir / WEIGHTS).is_file():
            raise PipelineError(f"{where}: no {MANIFEST} / {WEIGHTS} there; write one with "
                                f"`tokenmill quantize PIPELINE --out {self.dir}`")
        try:
            manifest = json.loads(mpath.read_text())
        except ValueError as exc:
            raise PipelineError(f"{where}: unreadable {MANIFEST}: {exc}") from None
        if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
            raise PipelineError(f"{where}: not a {FORMAT} v{VERSION} checkpoint "
                                f"(format={manifest.get('format')!r}, version={manifest.get('version')!r})")
        if manifest["method"] != plugin.name:
            raise PipelineError(f"{where} was quantized with '{manifest['method']}', but the pipeline loads it "
                                f"through '{plugin.name}'; use the '{manifest['method']}' plugin")
        mine = plugin.options.settings()
        theirs = manifest["settings"]
        diff = {k: (theirs.get(k), mine.get(k)) for k in set(mine) | set(theirs) if theirs.get(k) != mine.get(k)}
        if diff:
            lines = ", ".join(f"{k}: checkpoint {a!r} vs pipeline {b!r}" for k, (a, b) in sorted(diff.items()))
            raise PipelineError(f"{where} was made with other '{plugin.name}' settings ({lines}); use the same "
                                f"options as when it was saved, or quantize again")
        want = config_summary(model_config)
        have = manifest["model"]["config"]
        bad = {k: (have.get(k), want.get(k)) for k in CONFIG_KEYS if have.get(k) != want.get(k)}
        if bad:
            lines = ", ".join(f"{k}={a!r} (pipeline model: {b!r})" for k, (a, b) in bad.items())
            raise PipelineError(f"{where} was quantized from another model, "
                                f"'{manifest['model']['name']}' with {lines}; quantize this pipeline's model "
                                f"with `tokenmill quantize`, or set `model:` to the one it came from")
        self.manifest = manifest
        self.plugin = plugin
        self.file = safe_open(str(self.dir / WEIGHTS), framework="pt")
        self.built: dict[str, QuantLinear] = {}
        self.where = where

    def _group(self, prefix: str, device: torch.device, model_dtype: torch.dtype) -> QuantLinear:
        if prefix not in self.built:
            from tokenmill.plugins.quant import LINEAR_KINDS

            meta = self.manifest["groups"][prefix]
            head = prefix + SEP
            tensors = {k[len(head):]: self.file.get_tensor(k) for k in self.file.keys() if k.startswith(head)}
            opts = self.plugin.options
            cd = resolve_compute_dtype(opts.compute_dtype, model_dtype, device)
            extra = {"compile_kernels": getattr(opts, "compile_kernels", True)}
            self.built[prefix] = LINEAR_KINDS[meta["kind"]].from_portable(
                meta, tensors, compute_dtype=cd, device=device, kernel_max_rows=opts.kernel_max_rows, **extra)
        return self.built[prefix]

    def module_for(self, name: str, module: torch.nn.Module) -> torch.nn.Module | None:
        entry = self.manifest["layers"].get(name)
        if entry is None:
            return None
        meta = self.manifest["groups"][entry["group"]]
        weight = module.weight
        if entry["module"] == "embedding":
            if not isinstance(module, torch.nn.Embedding) or tuple(weight.shape) != (entry["num_embeddings"],
                                                                                    entry["embedding_dim"]):
                raise PipelineError(f"{self.where}: layer '{name}' is an embedding "
                                    f"{entry['num_embeddings']}x{entry['embedding_dim']} there, but "
                                    f"{type(module).__name__} {tuple(weight.shape)} in the pipeline's model")
        elif not isinstance(module, torch.nn.Linear) or (module.out_features, module.in_features) != (
                meta["out_features"], meta["in_features"]):
            raise PipelineError(f"{self.where}: layer '{name}' is a {meta['out_features']}x{meta['in_features']} "
                                f"linear there, but {type(module).__name__} {tuple(weight.shape)} in the model")
        q = self._group(entry["group"], weight.device, weight.dtype)
        if entry["module"] == "embedding":
            return QuantizedEmbedding(q, entry["num_embeddings"], entry["embedding_dim"], entry["padding_idx"],
                                      weight.dtype)
        return q
