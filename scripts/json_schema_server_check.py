"""JSON schemas against a real server: every ``response_format: json_schema`` answer must parse and validate.

    python scripts/json_schema_server_check.py [--pipeline pipelines/continuous.yaml] [--port 8765]

Starts ``tokenmill serve`` on loopback with the pipeline (default model), sends one chat completion per schema
of ``benchmarks/data/json_schemas.json`` (the structured benchmark's), ``json_schemas_varied.json`` (nested
objects, arrays with item bounds, enums, integer ranges, patterns, a top-level array; the slow structured test's)
and one with optional fields, all at once through the ``openai`` client, plus ``json_object`` requests (any JSON
object) with budgets from 24 tokens to ``--max-tokens``: nothing bounds such an answer's size, so these check that
the grammar closes it before ``max_tokens`` cuts it. Validates each answer with ``jsonschema``; prints one line per
request and the valid fraction; exits 1 if any answer is invalid.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

EXTRA = {  # optional properties: the grammar must let the model stop after any of them
    "optional_fields": {"type": "object", "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 999},
                                                         "nick": {"type": "string", "maxLength": 12},
                                                         "score": {"type": "number", "minimum": 0, "maximum": 1}},
                        "required": ["id"], "additionalProperties": False},
}


OBJECTS = {  # json_object requests: what each asks for
    "cat": "object giving a cat's name and age", "story": "object holding a long story about a dragon",
    "weather": "object with the weather in Paris, London and Rome", "user": "object describing a user named Bo",
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pipeline", default=str(ROOT / "pipelines" / "continuous.yaml"))
    ap.add_argument("--port", type=int, default=8765)
    ap.add_argument("--max-tokens", type=int, default=384)
    ap.add_argument("--temperature", type=float, default=None,
                    help="sent with every request (default: not sent, so the OpenAI default 1.0 samples)")
    args = ap.parse_args()

    import httpx
    import jsonschema
    import openai
    import yaml

    data = ROOT / "benchmarks" / "data"
    schemas = {**json.loads((data / "json_schemas.json").read_text()),
               **json.loads((data / "json_schemas_varied.json").read_text()), **EXTRA}
    model = yaml.safe_load(Path(args.pipeline).read_text())["name"]
    server = subprocess.Popen([sys.executable, "-m", "tokenmill.cli", "serve", args.pipeline, "--port", str(args.port),
                               "--quiet", "--max-queued-requests", "64"])
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{args.port}/v1", api_key="none", max_retries=0)
    try:
        for _ in range(1200):  # until the pipeline is built and warm (GET /ready answers 200)
            try:
                if httpx.get(f"http://127.0.0.1:{args.port}/ready", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)

        def ask(name: str, schema: dict | None):
            fmt = ({"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}
                   if schema is not None else {"type": "json_object"})
            what = (f"following this JSON schema: {json.dumps(schema)}" if schema is not None
                    else OBJECTS[name.split(":")[0]])
            budget = args.max_tokens if schema is not None else int(name.split(":")[1])
            extra = {} if args.temperature is None else {"temperature": args.temperature}
            r = client.chat.completions.create(model=model, max_tokens=budget, response_format=fmt, **extra,
                                               messages=[{"role": "user", "content": f"Reply with a JSON value {what}"}])
            return name, schema, r.choices[0]

        t0 = time.perf_counter()
        jobs = list(schemas.items()) + [(f"{what}:{n}", None) for what, n in zip(OBJECTS, (24, 64, 128,
                                                                                         args.max_tokens))]
        with cf.ThreadPoolExecutor(len(jobs)) as pool:
            answers = list(pool.map(lambda job: ask(*job), jobs))
        wall = time.perf_counter() - t0
    finally:
        server.terminate()
        server.wait(60)
    ok = 0
    for name, schema, choice in answers:
        try:
            value = json.loads(choice.message.content)
            if schema is not None:
                jsonschema.validate(value, schema)
            else:
                assert isinstance(value, dict), "json_object must be an object"
            verdict = "valid"
            ok += 1
        except Exception as exc:  # a parse or validation failure is what this script reports
            verdict = f"INVALID ({type(exc).__name__}: {str(exc)[:80]})"
        print(f"{name:16s} {choice.finish_reason:7s} {verdict}: {choice.message.content[:90]!r}")
    print(f"\n{ok}/{len(answers)} answers parse and validate ({len(answers)} concurrent requests, {wall:.1f} s, "
          f"pipeline {args.pipeline}, temperature {'default (1.0)' if args.temperature is None else args.temperature})")
    return 0 if ok == len(answers) else 1


if __name__ == "__main__":
    sys.exit(main())
