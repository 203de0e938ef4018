"""Request fields the server knows but does not support: refused by name, unless they carry a neutral value.

OpenAI and vLLM clients send fields that would change the result (beam search, echo, prompt logprobs, special
tokens in the text ...). Ignoring them would answer a different question than the one asked, so each one listed
here is refused with a 400 that names it and says it is not supported, unless its value is *neutral*: the
value the server behaves as anyway (``use_beam_search: false``, ``skip_special_tokens: true``), which is
accepted and dropped. An entry may apply to some routes only (``routes``): where the field is real elsewhere
(``response_format`` on the OpenAI routes, ``structured_output`` on the native ones). Implementing a field later
is removing its entry here and adding it to the request models (``sampling_fields.py`` for every route,
``schemas.py`` native, ``openai_schemas.py`` OpenAI). Fields neither in a request model nor here are refused as
unknown (``extra="forbid"``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic_core import PydanticCustomError

NATIVE, COMPLETIONS, CHAT = "native", "completions", "chat"
ALL = frozenset({NATIVE, COMPLETIONS, CHAT})


@dataclass(frozen=True)
class Unsupported:
    why: str
    neutral: tuple = (None,)   # values accepted (and dropped) because the server behaves so anyway
    routes: frozenset = ALL    # where it is refused; elsewhere it is a real field (or unknown)

    def accepts(self, value: Any) -> bool:
        return any(_same(value, n) for n in self.neutral)

    def message(self, field: str) -> str:
        shown = [_show(n) for n in self.neutral if n is not None]
        fix = "leave it out" + (f" or set it to {' or '.join(shown)}" if shown else "")
        return f"{field} is not supported ({self.why}); {fix}"


def _same(a: Any, b: Any) -> bool:
    """Equal and of the same kind: ``0`` is not ``false``, ``1`` equals ``1.0``."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    return a == b and (isinstance(a, (int, float)) == isinstance(b, (int, float)))


def _show(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return f'"{v}"'
    if isinstance(v, dict):
        return "{" + ", ".join(f'"{k}": {_show(x)}' for k, x in v.items()) + "}"
    return repr(v)


LOGITS = "tokenmill has no such logits processor"
TEXT = {"type": "text"}
OPENAI = frozenset({COMPLETIONS, CHAT})
NOT_CHAT = frozenset({NATIVE, COMPLETIONS})
ON_NATIVE = frozenset({NATIVE})
GUIDED = "on the native routes structured output is the structured_output field"
TOOLS = "function calling is a chat completions feature"

UNSUPPORTED: dict[str, Unsupported] = {
    # sampling (penalties, logit_bias, min_p, min_tokens, bad_words, stop_token_ids, priority are real fields)
    "length_penalty": Unsupported("there is no beam search", (None, 1)),
    "allowed_token_ids": Unsupported(LOGITS + "; logit_bias can ban tokens"),
    "logits_processors": Unsupported(LOGITS + "; pipeline plugins process logits", (None, [])),
    "use_beam_search": Unsupported("there is no beam search", (None, False)),
    "best_of": Unsupported("each sample is returned; use n for several", (None, 1)),
    # stopping and the returned text
    "include_stop_str_in_output": Unsupported("stop strings are cut from the text", (None, False)),
    "skip_special_tokens": Unsupported("special tokens are always left out of the text", (None, True)),
    "spaces_between_special_tokens": Unsupported("special tokens are left out of the text", (None, True)),
    "echo": Unsupported("the answer holds the generated text only", (None, False)),
    "suffix": Unsupported("there is no fill-in-the-middle", (None, "")),
    "top_logprobs": Unsupported("on this route logprobs is the number of top alternatives", (None,), NOT_CHAT),
    "prompt_logprobs": Unsupported("log probabilities are returned for generated tokens only"),
    "return_tokens_as_token_ids": Unsupported("the answer holds text", (None, False)),
    "truncate_prompt_tokens": Unsupported("prompts are never truncated; a prompt too long is refused"),
    # structured output and tools (response_format, guided_*, structured_outputs, tools are real on OpenAI routes)
    "response_format": Unsupported(GUIDED, (None, TEXT), ON_NATIVE),
    "guided_json": Unsupported(GUIDED, (None,), ON_NATIVE),
    "guided_regex": Unsupported(GUIDED, (None,), ON_NATIVE),
    "guided_choice": Unsupported(GUIDED, (None,), ON_NATIVE),
    "guided_grammar": Unsupported(GUIDED, (None,), ON_NATIVE),
    "guided_decoding_backend": Unsupported(GUIDED, (None,), ON_NATIVE),
    "structured_outputs": Unsupported(GUIDED, (None,), ON_NATIVE),
    "guided_whitespace_pattern": Unsupported("JSON output follows the structured_output plugin's whitespace"),
    "tools": Unsupported(TOOLS, (None, []), NOT_CHAT),
    "tool_choice": Unsupported(TOOLS, (None, "none"), NOT_CHAT),
    "functions": Unsupported("the deprecated functions field is not supported; use tools", (None, [])),
    "function_call": Unsupported("the deprecated function_call field is not supported; use tool_choice",
                                 (None, "none")),
    # chat templating
    "chat_template": Unsupported("the model's own chat template is used"),
    "chat_template_kwargs": Unsupported("the model's own chat template is used", (None, {})),
    "add_generation_prompt": Unsupported("the generation prompt is always added", (None, True)),
    "continue_final_message": Unsupported("the generation prompt is always added", (None, False)),
    # a chat completions field elsewhere
    "max_completion_tokens": Unsupported("it is a chat completions field; use max_tokens", (None,), NOT_CHAT),
}


def refuse_unsupported(data: Any, route: str) -> Any:
    """``data`` without the neutral unsupported fields; a validation error naming every other one."""
    if not isinstance(data, dict):
        return data
    here = {k: UNSUPPORTED[k] for k in data if k in UNSUPPORTED and route in UNSUPPORTED[k].routes}
    bad = [k for k, entry in here.items() if not entry.accepts(data[k])]
    if bad:
        raise PydanticCustomError("value_error", "; ".join(here[k].message(k) for k in bad), {"param": bad[0]})
    return {k: v for k, v in data.items() if k not in here}
