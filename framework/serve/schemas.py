"""Request checks shared by every route, and the native routes' bodies. Every limit is checked with a message
that says what is allowed; the OpenAI bodies are in ``openai_schemas.py``."""
from __future__ import annotations

from typing import Any, ClassVar, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, field_validator, model_validator

from tokenmill import params as _params
from tokenmill.params import SamplingParams
from tokenmill.serve.sampling_fields import STRUCTURED, SamplingFields, check_logprobs
from tokenmill.serve.unsupported import NATIVE, refuse_unsupported

MAX_BATCH_PROMPTS = 1024
SEED_MAX = 2**63 - 1


# ------------------------------------------------------------------------------------------- checks
def check_max_tokens(v: int | None) -> int | None:
    if v is not None and v < 1:
        raise ValueError(f"max_tokens must be an integer >= 1, got {v}")
    return v


def check_temperature(v: float | None) -> float | None:
    if v is not None:
        _params.check_temperature(v)
    return v


def check_top_p(v: float | None) -> float | None:
    if v is not None:
        _params.check_top_p(v)
    return v


def check_text(v: str, what: str) -> str:
    """Text must encode as UTF-8: a lone surrogate (``"\\ud800"`` in JSON) cannot be tokenized."""
    try:
        v.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"{what} is not valid Unicode text: a lone surrogate at character {exc.start}") from None
    return v


def check_top_k(v: int | None) -> int | None:
    if v is not None and v < 0:
        raise ValueError(f"top_k must be an integer >= 0 (0 disables it), got {v}")
    return v


def check_seed(v: int | None) -> int | None:
    if v is not None and not 0 <= v <= SEED_MAX:
        raise ValueError(f"seed must be an integer in [0, 2**63 - 1], got {v}")
    return v


def check_stop(v: str | list[str] | None) -> list[str]:
    if v is None:
        return []
    stops = [v] if isinstance(v, str) else list(v)
    if any(not s for s in stops):
        raise ValueError("stop must be a string or a list of non-empty strings; got an empty string")
    if len(stops) > 16:
        raise ValueError(f"stop takes at most 16 strings, got {len(stops)}")
    return stops


def check_prompt(v: Any, what: str = "prompt") -> Any:
    if isinstance(v, str) and not v:
        raise ValueError(f"{what} is empty: send at least one character of text (or a non-empty list of token ids)")
    if isinstance(v, list) and not v:
        raise ValueError(f"{what} is empty: send a non-empty string or a non-empty list of token ids")
    if isinstance(v, list) and any(t < 0 for t in v):
        raise ValueError(f"{what}: token ids must be integers >= 0")
    if isinstance(v, str):
        check_text(v, what)
    return v


CHECKS = {"max_tokens": check_max_tokens, "temperature": check_temperature, "top_p": check_top_p,
          "top_k": check_top_k, "seed": check_seed}


class CheckedRequest(BaseModel):
    """A request body of any route: unknown fields refused, unsupported ones refused by name
    (``unsupported.UNSUPPORTED`` for ``route``), and the sampling numbers checked by :data:`CHECKS`."""

    model_config = ConfigDict(extra="forbid")
    route: ClassVar[str]  # which entries of unsupported.UNSUPPORTED apply

    @model_validator(mode="before")
    @classmethod
    def _refuse_unsupported(cls, data):
        return refuse_unsupported(data, cls.route)

    @field_validator("max_tokens", "temperature", "top_p", "top_k", "seed", check_fields=False)
    @classmethod
    def _ranges(cls, v, info):
        return CHECKS[info.field_name](v)


# ------------------------------------------------------------------------------------------- native API
class _Sampling(CheckedRequest, SamplingFields):
    route: ClassVar[str] = NATIVE

    max_tokens: StrictInt = Field(64, description="Tokens to generate at most (>= 1; prompt + max_tokens <= the "
                                            "pipeline's max_model_len).")
    temperature: float = Field(0.0, description="0 is greedy decoding.")
    top_p: float = Field(1.0, description="Nucleus sampling mass in (0, 1]; 1 disables it.")
    top_k: StrictInt = Field(0, description="Keep the k most likely tokens; 0 disables it.")
    stop: Optional[Union[str, list[str]]] = Field(None, description="Strings that end generation (cut from the text).")
    seed: Optional[StrictInt] = Field(None, description="Per-request seed: the same seed gives the same sample.")
    ignore_eos: StrictBool = Field(False, description="Keep generating past the end-of-sequence token.")
    chat: StrictBool = Field(False, description="Wrap the prompt in the model's chat template.")
    optimization: Optional[str] = Field(None, description="Which of the server's pipelines runs the request "
                                                          "(its YAML `name:`); default: the first one.")
    logprobs: Optional[StrictInt] = Field(None, description="Return each generated token's log-probability (the "
                                                            "model's raw distribution) and this many top "
                                                            "alternatives (0 to 20).")
    structured_output: Optional[dict[str, Any]] = Field(None, description="Constrain the output: the "
                                                        "structured_output plugin argument, e.g. {\"type\": "
                                                        "\"json_schema\", \"schema\": {...}}, {\"type\": "
                                                        "\"regex\", \"pattern\": ...}, {\"type\": \"choice\", "
                                                        "\"choices\": [...]}.")

    def sampling_params(self) -> SamplingParams:
        return SamplingParams(max_tokens=self.max_tokens, temperature=self.temperature, top_p=self.top_p,
                              top_k=self.top_k, seed=self.seed, stop=check_stop(self.stop),
                              ignore_eos=self.ignore_eos, **self.sampling_kwargs())

    def structured_request(self) -> tuple[dict | None, str | None]:
        return (self.structured_output, STRUCTURED) if self.structured_output is not None else (None, None)

    def logprob_count(self) -> int | None:
        return self.logprobs

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        check_stop(v)
        return v

    @field_validator("logprobs")
    @classmethod
    def _logprobs(cls, v):
        return check_logprobs(v)


class GenerateRequest(_Sampling):
    model_config = ConfigDict(json_schema_extra={"examples": [
        {"prompt": "Hello", "max_tokens": 4}, {"prompt": "Hello", "max_tokens": 4, "stream": True},
        {"prompt": "Hello", "max_tokens": 8, "temperature": 0.7, "seed": 1, "logprobs": 2, "presence_penalty": 0.5},
        {"prompt": "Answer yes or no:", "max_tokens": 4,
         "structured_output": {"type": "choice", "choices": ["yes", "no"]}}]})
    prompt: Union[str, list[StrictInt]] = Field(..., description="Text, or a list of token ids.")
    stream: StrictBool = Field(False, description="Send Server-Sent Events: one per decoded chunk, then a `done` "
                                            "event with the stats.")

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v):
        return check_prompt(v)


class TopLogprobOut(BaseModel):
    token_id: int
    token: str
    logprob: float


class TokenLogprobOut(TopLogprobOut):
    top: list[TopLogprobOut]


class GenerateResponse(BaseModel):
    request_id: str
    text: str
    tokens_generated: int
    prompt_tokens: int
    finish_reason: str
    latency_ms: float
    ttft_ms: Optional[float]
    queue_ms: Optional[float]
    optimization_used: str
    error: Optional[str] = None
    cached_tokens: int = Field(0, description="Prompt tokens whose KV the prefix cache supplied.")
    logprobs: Optional[list[TokenLogprobOut]] = Field(None, description="Per generated token, when asked.")


class BatchRequest(_Sampling):
    model_config = ConfigDict(json_schema_extra={"examples": [{"prompts": ["Hello", "1, 2, 3,"], "max_tokens": 4}]})
    prompts: list[Union[str, list[StrictInt]]] = Field(..., description=f"1 to {MAX_BATCH_PROMPTS} prompts, run "
                                                                  "together so they batch.")

    @field_validator("prompts")
    @classmethod
    def _prompts(cls, v):
        if not 1 <= len(v) <= MAX_BATCH_PROMPTS:
            raise ValueError(f"prompts must hold 1 to {MAX_BATCH_PROMPTS} prompts, got {len(v)}")
        for i, p in enumerate(v):
            check_prompt(p, f"prompts[{i}]")
        return v


class BatchResponse(BaseModel):
    results: list[GenerateResponse]
    total_latency_ms: float
    throughput_tokens_per_sec: float
    tokens_generated: int
    prompt_tokens: int
    optimization_used: str
