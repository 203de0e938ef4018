"""Structured output and function calling through the OpenAI routes (the `openai` client against a real server)
and the native route: every way of asking (response_format, guided_*, structured_outputs, structured_output,
tools / tool_choice) gives the offline result of the structured_output plugin argument it stands for; what the
answer looks like (message.tool_calls, finish_reason tool_calls, streamed); refusals naming the field; the
chat template offered the tools."""
from __future__ import annotations

import copy
import json
import re

import pytest

from tests.conftest import tiny_pipeline_dict
from tests.serve.helpers import start_server
from tokenmill import Pipeline, SamplingParams
from tokenmill.errors import RequestError
from tokenmill.serve.responses import ChatCompletionResponse
from tokenmill.serve.tools import TOOLS_PROMPT, encode_chat

openai = pytest.importorskip("openai")
jsonschema = pytest.importorskip("jsonschema")

MESSAGES = [{"role": "user", "content": "What is the weather in Paris?"}]
POINT = {"type": "object", "properties": {"x": {"enum": [1, 2, 3]}, "ok": {"type": "boolean"}},
         "required": ["x", "ok"], "additionalProperties": False}
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Current weather of a city",
                                            "parameters": {"type": "object", "properties": {
                                                "unit": {"enum": ["celsius", "fahrenheit"]}},
                                                "required": ["unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"utc": {"type": "boolean"}}, "required": ["utc"], "additionalProperties": False}}}


@pytest.fixture(scope="module")
def pipes(tiny_llama_dir):
    served = Pipeline.from_dict(tiny_pipeline_dict(tiny_llama_dir, name="tools"), progress=False)
    offline = Pipeline.from_dict(tiny_pipeline_dict(tiny_llama_dir, name="offline"), progress=False)
    return served, offline


@pytest.fixture(scope="module")
def structured(pipes):
    if "structured_output" not in pipes[0].engine.request_args:
        pytest.skip("no structured_output plugin in this pipeline")


@pytest.fixture(scope="module")
def run(pipes):
    run = start_server([pipes[0]])
    yield run
    run.stop()
    assert pipes[0].stats()["kv"]["used_blocks"] == 0 and not pipes[0].engine.has_unfinished()


@pytest.fixture(scope="module")
def oc(run):
    with openai.OpenAI(base_url=run.base + "/v1", api_key="x", max_retries=0) as client:
        yield client


@pytest.fixture(scope="module")
def http(run):
    with run.client() as c:
        yield c


def offline_chat(offline, spec: dict, messages=MESSAGES, tools=None, **kw):
    ids = encode_chat(offline, messages, tools)
    params = SamplingParams(max_tokens=kw.pop("max_tokens", 48), temperature=0, plugin_args={"structured_output": spec},
                            **kw)
    return offline.generate([ids], params)[0]


# ---------------------------------------------------------------------------------------------- structured output
SOURCES = [  # (fields sent to /v1/chat/completions, the plugin argument they stand for)
    ({"response_format": {"type": "json_object"}}, {"type": "json_object"}),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "p", "schema": POINT, "strict": True}}},
     {"type": "json_schema", "schema": POINT}),
    ({"guided_json": POINT}, {"type": "json_schema", "schema": POINT}),
    ({"guided_json": json.dumps(POINT)}, {"type": "json_schema", "schema": POINT}),
    ({"guided_regex": "[0-9]{3}-[a-c]{1,4}", "guided_decoding_backend": "xgrammar"},
     {"type": "regex", "pattern": "[0-9]{3}-[a-c]{1,4}"}),
    ({"guided_choice": ["sunny", "rainy"]}, {"type": "choice", "choices": ["sunny", "rainy"]}),
    ({"guided_grammar": 'root ::= "yes" | "no"'}, {"type": "grammar", "grammar": 'root ::= "yes" | "no"'}),
    ({"structured_outputs": {"choice": ["a", "b"]}}, {"type": "choice", "choices": ["a", "b"]}),
    ({"structured_outputs": {"json": POINT}}, {"type": "json_schema", "schema": POINT}),
]


@pytest.mark.parametrize("fields,spec", SOURCES, ids=[f"{i}-{next(iter(f))}" for i, (f, _) in enumerate(SOURCES)])
def test_structured_output_fields_give_the_plugin_result(http, pipes, structured, fields, spec):
    ref = offline_chat(pipes[1], spec)
    r = http.post("/v1/chat/completions", json=dict(model="tools", messages=MESSAGES, max_tokens=48, temperature=0,
                                                    **fields))
    assert r.status_code == 200, r.text
    text = r.json()["choices"][0]["message"]["content"]
    assert text == ref.text and r.json()["choices"][0]["finish_reason"] == "stop"
    if spec["type"] == "json_schema":
        jsonschema.validate(json.loads(text), spec["schema"])
    elif spec["type"] == "json_object":
        assert isinstance(json.loads(text), dict)
    elif spec["type"] == "regex":
        assert re.fullmatch(spec["pattern"], text), text
    elif spec["type"] == "choice":
        assert text in spec["choices"]
    else:
        assert text in ("yes", "no")


def test_structured_output_on_completions_and_native(oc, http, pipes, structured):
    ids = pipes[1].encode("The answer is")
    ref = pipes[1].generate([ids], SamplingParams(max_tokens=16, temperature=0, plugin_args={
        "structured_output": {"type": "regex", "pattern": "[0-9]+"}}))[0]
    out = oc.completions.create(model="tools", prompt="The answer is", max_tokens=16, temperature=0,
                                extra_body={"guided_regex": "[0-9]+"})
    assert out.choices[0].text == ref.text and re.fullmatch("[0-9]+", ref.text)
    r = http.post("/v1/generate", json={"prompt": "The answer is", "max_tokens": 16,
                                        "structured_output": {"type": "regex", "pattern": "[0-9]+"}})
    assert r.status_code == 200 and r.json()["text"] == ref.text, r.text
    regex = {"structured_output": {"type": "regex", "pattern": "[0-9]+"}}
    r = http.post("/v1/generate/batch", json={"prompts": ["The answer is"], "max_tokens": 16, "plugin_args": regex})
    assert r.status_code == 200 and r.json()["results"][0]["text"] == ref.text, r.text


REFUSED = [  # (route, fields, the field named, part of the message)
    ("/v1/chat/completions", {"response_format": {"type": "json_object"}, "guided_regex": "a"}, "response_format",
     "response_format and guided_regex both ask for structured output"),
    ("/v1/chat/completions", {"response_format": {"type": "json_schema"}}, "response_format", "json_schema.schema"),
    ("/v1/chat/completions", {"response_format": {"type": "yaml"}}, "response_format.type", "json_schema"),
    ("/v1/chat/completions", {"guided_json": "{not json"}, "guided_json", "guided_json must be a JSON schema"),
    ("/v1/chat/completions", {"guided_json": [1]}, "guided_json", "guided_json must be a JSON schema object, got "
     "list"),
    ("/v1/chat/completions", {"structured_outputs": {"json": 3}}, "structured_outputs.json", "JSON schema object"),
    ("/v1/chat/completions", {"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs",
     "structured_outputs takes one of"),
    ("/v1/chat/completions", {"guided_choice": ["a"], "plugin_args": {"structured_output": {"type": "json_object"}}},
     "guided_choice", "both ask for structured output"),
    ("/v1/completions", {"guided_choice": []}, "guided_choice", "choices must be a non-empty list"),
    ("/v1/completions", {"guided_regex": "(unclosed"}, "guided_regex", "plugin 'structured_output' refused"),
    ("/v1/generate", {"structured_output": {"type": "bogus"}}, "structured_output", "structured_output.type"),
    ("/v1/generate", {"structured_output": {"type": "json_schema", "schema": {"type": 5}}}, "structured_output",
     "plugin 'structured_output' refused"),
]


@pytest.mark.parametrize("route,fields,param,message", REFUSED, ids=[f"{i}" for i in range(len(REFUSED))])
def test_bad_structured_output_is_refused_naming_the_field(http, structured, route, fields, param, message):
    body = {"/v1/chat/completions": {"model": "tools", "messages": MESSAGES},
            "/v1/completions": {"model": "tools", "prompt": "x"}, "/v1/generate": {"prompt": "x"}}[route]
    r = http.post(route, json=dict(body, max_tokens=4, **fields))
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and message in err["message"], err


def test_json_object_answers_parse_at_any_max_tokens(oc, structured, tokenizer):
    # nothing bounds an object's size: the grammar closes it in the tokens left, so even a "length" answer parses
    # (the bias keeps the random model from closing its object at once, as it would)
    bias = {str(t): -100 for t in tokenizer.convert_tokens_to_ids(["}", "{}"])}
    texts = []
    for n, temperature in [(5, 0), (9, 0), (17, 1.0), (33, 1.0)]:
        out = oc.chat.completions.create(model="tools", messages=MESSAGES, max_tokens=n, temperature=temperature,
                                         seed=1, response_format={"type": "json_object"}, logit_bias=bias)
        choice = out.choices[0]
        assert isinstance(json.loads(choice.message.content), dict), choice.message.content
        assert out.usage.completion_tokens <= n
        texts.append(choice.message.content)
    assert len(set(texts)) == len(texts), texts  # four different answers, the longer ones with long keys


def test_structured_output_without_the_plugin_is_refused(make_server, tiny_llama_dir, monkeypatch):
    from tokenmill import host

    monkeypatch.setattr(host, "DEFAULT_PLUGINS", tuple(p for p in host.DEFAULT_PLUGINS if p != "structured_output"))
    bare = Pipeline.from_dict(tiny_pipeline_dict(tiny_llama_dir, name="bare"), progress=False)
    assert "structured_output" not in bare.engine.request_args
    run = make_server([bare])
    with run.client() as c:
        r = c.post("/v1/chat/completions", json={"model": "bare", "messages": MESSAGES,
                                                 "response_format": {"type": "json_object"}})
        assert r.status_code == 400 and r.json()["error"]["param"] == "response_format", r.text
        assert "needs structured output" in r.json()["error"]["message"]
        r = c.post("/v1/chat/completions", json={"model": "bare", "messages": MESSAGES, "tools": [WEATHER]})
        assert r.status_code == 400 and r.json()["error"]["param"] == "tools", r.text


# ---------------------------------------------------------------------------------------------- tools
def _call_spec(tools: list[dict]) -> dict:
    one = [{"type": "object", "properties": {"name": {"type": "string", "enum": [t["function"]["name"]]},
                                             "arguments": t["function"]["parameters"]},
            "required": ["name", "arguments"], "additionalProperties": False} for t in tools]
    return {"type": "json_schema", "schema": one[0] if len(one) == 1 else {"anyOf": one}}


@pytest.mark.parametrize("tool_choice,tools,called", [
    ("required", [WEATHER], [WEATHER]),
    (None, [WEATHER, TIME], [WEATHER, TIME]),  # "auto", the default with tools: read as required
    ({"type": "function", "function": {"name": "get_time"}}, [WEATHER, TIME], [TIME]),
], ids=["required", "auto", "named"])
def test_tool_calls_follow_the_tool_schema(oc, pipes, structured, tool_choice, tools, called):
    kw = {} if tool_choice is None else {"tool_choice": tool_choice}
    out = oc.chat.completions.create(model="tools", messages=MESSAGES, tools=tools, max_tokens=48, temperature=0, **kw)
    ChatCompletionResponse.model_validate(out.model_dump())
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (tc,) = choice.message.tool_calls
    assert tc.type == "function" and tc.id.startswith("call_")
    tool = next(t for t in called if t["function"]["name"] == tc.function.name)
    jsonschema.validate(json.loads(tc.function.arguments), tool["function"]["parameters"])
    ref = offline_chat(pipes[1], _call_spec(called), tools=tools)
    assert json.loads(ref.text) == {"name": tc.function.name, "arguments": json.loads(tc.function.arguments)}

    stream = oc.chat.completions.create(model="tools", messages=MESSAGES, tools=tools, max_tokens=48, temperature=0,
                                        stream=True, **kw)
    deltas = [c.choices[0] for c in stream if c.choices]
    calls = [d.delta.tool_calls for d in deltas if d.delta.tool_calls]
    assert len(calls) == 1 and calls[0][0].index == 0
    assert (calls[0][0].function.name, calls[0][0].function.arguments) == (tc.function.name, tc.function.arguments)
    assert deltas[-1].finish_reason == "tool_calls"
    assert not any(d.delta.content for d in deltas)


def test_tool_choice_none_is_plain_text_without_the_tools(oc, pipes):
    plain = oc.chat.completions.create(model="tools", messages=MESSAGES, max_tokens=6, temperature=0)
    out = oc.chat.completions.create(model="tools", messages=MESSAGES, tools=[WEATHER], tool_choice="none",
                                     max_tokens=6, temperature=0)
    assert out.choices[0].message.tool_calls is None and out.choices[0].finish_reason == "length"
    assert out.choices[0].message.content == plain.choices[0].message.content
    assert out.usage.prompt_tokens == plain.usage.prompt_tokens  # the tools are left out of the prompt


def test_tools_reach_the_prompt_and_a_cut_call_is_text(oc, pipes, structured):
    """The default model's template does not use tools: they are described in a first system message. A call cut
    short by max_tokens is no call: its text comes back with finish_reason length."""
    out = oc.chat.completions.create(model="tools", messages=MESSAGES, tools=[WEATHER], max_tokens=3, temperature=0)
    ids = encode_chat(pipes[1], MESSAGES, [WEATHER])
    assert out.usage.prompt_tokens == len(ids) > len(pipes[1].apply_chat_template(MESSAGES))
    assert "get_weather" in pipes[1].tokenizer.decode(ids)
    choice = out.choices[0]
    assert choice.finish_reason == "length" and choice.message.tool_calls is None
    assert choice.message.content.startswith('{"')


def test_a_replayed_tool_conversation_is_accepted(oc, structured):
    history = MESSAGES + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather",
                                                              "arguments": '{"unit": "celsius"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "21 degrees"}]
    out = oc.chat.completions.create(model="tools", messages=history, tools=[WEATHER], tool_choice="none",
                                     max_tokens=4, temperature=0)
    assert out.choices[0].finish_reason == "length"


TOOL_REFUSED = [
    ({"tool_choice": "required"}, "tool_choice", "tool_choice required needs tools"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice",
     "'nope', which is not among tools (get_weather)"),
    ({"tools": [WEATHER, WEATHER]}, "tools", "more than once"),
    ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tools.0.function.name",
     "a function name is 1 to 64"),
    ({"tools": [WEATHER], "response_format": {"type": "json_object"}}, "tools", "both ask for structured output"),
    ({"tools": [{"type": "retrieval"}]}, "tools.0.type", "function"),
    ({"functions": [WEATHER["function"]]}, "functions", "use tools"),
    ({"tool_choice": "sometimes"}, "tool_choice", 'tool_choice must be "none", "auto", "required" or'),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "name": "get_weather"}}, "tool_choice",
     'got {"type": "function", "name": "get_weather"}'),
]


@pytest.mark.parametrize("fields,param,message", TOOL_REFUSED, ids=[str(i) for i in range(len(TOOL_REFUSED))])
def test_bad_tool_requests_are_refused_naming_the_field(http, fields, param, message):
    r = http.post("/v1/chat/completions", json=dict(model="tools", messages=MESSAGES, max_tokens=4, **fields))
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and message in err["message"], err


# ---------------------------------------------------------------------------------------------- chat template
class _Pipe:
    """A pipeline with only a tokenizer: the real chat-template method, without building a model."""

    apply_chat_template = Pipeline.apply_chat_template

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer


TOOLS_TEMPLATE = ("{% if tools %}TOOLS:{% for t in tools %}{{ t.function.name }};{% endfor %}\n{% endif %}"
                  "{% for m in messages %}{{ m.role }}: {{ m.content }}"
                  "{% if m.tool_calls %}{% for c in m.tool_calls %}CALL {{ c.function.name }} "
                  "{{ c.function.arguments | tojson }}{% endfor %}{% endif %}\n{% endfor %}"
                  "{% if add_generation_prompt %}assistant:{% endif %}")


def test_encode_chat_offers_tools_to_templates_that_use_them(tokenizer):
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = TOOLS_TEMPLATE
    tools = [WEATHER]
    history = MESSAGES + [{"role": "assistant", "content": "", "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "get_weather", "arguments": {"unit": "celsius"}}}]}]
    ids = encode_chat(_Pipe(tok), history, tools)
    text = tok.decode(ids)
    assert text.startswith("TOOLS:get_weather;") and 'CALL get_weather {"unit": "celsius"}' in text
    assert TOOLS_PROMPT.split(".")[0] not in text
    assert ids == tok.encode(tok.apply_chat_template(history, tools=tools, tokenize=False,
                                                     add_generation_prompt=True), add_special_tokens=False)


def test_encode_chat_describes_tools_to_templates_that_do_not(tokenizer):
    history = MESSAGES + [{"role": "assistant", "content": "", "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "get_weather", "arguments": {"unit": "celsius"}}}]}]
    text = tokenizer.decode(encode_chat(_Pipe(tokenizer), history, [WEATHER]))
    assert "You can call these functions" in text and '"name": "get_weather"' in text
    assert '{"name": "get_weather", "arguments": {"unit": "celsius"}}' in text  # the call, as it is generated
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = "{{ raise_exception('roles must alternate') }}"
    with pytest.raises(RequestError, match="chat template of this model refused the messages.*roles must alternate"):
        encode_chat(_Pipe(tok), history, None)
