"""Perplexity of the quantized pipelines against float32, on held-out English shipped with Python.

    python benchmarks/perplexity.py [--rows fp32,int8,int4,nf4] [--tokens 20480] [--window 1024] [--stride 512]
                                    [--set int4.group_size=64 ...]

Each row builds its pipeline (``pipelines/continuous.yaml`` for fp32, ``pipelines/<row>.yaml`` otherwise; a
row may also be a YAML path) and runs ``tokenmill.evaluate.pipeline_perplexity``: the same fixed slice of
``pydoc_data.topics`` (``--tokens`` scored tokens), strided windows, through the pipeline's loaded (and
quantized) HF model. ``--set plugin.option=value`` overrides a plugin option (e.g. ``int4.group_size=64``).
Writes results/perplexity.json and prints a markdown table with the change against fp32.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import asdict
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write  # noqa: E402

PIPELINES = {"fp32": "pipelines/continuous.yaml", "int8": "pipelines/int8.yaml", "int4": "pipelines/int4.yaml",
             "nf4": "pipelines/nf4.yaml"}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default="fp32,int8,int4,nf4")
    ap.add_argument("--tokens", type=int, default=20480)
    ap.add_argument("--window", type=int, default=1024)
    ap.add_argument("--stride", type=int, default=512)
    ap.add_argument("--set", action="append", default=[], help="plugin.option=value (YAML value)")
    ap.add_argument("--name", default="perplexity")
    args = ap.parse_args()
    from tokenmill import Pipeline, load_spec
    from tokenmill.evaluate import pipeline_perplexity
    from tokenmill.options import build_options

    overrides: dict[str, dict] = {}
    for item in args.set:
        key, _, value = item.partition("=")
        plugin, _, option = key.partition(".")
        overrides.setdefault(plugin, {})[option] = yaml.safe_load(value)
    results = {}
    for row in [r for r in args.rows.split(",") if r]:
        spec = load_spec(PIPELINES.get(row, row))
        for p in spec.plugins:
            if p.name in overrides:  # rebuilt, so the options' own checks and normalization run again
                p.options = build_options(type(p.options), {**asdict(p.options), **overrides[p.name]}, p.name)
            if p.name == "paged_kv":
                p.options.kv_memory_gb = 0.25  # the evaluation does not use the KV pool
        pipe = Pipeline(spec, progress=False)
        res = pipeline_perplexity(pipe, num_tokens=args.tokens, window=args.window, stride=args.stride)
        res["settings"] = {p.name: repr(p.options) for p in spec.plugins if p.name in ("int8", "int4", "nf4")}
        results[row] = res
        print(f"{row}: ppl {res['perplexity']:.4f} over {res['tokens']} tokens, {res['seconds']:.0f} s", flush=True)
        del pipe
    base = results.get("fp32")
    print(f"\n{args.tokens} tokens of pydoc_data.topics, windows of {args.window}, stride {args.stride}\n"
          "| row | perplexity | vs fp32 | weight MB |\n|---|---|---|---|")
    for row, r in results.items():
        delta = f"{(r['perplexity'] / base['perplexity'] - 1) * 100:+.2f} %" if base else "-"
        r["vs_fp32_pct"] = (r["perplexity"] / base["perplexity"] - 1) * 100 if base else None
        print(f"| {row} | {r['perplexity']:.4f} | {delta} | {r['weight_bytes'] / 1e6:.1f} |")
    print(f"wrote {write(args.name, {'rows': results, 'tokens': args.tokens, 'window': args.window, 'stride': args.stride})}")


if __name__ == "__main__":
    main()
