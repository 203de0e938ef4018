"""Load test of `tokenmill serve`: many concurrent streaming clients vs the offline engine on the same requests.

    python benchmarks/serve_load.py [--pipeline pipelines/continuous.yaml] [--clients 256] [--seed 0] [--quick]

1. Builds the pipeline (default model) and runs the whole workload offline with ``Pipeline.generate`` (all
   requests submitted at once, on a thread of its own like the server's engine thread): the throughput
   ceiling of the engine on these requests. It runs again after the served pass (the box is shared); the
   served throughput is compared with the better of the two.
2. Clears the prefix cache, serves the same Pipeline object over HTTP (uvicorn on 127.0.0.1, in this process,
   one engine thread) and replays the workload from a separate client process: every client opens its
   ``POST /v1/generate`` stream at once (``stream: true``) and reads it to the end.
3. Checks that nothing is left behind: ``GET /v1/cache/stats`` and, after the server stops, the engine itself
   must show 0 KV blocks held and no request state.

Workload (seeded): random token-id prompts in [100, 40000) of 16..256 tokens and 32..128 new tokens each
(``--quick``: 32 clients, 16..64-token prompts, 16 new tokens), greedy, EOS ignored so both runs generate exactly
the same tokens; the served text is compared with the offline text.

Reports 0 errors (or lists them), throughput (generated tokens / wall time, first submit to last token) offline
and served, TTFT and end-to-end latency p50/p99 (served: measured by the clients), the engine's mean step time
in both runs, and the CPU time of the engine thread and of the event-loop thread while serving (a spinning
loop would show up there). Writes results/serve_load[-quick].json.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

VOCAB_LO, VOCAB_HI = 100, 40000


def make_workload(n: int, seed: int, quick: bool) -> list[dict]:
    rng = random.Random(seed)
    lo, hi = (16, 64) if quick else (16, 256)
    out = []
    for _ in range(n):
        prompt = [rng.randrange(VOCAB_LO, VOCAB_HI) for _ in range(rng.randint(lo, hi))]
        max_tokens = 16 if quick else rng.randint(32, 128)
        out.append({"prompt": prompt, "max_tokens": max_tokens})
    return out


def dist(xs: list[float]) -> dict:
    import numpy as np

    if not xs:
        return {"mean": None, "p50": None, "p99": None, "max": None}
    a = np.asarray(xs, dtype=float)
    return {"mean": float(a.mean()), "p50": float(np.percentile(a, 50)), "p99": float(np.percentile(a, 99)),
            "max": float(a.max())}


def thread_cpu_s(native_id: int) -> float | None:
    try:
        fields = Path(f"/proc/self/task/{native_id}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# ---------------------------------------------------------------------------------------------- client process
async def _client_main(base: str, work: list[dict]) -> dict:
    import httpx

    limits = httpx.Limits(max_connections=len(work) + 8, max_keepalive_connections=len(work) + 8)
    timeout = httpx.Timeout(3600.0, connect=60.0)
    results: list[dict] = [None] * len(work)  # type: ignore[list-item]
    start_gate = asyncio.Event()

    async def one(ac: httpx.AsyncClient, i: int, req: dict) -> None:
        payload = {"prompt": req["prompt"], "max_tokens": req["max_tokens"], "ignore_eos": True, "stream": True}
        await start_gate.wait()
        t0 = time.perf_counter()
        first = None
        text, chunks, final, error = [], 0, None, None
        try:
            async with ac.stream("POST", "/v1/generate", json=payload) as r:
                if r.status_code != 200:
                    error = f"HTTP {r.status_code}: {(await r.aread()).decode()[:300]}"
                else:
                    event = "message"
                    async for line in r.aiter_lines():
                        if line.startswith("event:"):
                            event = line[6:].strip()
                        elif line.startswith("data:"):
                            data = json.loads(line[5:])
                            if event == "message":
                                if first is None:
                                    first = time.perf_counter()
                                text.append(data["text"])
                                chunks += 1
                            elif event == "done":
                                final = data
                            else:
                                error = json.dumps(data)[:300]
                            event = "message"
        except Exception as exc:  # noqa: BLE001 - every failure is a reported error
            error = f"{type(exc).__name__}: {exc}"
        t1 = time.perf_counter()
        if final is None and error is None:
            error = "stream ended without a final event"
        results[i] = {"t_send": t0, "t_first": first, "t_end": t1, "text": "".join(text), "chunks": chunks,
                      "final": final, "error": error}

    async with httpx.AsyncClient(base_url=base, limits=limits, timeout=timeout) as ac:
        tasks = [asyncio.create_task(one(ac, i, req)) for i, req in enumerate(work)]
        await asyncio.sleep(0.2)  # every task is parked on the gate: release them together
        t_start = time.perf_counter()
        start_gate.set()
        await asyncio.gather(*tasks)
    return {"t_start": t_start, "results": results, "client_cpu_s": time.process_time()}


def client_process(args) -> None:
    work = json.loads(Path(args.workload_file).read_text())
    out = asyncio.run(_client_main(args.base, work))
    Path(args.out_file).write_text(json.dumps(out))


# ---------------------------------------------------------------------------------------------- runs
def run_offline(pipe, work, params, total_tokens) -> tuple[dict, list]:
    """``Pipeline.generate`` on the whole workload, on a thread of its own like the server's engine thread (on
    this 2-core box under CPU contention, torch ops issued from the main thread ran ~4x slower than the same ops
    from another thread, which would flatter the server)."""
    box: dict = {}

    def go() -> None:
        pipe.clear_prefix_cache()
        steps0 = pipe.stats()["steps"]
        t0 = time.perf_counter()
        outs = pipe.generate([w["prompt"] for w in work], params)
        wall = time.perf_counter() - t0
        steps = pipe.stats()["steps"] - steps0
        assert sum(o.num_output_tokens for o in outs) == total_tokens
        box["r"] = ({"wall_s": wall, "generated_tokens": total_tokens, "throughput_tok_s": total_tokens / wall,
                     "steps": steps, "mean_step_ms": 1000 * wall / max(1, steps),
                     "ttft_s": dist([o.ttft_s for o in outs]), "latency_s": dist([o.total_s for o in outs])}, outs)

    th = threading.Thread(target=go, name="offline-engine")
    th.start()
    th.join()
    r = box["r"][0]
    print(f"[serve_load] offline: {r['generated_tokens']} tokens in {r['wall_s']:.1f} s = "
          f"{r['throughput_tok_s']:.1f} tok/s", file=sys.stderr)
    return box["r"]


def run_served(pipe, name: str, work: list[dict], outs: list) -> tuple[dict, dict]:
    """Serve ``pipe`` on 127.0.0.1, replay ``work`` from a client process, check for leaks, stop the server."""
    import httpx
    import uvicorn

    from tokenmill.serve import create_app
    from tokenmill.serve.server import DrainingServer

    n = len(work)
    pipe.clear_prefix_cache()  # the served run must not reuse the offline run's prompts
    app = create_app([pipe], request_timeout=None, max_queued_requests=max(1024, n))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    base = f"http://127.0.0.1:{sock.getsockname()[1]}"
    server = DrainingServer(uvicorn.Config(app, log_level="warning", access_log=False), app.state.service)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 300
    while True:
        try:
            if httpx.get(base + "/ready", timeout=5).status_code == 200:
                break
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise SystemExit("the server did not become ready")
        time.sleep(0.1)
    worker = app.state.service.workers[name]
    steps1 = pipe.stats()["steps"]
    cpu0 = {"engine": thread_cpu_s(worker.thread.native_id), "event_loop": thread_cpu_s(thread.native_id)}
    with tempfile.TemporaryDirectory() as tmp:
        wfile, ofile = Path(tmp) / "work.json", Path(tmp) / "out.json"
        wfile.write_text(json.dumps(work))
        t_client = time.perf_counter()
        subprocess.run([sys.executable, __file__, "--client-mode", "--base", base, "--workload-file", str(wfile),
                        "--out-file", str(ofile)], check=True)
        client_wall = time.perf_counter() - t_client
        client = json.loads(ofile.read_text())
    cpu1 = {"engine": thread_cpu_s(worker.thread.native_id), "event_loop": thread_cpu_s(thread.native_id)}
    served_steps = pipe.stats()["steps"] - steps1
    res = client["results"]
    errors = [f"client {i}: {r['error']}" for i, r in enumerate(res) if r["error"]]
    mismatched = [i for i, (r, o) in enumerate(zip(res, outs)) if not r["error"] and r["text"] != o.text]
    t_start = client["t_start"]
    ok = [r for r in res if not r["error"]]
    gen = sum(r["final"]["tokens_generated"] for r in ok)
    wall = max(r["t_end"] for r in ok) - t_start if ok else float("nan")
    served = {
        "wall_s": wall, "generated_tokens": gen, "throughput_tok_s": gen / wall if ok else 0.0,
        "errors": len(errors), "error_samples": errors[:5], "text_mismatches_vs_offline": len(mismatched),
        "steps": served_steps, "mean_step_ms": 1000 * wall / max(1, served_steps),
        "ttft_s": dist([r["t_first"] - r["t_send"] for r in ok if r["t_first"] is not None]),
        "latency_s": dist([r["t_end"] - r["t_send"] for r in ok]),
        "server_ttft_s": dist([r["final"]["ttft_ms"] / 1000 for r in ok if r["final"]["ttft_ms"] is not None]),
        "server_queue_s": dist([r["final"]["queue_ms"] / 1000 for r in ok if r["final"]["queue_ms"] is not None]),
        "events_per_request": dist([r["chunks"] for r in ok]),
        "client_process_cpu_s": client["client_cpu_s"], "client_process_wall_s": client_wall,
        "cpu_s_while_serving": {k: round(cpu1[k] - cpu0[k], 3) if cpu0[k] is not None else None for k in cpu0},
    }
    with httpx.Client(base_url=base, timeout=30) as c:
        cache = c.get("/v1/cache/stats").json()
        metrics_text = c.get("/metrics").text
    server.should_exit = True
    thread.join(60)
    kv = pipe.stats()["kv"]
    outcomes = {}
    for line in metrics_text.splitlines():
        if line.startswith("tokenmill_requests_total{"):
            outcome = line.split('outcome="', 1)[1].split('"', 1)[0]
            outcomes[outcome] = outcomes.get(outcome, 0) + float(line.rsplit(" ", 1)[1])
    leaks = {"cache_stats_used_blocks": cache["used_blocks"], "engine_used_blocks": kv["used_blocks"],
             "engine_requests_left": len(pipe.engine.requests), "engine_unfinished": pipe.engine.has_unfinished(),
             "cached_prefix_blocks_kept_for_reuse": cache["entries"], "server_thread_stopped": not thread.is_alive(),
             "request_outcomes": outcomes}
    s = served
    print(f"[serve_load] served: {s['generated_tokens']} tokens in {s['wall_s']:.1f} s = "
          f"{s['throughput_tok_s']:.1f} tok/s, {s['errors']} errors", file=sys.stderr)
    return served, leaks


def row(label: str, n: int, r: dict) -> str:
    return (f"| {label} | {n} | {r['generated_tokens']} | {r['wall_s']:.2f} | {r['throughput_tok_s']:.1f} | "
            f"{r['ttft_s']['p50']:.2f} / {r['ttft_s']['p99']:.2f} | {r['latency_s']['p50']:.2f} / "
            f"{r['latency_s']['p99']:.2f} | {r['mean_step_ms']:.1f} |")


# ---------------------------------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pipeline", default=str(ROOT / "pipelines/continuous.yaml"))
    ap.add_argument("--model", default=None, help="override the pipeline's model")
    ap.add_argument("--clients", type=int, default=None, help="concurrent streaming clients (default 256, quick 32)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="32 clients, 16 new tokens each")
    ap.add_argument("--repeat", type=int, default=1, help="served passes, alternating with offline passes "
                                                          "(offline, served, offline, ...); best of each is compared")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    ap.add_argument("--out", default=None, help="result name (default serve_load[-quick] in results/)")
    # internal: the load-generating client process
    ap.add_argument("--client-mode", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--base", help=argparse.SUPPRESS)
    ap.add_argument("--workload-file", help=argparse.SUPPRESS)
    ap.add_argument("--out-file", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.client_mode:
        client_process(args)
        return

    import torch

    from common import write
    from tokenmill import Pipeline, SamplingParams, load_spec

    if args.threads:
        torch.set_num_threads(args.threads)
    n = args.clients or (32 if args.quick else 256)
    work = make_workload(n, args.seed, args.quick)
    spec = load_spec(args.pipeline)
    if args.model:
        spec.model = args.model
    print(f"[serve_load] {n} clients, pipeline {args.pipeline} ({spec.name}), torch threads "
          f"{torch.get_num_threads()}", file=sys.stderr)
    pipe = Pipeline(spec, progress=False)
    pipe.wait_ready()  # background preparation (a compiled draft) done before timing
    params = [SamplingParams(max_tokens=w["max_tokens"], ignore_eos=True) for w in work]
    total_tokens = sum(w["max_tokens"] for w in work)
    warm = threading.Thread(target=pipe.generate, args=([list(range(VOCAB_LO, VOCAB_LO + 16))],
                                                        SamplingParams(max_tokens=2, ignore_eos=True)))
    warm.start()
    warm.join()

    offline_runs, served_runs, leak_runs = [], [], []
    offline, outs = run_offline(pipe, work, params, total_tokens)
    offline_runs.append(offline)
    for _ in range(max(1, args.repeat)):
        served, leaks = run_served(pipe, spec.name, work, outs)
        served_runs.append(served)
        leak_runs.append(leaks)
        offline_runs.append(run_offline(pipe, work, params, total_tokens)[0])
    best_off = max(offline_runs, key=lambda r: r["throughput_tok_s"])
    best_srv = max(served_runs, key=lambda r: r["throughput_tok_s"])
    errors = sum(r["errors"] for r in served_runs)
    leaked = any(lk[k] for lk in leak_runs for k in ("cache_stats_used_blocks", "engine_used_blocks",
                                                      "engine_requests_left", "engine_unfinished"))
    payload = {
        "pipeline": args.pipeline, "pipeline_name": spec.name, "model": spec.model, "clients": n,
        "quick": args.quick, "seed": args.seed, "repeat": args.repeat,
        "requests": {"prompt_tokens": dist([len(w["prompt"]) for w in work]),
                     "max_tokens": dist([w["max_tokens"] for w in work]), "generated_tokens": total_tokens},
        "offline_runs": offline_runs, "served_runs": served_runs, "leaks": leak_runs,
        "errors": errors, "leaked": leaked,
        "served_vs_offline_throughput": best_srv["throughput_tok_s"] / best_off["throughput_tok_s"],
        "served_vs_offline_note": "best served pass / best offline pass (offline passes run before and after each "
                                  "served pass, since the box is shared)",
        "torch_threads": torch.get_num_threads(), "machine_load_1m_at_end": os.getloadavg()[0],
    }
    name = args.out or ("serve_load-quick" if args.quick else "serve_load")
    path = write(name, payload)
    lines = ["| run | requests | tokens | wall s | tok/s | TTFT p50 / p99 s | latency p50 / p99 s | mean step ms |",
             "|---|---|---|---|---|---|---|---|"]
    for i, o in enumerate(offline_runs):
        lines.append(row(f"offline Pipeline.generate #{i + 1}", n, o))
    for i, s in enumerate(served_runs):
        lines.append(row(f"served, {n} SSE clients #{i + 1}", n, s))
    print("\n" + "\n".join(lines))
    print(f"\nserved / offline throughput (best of each): {payload['served_vs_offline_throughput']:.3f}; "
          f"errors: {errors}; text mismatches vs offline: {sum(s['text_mismatches_vs_offline'] for s in served_runs)}")
    for s, lk in zip(served_runs, leak_runs):
        print(f"CPU while serving: engine thread {s['cpu_s_while_serving']['engine']} s, event loop "
              f"{s['cpu_s_while_serving']['event_loop']} s, client process {s['client_process_cpu_s']:.2f} s "
              f"(wall {s['wall_s']:.1f} s); after: {lk}")
    print(f"wrote {path}")
    if errors or leaked:
        sys.exit(1)


if __name__ == "__main__":
    main()
