"""Time one pipeline build: python scripts/build_time.py PIPELINE.yaml (model load, quantization, warm-up)."""
import sys, time
t0 = time.perf_counter()
from tokenmill import Pipeline
p = Pipeline.from_yaml(sys.argv[1], progress=False)
print(f"{sys.argv[1]} built in {time.perf_counter() - t0:.1f} s", flush=True)
