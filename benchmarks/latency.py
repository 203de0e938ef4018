"""Batch-1 greedy decode: HF eager generate() vs tokenmill eager vs tokenmill compiled, in one run.

    python benchmarks/latency.py [--pipeline pipelines/default.yaml] [--new-tokens 128] [--repeats 2]
    python benchmarks/latency.py --peer llama.cpp [--threads 1,2] [--compile]

Writes results/latency.json and results/latency.png and prints a markdown table. With ``--peer llama.cpp``
it runs every bit width against llama.cpp instead (see ``benchmarks/latency_peer.py``; results/latency-peer.*).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import bar_chart, hf_generate_greedy, peak_rss_mb, write  # noqa: E402

PROMPT = "Write a short essay about the history of the printing press and its effect on science."


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pipeline", default="pipelines/default.yaml")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=2, help="timed runs per row (best is reported)")
    ap.add_argument("--threads", default=None, help="torch threads; with --peer a list (default 1,2)")
    ap.add_argument("--peer", choices=["llama.cpp"], default=None,
                    help="every bit width against llama.cpp (needs llama-cpp-python)")
    ap.add_argument("--bits", default=None, help="with --peer: only these bit widths (e.g. 8-bit,4-bit)")
    ap.add_argument("--prefill-tokens", type=int, default=1000, help="with --peer: the prefill prompt's length")
    ap.add_argument("--compile", action="store_true",
                    help="with --peer: every row again with its batch-1 decode step compiled")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--device", default=None, help="override the pipeline's device (e.g. cuda)")
    ap.add_argument("--attention", default=None, help="override the pipeline's attention backend")
    ap.add_argument("--compile-mode", default=None, help="e.g. reduce-overhead (CUDA graphs)")
    ap.add_argument("--name", default=None, help="output file stem under results/")
    args = ap.parse_args()
    if args.peer:
        import latency_peer

        args.threads = args.threads or "1,2"
        args.name = args.name or "latency-peer"
        return latency_peer.main(args)
    args.name = args.name or "latency"
    if args.threads:
        torch.set_num_threads(int(args.threads))
    from transformers import AutoModelForCausalLM

    from tokenmill import Pipeline, SamplingParams, load_spec

    n = args.new_tokens
    def make_spec(compiled: bool):
        spec = load_spec(args.pipeline)
        if args.device:
            spec.device = args.device
        if args.attention:
            spec.attention = args.attention
        if compiled:
            spec.compile.enabled = True
            spec.compile.mode = args.compile_mode
        return spec

    eager = Pipeline(make_spec(False), progress=False)
    eager.wait_ready()  # background preparation (a compiled draft) done before timing
    ids = eager.encode(PROMPT, chat=True)
    hf = AutoModelForCausalLM.from_pretrained(eager.loaded.path, dtype=eager.loaded.dtype,
                                              device_map={"": str(eager.loaded.device)}).eval()
    params = SamplingParams(max_tokens=n, ignore_eos=True)
    rows: dict[str, dict] = {}

    def sync():
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def run_hf():
        return hf_generate_greedy(hf, ids, n)

    def run_tm(pipe):
        def go():
            sync()
            t0 = time.perf_counter()
            res = pipe.generate([ids], params)[0]
            sync()
            return res.token_ids, time.perf_counter() - t0
        return go

    variants = [("HF eager generate()", run_hf), ("tokenmill eager", run_tm(eager))]
    compiled = None
    if not args.no_compile:
        compiled = Pipeline(make_spec(True), progress=False)
        t0 = time.perf_counter()
        compiled.generate([ids], params)  # warm-up: compiles the decode graphs
        rows_warm = time.perf_counter() - t0
        variants.append(("tokenmill compiled", run_tm(compiled)))
    ref = None
    run_hf()  # warm-up for HF too
    eager.generate([ids], SamplingParams(max_tokens=8, ignore_eos=True))
    for _ in range(args.repeats):  # interleave rows so drift on a noisy box hits all alike
        for name, fn in variants:
            toks, dt = fn()
            r = rows.setdefault(name, {"seconds": [], "tokens": n})
            r["seconds"].append(dt)
            if ref is None:
                ref = toks
            r["identical_to_hf"] = toks == ref
    base = min(rows["HF eager generate()"]["seconds"])
    for name, r in rows.items():
        best = min(r["seconds"])
        r["tok_per_s"] = n / best
        r["speedup_vs_hf"] = base / best
    if compiled is not None:
        rows["tokenmill compiled"]["warmup_s"] = rows_warm
    out = write(args.name, {"new_tokens": n, "prompt_tokens": len(ids), "rows": rows,
                            "peak_rss_mb": peak_rss_mb(), "pipeline": args.pipeline})
    bar_chart(args.name, list(rows), [r["tok_per_s"] for r in rows.values()], "tokens / s",
              f"batch 1, greedy, {n} new tokens")
    print(f"| row | tok/s | vs HF eager | greedy tokens identical to HF |\n|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['tok_per_s']:.1f} | {r['speedup_vs_hf']:.2f}x | {r['identical_to_hf']} |")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
