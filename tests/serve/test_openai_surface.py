"""What an OpenAI (or vLLM) client sends and expects: fields that would change the result but are not
supported are refused by name, unknown fields are refused, harmless extras are accepted; the routes such a
client calls besides completions (one model, tokenize, detokenize, version)."""
from __future__ import annotations

import pytest

from tests.conftest import tiny_pipeline_dict
from tests.serve.helpers import start_server
from tokenmill import Pipeline, __version__


@pytest.fixture(scope="module")
def pipe(tiny_llama_dir):
    return Pipeline.from_dict(tiny_pipeline_dict(tiny_llama_dir, name="surface"), progress=False)


@pytest.fixture(scope="module")
def client(pipe):
    run = start_server([pipe])
    with run.client() as c:
        yield c
    run.stop()


COMPLETION = {"model": "surface", "prompt": "Hello", "max_tokens": 2}
CHAT = {"model": "surface", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 2}
NATIVE = {"prompt": "Hello", "max_tokens": 2}
ROUTES = {"/v1/completions": COMPLETION, "/v1/chat/completions": CHAT, "/v1/generate": NATIVE,
          "/v1/generate/batch": {"prompts": ["Hello"], "max_tokens": 2}}

# (field, a value that would change the result, routes that refuse it)
NATIVE_ROUTES = ["/v1/generate", "/v1/generate/batch"]
TOOL = [{"type": "function", "function": {"name": "f"}}]
UNSUPPORTED = [
    ("include_stop_str_in_output", True, list(ROUTES)),
    ("skip_special_tokens", False, list(ROUTES)),
    ("use_beam_search", True, list(ROUTES)),
    ("prompt_logprobs", 1, list(ROUTES)),
    ("guided_whitespace_pattern", " ", list(ROUTES)),
    ("guided_json", {"type": "object"}, NATIVE_ROUTES),
    ("response_format", {"type": "json_object"}, NATIVE_ROUTES),
    ("top_logprobs", 3, ["/v1/completions"] + NATIVE_ROUTES),
    ("tools", TOOL, ["/v1/completions"] + NATIVE_ROUTES),
    ("max_completion_tokens", 4, ["/v1/completions"]),
]
CASES = [(route, field, value) for field, value, routes in UNSUPPORTED for route in routes]


@pytest.mark.parametrize("route,field,value", CASES, ids=[f"{r}-{f}" for r, f, _ in CASES])
def test_a_field_that_would_change_the_result_is_refused_by_name(client, route, field, value):
    r = client.post(route, json=dict(ROUTES[route], **{field: value}))
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert field in err["message"] and "not supported" in err["message"], err
    assert err["param"] == field


def test_neutral_values_are_accepted(client):
    """A client that sends the value the server behaves as anyway is not refused (unsupported fields at their
    neutral value, and sampling fields at the value that disables them)."""
    neutral = {"repetition_penalty": 1.0, "min_p": 0.0, "min_tokens": 0, "stop_token_ids": [],
               "skip_special_tokens": True, "include_stop_str_in_output": False, "priority": 0,
               "use_beam_search": False, "presence_penalty": 0, "logit_bias": {}}
    for route, body in ROUTES.items():
        r = client.post(route, json=dict(body, **neutral))
        assert r.status_code == 200, (route, r.text)


@pytest.mark.parametrize("route", ["/v1/completions", "/v1/chat/completions"])
def test_unknown_openai_fields_are_refused(client, route):
    r = client.post(route, json=dict(ROUTES[route], temperture=0.5))
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert "unknown field 'temperture'" in err["message"] and err["param"] == "temperture"


@pytest.mark.parametrize("route", ["/v1/completions", "/v1/chat/completions"])
def test_harmless_openai_extras_are_accepted(client, route):
    extras = {"user": "u-1", "metadata": {"k": "v"}, "store": False, "service_tier": "auto",
              "safety_identifier": "s-1", "prompt_cache_key": "p-1"}
    r = client.post(route, json=dict(ROUTES[route], **extras))
    assert r.status_code == 200, r.text


def test_chat_message_fields_that_would_be_dropped_are_refused(client):
    """The chat template sees a message's role and content (and tool calls / tool_call_id): an unknown key, or tool
    calls on a message that is not the assistant's, would vanish from the prompt, so they are refused; fields
    OpenAI's own answers carry empty are accepted."""
    call = [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]
    cases = [({"role": "user", "content": "x", "tool_calls": call}, "messages[0]: tool_calls belong to assistant"),
             ({"role": "user", "content": "x", "foo": 1}, "unknown field 'messages.0.foo'")]
    for message, text in cases:
        r = client.post("/v1/chat/completions", json=dict(CHAT, messages=[message]))
        assert r.status_code == 400 and text in r.json()["error"]["message"], r.text
    replayed = {"role": "assistant", "content": "Hi", "tool_calls": None, "function_call": None, "refusal": None,
                "audio": None, "annotations": [], "name": "bot"}
    r = client.post("/v1/chat/completions", json=dict(CHAT, messages=[replayed, {"role": "user", "content": "Go"}]))
    assert r.status_code == 200, r.text


def test_max_completion_tokens_wins_over_max_tokens_on_chat(client):
    body = dict(CHAT, max_tokens=2, max_completion_tokens=5, ignore_eos=True)
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 5
    r = client.post("/v1/chat/completions", json=dict(CHAT, max_tokens=2, max_completion_tokens=9999))
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_completion_tokens", r.text
    assert "max_completion_tokens must be at most 255" in r.json()["error"]["message"]
# ---------------------------------------------------------------------------------------------- routes
def test_get_one_model(client):
    r = client.get("/v1/models/surface")
    assert r.status_code == 200, r.text
    m = r.json()
    assert m["id"] == "surface" and m["object"] == "model" and m["owned_by"] == "tokenmill"
    assert m["max_model_len"] == 256
    r = client.get("/v1/models/gpt-4")
    assert r.status_code == 404, r.text
    err = r.json()["error"]
    assert err["code"] == "model_not_found" and err["param"] == "model" and "surface" in err["message"]
    for path in ("/v1/models/org/model", "/v1/models/"):  # served names may hold a slash, as hub ids do
        r = client.get(path)
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found", (path, r.text)


def test_tokenize_and_detokenize_round_trip(client, pipe):
    ids = pipe.encode("Hello world")
    r = client.post("/tokenize", json={"prompt": "Hello world"})
    assert r.status_code == 200, r.text
    assert r.json() == {"tokens": ids, "count": len(ids), "max_model_len": 256}
    r = client.post("/tokenize", json={"prompt": "Hello world", "model": "surface", "add_special_tokens": False})
    assert r.status_code == 200 and r.json()["tokens"] == pipe.tokenizer.encode("Hello world",
                                                                                add_special_tokens=False)
    r = client.post("/detokenize", json={"tokens": ids})
    assert r.status_code == 200, r.text
    assert r.json() == {"prompt": pipe.tokenizer.decode(ids)}


def test_tokenize_and_detokenize_refuse_bad_input(client, pipe):
    vocab = pipe.engine.vocab_size
    r = client.post("/detokenize", json={"tokens": [1, vocab]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "tokens", r.text
    assert f"tokens[1] = {vocab} is outside the vocabulary [0, {vocab})" in r.json()["error"]["message"]
    r = client.post("/detokenize", json={"tokens": [-1]})
    assert r.status_code == 400 and "tokens" in r.json()["error"]["message"], r.text
    r = client.post("/detokenize", json={"tokens": ["a"]})
    assert r.status_code == 400, r.text
    r = client.post("/tokenize", json={"prompt": "x", "model": "nope"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found", r.text
    r = client.post("/tokenize", json={"prompt": "x", "extra": 1})
    assert r.status_code == 400 and "unknown field 'extra'" in r.json()["error"]["message"], r.text


def test_version(client):
    r = client.get("/version")
    assert r.status_code == 200 and r.json() == {"version": __version__}
