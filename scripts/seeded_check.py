"""Seeded sampling on shipped pipelines: alone vs in a batch vs with others aborted vs continuous.yaml."""
import sys, time
from tokenmill import Pipeline, SamplingParams

PROMPTS = ["Write a haiku about the sea.", "Repeat after me: the quick brown fox jumps over the lazy dog. The quick",
           "List three uses of copper.", "def fib(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n"]
SEEDED = [(p, SamplingParams(max_tokens=24, temperature=0.8, seed=11 + i)) for i, p in enumerate(PROMPTS)]
OTHERS = [(f"Tell me a story about {w}.", SamplingParams(max_tokens=40, temperature=1.0)) for w in ("a cat", "rain", "a ship")]

def runs(pipe):
    alone = [pipe.generate(p, s, chat=True)[0].token_ids for p, s in SEEDED]
    mixed = [r.token_ids for r in pipe.generate([p for p, _ in OTHERS + SEEDED], [s for _, s in OTHERS + SEEDED], chat=True)][3:]
    others = [pipe.submit(p, s, chat=True) for p, s in OTHERS]
    mine = [pipe.submit(p, s, chat=True) for p, s in SEEDED]
    for _ in range(4):
        pipe.step()
    for r in others:
        pipe.abort(r)
    while pipe.engine.has_unfinished():
        pipe.step()
    aborted = [pipe.collect(r).token_ids for r in mine]
    return alone, mixed, aborted

ref = None
for path in ["pipelines/continuous.yaml"] + sys.argv[1:]:
    t0 = time.perf_counter()
    pipe = Pipeline.from_yaml(path, progress=False)
    pipe.wait_ready()
    alone, mixed, aborted = runs(pipe)
    ref = ref or alone
    print(f"{path}: alone==mixed {alone == mixed}, alone==aborted {alone == aborted}, alone==continuous.yaml {alone == ref} "
          f"({sum(a == b for a, b in zip(alone, ref))}/{len(ref)}); spec {pipe.stats()['spec'].get('acceptance_rate')} "
          f"drafted {pipe.stats()['spec'].get('draft_tokens')}; {time.perf_counter() - t0:.0f} s", flush=True)
