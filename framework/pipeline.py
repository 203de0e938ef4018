"""A built pipeline: model + plugins + engine, driven through a small embedding API."""
from __future__ import annotations

import os
import time
import warnings
from dataclasses import replace
from types import MappingProxyType
from typing import Any, Iterator, Mapping, Sequence as Seq

import torch

from tokenmill.engine.engine import Engine
from tokenmill.engine.outputs import RequestOutput, StreamChunk
from tokenmill.errors import PipelineError, RequestError
from tokenmill.host import call_each, instantiate, make_plugin_manager
from tokenmill.hooktypes import CalibrationContext, PipelineContext, SchedulerLimits
from tokenmill.model import LoadedModel, ModelRunner, load_model
from tokenmill.model.loader import weight_bytes
from tokenmill.model.resolve import persist_compiled_kernels
from tokenmill.params import SamplingParams
from tokenmill.spec import PipelineSpec, load_spec

Prompt = str | list[int]


def quantize_model(pm, loaded: LoadedModel, progress: bool = False) -> list[str]:
    """Run the pipeline's ``calibrate`` and ``quantize_layer`` hooks over ``loaded.model`` (swapping modules in
    place); the names of the replaced layers."""
    model = loaded.model
    if pm.hook.calibrate.get_hookimpls():
        pm.hook.calibrate(context=CalibrationContext(
            model=model, tokenizer=loaded.tokenizer, model_name=loaded.name, device=loaded.device,
            dtype=loaded.dtype, progress=progress, source_gguf=loaded.gguf))
    if not pm.hook.quantize_layer.get_hookimpls():
        return []
    replaced = []
    for name, module in list(model.named_modules()):
        if not isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
            continue
        new = pm.hook.quantize_layer(name=name, module=module, model_config=model.config)
        if new is not None and new is not module:
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
            replaced.append(name)
    return replaced


class Pipeline:
    """Model, plugins and engine assembled from a :class:`PipelineSpec`.

    Each pipeline has its own plugin manager, plugin instances, KV pool and engine, so several can live in
    one process. Not thread-safe; drive one pipeline from one thread. :meth:`close` it (or use it in a
    ``with`` block) to let its plugins release what they hold.
    """

    def __init__(self, spec: PipelineSpec, *, loaded: LoadedModel | None = None, progress: bool = True) -> None:
        self.spec = spec
        self.closed = False
        if spec.threads:
            torch.set_num_threads(spec.threads)
        persist_compiled_kernels()  # quantization kernels, compiled steps and FlexAttention reuse earlier builds' code
        named = {p.name: instantiate(p.obj, p.options) for p in spec.plugins}
        self.pm = make_plugin_manager(list(named.items()), spec.order)
        self._plugins = MappingProxyType(self._plugin_map(named))
        self.loaded = loaded or load_model(spec.model, dtype=spec.dtype, device=spec.device, progress=progress)
        self.tokenizer = self.loaded.tokenizer
        model = self.loaded.model
        world = spec.parallel.tensor_parallel_size
        group = shard = None
        if world > 1:  # the worker ranks load theirs while this one quantizes and slices its own
            group = self._start_ranks(world)
        try:
            self.quantized_layers = quantize_model(self.pm, self.loaded, progress)
            if group is not None:
                from tokenmill.model.shard import shard_model

                shard = shard_model(model, 0, world)
            cfg = model.config
            max_len = min(spec.limits.max_model_len, getattr(cfg, "max_position_embeddings",
                                                             spec.limits.max_model_len))
            self.limits = SchedulerLimits(spec.limits.max_num_seqs, spec.limits.max_num_batched_tokens, max_len)
            kv_spec = ModelRunner.kv_spec(model, dtype=self.loaded.dtype, device=self.loaded.device,
                                          max_model_len=max_len, max_num_seqs=spec.limits.max_num_seqs)
            kv_spec = replace(kv_spec, extra=tuple(x for x in self.pm.hook.kv_layers(spec=kv_spec) if x))
            pool = self.pm.hook.init_kv_cache(spec=kv_spec)
            assert pool is not None, "no plugin answered init_kv_cache"
            missing = [x.owner for x in kv_spec.extra if x.owner not in pool.extra]
            if missing:
                raise PipelineError(f"the KV plugin's init_kv_cache did not allocate the layers {missing} declared "
                                    "through kv_layers (KVCacheSpec.extra; KVCacheSpec.allocate lays them out)")
            options = dict(attention=spec.attention, compile_spec=spec.compile, max_model_len=max_len,
                           cpu_gemm=spec.cpu_gemm)
            if group is None:
                self.runner = ModelRunner(model, pool, **options)
            else:
                from tokenmill.parallel import ParallelRunner

                group.wait_ready()
                group.send(("pool", (pool.block_size, pool.num_blocks, max_len)))
                self.runner = ParallelRunner(group, model, pool, shard=shard, **options)
        except BaseException:
            if group is not None:
                group.close()
            raise
        try:
            self.runner.tune_cpu_gemm()
            if self.runner.compiled or self.runner.attention.needs_warm_up:
                self.runner.warm_up(self.limits.max_num_seqs)  # compile the decode shapes now, not in a request
            eos = self._eos_ids()
            self._configure_plugins(PipelineContext(
                model=model, tokenizer=self.tokenizer, model_name=self.loaded.name, model_path=self.loaded.path,
                device=self.loaded.device, dtype=self.loaded.dtype, limits=self.limits, kv_spec=kv_spec,
                kv_pool=pool, progress=progress, eos_token_ids=frozenset(eos), tensor_parallel_size=world))
            self.engine = Engine(self.pm, self.runner, self.tokenizer, self.limits, eos_token_ids=eos,
                                 seed=spec.seed)
        except BaseException:
            self.runner.close()  # a tensor-parallel runner's worker ranks stop with the failed build
            raise

    def _configure_plugins(self, context: PipelineContext) -> None:
        """Call ``configure`` with ``context``; its ``time_forward`` times forwards on the fresh KV pool while
        the hook runs and refuses afterwards, when sequences hold the pool."""
        building = True

        def time_forward(num_seqs: int, width: int) -> float | None:
            if not building:
                raise RuntimeError("time_forward is for configure: the KV pool is in use after the build")
            return self.runner.time_forward(num_seqs, width)

        context.time_forward = time_forward
        self.pm.hook.configure(context=context)
        building = False

    # ------------------------------------------------------------------ construction
    @property
    def plugins(self) -> Mapping[str, Any]:
        """Read-only mapping from plugin name to the instance in this pipeline: the plugins the YAML names
        (in YAML order), then the autoload plugins and the defaults that take part (``fcfs``,
        ``contiguous_kv``, ``sampler``, ``logits_processors``, ``structured_output`` unless named)."""
        return self._plugins

    def _plugin_map(self, named: dict[str, Any]) -> dict[str, Any]:
        out = dict(named)
        registered = self.pm.list_name_plugin()
        for prefix in ("autoload:", "default:"):
            out.update((name.removeprefix(prefix), p) for name, p in registered if name.startswith(prefix))
        return out

    @classmethod
    def from_yaml(cls, path: str | os.PathLike, **kwargs: Any) -> "Pipeline":
        return cls(load_spec(path), **kwargs)

    @classmethod
    def from_dict(cls, data: dict, **kwargs: Any) -> "Pipeline":
        return cls(load_spec(data), **kwargs)

    def _start_ranks(self, world: int):
        """Start worker ranks ``1 .. world - 1`` (each builds its own shard)."""
        from tokenmill.model.shard import check_shardable
        from tokenmill.parallel import WorkerGroup

        check_shardable(self.loaded.model.config, world)

        return WorkerGroup(self.spec.raw if self.spec.source == "<dict>" else self.spec.source, world,
                           threads=self.spec.threads, device=self.spec.device)

    def _eos_ids(self) -> set[int]:
        ids: set[int] = set()
        for src in (getattr(self.loaded.model, "generation_config", None), self.tokenizer):
            eos = getattr(src, "eos_token_id", None)
            if isinstance(eos, int):
                ids.add(eos)
            elif isinstance(eos, (list, tuple)):
                ids.update(int(e) for e in eos)
        return ids

    # ------------------------------------------------------------------ prompts
    def encode(self, prompt: Prompt, *, chat: bool = False) -> list[int]:
        """Token ids for a text prompt (with the chat template when ``chat``), or ids passed through."""
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], dict):
            return self.apply_chat_template(prompt)
        if isinstance(prompt, list):
            if chat:
                raise RequestError("chat=True needs a text prompt or a list of messages, not token ids")
            return prompt
        if not isinstance(prompt, str):
            raise RequestError(f"a prompt is a string or a list of token ids, got {type(prompt).__name__}")
        if chat:
            return self.apply_chat_template([{"role": "user", "content": prompt}])
        return self.tokenizer.encode(prompt, add_special_tokens=True) if prompt else []

    def apply_chat_template(self, messages: list[dict], *, tools: list[dict] | None = None) -> list[int]:
        """Token ids of ``messages`` through the model's chat template (generation prompt added), with
        ``tools`` (OpenAI-style function definitions) passed to templates that take them."""
        if not getattr(self.tokenizer, "chat_template", None):
            raise RequestError("this model's tokenizer has no chat template; send a plain prompt")
        extra = {"tools": tools} if tools else {}
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **extra)
        return self.tokenizer.encode(text, add_special_tokens=False)

    # ------------------------------------------------------------------ running
    def submit(self, prompt: Prompt, params: SamplingParams | None = None, *, chat: bool = False,
               request_id: str | None = None) -> str:
        """Queue one request; returns its id. Drive it with :meth:`step`."""
        self._check_open()
        return self.engine.add_request(self.encode(prompt, chat=chat), params, request_id).request_id

    def step(self) -> list[StreamChunk]:
        return self.engine.step()

    def abort(self, request_id: str) -> bool:
        """Stop a request and free its KV now; its finished chunk comes with the next :meth:`step`."""
        return self.engine.abort(request_id)

    def clear_prefix_cache(self) -> int:
        """Free cached KV blocks that no running request uses; returns how many (0 without a prefix cache)."""
        return self.pm.hook.clear_prefix_cache() or 0

    def collect(self, request_id: str) -> RequestOutput:
        """The result of a finished request driven with :meth:`submit` / :meth:`step` (forgets it)."""
        return self.engine.pop_finished(request_id)

    def generate(self, prompts: Prompt | Seq[Prompt], params: SamplingParams | Seq[SamplingParams] | None = None,
                 *, chat: bool = False) -> list[RequestOutput]:
        """Run prompts to completion, batched by the pipeline's scheduler; one result per prompt, in order.

        Invalid prompts raise :class:`RequestError` before anything is queued.
        """
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        prompts = list(prompts)
        plist = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
        if len(plist) != len(prompts):
            raise RequestError(f"got {len(plist)} SamplingParams for {len(prompts)} prompts")
        self._check_open()
        encoded = [self.encode(p, chat=chat) for p in prompts]
        ids = []
        try:
            for toks, p in zip(encoded, plist):
                ids.append(self.engine.add_request(toks, p).request_id)
        except RequestError:
            for rid in ids:
                self.engine.abort(rid)
                self.engine.pop_finished(rid)
            raise
        pending = set(ids)
        while pending:
            if self.engine.idle:
                time.sleep(0.0005)  # the scheduler is holding back (e.g. a batching window)
            for chunk in self.engine.step():
                if chunk.finished:
                    pending.discard(chunk.request_id)
            pending = {r for r in pending if not self.engine.requests[r].is_finished}
        return [self.engine.pop_finished(rid) for rid in ids]

    def stream(self, prompt: Prompt, params: SamplingParams | None = None, *,
               chat: bool = False) -> Iterator[StreamChunk]:
        """Yield text as it is produced; the last chunk has ``finished`` and the full ``output``.

        Closing the generator early aborts the request and frees its KV.
        """
        rid = self.submit(prompt, params, chat=chat)
        try:
            while True:
                if self.engine.idle:
                    time.sleep(0.0005)
                for chunk in self.engine.step():
                    if chunk.request_id == rid:
                        if chunk.finished:
                            self.engine.requests.pop(rid, None)
                        yield chunk
                        if chunk.finished:
                            return
        finally:
            if rid in self.engine.requests:
                self.engine.abort(rid)
                self.engine.requests.pop(rid, None)

    # ------------------------------------------------------------------ closing
    def close(self) -> None:
        """Abort the requests still in flight (freeing their KV), then call every plugin's ``shutdown`` once.

        A second call does nothing. A failing ``shutdown`` is a ``RuntimeWarning`` naming the plugin and the
        other plugins' ``shutdown`` still runs. A closed pipeline takes no new requests.
        """
        if self.closed:
            return
        self.closed = True
        for rid, seq in list(self.engine.requests.items()):
            if not seq.is_finished:
                self.engine.abort(rid)
        for failure in call_each(self.pm, "shutdown"):
            warnings.warn(f"{failure}; the other plugins are still shut down", RuntimeWarning, stacklevel=2)
        self.runner.close()

    def wait_ready(self, timeout: float | None = None) -> bool:
        """Wait for what plugins prepare in the background (``wait_ready`` hook), e.g. before timing the
        pipeline; True when all of it is done within ``timeout`` seconds (None: however long it takes)."""
        return all(r is not False for r in self.pm.hook.wait_ready(timeout=timeout))

    def __enter__(self) -> "Pipeline":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def _check_open(self) -> None:
        if self.closed:
            raise RequestError(f"pipeline '{self.spec.name}' is closed; build a new one to run requests")

    # ------------------------------------------------------------------ introspection
    def stats(self) -> dict:
        """Engine statistics: queue sizes, KV usage, throughput, batch utilization."""
        out = self.engine.stats.snapshot()
        out.update(running=len(self.engine.running), waiting=len(self.engine.waiting),
                   kv=self.pm.hook.kv_stats())
        return out

    def info(self) -> dict:
        cfg = self.loaded.config
        params = sum(p.numel() for p in self.loaded.model.parameters())
        return {
            "name": self.spec.name, "model": self.loaded.name, "architecture": cfg.model_type,
            "params": params, "dtype": str(self.loaded.dtype).removeprefix("torch."),
            "device": str(self.loaded.device), "weight_bytes": weight_bytes(self.loaded.model),
            "quantized_layers": len(self.quantized_layers),
            "max_num_seqs": self.limits.max_num_seqs, "max_model_len": self.limits.max_model_len,
            "max_num_batched_tokens": self.limits.max_num_batched_tokens,
            "compiled": self.runner.compiled, "attention": self.runner.attention.name,
            "cpu_gemm": self.runner.cpu_gemm, "cpu_gemm_skinny_rows": self.runner.cpu_gemm_skinny_rows,
            "packed_weight_bytes": self.runner.packed_weight_bytes,
            "plugins": {p.name: repr(getattr(self._plugins[p.name], "options", None)) for p in self.spec.plugins},
            "tensor_parallel": {"size": self.spec.parallel.tensor_parallel_size,
                                "weight_bytes_per_rank": self.runner.weight_bytes()}
            if hasattr(self.runner, "group") else None,
        }
