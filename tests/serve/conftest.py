"""Fixtures for the service tests: tiny-model pipelines and servers started with special options."""
from __future__ import annotations

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from tests.conftest import tiny_pipeline_dict  # noqa: E402
from tests.serve.helpers import PAGED, Poisoned, Running, Slow, build_with_plugins, start_server  # noqa: E402
from tokenmill import Pipeline  # noqa: E402


@pytest.fixture(autouse=True)
def _no_delay():
    """Every service test starts and ends with the spare pipeline's step delay off."""
    Slow.delay = 0.0
    yield
    Slow.delay = 0.0


@pytest.fixture(scope="session")
def serve_pipelines(tiny_llama_dir):
    """``tiny`` (fcfs + contiguous KV), ``tiny-paged`` (continuous batching + paged KV with prefix caching),
    ``faulty`` (a plugin fails verification for poisoned prompts), ``tiny-dynamic`` (a 50 ms batching window)."""
    tiny = Pipeline.from_dict(tiny_pipeline_dict(tiny_llama_dir), progress=False)
    paged = Pipeline.from_dict(tiny_pipeline_dict(tiny_llama_dir, name="tiny-paged", plugins=PAGED), progress=False)
    faulty = build_with_plugins(tiny_llama_dir, name="faulty", plugins=["poisoned"])
    assert type(faulty.plugins["poisoned"]) is Poisoned
    Poisoned.poison = faulty.encode("poison")[0]
    dynamic = Pipeline.from_dict(tiny_pipeline_dict(tiny_llama_dir, name="tiny-dynamic", plugins=[
        {"dynamic_batching": {"max_batch_size": 4, "max_wait_ms": 50}}, "contiguous_kv"]), progress=False)
    return {"tiny": tiny, "tiny-paged": paged, "faulty": faulty, "tiny-dynamic": dynamic}


@pytest.fixture(scope="session")
def spare_pipeline(tiny_llama_dir):
    """For servers with special options (one at a time): paged KV and a step delay the test can set."""
    pipe = build_with_plugins(tiny_llama_dir, name="spare",
                              plugins=["slow", "continuous_batching", {"paged_kv": {"block_size": 8, "num_blocks": 512}}])
    assert type(pipe.plugins["slow"]) is Slow  # the class whose `delay` the tests set
    return pipe


@pytest.fixture()
def make_server():
    """Start servers with special options; each is stopped at the end of the test."""
    started: list[Running] = []

    def _make(pipelines, **options) -> Running:
        run = start_server(pipelines, **options)
        started.append(run)
        return run

    yield _make
    for run in started:
        if run.thread.is_alive():
            run.stop()


