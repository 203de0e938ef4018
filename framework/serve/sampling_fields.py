"""The sampling fields every generation route shares beyond temperature / top_p / top_k / seed / stop: the logits
processors' fields, ``min_p``, ``stop_token_ids``, ``plugin_args`` (and ``priority``, a plugin argument), turned
into :class:`~tokenmill.SamplingParams`; and the check that the pipeline has the plugins a request needs.

Each body checks its values by building the SamplingParams they make (``SamplingParams`` says what is allowed);
the error names the field. What depends on the pipeline is checked per request (:func:`check_support`):
penalties, biases, ``min_tokens`` and bad words need the ``logits_processors`` plugin, structured output a plugin
reading ``plugin_args["structured_output"]``, ``priority`` a plugin reading ``plugin_args["priority"]``. Unknown
``plugin_args`` keys are refused by the engine, which lists the accepted ones (400 naming ``plugin_args``).
"""
from __future__ import annotations

import re
from typing import Any, Optional, Union

from pydantic import BaseModel, Field, StrictInt, model_validator
from pydantic_core import PydanticCustomError

from tokenmill.params import MAX_LOGPROBS, SamplingParams
from tokenmill.serve.service import APIError, Service
from tokenmill.serve.worker import EngineWorker

LOGITS_PLUGIN = "logits_processors"
STRUCTURED = "structured_output"  # the plugin argument structured output travels in
PROCESSED = ("repetition_penalty", "presence_penalty", "frequency_penalty", "logit_bias", "min_tokens", "bad_words",
             "bad_words_ids")
SIMPLE = ("min_p",) + PROCESSED + ("stop_token_ids",)
_DEFAULTS = SamplingParams()
_FIELD = re.compile(r"([A-Za-z_]+)")


class SamplingFields(BaseModel):
    """Fields of every generation body (a mixin next to ``schemas.CheckedRequest``). Subclasses say where their
    structured output and logprobs come from (:meth:`structured_request`, :meth:`logprob_count`)."""

    min_p: Optional[float] = Field(None, description="Keep only tokens at least min_p times as likely as the most "
                                                     "likely one; 0 disables it.")
    repetition_penalty: Optional[float] = Field(None, description="> 1 discourages every token already in the "
                                                                  "prompt or output (HF's formula); 1 disables it.")
    presence_penalty: Optional[float] = Field(None, description="In [-2, 2]: subtracted from the logit of every "
                                                                "token generated so far.")
    frequency_penalty: Optional[float] = Field(None, description="In [-2, 2]: subtracted once per occurrence of a "
                                                                 "token generated so far.")
    logit_bias: Optional[dict[str, float]] = Field(None, description="Token id (a string, as JSON keys are) -> "
                                                                     "bias in [-100, 100] added to its logit.")
    min_tokens: Optional[StrictInt] = Field(None, description="EOS and stop_token_ids are banned until this many "
                                                              "tokens are generated.")
    bad_words: Optional[Union[str, list[str]]] = Field(None, description="Strings never generated.")
    bad_words_ids: Optional[list[list[StrictInt]]] = Field(None, description="Token-id sequences never generated.")
    stop_token_ids: Optional[list[StrictInt]] = Field(None, description="Token ids that end generation.")
    priority: Optional[StrictInt] = Field(None, description="Passed to the pipeline's plugins as plugin_args "
                                                            "priority (a scheduler plugin must read it); 0: none.")
    plugin_args: Optional[dict[str, Any]] = Field(None, description="Per-request arguments of the pipeline's "
                                                                    "plugins (SamplingParams.plugin_args); a key no "
                                                                    "plugin reads is refused, naming those accepted.")

    def structured_request(self) -> tuple[dict | None, str | None]:
        """``(plugin_args["structured_output"] value, the field it came from)``, or ``(None, None)``."""
        return None, None

    def logprob_count(self) -> int | None:
        """``SamplingParams.logprobs``: None for none, else how many top alternatives per token."""
        return None

    def param_name(self, sampling_name: str) -> str:
        """The request field a SamplingParams error about ``sampling_name`` is about."""
        return sampling_name

    def sampling_kwargs(self) -> dict[str, Any]:
        """SamplingParams keyword arguments of these fields (raises ValueError naming the field on conflicts)."""
        kw = {f: getattr(self, f) for f in SIMPLE if getattr(self, f) is not None}
        args = dict(self.plugin_args or {})
        spec, source = self.structured_request()
        if spec is not None:
            if STRUCTURED in args:
                raise ValueError(f"{source} and plugin_args.{STRUCTURED} both ask for structured output; send one")
            args[STRUCTURED] = spec
        if self.priority:
            if args.get("priority", self.priority) != self.priority:
                raise ValueError(f"priority ({self.priority}) and plugin_args.priority ({args['priority']!r}) "
                                 "differ; send one")
            args["priority"] = self.priority
        kw["plugin_args"] = args
        count = self.logprob_count()
        if count is not None:
            kw["logprobs"] = count
        return kw

    @model_validator(mode="after")
    def _check_sampling(self):
        try:
            SamplingParams(max_tokens=1, **self.sampling_kwargs())
        except ValueError as exc:
            message = str(exc)
            m = _FIELD.match(message)
            name = self.param_name(m.group(1)) if m else None
            raise PydanticCustomError("value_error", message, {"param": name}) from None
        return self

    def engine_fields(self) -> dict[str, str]:
        """For :func:`tokenmill.serve.call.rejection_param`: which field an engine refusal is about."""
        _, source = self.structured_request()
        fields = {f: f for f in SIMPLE if getattr(self, f) is not None}
        if source is not None:
            fields[f"plugin:{STRUCTURED}"] = source
        fields["plugin_args"] = "priority" if self.priority and not self.plugin_args else "plugin_args"
        return fields


def check_logprobs(v: int | None, field: str = "logprobs") -> int | None:
    if v is not None and not 0 <= v <= MAX_LOGPROBS:
        raise ValueError(f"{field} must be an integer in [0, {MAX_LOGPROBS}] (top alternatives per token), got {v}")
    return v


def plugin_names(w: EngineWorker) -> set[str]:
    """The plugins of ``w``'s pipeline, by name (defaults and autoloaded ones included)."""
    return set(w.pipeline.plugins)


def check_support(service: Service, w: EngineWorker, params: SamplingParams, body: SamplingFields) -> None:
    """400 naming the field when ``w``'s pipeline has no plugin for what ``params`` ask."""
    problem = None
    asked = [f for f in PROCESSED if getattr(params, f) != getattr(_DEFAULTS, f)]
    if asked and LOGITS_PLUGIN not in plugin_names(w):
        problem = (asked[0], f"{asked[0]} needs the {LOGITS_PLUGIN} plugin, which pipeline '{w.name}' does not load; "
                             f"leave it out")
    accepted = w.pipeline.engine.request_args
    if problem is None and STRUCTURED in params.plugin_args and STRUCTURED not in accepted:
        _, source = body.structured_request()
        source = source or "plugin_args"
        problem = (source, f"{source} needs structured output, which pipeline '{w.name}' does not have (no plugin of "
                           f"it reads plugin_args '{STRUCTURED}'); leave it out")
    if problem is None and body.priority and "priority" not in accepted:
        known = ", ".join(sorted(accepted)) or "none"
        problem = ("priority", f"priority is not supported by pipeline '{w.name}': no plugin of it reads a priority "
                               f"(the plugin arguments it accepts: {known}); leave it out or set it to 0")
    if problem is not None:
        service.count(w, "invalid")
        raise APIError(400, problem[1], param=problem[0])
