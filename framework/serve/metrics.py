"""Prometheus metrics of the service, in a registry of its own (never the process-global one).

Per-request metrics (outcomes, tokens, latency histograms) are recorded by the engine threads as requests
produce tokens and finish. Engine state (running / waiting requests, KV usage, prefix-cache counters,
preemptions, batch utilization, speculative decoding) is read from ``Pipeline.stats()`` on each engine
thread when ``/metrics`` is scraped, so every value is measured at scrape time. The generation rate is
the tokens the engine threads produced in the last ``TOKEN_RATE_WINDOW_S`` seconds over that window, so it
decays to 0 when the server is idle.
"""
from __future__ import annotations

import threading
import time
from collections import deque
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0,
                   45.0, 60.0, 120.0, 300.0)
TTFT_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 7.5,
                10.0, 20.0, 40.0, 80.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0,
               2.5, 5.0)

# Keys a speculative-decoding plugin is expected to put under ``Pipeline.stats()["spec"]`` (first found wins).
SPEC_DRAFT_KEYS = ("draft_tokens", "num_draft_tokens", "proposed_tokens")
SPEC_ACCEPTED_KEYS = ("accepted_tokens", "num_accepted_tokens")


TOKEN_RATE_WINDOW_S = 10.0

# The routes whose requests tokenmill_requests_total counts (one per prompt).
GENERATION_ROUTES = frozenset({"/v1/generate", "/v1/generate/batch", "/v1/completions", "/v1/chat/completions"})


def outcome_for_status(status: int) -> str:
    """The tokenmill_requests_total outcome of a generation request refused or failed with HTTP ``status``."""
    if status == 503:
        return "overloaded"
    if status == 504:
        return "timeout"
    return "error" if status >= 500 else "invalid"


@dataclass(slots=True)
class RequestAccount:
    """What the service knows about one HTTP request, for counting it in tokenmill_requests_total exactly once:
    its pipeline, how many prompts it carries, and whether something counted them already (an admission refusal,
    or the engine thread, which counts every request submitted to it when it is refused or finishes)."""

    pipeline: str | None = None
    prompts: int = 1
    counted: bool = False


# set by HTTPMetricsMiddleware for the duration of each HTTP request
REQUEST_ACCOUNT: ContextVar[RequestAccount | None] = ContextVar("tokenmill_request_account", default=None)


def current_account() -> RequestAccount:
    """The account of the HTTP request being handled (a throwaway one outside a request)."""
    account = REQUEST_ACCOUNT.get()
    return account if account is not None else RequestAccount()


class SlidingRate:
    """Counts per second over the last ``window_s`` seconds: ``rate(now)`` is the sum of the counts added in
    ``(now - window_s, now]`` divided by ``window_s``, so it falls to 0 once nothing was added for a window.
    Times are passed in (any monotonic clock); ``add`` and ``rate`` may run on different threads."""

    def __init__(self, window_s: float = TOKEN_RATE_WINDOW_S) -> None:
        if not window_s > 0:
            raise ValueError(f"window_s must be > 0 seconds, got {window_s}")
        self.window_s = float(window_s)
        self._events: deque[tuple[float, int]] = deque()
        self._sum = 0
        self._lock = threading.Lock()

    def add(self, count: int, now: float) -> None:
        if count <= 0:
            return
        with self._lock:
            self._events.append((now, count))
            self._sum += count
            self._expire(now)

    def rate(self, now: float) -> float:
        with self._lock:
            self._expire(now)
            return self._sum / self.window_s

    def _expire(self, now: float) -> None:
        start = now - self.window_s
        while self._events and self._events[0][0] <= start:
            self._sum -= self._events.popleft()[1]


def _first(d: dict, keys: tuple[str, ...]) -> float:
    for k in keys:
        if k in d:
            return float(d[k])
    return 0.0


class EngineCollector:
    """Turns the latest ``Pipeline.stats()`` snapshot of each pipeline into metric families."""

    def __init__(self, tokens_per_second: Callable[[str], float]) -> None:
        self.tokens_per_second = tokens_per_second
        self.snapshots: dict[str, dict] = {}
        self.states: dict[str, str] = {}
        self.queued: dict[str, int] = {}

    def describe(self):
        return []

    def collect(self):
        running = GaugeMetricFamily("tokenmill_num_requests_running", "Requests in the running batch.",
                                    labels=["pipeline"])
        waiting = GaugeMetricFamily("tokenmill_num_requests_waiting",
                                    "Requests waiting for a batch slot (engine queue, preempted included).",
                                    labels=["pipeline"])
        queued = GaugeMetricFamily("tokenmill_num_requests_queued",
                                   "Requests not running yet (submitted or in the engine's waiting queue).",
                                   labels=["pipeline"])
        kv_usage = GaugeMetricFamily("tokenmill_kv_cache_usage_perc", "Share of KV blocks held by requests (0-1).",
                                     labels=["pipeline"])
        kv_used = GaugeMetricFamily("tokenmill_kv_cache_used_blocks", "KV blocks held by requests.",
                                    labels=["pipeline"])
        kv_total = GaugeMetricFamily("tokenmill_kv_cache_blocks", "KV blocks in the pool.", labels=["pipeline"])
        kv_cached = GaugeMetricFamily("tokenmill_prefix_cache_cached_blocks",
                                      "Blocks kept for prefix reuse that no request holds.", labels=["pipeline"])
        pq = CounterMetricFamily("tokenmill_prefix_cache_queries",
                                 "Prompt tokens looked up in the prefix cache.", labels=["pipeline"])
        ph = CounterMetricFamily("tokenmill_prefix_cache_hits",
                                 "Prompt tokens found in the prefix cache.", labels=["pipeline"])
        pre = CounterMetricFamily("tokenmill_num_preemptions", "Requests preempted (KV freed, recomputed later).",
                                  labels=["pipeline"])
        util = GaugeMetricFamily("tokenmill_batch_utilization",
                                 "Scheduled tokens / step token budget over the engine's recent steps (0-1).",
                                 labels=["pipeline"])
        tps = GaugeMetricFamily("tokenmill_generation_tokens_per_second",
                                f"Tokens generated in the last {TOKEN_RATE_WINDOW_S:g} s, per second (0 when idle).",
                                labels=["pipeline"])
        steps = CounterMetricFamily("tokenmill_engine_steps", "Engine steps run.", labels=["pipeline"])
        sd = CounterMetricFamily("tokenmill_spec_decode_num_draft_tokens",
                                 "Draft tokens proposed by speculative decoding.", labels=["pipeline"])
        sa = CounterMetricFamily("tokenmill_spec_decode_num_accepted_tokens",
                                 "Draft tokens accepted by speculative decoding.", labels=["pipeline"])
        ready = GaugeMetricFamily("tokenmill_pipeline_ready", "1 when the pipeline is loaded and warmed up.",
                                  labels=["pipeline"])
        for name, state in self.states.items():
            ready.add_metric([name], 1.0 if state == "ready" else 0.0)
            tps.add_metric([name], self.tokens_per_second(name))
        for name, q in self.queued.items():
            queued.add_metric([name], q)
        for name, s in self.snapshots.items():
            kv = s.get("kv") or {}
            spec = s.get("spec") or {}
            running.add_metric([name], s.get("running", 0))
            waiting.add_metric([name], s.get("waiting", 0))
            kv_usage.add_metric([name], kv.get("usage", 0.0))
            kv_used.add_metric([name], kv.get("used_blocks", 0))
            kv_total.add_metric([name], kv.get("num_blocks", 0))
            kv_cached.add_metric([name], kv.get("cached_blocks", 0))
            pq.add_metric([name], kv.get("prefix_queries_tokens", 0))
            ph.add_metric([name], kv.get("prefix_hits_tokens", 0))
            pre.add_metric([name], s.get("preemptions", 0))
            util.add_metric([name], s.get("batch_utilization", 0.0))
            steps.add_metric([name], s.get("steps", 0))
            sd.add_metric([name], _first(spec, SPEC_DRAFT_KEYS))
            sa.add_metric([name], _first(spec, SPEC_ACCEPTED_KEYS))
        yield from (running, waiting, queued, kv_usage, kv_used, kv_total, kv_cached, pq, ph, pre, util, tps, steps,
                    sd, sa, ready)


class ServeMetrics:
    """Every metric of one app, in ``self.registry``."""

    def __init__(self, registry: CollectorRegistry | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock  # for the token-rate window; tests replace it
        self.token_rate_window_s = TOKEN_RATE_WINDOW_S
        self._rates: dict[str, SlidingRate] = {}
        r = self.registry = registry if registry is not None else CollectorRegistry()
        p = ["pipeline"]
        self.requests = Counter("tokenmill_requests", "Generation requests by outcome: stop, length, error "
                                "(failed while running), cancelled (client went away), timeout, shutdown, "
                                "invalid (refused as a bad request), overloaded (503: queue full or draining).",
                                p + ["outcome"], registry=r)
        self.prompt_tokens = Counter("tokenmill_prompt_tokens", "Prompt tokens of finished requests.", p,
                                     registry=r)
        self.generation_tokens = Counter("tokenmill_generation_tokens", "Tokens generated by finished requests.",
                                         p, registry=r)
        self.ttft = Histogram("tokenmill_time_to_first_token_seconds",
                              "From the HTTP request's arrival to its first generated token.", p,
                              buckets=TTFT_BUCKETS, registry=r)
        self.itl = Histogram("tokenmill_inter_token_latency_seconds",
                             "Time between successive generated tokens of a request.", p, buckets=ITL_BUCKETS,
                             registry=r)
        self.e2e = Histogram("tokenmill_e2e_request_latency_seconds",
                             "From the HTTP request's arrival to its last token.", p, buckets=LATENCY_BUCKETS,
                             registry=r)
        self.queue = Histogram("tokenmill_request_queue_time_seconds",
                               "From the HTTP request's arrival to its first scheduled engine step.", p,
                               buckets=LATENCY_BUCKETS, registry=r)
        self.http = Counter("tokenmill_http_requests", "HTTP requests by route, method and status code.",
                            ["route", "method", "status"], registry=r)
        self.engine = EngineCollector(self.tokens_per_second)
        r.register(self.engine)

    def record_generated(self, pipeline: str, count: int) -> None:
        """``count`` tokens were generated by ``pipeline`` just now (called by its engine thread each step)."""
        rate = self._rates.get(pipeline)
        if rate is None:
            rate = self._rates.setdefault(pipeline, SlidingRate(self.token_rate_window_s))
        rate.add(count, self.clock())

    def tokens_per_second(self, pipeline: str) -> float:
        rate = self._rates.get(pipeline)
        return 0.0 if rate is None else rate.rate(self.clock())
