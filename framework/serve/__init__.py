"""The HTTP service: ``tokenmill serve`` (FastAPI + uvicorn).

One engine thread per pipeline owns it; HTTP handlers talk to it through a command queue and get their
output back through per-request asyncio queues, so requests from every client are batched by the
pipeline's scheduler. See docs/service.md.
"""
from tokenmill.serve.app import create_app
from tokenmill.serve.server import DrainingServer, build_server, serve
from tokenmill.serve.service import APIError, ServeConfig

__all__ = ["APIError", "DrainingServer", "ServeConfig", "build_server", "create_app", "serve"]
