"""Review hardening (issue 17): keep-alive latency, huge bodies and prompts, 5xx accounting, the token-rate
gauge and the queue bound under a burst. Real uvicorn servers on 127.0.0.1, or the ASGI app in-process."""
from __future__ import annotations

import http.client
import json
import statistics
import time

import pytest

from tests.serve.helpers import Slow

PROMPT = "The quick brown fox jumps over the lazy dog"


@pytest.fixture(autouse=True)
def _no_delay():
    Slow.delay = 0.0
    yield
    Slow.delay = 0.0


# ---------------------------------------------------------------------------------------------- item 1
def test_keep_alive_connection_has_no_nagle_stall(make_server, spare_pipeline):
    """20 sequential requests on one kept-alive connection: each costs little beyond its generation. Without
    TCP_NODELAY on the accepted socket, every request after the first waits ~40 ms for a delayed ACK."""
    run = make_server([spare_pipeline])
    conn = http.client.HTTPConnection("127.0.0.1", run.port, timeout=30)
    body = json.dumps({"prompt": "Hi", "max_tokens": 1})
    overheads = []
    try:
        for _ in range(21):
            t0 = time.perf_counter()
            conn.request("POST", "/v1/generate", body=body, headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            data = json.loads(resp.read())
            wall_ms = (time.perf_counter() - t0) * 1000.0
            assert resp.status == 200, data
            assert not resp.will_close, "the server closed the kept-alive connection"
            overheads.append(wall_ms - data["latency_ms"])
    finally:
        conn.close()
    reused = overheads[1:]  # the first request opened the connection
    assert statistics.median(reused) < 5.0, f"per-request overhead (ms) beyond generation: {reused}"


# ---------------------------------------------------------------------------------------------- item 8
async def _serving(app):
    """Enter the app's lifespan (engine threads) and wait until every pipeline is warm."""
    import asyncio

    ctx = app.router.lifespan_context(app)
    await ctx.__aenter__()
    for w in app.state.service.workers.values():
        assert await asyncio.to_thread(w.ready.wait, 60) and w.state == "ready", w.error
    return ctx


def test_burst_admits_free_slots_plus_max_queued(spare_pipeline):
    """max_num_seqs 8, --max-queued-requests 4, 30 simultaneous requests while the engine thread is blocked
    (nothing is taken, nothing finishes): exactly 8 + 4 are admitted, the other 18 get 503 queue_full."""
    import asyncio
    import threading

    import httpx

    from tokenmill.serve import create_app

    app = create_app([spare_pipeline], max_queued_requests=4)
    service = app.state.service
    w = service.workers["spare"]
    assert w.limits.max_num_seqs == 8

    async def main():
        ctx = await _serving(app)
        gate = threading.Event()
        decided = asyncio.Event()
        admissions = []
        admit = service.admit

        def counting_admit(worker, n):
            try:
                admit(worker, n)
            finally:
                admissions.append(n)
                if len(admissions) == 30:
                    decided.set()

        service.admit = counting_admit
        blocked = w.call(lambda p: gate.wait(60))  # the engine thread takes no command until the gate opens
        try:
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=60) as ac:
                tasks = [asyncio.create_task(ac.post("/v1/generate", json={"prompt": PROMPT, "max_tokens": 2}))
                         for _ in range(30)]
                await asyncio.wait_for(decided.wait(), 30)
                refused = [t.result() for t in tasks if t.done()]
                admitted = w.posted
                gate.set()
                await blocked
                answers = await asyncio.gather(*tasks)
        finally:
            gate.set()
            service.admit = admit
            await ctx.__aexit__(None, None, None)
        return refused, admitted, answers

    refused, admitted, answers = asyncio.run(main())
    assert admitted == 12, f"admitted {admitted} of 30 with 8 free slots and --max-queued-requests 4"
    assert len(refused) == 18 and all(r.status_code == 503 for r in refused)
    assert all(r.json()["error"]["code"] == "queue_full" for r in refused)
    assert sorted(r.status_code for r in answers) == [200] * 12 + [503] * 18


def test_token_rate_gauge_counts_the_last_window_and_decays_to_zero(make_server, spare_pipeline):
    """tokenmill_generation_tokens_per_second = tokens generated in the last window / window, so an idle server
    reads 0 (it used to report the engine's last steps' rate forever: 14-115 tok/s while idle)."""
    from tests.serve.helpers import metric

    run = make_server([spare_pipeline])
    now = [1000.0]
    metrics = run.app.state.metrics
    metrics.clock = lambda: now[0]  # the window's clock: no sleeps
    with run.client() as c:
        r = c.post("/v1/generate/batch", json={"prompts": [PROMPT, "Hello"], "max_tokens": 12, "ignore_eos": True})
        assert r.status_code == 200 and r.json()["tokens_generated"] == 24
        busy = metric(c.get("/metrics").text, "tokenmill_generation_tokens_per_second", pipeline="spare")
        now[0] += 3600.0  # an hour later, nothing generated since
        idle = metric(c.get("/metrics").text, "tokenmill_generation_tokens_per_second", pipeline="spare")
    assert idle == 0.0, f"the token rate reads {idle} tok/s on an idle server"
    assert busy == pytest.approx(24 / metrics.token_rate_window_s)


def test_sliding_rate_counts_the_window_only():
    from tokenmill.serve.metrics import SlidingRate

    rate = SlidingRate(window_s=10.0)
    assert rate.rate(0.0) == 0.0
    rate.add(30, now=1.0)
    rate.add(20, now=6.0)
    assert rate.rate(6.0) == pytest.approx(5.0)
    assert rate.rate(10.9) == pytest.approx(5.0)
    assert rate.rate(11.0) == pytest.approx(2.0)   # the 30 tokens at t=1 left the window (1, 11]
    assert rate.rate(16.0) == 0.0
    rate.add(0, now=17.0)
    assert rate.rate(17.0) == 0.0
    with pytest.raises(ValueError, match="window_s must be > 0"):
        SlidingRate(window_s=0)


# ---------------------------------------------------------------------------------------------- item 3
def test_every_5xx_of_a_generation_request_is_counted(make_server, spare_pipeline):
    """A generation request answered 5xx is counted in tokenmill_requests_total, whatever produced the 5xx: an
    unhandled exception in the handler (500, outcome error) or a refusal before admission (draining: 503,
    outcome overloaded); tokenmill_http_requests_total has the same statuses."""
    from tests.serve.helpers import metric

    run = make_server([spare_pipeline])
    service = run.service

    def bug(*args, **kwargs):
        raise RuntimeError("injected bug")

    chat = {"model": "spare", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    with run.client() as c:
        before = c.get("/metrics").text
        service.check_max_tokens = bug  # raises inside the handlers, before anything is submitted
        try:
            r1 = c.post("/v1/generate", json={"prompt": PROMPT, "max_tokens": 2})
            r2 = c.post("/v1/chat/completions", json=chat)
        finally:
            del service.check_max_tokens
        service.draining = True  # refused by the handlers' readiness check
        try:
            r3 = c.post("/v1/generate", json={"prompt": PROMPT, "max_tokens": 2})
            r4 = c.post("/v1/completions", json={"model": "spare", "prompt": PROMPT, "max_tokens": 2})
        finally:
            service.draining = False
        after = c.get("/metrics").text
    assert [r.status_code for r in (r1, r2, r3, r4)] == [500, 500, 503, 503]
    assert "injected bug" in r1.json()["error"]["message"]

    def delta(name, **labels):
        return metric(after, name, **labels) - metric(before, name, **labels)

    assert delta("tokenmill_requests_total", pipeline="spare", outcome="error") == 2
    assert delta("tokenmill_requests_total", pipeline="spare", outcome="overloaded") == 2
    assert delta("tokenmill_http_requests_total", route="/v1/generate", method="POST", status="500") == 1
    assert delta("tokenmill_http_requests_total", route="/v1/chat/completions", method="POST", status="500") == 1
    assert delta("tokenmill_http_requests_total", route="/v1/generate", method="POST", status="503") == 1
