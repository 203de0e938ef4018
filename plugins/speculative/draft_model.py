"""``speculative``: a draft model proposes k tokens per step; the target verifies them in one forward.

``draft: self_int8 | self_int4 | self_nf4`` quantizes a copy of the target's own weights through the
quantization plugins (no second model to download); any other value is a model (alias, HF directory,
.gguf or hub id) that must share the target's tokenizer vocabulary.

Self-drafts default to the settings that keep acceptance high for the least memory traffic: ``self_int4`` uses
group 32 and the LM head in int8 (an int4 head costs most of the acceptance); ``draft_quant_options`` overrides
them. ``compile_draft: true`` runs the draft's single-token steps through ``torch.compile`` (batch-size buckets,
like the target's compiled decode path): drafting is k sequential small forwards, where per-op overhead
dominates, so it pays even when the target runs eagerly. With ``compile_draft`` and no ``max_batch_size``,
steps of more than ``DRAFT_BUCKETS[-1]`` sequences do not speculate (the draft's eager path is slower there).

The draft's K/V live in the pipeline's KV blocks (:mod:`tokenmill.plugins.speculative.draft_runner`): a draft
model's own layers are declared through ``kv_layers`` and allocated beside the target's, inside the pipeline's
KV budget. A self-draft shares the target's K/V instead (``share_kv``, on by default for self-drafts): it reads
the target's layers in place for every position the target has computed, so it needs no KV of its own, never
prefills a prompt (that would cost about as much as the target's own prefill) nor catches up on accepted
tokens; it runs only its k single-token steps, on the target's exact K/V. The step in which a prompt's
prefill runs (its K/V not yet computed) gets no drafts.
"""
from __future__ import annotations

import copy
import sys
import threading
import time
import warnings
from dataclasses import dataclass
from typing import Literal

import torch

from tokenmill.errors import PipelineError
from tokenmill.hooktypes import KVCacheSpec, KVHandle, KVLayers, PipelineContext
from tokenmill.speculation import Draft
from tokenmill.model import ModelRunner, load_model
from tokenmill.options import ModelRef
from tokenmill.plugin import hookimpl
from tokenmill.plugins.speculative.base import DrafterPlugin
from tokenmill.plugins.speculative.draft_runner import DRAFT_BUCKETS, DraftModelRunner
from tokenmill.plugins.speculative.prompt_lookup import lookup_match
from tokenmill.spec import CompileSpec
from tokenmill.sequence import Sequence

SELF_DRAFTS = {"self_int8": "int8", "self_int4": "int4", "self_nf4": "nf4"}
LOOKUP_WINDOW = 4096  # tokens searched back for `lookup_ngram` matches
COPY = 1  # Draft.kind of an n-gram copy (the draft model's own drafts are kind 0): acceptance is learned apart
SELF_DRAFT_GRID = {"int4": {"group_size": 32}, "nf4": {"block_size": 32}}  # finer than the plugins' defaults


def self_draft_options(plugin_name: str, vocab_size: int, options: dict | None) -> dict:
    """The self-draft's quantization options, overridden key by key by ``options``: for int4 / nf4 a grid of
    32 and every row of the LM head in int8 (an int4 head costs most of the acceptance); int8 as it is."""
    out = {}
    if plugin_name in SELF_DRAFT_GRID:
        out = dict(SELF_DRAFT_GRID[plugin_name], lm_head_int8_rows=vocab_size)
    out.update(options or {})
    return out


def quantized_copy(model, plugin_name: str, options: dict | None = None):
    """A deep copy of ``model`` with every Linear replaced through the named quantization plugin."""
    from tokenmill.host import discover_plugins, instantiate
    from tokenmill.options import build_options

    catalog = discover_plugins()
    if plugin_name not in catalog:
        raise PipelineError(f"self-draft needs the '{plugin_name}' quantization plugin, which is not installed")
    cls = catalog[plugin_name].load()
    plugin = instantiate(cls, build_options(cls.Options, options or {}, f"plugin '{plugin_name}'"))
    draft = copy.deepcopy(model)
    for name, module in list(draft.named_modules()):
        if isinstance(module, torch.nn.Linear):
            new = plugin.quantize_layer(name=name, module=module, model_config=draft.config)
            if new is not None:
                parent, _, child = name.rpartition(".")
                setattr(draft.get_submodule(parent) if parent else draft, child, new)
    return draft


class Speculative(DrafterPlugin):
    """Draft-model speculative decoding (``draft: self_int4`` by default: the target quantized to int4)."""

    name = "speculative"

    @dataclass(slots=True)
    class Options(DrafterPlugin.Options):
        draft: ModelRef = "self_int4"
        draft_quant_options: dict | None = None   # options for the self-draft's quantization plugin
        compile_draft: bool = False               # torch.compile the draft's single-token steps
        compile_mode: str | None = None           # torch.compile mode for the draft (None: default)
        # copy instead of drafting: when the last `lookup_ngram` tokens occurred earlier in the sequence, propose
        # the (up to `lookup_tokens`) tokens that followed them, as prompt_lookup does, and skip the draft model
        lookup_ngram: int | None = None
        lookup_tokens: int = 16
        # a sequence the draft has not caught up on (its prompt, at first) is drafted for only once it may still
        # generate at least 1/ratio as many tokens as the draft must prefill for it (null: always)
        max_catch_up_ratio: float | None = 4.0
        # a self-draft reads the target's K/V in place and writes its drafts' into the target's layers, keeping
        # none of its own (null: on for self-drafts)
        share_kv: bool | None = None
        # compile_draft: compile the draft's graphs in a background thread while requests run without
        # speculation (background), or before the build returns (build)
        warm_up: Literal["background", "build"] = "background"

        def __post_init__(self) -> None:
            DrafterPlugin.Options.__post_init__(self)
            if self.lookup_ngram is not None and not 1 <= self.lookup_ngram <= 16:
                raise ValueError(f"lookup_ngram must be in 1..16 or null, got {self.lookup_ngram}")
            if not 1 <= self.lookup_tokens <= 16:
                raise ValueError(f"lookup_tokens must be in 1..16, got {self.lookup_tokens}")
            if self.max_catch_up_ratio is not None and not self.max_catch_up_ratio > 0:
                raise ValueError(f"max_catch_up_ratio must be > 0 or null, got {self.max_catch_up_ratio}")
            modes = (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
            if self.compile_mode not in modes:
                raise ValueError(f"compile_mode must be one of {', '.join(map(str, modes))}, "
                                 f"got {self.compile_mode!r}")

    def __init__(self, options=None) -> None:
        super().__init__(options)
        self.runner: DraftModelRunner | None = None
        self.shared = False    # the draft reads and writes the target's own K/V layers
        self._loaded = None    # a separate draft model, loaded when it declares its K/V layers
        self._warming: threading.Thread | None = None
        self._warm = threading.Event()
        self._warm.set()
        self.warm_up_s: float | None = None
        self.warm_up_error: str | None = None
        self._warned = False
        self._untimed = True  # the draft steps' cost not yet timed into the planner (_time_draft_steps)

    @hookimpl
    def kv_layers(self, spec: KVCacheSpec) -> KVLayers | None:
        """The draft's K/V layers in the pipeline's blocks: a draft model's own; none for a self-draft sharing
        the target's. Loads a separate draft model now (its layout sizes the layers)."""
        opts = self.options
        self.shared = opts.draft in SELF_DRAFTS if opts.share_kv is None else opts.share_kv
        if self.shared and opts.draft not in SELF_DRAFTS:
            raise PipelineError(f"share_kv: true needs a self-draft ({', '.join(SELF_DRAFTS)}); the draft model "
                                f"'{opts.draft}' has its own weights and so its own K/V")
        if self.shared:
            return None
        if opts.draft in SELF_DRAFTS:
            return KVLayers(self.name, spec.num_layers, spec.num_kv_heads, spec.head_dim)
        self._loaded = load_model(opts.draft, dtype=str(spec.dtype).removeprefix("torch."), device=str(spec.device),
                                  progress=False)
        own = ModelRunner.kv_spec(self._loaded.model, dtype=spec.dtype, device=spec.device,
                                  max_model_len=spec.max_model_len, max_num_seqs=spec.max_num_seqs)
        return KVLayers(self.name, own.num_layers, own.num_kv_heads, own.head_dim)

    @hookimpl
    def configure(self, context: PipelineContext) -> None:
        opts = self.options
        if opts.draft in SELF_DRAFTS and context.tensor_parallel_size > 1:
            raise PipelineError(f"the self-draft '{opts.draft}' cannot run with tensor_parallel_size "
                                f"{context.tensor_parallel_size}: it copies the target's layers, of which this rank "
                                "holds a slice; use prompt_lookup or a separate draft model (draft: PATH)")
        if context.kv_pool is None:
            raise PipelineError("speculative needs the pipeline's KV pool (PipelineContext.kv_pool) for its draft")
        if opts.draft in SELF_DRAFTS:
            qname = SELF_DRAFTS[opts.draft]
            model = quantized_copy(context.model, qname,
                                   self_draft_options(qname, context.model.config.vocab_size,
                                                      opts.draft_quant_options))
        else:
            loaded, self._loaded = self._loaded, None
            if loaded.tokenizer.get_vocab() != context.tokenizer.get_vocab():
                raise PipelineError(
                    f"draft model '{opts.draft}' does not share the target's tokenizer vocabulary "
                    f"({len(loaded.tokenizer)} vs {len(context.tokenizer)} tokens); a draft must use the same "
                    "tokenizer")
            model = loaded.model
        # one shape-generic graph (dynamic) for up to DRAFT_BUCKETS[-1] sequences: a graph per batch size, step
        # width and key length would recompile for minutes under a changing batch; larger batches run eagerly
        compile_spec = CompileSpec(enabled=True, mode=opts.compile_mode, dynamic=True,
                                   buckets=DRAFT_BUCKETS) if opts.compile_draft else None
        pool = context.kv_pool if self.shared else context.kv_pool.extra[self.name]
        self.runner = DraftModelRunner(model, pool, shared=self.shared, max_len=context.limits.max_model_len,
                                       compile_spec=compile_spec)
        self.calibrate(context)  # before a background warm-up competes for the cores
        # CUDA graphs (reduce-overhead) are recorded per thread: compile them on the thread that runs them
        if opts.compile_draft and opts.warm_up == "background" and opts.compile_mode != "reduce-overhead":
            self._warm.clear()
            self._warming = threading.Thread(target=self._warm_up, args=(context.progress,), daemon=True,
                                             name="tokenmill-draft-warm-up")
            self._warming.start()
        else:
            self._warm_up(context.progress and opts.compile_draft)
        if opts.compile_draft and opts.max_batch_size is None:
            # above the largest bucket the draft runs eagerly (and its quantized kernels would compile inside
            # timed steps): no speculation there unless max_batch_size asks for it
            self.batch_limit = DRAFT_BUCKETS[-1]

    @hookimpl
    def free_kv(self, seq: Sequence, reusable: bool) -> None:
        if self.runner is not None:  # the draft's K/V in the sequence's blocks go back with them
            self.runner.forget(seq.seq_id)

    def _warm_up(self, progress: bool) -> None:
        """Compile the draft's graphs (the draft runner's warm-up), reporting what it does and for how long."""
        background = self._warming is not None
        if progress:
            print(f"{self.name}: compiling the draft's decode graphs{' in the background' if background else ''} "
                  "(minutes on a first run on CPU, seconds once torch's compile cache holds them)"
                  + ("; requests run without speculation until then" if background else ""),
                  file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        try:
            self.runner.warm_up()
            # the planner starts from the draft's measured step cost per batch; not timed on a background thread,
            # whose OpenMP team shares the cores with the main thread's (measured: 48 ms for a 20 ms step): there
            # the engine's thread times it when it first finds the draft ready (ready())
            if not background:
                self._time_draft_steps()
        except Exception as exc:  # speculation costs speed, never requests: run without it
            if not background:
                raise
            self.warm_up_error = f"{type(exc).__name__}: {exc}"  # reported by the next step (ready())
        finally:
            self.warm_up_s = time.perf_counter() - t0
            if progress:  # before the event: whoever waits for it sees the line
                print(f"{self.name}: the draft failed to compile after {self.warm_up_s:.0f} s "
                      f"({self.warm_up_error}); no speculation" if self.warm_up_error else
                      f"{self.name}: draft compiled in {self.warm_up_s:.0f} s"
                      + ("; speculating from now" if background else ""), file=sys.stderr, flush=True)
            self._warm.set()

    def _time_draft_steps(self) -> None:
        """Seed the planner's draft cost with a timed draft step per batch bucket (with ``adaptive``). Without it
        only the batch sizes the first drafts ran at are measured, and a larger batch is priced linearly from
        them: after a batch-1 prompt, ``speculative.yaml``'s draft cost 17.7 ms per position at 1 sequence and so
        283 ms at 16, where a timed step costs 76 ms."""
        self._untimed = False
        if self.options.adaptive:
            for batch, seconds in self.runner.step_seconds(DRAFT_BUCKETS).items():
                self.draft_cost.observe(batch, 1, seconds)

    def ready(self) -> bool:
        if not self._warm.is_set():
            return False
        if self.warm_up_error is not None and not self._warned:
            self._warned = True
            warnings.warn(f"plugin '{self.name}' failed to compile its draft ({self.warm_up_error}); it does not "
                          "speculate", RuntimeWarning, stacklevel=2)
        if self.warm_up_error is None and self._untimed:  # warmed up in the background: time it on this thread
            self._time_draft_steps()
        return self.warm_up_error is None

    @hookimpl
    def wait_ready(self, timeout: float | None) -> bool:
        return self._warm.wait(timeout)

    @hookimpl
    def shutdown(self) -> None:
        if self._warming is not None:
            self._warming.join()  # a compile cannot be interrupted; it is bounded (a few graphs)

    def draft_widths(self) -> list[int]:
        o = self.options
        return [1] * max(o.num_speculative_tokens, o.lookup_tokens if o.lookup_ngram else 0)

    def cheap_drafts(self, seqs: list[Sequence]) -> list[Draft | None]:
        """With ``lookup_ngram``: a long n-gram match is a cheaper and (on input-grounded text) longer draft than
        k draft-model steps; the draft model catches up on whatever of it is accepted at its next step."""
        o = self.options
        if not o.lookup_ngram:
            return [None] * len(seqs)
        copies = [lookup_match(s.token_ids, o.lookup_ngram, o.lookup_ngram, o.lookup_tokens, LOOKUP_WINDOW)[0]
                  for s in seqs]
        return [Draft(c, kind=COPY) if c else None for c in copies]

    def draft(self, seqs: list[Sequence], depth: int, *, hidden: list, kv: KVHandle) -> list[Draft]:
        assert self.runner is not None, "configure was not called"
        o = self.options
        return self.runner.propose(seqs, min(depth, o.num_speculative_tokens), kv, o.max_catch_up_ratio)
