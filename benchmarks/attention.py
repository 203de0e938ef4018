"""Attention backends on the default model: one decode step of many sequences at a long context, per backend,
in one run; and greedy output of the default pipeline per backend.

    python benchmarks/attention.py [--seqs 64] [--context 1024] [--block-size 16] [--steps 5]
                                   [--backends sdpa_gather,flex_paged,fused_paged] [--no-greedy]

The step: ``--seqs`` sequences, each with ``--context`` tokens of K/V already in a paged pool (random values on
shuffled, non-contiguous blocks: a decode step's cost does not depend on them), each decoding one token, through
``ModelRunner.run`` (the whole model: embedding, 30 layers, head). Each backend gets one untimed step first
(compilation), then ``--steps`` timed ones; the median is reported. The greedy check runs
``pipelines/continuous.yaml`` (paged KV) with ``attention:`` set to each backend on three prompts x 32 tokens
and compares tokens; ``flex_paged`` and ``fused_paged`` run there with ``min_keys = 0``, so that every decode of
these short prompts goes through FlexAttention or the fused kernel (the count of their calls is reported). Writes results/attention.json and .png.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import yaml

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import bar_chart, write  # noqa: E402

PROMPTS = ["The capital of France is", "Here is a short story about a robot:", "List three uses of a paperclip:\n1."]


def decode_step_ms(model, backend: str, seqs: int, context: int, block_size: int, steps: int) -> dict:
    from tokenmill.hooktypes import KVPool
    from tokenmill.model import ModelRunner

    spec = ModelRunner.kv_spec(model, dtype=torch.float32, device=torch.device("cpu"), max_model_len=2048,
                               max_num_seqs=seqs)
    per_seq = -(-(context + 1) // block_size)
    num_blocks = seqs * per_seq + 8
    g = torch.Generator().manual_seed(0)
    shape = (num_blocks * block_size, spec.num_kv_heads, spec.head_dim)
    pool = KVPool([torch.randn(shape, generator=g) * 0.5 for _ in range(spec.num_layers)],
                  [torch.randn(shape, generator=g) * 0.5 for _ in range(spec.num_layers)], block_size, num_blocks)
    perm = torch.randperm(num_blocks, generator=g).tolist()
    tables = [perm[i * per_seq:(i + 1) * per_seq] for i in range(seqs)]
    runner = ModelRunner(model, pool, attention=backend, max_model_len=2048)
    items = [([100 + i], context, tables[i], 1) for i in range(seqs)]
    t0 = time.perf_counter()
    first = runner.run(items).logits
    warm = time.perf_counter() - t0
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        logits = runner.run(items).logits
        times.append(time.perf_counter() - t0)
    assert torch.equal(first, logits)
    return {"backend": backend, "step_ms": statistics.median(times) * 1e3, "all_ms": [t * 1e3 for t in times],
            "first_step_s": warm, "logits": logits}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seqs", type=int, default=64)
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--backends", default="sdpa_gather,flex_paged,fused_paged")
    ap.add_argument("--no-greedy", action="store_true")
    ap.add_argument("--greedy-only", action="store_true")
    ap.add_argument("--name", default="attention")
    args = ap.parse_args()
    from tokenmill import Pipeline, SamplingParams
    from tokenmill.model import load_model

    backends = args.backends.split(",")
    model = load_model("smollm2-135m-instruct", progress=False).model
    rows = [] if args.greedy_only else [decode_step_ms(model, b, args.seqs, args.context, args.block_size, args.steps)
                                        for b in backends]
    ref = rows[0]["logits"] if rows else None
    for r in rows:
        r["vs_first"] = rows[0]["step_ms"] / r["step_ms"]
        r["max_logit_diff_vs_first"] = float((r["logits"] - ref).abs().max())
    for r in rows:
        del r["logits"]
    greedy, inplace_calls = {}, []
    if not args.no_greedy:
        from tokenmill.model.attention.flex_paged import FlexPaged
        from tokenmill.model.attention.fused_paged import FusedPaged

        for cls in (FlexPaged, FusedPaged):
            cls.min_keys = 0
            real = cls._fn
            cls._fn = lambda self, *a, real=real, name=cls.name: inplace_calls.append(name) or real(self, *a)
        for b in backends:
            data = yaml.safe_load((HERE.parent / "pipelines/continuous.yaml").read_text())
            pipe = Pipeline.from_dict(dict(data, attention=b), progress=False)
            outs = pipe.generate(PROMPTS, SamplingParams(max_tokens=32, ignore_eos=True))
            greedy[b] = [o.token_ids for o in outs]
        print("in-place kernel calls in the greedy runs: "
              + ", ".join(f"{n} {inplace_calls.count(n)}" for n in sorted(set(inplace_calls))))
        same = all(greedy[b] == greedy[backends[0]] for b in backends)
        print(f"greedy tokens identical across backends: {same}")
    print(f"\ndecode step, {args.seqs} sequences x {args.context} tokens of context, block {args.block_size}\n")
    print("| backend | step ms (median) | vs " + backends[0] + " | first step s |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['backend']} | {r['step_ms']:.1f} | {r['vs_first']:.2f}x | {r['first_step_s']:.1f} | "
              f"max logit diff {r['max_logit_diff_vs_first']:.2e} |")
    payload = {"seqs": args.seqs, "context": args.context, "block_size": args.block_size, "rows": rows,
               "in_place_calls_in_greedy": {n: inplace_calls.count(n) for n in sorted(set(inplace_calls))},
               "greedy": greedy,
               "greedy_identical": all(greedy[b] == greedy[backends[0]] for b in backends) if greedy else None}
    print(f"wrote {write(args.name, payload)}")
    if rows:
        bar_chart(args.name, [r["backend"] for r in rows], [r["step_ms"] for r in rows], "ms per decode step",
                  f"{args.seqs} seqs x {args.context} ctx, default model fp32")


if __name__ == "__main__":
    main()
