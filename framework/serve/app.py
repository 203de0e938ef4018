"""The FastAPI application: native routes (``native_routes.py``), OpenAI-compatible routes (``openai_routes.py``),
utility routes, cache and model operations, health, readiness and metrics.

``create_app(pipelines)`` takes already-built :class:`~tokenmill.Pipeline` objects (or factories that
build them on their engine thread) and returns an ASGI app; ``tokenmill serve`` runs it under uvicorn.
"""
from __future__ import annotations

import asyncio
import hmac
import logging
import os
import time
from contextlib import asynccontextmanager
from typing import Any, Mapping

from fastapi import APIRouter, Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from tokenmill import __version__
from tokenmill.serve import extra_routes, native_routes, openai_routes
from tokenmill.serve.call import ClientGone
from tokenmill.serve.metrics import ServeMetrics
from tokenmill.serve.middleware import BodyLimitMiddleware, HTTPMetricsMiddleware
from tokenmill.serve.responses import GENERATION_ERRORS, drop_default_422, errors
from tokenmill.serve.service import APIError, ServeConfig, Service

log = logging.getLogger("tokenmill.serve")

OPEN_PATHS = ("/health", "/ready", "/docs", "/redoc", "/openapi.json", "/docs/oauth2-redirect")
API_KEY_ENV = "TOKENMILL_API_KEY"


# ------------------------------------------------------------------------------------------- helpers
def name_pipelines(pipelines: Any) -> dict[str, Any]:
    """``{name: Pipeline or factory}`` from a mapping, or from a list of pipelines / ``(name, factory)`` pairs.
    A pipeline's name is its YAML ``name:``; names must be unique."""
    if isinstance(pipelines, Mapping):
        return dict(pipelines)
    if hasattr(pipelines, "engine"):
        pipelines = [pipelines]
    named: dict[str, Any] = {}
    for item in pipelines:
        name, src = item if isinstance(item, tuple) else (item.spec.name, item)
        if name in named:
            raise ValueError(f"two pipelines are named '{name}'; give each pipeline a unique `name:` in its YAML")
        named[name] = src
    return named


def _make_auth(api_key: str | None):
    async def require_api_key(request: Request) -> None:
        if not api_key:
            return
        header = request.headers.get("authorization", "")
        token = header[7:].strip() if header[:7].lower() == "bearer " else request.headers.get("x-api-key", "")
        if not hmac.compare_digest(token.encode(), api_key.encode()):
            raise APIError(401, "missing or invalid API key: send the header 'Authorization: Bearer <key>'",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
    return require_api_key


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    parts, param = [], None
    for err in exc.errors():
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        kind = err.get("type", "")
        if kind == "json_invalid":
            where = f" at position {loc[0]}" if loc else ""
            detail = (err.get("ctx") or {}).get("error", "")
            parts.append(f"the request body is not valid JSON{where}" + (f" ({detail})" if detail else ""))
            continue
        field = ".".join(loc) or "body"
        param = param or (field if loc else (err.get("ctx") or {}).get("param"))
        msg = str(err.get("msg", "invalid")).removeprefix("Value error, ")
        if kind == "missing":
            parts.append(f"{field} is required")
        elif kind == "extra_forbidden":
            parts.append(f"unknown field '{field}'; see GET /openapi.json (or /docs) for the allowed fields")
        elif kind == "value_error":
            parts.append(msg if msg.startswith(field.split(".")[0]) or not loc else f"{field}: {msg}")
        else:
            got = err.get("input")
            shown = repr(got) if not isinstance(got, (dict, list)) or len(repr(got)) < 80 else type(got).__name__
            parts.append(f"{field}: {msg} (got {shown})")
    return "; ".join(parts) or "invalid request", param


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        message, param = _validation_message(exc)
        return JSONResponse(APIError(400, message, param=param).body(), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if exc.status_code == 404:
            message = f"no route {request.method} {request.url.path}; see /docs for the API"
        return JSONResponse(APIError(exc.status_code, message).body(), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(ClientGone)
    async def _gone(request: Request, exc: ClientGone):
        return Response(status_code=499)
    # other exceptions become a 500 in HTTPMetricsMiddleware (tokenmill.serve.middleware)


# ------------------------------------------------------------------------------------------- the app
def create_app(pipelines: Any, config: ServeConfig | None = None, **options: Any) -> FastAPI:
    """Build the service over ``pipelines`` (see :func:`name_pipelines`); ``options`` are :class:`ServeConfig`
    fields. Engine threads start with the app (lifespan startup) and stop with it."""
    config = config or ServeConfig(**options)
    if config.api_key is None:
        config.api_key = os.environ.get(API_KEY_ENV) or None
    metrics = ServeMetrics()
    service = Service(name_pipelines(pipelines), config, metrics)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        service.start()
        try:
            yield
        finally:
            await service.stop()

    app = FastAPI(title="tokenmill", version=__version__, lifespan=lifespan,
                  description="LLM inference over tokenmill pipelines: native routes, OpenAI-compatible routes, "
                              "health, readiness and Prometheus metrics. See docs/service.md.")
    app.state.service = service
    app.state.metrics = metrics
    app.add_middleware(BodyLimitMiddleware, max_bytes=config.max_body_bytes)  # inside the metrics: 413s count
    app.add_middleware(HTTPMetricsMiddleware, metrics=metrics, default_pipeline=service.default)
    _install_error_handlers(app)
    auth = [Depends(_make_auth(config.api_key))]
    app.include_router(native_routes.router(service), dependencies=auth, responses=errors(*GENERATION_ERRORS))
    app.include_router(openai_routes.router(service), dependencies=auth)
    app.include_router(extra_routes.router(service), dependencies=auth)
    app.include_router(_ops_router(service, metrics), dependencies=auth, responses=errors(401))
    app.include_router(_probe_router(service), responses={503: {"description": "Not alive / not ready; the body "
                                                                               "says why."}})
    drop_default_422(app)
    return app


def cache_view(name: str, kv: dict) -> dict:
    prefix = bool(kv.get("prefix_caching", False))
    nblocks = max(1, int(kv.get("num_blocks", 1)))
    block_bytes = kv.get("pool_bytes", 0) / nblocks
    entries = int(kv.get("cached_blocks", 0)) if prefix else 0
    return {
        "optimization": name, "kind": kv.get("kind"), "prefix_caching": prefix,
        "entries": entries, "total_size_mb": round(entries * block_bytes / 2**20, 4),
        "usage": kv.get("usage", 0.0), "used_blocks": kv.get("used_blocks", 0), "num_blocks": kv.get("num_blocks", 0),
        "block_size": kv.get("block_size"), "pool_size_mb": round(kv.get("pool_bytes", 0) / 2**20, 3),
        "hit_rate": kv.get("prefix_hit_rate", 0.0) if prefix else 0.0,
        "queries": kv.get("prefix_queries_tokens", 0) if prefix else 0,
        "hits": kv.get("prefix_hits_tokens", 0) if prefix else 0,
    }


def _ops_router(service: Service, metrics: ServeMetrics) -> APIRouter:
    r = APIRouter(tags=["operations"])
    opt = Query(None, description="pipeline name (default: the first)")

    @r.get("/v1/cache/stats", summary="Prefix-cache and KV statistics of one pipeline", responses=errors(400, 503))
    async def cache_stats(optimization: str | None = opt):
        w = service.worker(optimization)
        kv = await service.on_engine_thread(w, lambda p: p.stats()["kv"])
        return cache_view(w.name, kv)

    @r.delete("/v1/cache", summary="Drop cached prefix blocks that no running request uses",
              responses=errors(400, 503))
    async def clear_cache(optimization: str | None = opt):
        w = service.worker(optimization)

        def clear(p):
            before = p.stats()["kv"]
            freed = p.clear_prefix_cache()
            return before, freed, p.stats()["kv"]

        before, freed, after = await service.on_engine_thread(w, clear)
        view = cache_view(w.name, after)
        block_bytes = after.get("pool_bytes", 0) / max(1, after.get("num_blocks", 1))
        return {"optimization": w.name, "prefix_caching": view["prefix_caching"], "freed_blocks": freed,
                "freed_mb": round(freed * block_bytes / 2**20, 4),
                "entries_before": cache_view(w.name, before)["entries"], "entries_after": view["entries"],
                "used_blocks": view["used_blocks"]}

    @r.get("/v1/model/info", summary="Model, limits and plugins of one pipeline", responses=errors(400, 503))
    async def model_info(optimization: str | None = opt):
        w = service.worker(optimization)
        if w.info is None:
            service.check_ready(w)
        info = dict(w.info)
        info.update(optimization=w.name, available=list(service.workers),
                    max_batch_size=info.get("max_num_seqs"), max_sequence_length=info.get("max_model_len"))
        return info

    @r.get("/metrics", summary="Prometheus metrics", responses={200: {"description": "Prometheus text format",
                                                                     "content": {"text/plain": {}}}})
    async def prom_metrics():
        col = metrics.engine
        ready = [w for w in service.workers.values() if w.state == "ready"]
        snaps = await asyncio.gather(*(asyncio.wait_for(w.call(lambda p: p.stats()), service.config.stats_timeout)
                                       for w in ready), return_exceptions=True)
        for w, s in zip(ready, snaps):
            if isinstance(s, dict):
                col.snapshots[w.name] = s
        col.states = {n: w.state for n, w in service.workers.items()}
        col.queued = {n: w.queued() for n, w in service.workers.items()}
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return r


def _probe_router(service: Service) -> APIRouter:
    r = APIRouter(tags=["probes"])

    @r.get("/health", summary="Liveness: 200 while the process and its engine threads are alive")
    async def health():
        states = {n: w.state for n, w in service.workers.items()}
        dead = [n for n, w in service.workers.items() if not w.alive and w.state != "stopped"]
        dead += [n for n, w in service.workers.items() if w.state == "stopped" and not service.draining]
        body = {"status": "dead" if dead else "ok", "pipelines": states,
                "uptime_s": round(time.time() - service.started, 3)}
        return JSONResponse(body, status_code=503 if dead else 200)

    @r.get("/ready", summary="Readiness: 200 once every pipeline is loaded and warmed up, 503 before and "
                              "while draining")
    async def ready():
        states = {n: w.state for n, w in service.workers.items()}
        if service.draining:
            status = "draining"
        elif all(s == "ready" for s in states.values()):
            status = "ready"
        elif any(s == "failed" for s in states.values()):
            status = "failed"
        else:
            status = "loading"
        body = {"status": status, "pipelines": states,
                "errors": {n: w.error for n, w in service.workers.items() if w.error}}
        return JSONResponse(body, status_code=200 if status == "ready" else 503)

    return r
