"""Structured output under load: N concurrent json_schema requests vs the same N unconstrained, and compile times.

    python benchmarks/structured.py [--requests 16] [--max-tokens 384] [--pipeline pipelines/default.yaml]
                                    [--repeats 2] [--threads 2]

The default model through ``--pipeline`` (default ``pipelines/default.yaml``: FCFS iteration-level batching,
up to its ``max_num_seqs`` running at once), greedy, chat template on. ``--requests`` requests are submitted at
once, each with one of the schemas of ``benchmarks/data/json_schemas.json`` (cycled) and a prompt asking for
such an object:

* ``json_schema``: ``plugin_args={"structured_output": {"type": "json_schema", "schema": ...}}``; each request
  ends when its grammar is complete (finish_reason "stop"), or at ``--max-tokens``. Every output is parsed and
  validated (``jsonschema``) and the valid fraction reported.
* ``unconstrained``: the same prompts, each request made to generate exactly as many tokens as its constrained
  run did (``max_tokens`` = that count, EOS ignored), so both rows decode the same batch shapes and the ratio
  is the grammar's cost alone.

tok/s = generated tokens / seconds from the first submit to the last finish; rows alternate ``--repeats`` times
and each keeps its fastest run. Grammar compilation is reported apart (it happens at submit, once per schema):
``setup_s`` (xgrammar's tokenizer info, at the first constrained request of a pipeline), each schema's ``cold``
compile and its ``cached`` one (the plugin's LRU: ~0). The timed rows run with every schema already cached.
Writes results/structured.json and .png and prints a markdown table. Target: ratio >= 0.85.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

SCHEMAS = json.loads((HERE / "data" / "json_schemas.json").read_text())
TASKS = {
    "person": ["a famous scientist", "a fictional detective", "your favourite author", "a chef from Lyon"],
    "sentiment": ["the review 'Great battery, awful screen.'", "the sentence 'I loved every minute of it!'",
                  "the tweet 'Train late again. Of course.'", "the comment 'It works, I guess.'"],
    "event": ["a team meeting next Monday", "a birthday party in June", "an online book club session",
              "a conference talk in 2025"],
    "order": ["an order of three books", "a coffee shop order for two people", "an order of garden tools",
              "a pizza order with drinks"],
}


def requests(n: int) -> list[tuple[str, dict, str]]:
    """``(schema name, schema, prompt)`` for ``n`` requests, cycling through the schemas and their tasks."""
    names = list(SCHEMAS)
    out = []
    for i in range(n):
        name = names[i % len(names)]
        task = TASKS[name][(i // len(names)) % len(TASKS[name])]
        prompt = (f"Reply with only a JSON object following this schema:\n{json.dumps(SCHEMAS[name])}\n\n"
                  f"Describe {task}.")
        out.append((name, SCHEMAS[name], prompt))
    return out


def timed_run(pipe, prompts: list[list[int]], params: list) -> tuple[float, list]:
    t0 = time.perf_counter()
    rids = [pipe.submit(p, sp) for p, sp in zip(prompts, params)]
    while pipe.engine.has_unfinished():
        pipe.step()
    wall = time.perf_counter() - t0
    return wall, [pipe.collect(r) for r in rids]


def valid(text: str, schema: dict) -> bool:
    import jsonschema

    try:
        jsonschema.validate(json.loads(text), schema)
    except (ValueError, jsonschema.ValidationError):
        return False
    return True


def compile_times(pipe) -> dict:
    """Setup and per-schema compile times of the pipeline's structured_output plugin (cold, then cached)."""
    from tokenmill.plugins.structured.spec import parse_spec

    plugin = pipe.pm.get_plugin("default:structured_output") or pipe.plugins["structured_output"]
    cache = plugin.grammars
    t0 = time.perf_counter()
    cache.get(parse_spec({"type": "regex", "pattern": "x"}))  # the first compile builds xgrammar's tokenizer info
    out = {"setup_s": time.perf_counter() - t0, "schemas": {}}
    for name, schema in SCHEMAS.items():
        spec = parse_spec({"type": "json_schema", "schema": schema})
        t0 = time.perf_counter()
        cache.get(spec)
        t1 = time.perf_counter()
        cache.get(spec)
        out["schemas"][name] = {"cold_ms": 1e3 * (t1 - t0), "cached_ms": 1e3 * (time.perf_counter() - t1)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=384)
    ap.add_argument("--pipeline", default=str(ROOT / "pipelines" / "default.yaml"))
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--name", default="structured", help="output file stem under results/")
    args = ap.parse_args()

    import torch

    from common import bar_chart, write
    from tokenmill import Pipeline, SamplingParams, load_spec

    torch.set_num_threads(args.threads)
    spec = load_spec(args.pipeline)
    pipe = Pipeline(spec, progress=False)
    pipe.wait_ready()
    compiled = compile_times(pipe)
    reqs = requests(args.requests)
    prompts = [pipe.apply_chat_template([{"role": "user", "content": p}]) for _, _, p in reqs]
    constrained = [SamplingParams(max_tokens=args.max_tokens,
                                  plugin_args={"structured_output": {"type": "json_schema", "schema": s}})
                   for _, s, _ in reqs]
    pipe.generate(prompts[:1], SamplingParams(max_tokens=4))  # warm-up
    best: dict[str, tuple[float, list]] = {}
    for _ in range(args.repeats):
        wall, outs = timed_run(pipe, prompts, constrained)
        if "json_schema" not in best or wall < best["json_schema"][0]:
            best["json_schema"] = (wall, outs)
        counts = [len(o.token_ids) for o in best["json_schema"][1]]
        plain = [SamplingParams(max_tokens=n, ignore_eos=True) for n in counts]
        wall, outs = timed_run(pipe, prompts, plain)
        if "unconstrained" not in best or wall < best["unconstrained"][0]:
            best["unconstrained"] = (wall, outs)
    rows = {}
    for row, (wall, outs) in best.items():
        tokens = sum(len(o.token_ids) for o in outs)
        rows[row] = {"wall_s": wall, "generated_tokens": tokens, "tok_per_s": tokens / wall,
                     "finish_reasons": {r: sum(o.finish_reason == r for o in outs) for r in {o.finish_reason
                                                                                         for o in outs}}}
    rows["json_schema"]["valid_fraction"] = sum(valid(o.text, schema) for (_, schema, _), o
                                                in zip(reqs, best["json_schema"][1])) / len(reqs)
    ratio = rows["json_schema"]["tok_per_s"] / rows["unconstrained"]["tok_per_s"]
    payload = {"pipeline": str(Path(args.pipeline).relative_to(ROOT)) if Path(args.pipeline).is_relative_to(ROOT)
               else args.pipeline, "max_num_seqs": spec.limits.max_num_seqs, "requests": args.requests,
               "max_tokens": args.max_tokens, "repeats": args.repeats, "threads": args.threads,
               "schemas": list(SCHEMAS), "compile": compiled, "rows": rows, "tok_per_s_ratio": ratio,
               "target_ratio": 0.85,
               "throughput_definition": "generated tokens / seconds from the first submit to the last finish; the "
                                        "unconstrained row makes each request generate its constrained token count"}
    out = write(args.name, payload)
    bar_chart(args.name, list(rows), [r["tok_per_s"] for r in rows.values()], "output tokens / s",
              f"{args.requests} concurrent requests: json_schema / unconstrained = {ratio:.2f}")
    print(f"\n{args.requests} requests through {payload['pipeline']} (max_num_seqs {spec.limits.max_num_seqs}), "
          f"{args.threads} threads\n")
    print("| row | output tok/s | tokens | wall (s) | valid JSON |\n|---|---|---|---|---|")
    for row, r in rows.items():
        shown = f"{r['valid_fraction']:.0%}" if "valid_fraction" in r else "-"
        print(f"| {row} | {r['tok_per_s']:.1f} | {r['generated_tokens']} | {r['wall_s']:.2f} | {shown} |")
    print(f"\ntok/s ratio json_schema / unconstrained: {ratio:.3f} (target >= 0.85)")
    print(f"xgrammar setup (first constrained request): {compiled['setup_s'] * 1e3:.0f} ms")
    for name, c in compiled["schemas"].items():
        print(f"compile {name}: cold {c['cold_ms']:.1f} ms, cached {c['cached_ms']:.3f} ms")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
