"""Whole-step A/B of the CPU fp32 GEMM kernels: today's dispatch vs weights in oneDNN's packed layout.

    python scripts/gemm_step_ab.py [--pipeline pipelines/continuous.yaml]

Runs ``ModelRunner.run`` of the pipeline's model on 16 and 64 decodes at context 200 and one 512-token prefill,
median of 5 after a warm run, first with ``CpuLinear`` as it is, then with every weight above 4 rows handed to
oneDNN prepacked for 64 rows (``torch.ops.mkldnn._reorder_linear_weight``, a second copy of each weight), and
prints both times and the largest logit difference (0: bit-identical).
"""
import sys
import time

import torch

from tokenmill import Pipeline
from tokenmill.model.kernels.cpu_gemm import CpuLinear

torch.set_num_threads(2)
pipe = Pipeline.from_yaml(sys.argv[sys.argv.index('--pipeline') + 1] if '--pipeline' in sys.argv else 'pipelines/continuous.yaml', progress=False)
runner = pipe.runner
bs = runner.pool.block_size
packed = {}
orig_call = CpuLinear.__call__
def packed_call(self, x, weight, bias):
    m = x.shape[0]
    if m <= 4:
        return orig_call(self, x, weight, bias)
    key = (weight.data_ptr(), tuple(weight.shape))
    p = packed.get(key)
    if p is None:
        p = packed[key] = torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), 64)
    return self.onednn(x, p, bias, "none", [], "")
def items(nseq, ctx):
    per = -(-(ctx + 1) // bs)
    return [([5], ctx, list(range(i * per, (i + 1) * per)), 1) for i in range(nseq)]
def timeit(it, reps=5):
    runner.run(it)
    ts = []
    for _ in range(reps):
        t = time.perf_counter(); runner.run(it); ts.append(time.perf_counter() - t)
    return round(sorted(ts)[len(ts)//2] * 1e3, 1)
cases = [("decode16", items(16, 200)), ("decode64", items(64, 200)), ("prefill512", [(list(range(5, 517)), 0, list(range(0, 65)), 1)])]
for name, it in cases:
    CpuLinear.__call__ = orig_call; a = timeit(it)
    CpuLinear.__call__ = packed_call; b = timeit(it)
    with torch.inference_mode():
        CpuLinear.__call__ = orig_call; o1 = runner.run(it).logits
        CpuLinear.__call__ = packed_call; o2 = runner.run(it).logits
    print(name, "plain", a, "packed", b, "max|dlogit|", float((o1 - o2).abs().max()), flush=True)
