"""Data-parallel replicas on Ray Serve against one bigger engine, and a replica killed mid-run.

    python benchmarks/replicas.py [--requests 64] [--concurrency 16] [--seed 0] [--skip-kill]

Rows (default model, continuous batching + paged KV with prefix caching, each in a fresh server process):
  - ``ray 2x1``: ``tokenmill serve --replicas 2``, each replica ``threads: 1``;
  - ``ray 1x2``: ``tokenmill serve --replicas 1``, the replica ``threads: 2``;
  - ``single 1x2``: plain ``tokenmill serve`` (no Ray), ``threads: 2``: what Ray's hops cost.
Workload (seeded, the same for every row): 64 chat requests through ``/v1/chat/completions``, ``concurrency``
in flight at once; a quarter share one long system prompt (prefix-cache hits), the rest are distinct; 16..96
new tokens each, greedy, EOS ignored. Throughput = generated tokens / wall time.

Kill run (``ray 2x1`` again): once 16 requests have finished, SIGKILL the replica process (its pid comes in
the ``x-tokenmill-replica-pid`` header) serving the most requests in flight. Every request must either
succeed or fail with the clean ``replica_failed`` error; requests sent after the failure was first seen
must all succeed. Writes results/replicas.json and results/replicas.png.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from common import bar_chart, write  # noqa: E402

SYSTEM = ("You are a meticulous assistant for a hardware store. You answer questions about tools, paint, "
          "lumber and plumbing in two or three plain sentences, and you say so when you do not know. ") * 3
TOPICS = ["a hammer", "latex paint", "pine boards", "a pipe wrench", "drywall screws", "a circular saw",
          "wood glue", "a level", "sandpaper grits", "a stud finder", "PVC cement", "a cordless drill"]
PIPELINE = """name: smollm2
model: smollm2-135m-instruct
threads: {threads}
limits: {{max_model_len: 2048, max_num_seqs: 32, max_num_batched_tokens: 1024}}
plugins:
  - continuous_batching: {{chunked_prefill: true}}
  - paged_kv: {{block_size: 16, num_blocks: auto, kv_memory_gb: 0.5, prefix_caching: true}}
"""


def workload(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        topic = rng.choice(TOPICS)
        msgs = [{"role": "user", "content": f"Request {i}: tell me about {topic} and what it costs."}]
        if rng.random() < 0.25:
            msgs.insert(0, {"role": "system", "content": SYSTEM})
        out.append({"model": "smollm2", "messages": msgs, "max_tokens": rng.randint(16, 96), "temperature": 0,
                    "ignore_eos": True})
    return out


def start(yaml: Path, replicas: int | None, log: Path) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    extra = ["--replicas", str(replicas)] if replicas else []
    proc = subprocess.Popen([sys.executable, "-m", "tokenmill", "serve", str(yaml), "--port", str(port), "--quiet",
                             "--log-level", "warning", *extra], stdout=open(log, "w"), stderr=subprocess.STDOUT,
                            start_new_session=True, cwd=ROOT, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 600
    while time.time() < deadline:
        assert proc.poll() is None, log.read_text()[-3000:]
        text = log.read_text()
        if replicas and "serving on" in text or not replicas and _ready(base):
            return proc, base
        time.sleep(0.5)
    raise TimeoutError(f"{yaml} did not start: {log.read_text()[-2000:]}")


def _ready(base: str) -> bool:
    try:
        return httpx.get(base + "/ready", timeout=2).status_code == 200
    except httpx.TransportError:
        return False


def stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


async def replay(base: str, work: list[dict], concurrency: int, kill_after: int | None = None) -> dict:
    sem = asyncio.Semaphore(concurrency)
    results: list[dict] = [{} for _ in work]
    inflight: dict[int, int] = {}   # replica pid -> requests in flight (as far as the client knows)
    state = {"done": 0, "killed": None, "failure_seen": None}

    async def one(i: int, client: httpx.AsyncClient) -> None:
        async with sem:
            sent = time.perf_counter()
            r = await client.post("/v1/chat/completions", json=work[i])
            res = {"sent": sent, "status": r.status_code, "end": time.perf_counter()}
            if r.status_code == 200:
                res["tokens"] = r.json()["usage"]["completion_tokens"]
                res["pid"] = int(r.headers.get("x-tokenmill-replica-pid", 0))  # 0: no replicas
            else:
                res["error"] = r.json().get("error", {})
                if state["failure_seen"] is None:
                    state["failure_seen"] = res["end"]
            results[i] = res
            state["done"] += 1
            if kill_after is not None and state["done"] == kill_after and state["killed"] is None:
                pids = [x["pid"] for x in results if x.get("pid")]
                victim = max(set(pids), key=pids.count)
                os.kill(victim, signal.SIGKILL)
                state["killed"] = (victim, time.perf_counter())

    t0 = time.perf_counter()
    async with httpx.AsyncClient(base_url=base, timeout=600) as client:
        await asyncio.gather(*(one(i, client) for i in range(len(work))))
    wall = time.perf_counter() - t0
    ok = [r for r in results if r["status"] == 200]
    out = {"wall_s": round(wall, 2), "ok": len(ok), "failed": len(results) - len(ok),
           "tokens": sum(r["tokens"] for r in ok), "tok_s": round(sum(r["tokens"] for r in ok) / wall, 2),
           "per_replica": {str(p): sum(1 for r in ok if r["pid"] == p) for p in sorted({r["pid"] for r in ok})}}
    if kill_after is not None:
        seen = state["failure_seen"]
        errors = [r["error"] for r in results if r["status"] != 200]
        out.update(killed_pid=state["killed"][0] if state["killed"] else None,
                   clean_errors=sum(1 for e in errors if e.get("code") == "replica_failed"),
                   other_errors=[e for e in errors if e.get("code") != "replica_failed"],
                   sent_after_failure_seen=sum(1 for r in results if seen and r["sent"] > seen),
                   failed_after_failure_seen=sum(1 for r in results if seen and r["sent"] > seen and r["status"] != 200))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-kill", action="store_true")
    args = ap.parse_args()
    work = workload(args.requests, args.seed)
    tmp = Path(tempfile.mkdtemp(prefix="tm-replicas-"))
    rows: dict[str, dict] = {}
    plan = [("ray 2x1", 1, 2), ("ray 1x2", 2, 1), ("single 1x2", 2, None)]
    for label, threads, replicas in plan:
        yaml = tmp / f"t{threads}.yaml"
        yaml.write_text(PIPELINE.format(threads=threads))
        proc, base = start(yaml, replicas, tmp / f"{label.replace(' ', '_')}.log")
        try:
            asyncio.run(replay(base, work[:4], 4))  # warm every code path once
            rows[label] = asyncio.run(replay(base, work, args.concurrency))
        finally:
            stop(proc)
        print(f"{label:12s} {rows[label]}", flush=True)
    kill = None
    if not args.skip_kill:
        yaml = tmp / "t1.yaml"
        proc, base = start(yaml, 2, tmp / "kill.log")
        try:
            kill = asyncio.run(replay(base, work, args.concurrency, kill_after=16))
        finally:
            stop(proc)
        print(f"{'kill 2x1':12s} {kill}", flush=True)
    ratio = rows["ray 2x1"]["tok_s"] / rows["ray 1x2"]["tok_s"]
    print(f"throughput ratio ray 2x1 / ray 1x2 = {ratio:.3f}; ray 1x2 / single 1x2 = "
          f"{rows['ray 1x2']['tok_s'] / rows['single 1x2']['tok_s']:.3f}")
    path = write("replicas", {"requests": args.requests, "concurrency": args.concurrency, "seed": args.seed,
                              "rows": rows, "ratio_2x1_over_1x2": round(ratio, 3), "kill": kill})
    bar_chart("replicas", list(rows), [r["tok_s"] for r in rows.values()], "generated tok/s",
              f"{args.requests} chat requests, {args.concurrency} in flight")
    print("wrote", path)


if __name__ == "__main__":
    main()
