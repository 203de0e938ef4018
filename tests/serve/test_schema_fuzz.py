"""The OpenAPI schema says what the server does: documented statuses and response models, then a bounded,
derandomized schemathesis run over every route of a real server (tiny random-weight pipeline) in which every
answer must have a documented status, content type, headers and body shape, and none may be a 500."""
from __future__ import annotations

import pytest

from tests.conftest import tiny_pipeline_dict
from tests.serve.helpers import start_server
from tokenmill import Pipeline

schemathesis = pytest.importorskip("schemathesis")
from schemathesis import checks  # noqa: E402

MAX_EXAMPLES = 6  # per route and generation mode; the whole run stays well under a minute on 2 cores


@pytest.fixture(scope="module")
def server(tiny_llama_dir):
    pipe = Pipeline.from_dict(tiny_pipeline_dict(tiny_llama_dir, name="fuzz", limits={
        "max_model_len": 48, "max_num_seqs": 4, "max_num_batched_tokens": 128}), progress=False)
    run = start_server([pipe])
    yield run
    run.stop()
    assert pipe.stats()["kv"]["used_blocks"] == 0 and not pipe.engine.has_unfinished()


def test_schema_documents_what_the_routes_return(server):
    with server.client() as c:
        spec = c.get("/openapi.json").json()
    paths = spec["paths"]
    for path, method in [("/v1/generate", "post"), ("/v1/completions", "post"), ("/v1/chat/completions", "post")]:
        responses = paths[path][method]["responses"]
        assert {"200", "400", "401", "413", "503", "504"} <= set(responses), (path, sorted(responses))
        assert "422" not in responses
        assert "text/event-stream" in responses["200"]["content"], path
        assert "Retry-After" in responses["503"]["headers"], path
        assert responses["400"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorResponse")
    for path in ("/v1/completions", "/v1/chat/completions", "/v1/models/{model_id}", "/tokenize"):
        method = "get" if path.startswith("/v1/models") else "post"
        assert "404" in paths[path][method]["responses"], path
    refs = {path: paths[path][m]["responses"]["200"]["content"]["application/json"]["schema"].get("$ref", "")
            for path, m in [("/v1/completions", "post"), ("/v1/chat/completions", "post"), ("/v1/models", "get"),
                            ("/v1/models/{model_id}", "get"), ("/tokenize", "post"), ("/detokenize", "post"),
                            ("/version", "get")]}
    assert refs == {"/v1/completions": "#/components/schemas/CompletionResponse",
                    "/v1/chat/completions": "#/components/schemas/ChatCompletionResponse",
                    "/v1/models": "#/components/schemas/ModelList",
                    "/v1/models/{model_id}": "#/components/schemas/ModelCard",
                    "/tokenize": "#/components/schemas/TokenizeResponse",
                    "/detokenize": "#/components/schemas/DetokenizeResponse",
                    "/version": "#/components/schemas/VersionResponse"}
    assert "HTTPValidationError" not in spec["components"]["schemas"]


@pytest.fixture(scope="module")
def api_schema(server):
    config = schemathesis.Config.from_dict({
        "seed": 17,
        "generation": {"max-examples": MAX_EXAMPLES, "deterministic": True, "mode": "all", "database": "none",
                       "no-shrink": True},
        "phases": {"examples": {"enabled": True}, "coverage": {"enabled": False},
                   "stateful": {"enabled": False}},
    })
    return schemathesis.openapi.from_url(server.base + "/openapi.json", config=config)


schema = schemathesis.pytest.from_fixture("api_schema")
CHECKS = [checks.not_a_server_error, checks.status_code_conformance, checks.content_type_conformance,
          checks.response_schema_conformance, checks.response_headers_conformance]


@schema.parametrize()
def test_every_route_answers_as_documented(case):
    case.call_and_validate(checks=CHECKS, timeout=30)
