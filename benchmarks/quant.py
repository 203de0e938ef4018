"""Quantized pipelines vs float32: batch-1 decode speed, weight memory, and (optionally) batched throughput.

    python benchmarks/quant.py [--new-tokens 128] [--repeats 2] [--rows int8,int4,nf4] [--compile]
                               [--batch-requests 64 --batch-new-tokens 32] [--threads N]

Batch 1 (all rows in one process, timed runs interleaved so drift on a noisy box hits all alike, best of
``--repeats``): HF eager fp32 ``generate()`` (the baseline), tokenmill fp32 (``pipelines/continuous.yaml``)
and the quantized pipelines ``pipelines/{int8,int4,nf4}.yaml``; one chat-templated prompt, greedy,
``--new-tokens`` new tokens, EOS ignored. ``--compile`` also runs each tokenmill row with ``compile.enabled``.
Each row reports tok/s, speed-up over HF, weight bytes as loaded (``Pipeline.info()['weight_bytes']``: parameters
and buffers, so the quantized modules' packed weights and scales), the ratio to fp32 and bits per weight
(weight bytes * 8 / the float model's parameter count), and how many greedy tokens match HF fp32's.

Batched (``--batch-requests N``, 0 to skip): N requests with random prompts of 16..256 tokens, submitted at
once, ``--batch-new-tokens`` each; fp32 continuous vs int8 (and any ``--batch-rows``). Throughput = generated
tokens / wall time. Writes results/quant.json and prints markdown tables.
"""
from __future__ import annotations

import argparse
import os
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import hf_generate_greedy, peak_rss_mb, write  # noqa: E402

PROMPT = "Write a short essay about the history of the printing press and its effect on science."
PIPELINES = {"fp32": "pipelines/continuous.yaml", "int8": "pipelines/int8.yaml", "int4": "pipelines/int4.yaml",
             "nf4": "pipelines/nf4.yaml"}


def load_avg() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "?"


def make_pipeline(row: str, *, compiled: bool, kv_gb: float | None):
    from tokenmill import Pipeline, load_spec

    spec = load_spec(PIPELINES[row])
    if compiled:
        spec.compile.enabled = True
    if kv_gb is not None:
        for p in spec.plugins:
            if p.name == "paged_kv":
                p.options.kv_memory_gb = kv_gb
    return Pipeline(spec, progress=False)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--rows", default="int8,int4,nf4")
    ap.add_argument("--compile", action="store_true", help="also time each tokenmill row compiled")
    ap.add_argument("--batch-requests", type=int, default=0)
    ap.add_argument("--batch-new-tokens", type=int, default=32)
    ap.add_argument("--batch-rows", default="fp32,int8")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--name", default="quant")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM

    from tokenmill import SamplingParams

    load_before = load_avg()
    n = args.new_tokens
    rows_wanted = ["fp32"] + [r for r in args.rows.split(",") if r and r != "fp32"]
    pipes, warmup = {}, {}
    params = SamplingParams(max_tokens=n, ignore_eos=True)
    for row in rows_wanted:
        for compiled in ([False, True] if args.compile else [False]):
            label = f"tokenmill {row}" + (" compiled" if compiled else "")
            t0 = time.perf_counter()
            pipes[label] = make_pipeline(row, compiled=compiled, kv_gb=0.25)
            warmup[label] = {"build_s": time.perf_counter() - t0}
    base = pipes["tokenmill fp32"]
    ids = base.encode(PROMPT, chat=True)
    for label, pipe in pipes.items():  # warm-up: compiles kernels / decode graphs at the timed shapes
        t0 = time.perf_counter()
        pipe.generate([ids], params)
        warmup[label]["warmup_s"] = time.perf_counter() - t0
    hf = AutoModelForCausalLM.from_pretrained(base.loaded.path, dtype=torch.float32).eval()
    hf_generate_greedy(hf, ids, 8)

    def run_tm(pipe):
        t0 = time.perf_counter()
        res = pipe.generate([ids], params)[0]
        return res.token_ids, time.perf_counter() - t0

    variants = [("HF eager fp32 generate()", lambda: hf_generate_greedy(hf, ids, n))]
    variants += [(label, (lambda p: lambda: run_tm(p))(pipe)) for label, pipe in pipes.items()]
    rows: dict[str, dict] = {}
    ref = None
    for _ in range(args.repeats):
        for label, fn in variants:
            toks, dt = fn()
            r = rows.setdefault(label, {"seconds": []})
            r["seconds"].append(dt)
            if ref is None:
                ref = toks
            r["tokens_matching_hf"] = next((i for i, (a, b) in enumerate(zip(toks, ref)) if a != b), len(ref))
    fp32_bytes = base.info()["weight_bytes"]
    fp32_params = base.info()["params"]
    hf_best = min(rows["HF eager fp32 generate()"]["seconds"])
    for label, r in rows.items():
        best = min(r["seconds"])
        r.update(tok_per_s=n / best, speedup_vs_hf=hf_best / best)
        if label in pipes:
            info = pipes[label].info()
            r.update(weight_bytes=info["weight_bytes"], weight_ratio=info["weight_bytes"] / fp32_bytes,
                     bits_per_param=info["weight_bytes"] * 8 / fp32_params,
                     quantized_layers=info["quantized_layers"], **warmup[label])
    rows["HF eager fp32 generate()"].update(weight_bytes=sum(p.numel() * p.element_size() for p in hf.parameters()))
    hf = None  # free it before the batched rows

    batch = {}
    if args.batch_requests:
        rng = random.Random(0)
        prompts = [[rng.randrange(100, 40000) for _ in range(rng.randint(16, 256))]
                   for _ in range(args.batch_requests)]
        bparams = SamplingParams(max_tokens=args.batch_new_tokens, ignore_eos=True)
        for row in [r for r in args.batch_rows.split(",") if r]:
            for label in list(pipes):
                pipes[label] = None  # free batch-1 pipelines' KV pools
            pipe = make_pipeline(row, compiled=False, kv_gb=None)
            pipe.generate(prompts[:4], SamplingParams(max_tokens=4, ignore_eos=True))  # warm-up
            t0 = time.perf_counter()
            outs = pipe.generate(prompts, bparams)
            dt = time.perf_counter() - t0
            made = sum(len(o.token_ids) for o in outs)
            batch[row] = {"requests": len(prompts), "new_tokens": made, "seconds": dt, "tok_per_s": made / dt}
            del pipe
        if "fp32" in batch:
            for r in batch.values():
                r["vs_fp32"] = r["tok_per_s"] / batch["fp32"]["tok_per_s"]

    out = write(args.name, {"new_tokens": n, "prompt_tokens": len(ids), "rows": rows, "batched": batch,
                            "fp32_weight_bytes": fp32_bytes, "fp32_params": fp32_params,
                            "load_avg_before": load_before, "load_avg_after": load_avg(),
                            "peak_rss_mb": peak_rss_mb()})
    print(f"batch 1, greedy, {n} new tokens, prompt {len(ids)} tokens; load average before {load_before}, "
          f"after {load_avg()}")
    print("| row | tok/s | vs HF fp32 | weight MB | vs fp32 | bits/param | greedy tokens = HF |\n"
          "|---|---|---|---|---|---|---|")
    for label, r in rows.items():
        wr = f"{r['weight_ratio']:.3f}x" if "weight_ratio" in r else "-"
        bp = f"{r['bits_per_param']:.2f}" if "bits_per_param" in r else "-"
        print(f"| {label} | {r['tok_per_s']:.1f} | {r['speedup_vs_hf']:.2f}x | {r['weight_bytes'] / 1e6:.1f} | {wr} "
              f"| {bp} | {r['tokens_matching_hf']}/{n} |")
    if batch:
        print(f"\n{args.batch_requests} requests, {args.batch_new_tokens} new tokens each\n"
              "| pipeline | tok/s | vs fp32 | seconds |\n|---|---|---|---|")
        for row, r in batch.items():
            print(f"| {row} | {r['tok_per_s']:.1f} | {r.get('vs_fp32', 1):.2f}x | {r['seconds']:.1f} |")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
