"""CUDA check for a lent GPU: greedy equality with HF on the GPU through the paged attention backend
(``flex_paged``: FlexAttention over the paged pool, Triton on CUDA), then batch-1 decode eager vs compiled.

    python scripts/gpu_check.py            # prints a markdown table; results/ gets JSON + PNG

Run it only where CUDA exists (it exits 0 with a message otherwise). Compiled uses
mode=reduce-overhead, i.e. CUDA graphs over the bucketed decode shapes.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check")
        return 0
    print(f"device: {torch.cuda.get_device_name(0)}")
    from transformers import AutoModelForCausalLM

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from common import hf_generate_greedy

    from tokenmill import Pipeline, SamplingParams, load_spec

    spec = load_spec(ROOT / "pipelines" / "continuous.yaml")  # paged KV: the pool flex_paged reads in place
    spec.device = "cuda"
    spec.attention = "flex_paged"
    pipe = Pipeline(spec, progress=False)
    print(f"attention backend: {pipe.info()['attention']}")
    hf = AutoModelForCausalLM.from_pretrained(pipe.loaded.path, dtype=torch.float32, device_map={"": "cuda"}).eval()
    prompts = ["The capital of France is", "Here is a short story about a robot:", "def quicksort(xs):"]
    results = pipe.generate(prompts, SamplingParams(max_tokens=32, ignore_eos=True))
    ok = True
    for p, r in zip(prompts, results):
        ref, _ = hf_generate_greedy(hf, pipe.encode(p), 32)
        same = ref == r.token_ids
        ok &= same
        print(f"greedy equality on cuda: {same}  ({p!r})")
    cmd = [sys.executable, str(ROOT / "benchmarks" / "latency.py"), "--device", "cuda",
           "--pipeline", "pipelines/continuous.yaml", "--attention", "flex_paged",
           "--compile-mode", "reduce-overhead", "--name", "gpu_latency"]
    rc = subprocess.call(cmd, cwd=ROOT)
    return 0 if ok and rc == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
