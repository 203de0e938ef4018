"""Admission, timeouts, auth, draining, loading, and the engine thread's CPU behaviour (no busy loops)."""
from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.serve.helpers import Slow, cli_server, sse_events, wait_until
from tokenmill.errors import ModelLoadError

PROMPT = "The quick brown fox jumps over the lazy dog"



def used_blocks(c: httpx.Client) -> int:
    return c.get("/v1/cache/stats").json()["used_blocks"]


# ---------------------------------------------------------------------------------------------- admission
def test_full_queue_answers_503_with_retry_after(make_server, spare_pipeline):
    run = make_server([spare_pipeline], max_queued_requests=2)
    Slow.delay = 0.01
    long = {"prompt": PROMPT, "max_tokens": 200, "ignore_eos": True, "stream": True}

    async def until(predicate, what, timeout=30.0):
        deadline = time.monotonic() + timeout
        while not predicate():
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            await asyncio.sleep(0.01)

    async def main():
        hold = asyncio.Event()
        opened: list[int] = []
        async with httpx.AsyncClient(base_url=run.base, timeout=60, limits=httpx.Limits(max_connections=32)) as ac:
            async def one():
                async with ac.stream("POST", "/v1/generate", json=long) as r:
                    assert r.status_code == 200
                    async for line in r.aiter_lines():  # keep reading: the stream stays alive until `hold`
                        if line.startswith("data:") and len(opened) < 8 and not getattr(r, "_seen", False):
                            r._seen = True
                            opened.append(1)
                        if hold.is_set():
                            break
            # 8 run (max_num_seqs), then 2 more wait: the queue is full
            tasks = [asyncio.create_task(one()) for _ in range(8)]
            await until(lambda: len(opened) == 8, "8 running streams")
            extra = [asyncio.create_task(ac.post("/v1/generate", json=dict(long, stream=False)))
                     for _ in range(2)]  # these two fill the queue
            worker = run.service.workers["spare"]
            await until(lambda: worker.queued() == 2, "2 queued requests")
            refused = await ac.post("/v1/generate", json=dict(long, stream=False))
            refused_batch = await ac.post("/v1/generate/batch", json={"prompts": ["a", "b"], "max_tokens": 4})
            hold.set()
            for t in extra:
                t.cancel()
            await asyncio.gather(*tasks, *extra, return_exceptions=True)
            return refused, refused_batch

    refused, refused_batch = asyncio.run(main())
    for r in (refused, refused_batch):
        assert r.status_code == 503
        assert int(r.headers["Retry-After"]) >= 1
        err = r.json()["error"]
        assert err["code"] == "queue_full" and "--max-queued-requests=2" in err["message"]
    with run.client() as c:
        wait_until(lambda: used_blocks(c) == 0, timeout=30, what="KV freed")
        assert c.post("/v1/generate", json={"prompt": PROMPT, "max_tokens": 3}).status_code == 200
        assert 'tokenmill_requests_total{outcome="overloaded",pipeline="spare"} 3.0' in c.get("/metrics").text


def test_request_timeout_aborts_with_504(make_server, spare_pipeline):
    run = make_server([spare_pipeline], request_timeout=0.3)
    Slow.delay = 0.01
    long = {"prompt": PROMPT, "max_tokens": 200, "ignore_eos": True}
    with run.client() as c:
        t0 = time.perf_counter()
        r = c.post("/v1/generate", json=long)
        assert r.status_code == 504 and time.perf_counter() - t0 < 5
        assert "request timeout of 0.3 s" in r.json()["error"]["message"]
        with c.stream("POST", "/v1/generate", json=dict(long, stream=True)) as s:
            assert s.status_code == 200
            events = sse_events(s.iter_lines())
        assert events[-1][0] == "error" and events[-1][1]["error"]["status"] == 504
        assert sum(d["tokens"] for e, d in events if e == "message") < 200
        oai = c.post("/v1/chat/completions", json={"model": "spare", "messages": [{"role": "user", "content": "x"}],
                                                   "max_tokens": 200, "ignore_eos": True})
        assert oai.status_code == 504 and oai.json()["error"]["code"] == "timeout"
        wait_until(lambda: used_blocks(c) == 0, timeout=30, what="KV freed after timeouts")
        Slow.delay = 0.0
        assert c.post("/v1/generate", json={"prompt": PROMPT, "max_tokens": 3}).status_code == 200
        assert 'tokenmill_requests_total{outcome="timeout",pipeline="spare"} 3.0' in c.get("/metrics").text


# ---------------------------------------------------------------------------------------------- auth
def test_api_key(make_server, spare_pipeline, monkeypatch):
    openai = pytest.importorskip("openai")
    monkeypatch.setenv("TOKENMILL_API_KEY", "s3cret")
    run = make_server([spare_pipeline])
    with run.client() as c:
        assert c.get("/health").status_code == 200 and c.get("/ready").status_code == 200
        for method, path in (("GET", "/v1/models"), ("POST", "/v1/generate"), ("GET", "/metrics"),
                             ("GET", "/v1/cache/stats"), ("DELETE", "/v1/cache"), ("GET", "/v1/model/info")):
            r = c.request(method, path, json={"prompt": "x"} if method == "POST" else None)
            assert r.status_code == 401, path
            assert r.json()["error"]["code"] == "invalid_api_key" and r.headers["WWW-Authenticate"] == "Bearer"
        assert c.get("/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
        ok = c.post("/v1/generate", json={"prompt": "x", "max_tokens": 2}, headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200
    with openai.OpenAI(base_url=run.base + "/v1", api_key="s3cret", max_retries=0) as oc:
        assert oc.completions.create(model="spare", prompt="x", max_tokens=2).usage.completion_tokens == 2
    with openai.OpenAI(base_url=run.base + "/v1", api_key="nope", max_retries=0) as oc:
        with pytest.raises(openai.AuthenticationError):
            oc.models.list()


# ---------------------------------------------------------------------------------------------- draining
def test_drain_finishes_in_flight_and_refuses_new(make_server, spare_pipeline):
    run = make_server([spare_pipeline], drain_timeout=30)
    Slow.delay = 0.02
    with run.client() as c, c.stream("POST", "/v1/generate", json={"prompt": PROMPT, "max_tokens": 40,
                                                                     "ignore_eos": True, "stream": True}) as s:
        lines = s.iter_lines()
        head = [next(lines) for _ in range(2)]  # the first event
        run.server.request_drain()
        with run.client() as c2:
            ready = c2.get("/ready")
            assert ready.status_code == 503 and ready.json()["status"] == "draining"
            r = c2.post("/v1/generate", json={"prompt": "x", "max_tokens": 2})
            assert r.status_code == 503 and r.json()["error"]["code"] == "shutting_down"
            assert "Retry-After" in r.headers
        events = sse_events(head + list(lines))
    assert events[-1][0] == "done" and events[-1][1]["tokens_generated"] == 40
    run.thread.join(30)
    assert not run.thread.is_alive(), "the server did not exit after draining"
    assert run.server.drain_report["in_flight_at_start"] == 1 and run.server.drain_report["aborted"] == 0
    assert spare_pipeline.stats()["kv"]["used_blocks"] == 0


def test_drain_deadline_aborts_the_rest(make_server, spare_pipeline):
    run = make_server([spare_pipeline], drain_timeout=0.3)
    Slow.delay = 0.02
    with run.client() as c, c.stream("POST", "/v1/generate", json={"prompt": PROMPT, "max_tokens": 200,
                                                                     "ignore_eos": True, "stream": True}) as s:
        lines = s.iter_lines()
        head = [next(lines) for _ in range(2)]
        t0 = time.perf_counter()
        run.server.request_drain()
        events = sse_events(head + list(lines))
    assert events[-1][0] == "error" and events[-1][1]["error"]["status"] == 503
    run.thread.join(30)
    assert not run.thread.is_alive() and time.perf_counter() - t0 < 15
    assert run.server.drain_report["aborted"] == 1
    assert spare_pipeline.stats()["kv"]["used_blocks"] == 0 and not spare_pipeline.engine.requests


def test_sigterm_drains_the_cli_server(tiny_llama_dir, tmp_path):
    """`tokenmill serve` in a subprocess: SIGTERM -> 503 for new requests, in-flight finishes, exit 0."""
    yaml = tmp_path / "tiny.yaml"
    yaml.write_text(f"name: tiny-cli\nmodel: {tiny_llama_dir}\ndtype: float32\ndevice: cpu\n"
                    "limits: {max_model_len: 512, max_num_seqs: 4, max_num_batched_tokens: 512}\nthreads: 1\n")
    proc, base = cli_server(yaml, "--drain-timeout", "60")
    try:
        with httpx.Client(base_url=base, timeout=60) as c, \
                c.stream("POST", "/v1/generate", json={"prompt": PROMPT, "max_tokens": 400, "ignore_eos": True,
                                                        "stream": True}) as s:
            lines = s.iter_lines()
            head = [next(lines) for _ in range(2)]
            proc.send_signal(signal.SIGTERM)
            with httpx.Client(base_url=base, timeout=10) as c2:
                r = wait_until(lambda: (lambda r: r if r.status_code == 503 else None)(
                    c2.post("/v1/generate", json={"prompt": "x", "max_tokens": 2})), timeout=10, what="503")
                assert r.json()["error"]["code"] == "shutting_down"
            events = sse_events(head + list(lines))
        assert events[-1][0] == "done" and events[-1][1]["tokens_generated"] == 400
        assert proc.wait(timeout=30) == 0
        out = proc.stdout.read()
        assert "Traceback" not in out, out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_cli_serve_checks_files_before_loading(tmp_path, capsys):
    from tokenmill.cli import main

    assert main(["serve", str(tmp_path / "missing.yaml"), "--port", "0"]) == 2
    assert "missing.yaml" in capsys.readouterr().err
    a = tmp_path / "a.yaml"
    a.write_text("name: same\nmodel: smollm2-135m-instruct\n")
    b = tmp_path / "b.yaml"
    b.write_text("name: same\nmodel: smollm2-135m-instruct\n")
    assert main(["serve", str(a), str(b), "--port", "0"]) == 2
    assert "pipeline name 'same' is used by" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- loading
def test_not_ready_until_loaded_and_failed_loads_reported(make_server, tiny_llama_dir):
    from tests.conftest import tiny_pipeline_dict
    from tokenmill import Pipeline

    gate = threading.Event()

    def slow_factory():  # builds its own pipeline, which the worker closes when it stops
        assert gate.wait(30)
        return Pipeline.from_dict(tiny_pipeline_dict(tiny_llama_dir, name="spare"), progress=False)

    def broken_factory():
        raise ModelLoadError("no model at /nowhere")

    run = make_server([("spare", slow_factory), ("broken", broken_factory)], wait_ready=False)
    with run.client() as c:
        assert c.get("/health").status_code == 200
        wait_until(lambda: c.get("/ready").json()["pipelines"]["broken"] == "failed", timeout=10, what="failed")
        r = c.get("/ready")
        assert r.status_code == 503 and r.json()["pipelines"]["spare"] == "loading"
        assert "no model at /nowhere" in r.json()["errors"]["broken"]
        loading = c.post("/v1/generate", json={"prompt": "x", "max_tokens": 2})
        assert loading.status_code == 503 and loading.json()["error"]["code"] == "pipeline_loading"
        gate.set()
        wait_until(lambda: c.get("/ready").json()["pipelines"]["spare"] == "ready", timeout=30, what="warm-up")
        assert c.get("/ready").status_code == 503  # still: one pipeline failed
        assert c.post("/v1/generate", json={"prompt": "x", "max_tokens": 2}).status_code == 200
        broken = c.post("/v1/generate", json={"prompt": "x", "max_tokens": 2, "optimization": "broken"})
        assert broken.status_code == 503 and "no model at /nowhere" in broken.json()["error"]["message"]


# ---------------------------------------------------------------------------------------------- CPU behaviour
def _thread_cpu_s(native_id: int) -> float:
    fields = Path(f"/proc/self/task/{native_id}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="needs Linux /proc")
def test_idle_server_and_waiting_loop_burn_no_cpu(make_server, spare_pipeline):
    run = make_server([spare_pipeline])
    engine_tid = run.service.workers["spare"].thread.native_id
    loop_tid = run.thread.native_id
    e0, l0 = _thread_cpu_s(engine_tid), _thread_cpu_s(loop_tid)
    time.sleep(1.0)  # measuring an idle second
    e1, l1 = _thread_cpu_s(engine_tid), _thread_cpu_s(loop_tid)
    assert e1 - e0 <= 0.02, f"idle engine thread used {e1 - e0:.3f} s of CPU in 1 s (busy loop?)"
    assert l1 - l0 <= 0.05, f"idle event loop used {l1 - l0:.3f} s of CPU in 1 s"
    # while the engine computes, the event loop waiting for non-streaming results stays asleep
    with run.client() as c:
        body = {"prompts": [PROMPT] * 8, "max_tokens": 120, "ignore_eos": True}
        t0 = time.perf_counter()
        assert c.post("/v1/generate/batch", json=body).status_code == 200
        wall = time.perf_counter() - t0
    e2, l2 = _thread_cpu_s(engine_tid), _thread_cpu_s(loop_tid)
    assert e2 - e1 > 0
    assert l2 - l1 <= max(0.05, 0.05 * wall), (f"the event loop used {l2 - l1:.3f} s of CPU while the engine "
                                               f"computed for {wall:.2f} s")


def test_a_pipeline_the_worker_built_is_closed_when_it_stops(tiny_llama_dir):
    """Plugins' shutdown hooks run when the service stops a pipeline it built; one handed in is left open."""
    from tests.conftest import tiny_pipeline_dict
    from tokenmill import Pipeline
    from tokenmill.serve.worker import EngineWorker

    built: list[Pipeline] = []

    def factory() -> Pipeline:
        built.append(Pipeline.from_dict(tiny_pipeline_dict(tiny_llama_dir), progress=False))
        return built[-1]

    handed = Pipeline.from_dict(tiny_pipeline_dict(tiny_llama_dir), progress=False)
    workers = [EngineWorker("built", factory, warmup=False), EngineWorker("handed", handed, warmup=False)]
    for w in workers:
        w.start()
        assert w.ready.wait(60) and w.state == "ready", w.error
        w.stop()
        w.thread.join(60)
        assert w.state == "stopped"
    assert built[0].closed and not handed.closed
