"""Request fields the server knows but does not support: refused by name, unless they carry a neutral value.

OpenAI and vLLM clients send fields that would change the result (penalties, structured output, logprobs,
stop token ids ...). Ignoring them would answer a different question than the one asked, so each one listed
here is refused with a 400 that names it and says it is not supported, unless its value is *neutral*: the
value the server behaves as anyway (``repetition_penalty: 1``, ``stop_token_ids: []``), which is accepted
and dropped. Implementing a field later is removing its entry here and adding it to the request models in
``schemas.py`` and ``openai_schemas.py``. Fields neither in a request model nor here are refused as unknown
(``extra="forbid"``).
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


LOGITS = "it needs a logits processor"
STRUCTURED = "structured output needs a logits processor"
TEXT = {"type": "text"}

UNSUPPORTED: dict[str, Unsupported] = {
    # sampling and penalties
    "repetition_penalty": Unsupported(LOGITS, (None, 1)),
    "presence_penalty": Unsupported(LOGITS, (None, 0)),
    "frequency_penalty": Unsupported(LOGITS, (None, 0)),
    "length_penalty": Unsupported("there is no beam search", (None, 1)),
    "min_p": Unsupported(LOGITS, (None, 0)),
    "min_tokens": Unsupported(LOGITS, (None, 0)),
    "logit_bias": Unsupported(LOGITS, (None, {})),
    "bad_words": Unsupported(LOGITS, (None, [])),
    "allowed_token_ids": Unsupported(LOGITS),
    "logits_processors": Unsupported(LOGITS, (None, [])),
    "use_beam_search": Unsupported("there is no beam search", (None, False)),
    "best_of": Unsupported("one sample is drawn per prompt", (None, 1)),
    # stopping and the returned text
    "stop_token_ids": Unsupported("generation stops at EOS, max_tokens and stop strings", (None, [])),
    "include_stop_str_in_output": Unsupported("stop strings are cut from the text", (None, False)),
    "skip_special_tokens": Unsupported("special tokens are always left out of the text", (None, True)),
    "spaces_between_special_tokens": Unsupported("special tokens are left out of the text", (None, True)),
    "echo": Unsupported("the answer holds the generated text only", (None, False)),
    "suffix": Unsupported("there is no fill-in-the-middle", (None, "")),
    "logprobs": Unsupported("log probabilities are not returned", (None, False)),
    "top_logprobs": Unsupported("log probabilities are not returned", (None, 0)),
    "prompt_logprobs": Unsupported("log probabilities are not returned"),
    "return_tokens_as_token_ids": Unsupported("the answer holds text", (None, False)),
    "truncate_prompt_tokens": Unsupported("prompts are never truncated; a prompt too long is refused"),
    # structured output and tools
    "response_format": Unsupported(STRUCTURED, (None, TEXT)),
    "guided_json": Unsupported(STRUCTURED),
    "guided_regex": Unsupported(STRUCTURED),
    "guided_choice": Unsupported(STRUCTURED),
    "guided_grammar": Unsupported(STRUCTURED),
    "guided_decoding_backend": Unsupported(STRUCTURED),
    "guided_whitespace_pattern": Unsupported(STRUCTURED),
    "structured_outputs": Unsupported(STRUCTURED),
    "tools": Unsupported("there is no function calling", (None, [])),
    "tool_choice": Unsupported("there is no function calling", (None, "none", "auto"), frozenset({CHAT})),
    "functions": Unsupported("there is no function calling", (None, [])),
    "function_call": Unsupported("there is no function calling", (None, "none", "auto")),
    # chat templating and scheduling
    "chat_template": Unsupported("the model's own chat template is used"),
    "chat_template_kwargs": Unsupported("the model's own chat template is used", (None, {})),
    "add_generation_prompt": Unsupported("the generation prompt is always added", (None, True)),
    "continue_final_message": Unsupported("the generation prompt is always added", (None, False)),
    "priority": Unsupported("requests are scheduled by the pipeline's scheduler, not by priority", (None, 0)),
    # a chat completions field elsewhere
    "max_completion_tokens": Unsupported("it is a chat completions field; use max_tokens", (None,),
                                         frozenset({NATIVE, COMPLETIONS})),
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
