"""Tensor parallelism against one rank: greedy tokens, logits and weight bytes (docs/distributed.md).

    python scripts/tp_check.py [--tp 2] [--prompts 12] [--tokens 64] [--json results/tp_check.json]

Builds each pipeline below at ``tensor_parallel_size`` 1 and N (``threads: 1`` per rank, gloo on this CPU,
default model), generates greedily from the same prompts, and reports per pipeline: whether every output is
token-identical, the largest |logit difference| over every generated step whose context is still the same
in both runs (the raw logits each request's rows had, recorded by a ``process_logits`` observer on the
driver), each rank's weight bytes as a fraction of the single-rank model's, and the decode time. Exits 1 if
any output differs or a logit differs by more than 1e-3, except in the "bf16 compute" row: there each rank
rounds its partial sums to bfloat16 before the all-reduce, which one rank does not, so it is reported only.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from tokenmill import Pipeline, SamplingParams
from tokenmill.plugin import Plugin, hookimpl

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,",
           "List three primary colors:", "Explain photosynthesis in one sentence.", "import numpy as np\n",
           "The best way to learn a language is", "Q: What is 12 times 7?\nA:", "Write a haiku about the sea.",
           "SELECT name FROM users WHERE", "The three laws of motion are", "My favourite recipe for pancakes:"]
BASE = {"model": "smollm2-135m-instruct", "threads": 1,
        "limits": {"max_model_len": 512, "max_num_seqs": 16, "max_num_batched_tokens": 1024}}
PIPELINES = {
    "contiguous": [],
    "continuous+paged": [{"continuous_batching": {}}, {"paged_kv": {"block_size": 16, "num_blocks": 256,
                                                                   "prefix_caching": True}}],
    "int8": [{"continuous_batching": {}}, {"paged_kv": {"block_size": 16, "num_blocks": 256}},
             {"int8": {"lm_head": True, "embed_tokens": True, "compute_dtype": "float32"}}],
    "int8 (bf16 compute)": [{"continuous_batching": {}}, {"paged_kv": {"block_size": 16, "num_blocks": 256}},
                            {"int8": {"lm_head": True, "embed_tokens": True, "compute_dtype": "bfloat16"}}],
    "prompt_lookup": [{"continuous_batching": {}}, {"paged_kv": {"block_size": 16, "num_blocks": 256}},
                      {"prompt_lookup": {"num_speculative_tokens": 4}}],
}


class LogitsRecorder(Plugin):
    """Keeps the raw logits row each request's next token is chosen from, by (request, output position)."""

    name = "logits_recorder"

    def __init__(self) -> None:
        super().__init__(None)
        self.rows: dict[tuple[str, int], torch.Tensor] = {}

    @hookimpl(tryfirst=True)
    def process_logits(self, batch) -> None:
        for i, seq in enumerate(batch.seqs):
            for k in range(1 + len(batch.drafts[i])):
                key = (seq.request_id, seq.num_output_tokens + k, tuple(batch.follows(i, k)) if k else ())
                self.rows[key] = batch.logits[batch.row_start[i] + k].clone()


def run(plugins: list, tp: int, prompts: list[str], tokens: int):
    pipe = Pipeline.from_dict({**BASE, "name": f"tp{tp}", "plugins": plugins,
                               "parallel": {"tensor_parallel_size": tp}}, progress=False)
    try:
        recorder = LogitsRecorder()
        pipe.pm.register(recorder, name="logits_recorder")
        params = SamplingParams(max_tokens=tokens, ignore_eos=True)
        ids = [pipe.apply_chat_template([{"role": "user", "content": p}]) for p in prompts]
        t0 = time.perf_counter()
        outs = pipe.generate(ids, params)
        wall = time.perf_counter() - t0
        info = pipe.info()
        tp_info = info["tensor_parallel"]
        per_rank = tp_info["weight_bytes_per_rank"] if tp_info else [info["weight_bytes"]]
        index = {o.request_id: i for i, o in enumerate(outs)}
        rows = {(index[k[0]], *k[1:]): v for k, v in recorder.rows.items() if k[0] in index}
        return [o.token_ids for o in outs], rows, per_rank, wall
    finally:
        pipe.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--prompts", type=int, default=12)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--only", nargs="*", default=list(PIPELINES))
    ap.add_argument("--json", default="results/tp_check.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    prompts = PROMPTS[:args.prompts]
    report, ok = {}, True
    print(f"| pipeline | identical outputs | max abs logit diff | steps compared | weight bytes per rank / TP=1 "
          f"| TP=1 s | TP={args.tp} s |\n|---|---|---|---|---|---|---|")
    for name in args.only:
        ref_tokens, ref_rows, ref_bytes, ref_wall = run(PIPELINES[name], 1, prompts, args.tokens)
        tokens, rows, per_rank, wall = run(PIPELINES[name], args.tp, prompts, args.tokens)
        same = sum(a == b for a, b in zip(ref_tokens, tokens))
        agree = {i: next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), len(a))
                 for i, (a, b) in enumerate(zip(ref_tokens, tokens))}  # output tokens both runs share
        common = [k for k in ref_rows if k in rows and k[1] <= agree[k[0]]]
        diff = max(float((ref_rows[k] - rows[k]).abs().max()) for k in common)
        fractions = [b / ref_bytes[0] for b in per_rank]
        ok &= (same == len(prompts) and diff <= 1e-3) or "bf16" in name
        report[name] = {"identical": same, "prompts": len(prompts), "tokens": args.tokens, "max_abs_logit_diff": diff,
                        "rows_compared": len(common), "weight_bytes_tp1": ref_bytes[0],
                        "weight_bytes_per_rank": per_rank, "fraction_per_rank": fractions,
                        "wall_tp1_s": ref_wall, f"wall_tp{args.tp}_s": wall}
        print(f"| {name} | {same}/{len(prompts)} | {diff:.2e} | {len(common)} | "
              f"{', '.join(f'{f:.3f}' for f in fractions)} | {ref_wall:.1f} | {wall:.1f} |", flush=True)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"tp": args.tp, "threads_per_rank": 1, "results": report}, indent=2))
    print(f"wrote {args.json}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
