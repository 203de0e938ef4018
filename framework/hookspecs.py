"""Every tokenmill hook: the contract between the engine and plugins.

Call convention: the engine always calls hooks with keyword arguments. "Choose one" hooks are
``firstresult``: plugins are asked in order (YAML order, then built-in defaults, which register
``trylast``) and the first non-None result wins, so a plugin can decline by returning None.
Implement a hook with :data:`tokenmill.hookimpl`; a plugin implements any subset. An exception leaving an
implementation is reported naming the plugin and the hook (the rule: docs/architecture.md, "Error handling").
"""
from __future__ import annotations

import pluggy

PROJECT = "tokenmill"
hookspec = pluggy.HookspecMarker(PROJECT)


# -------------------- Build: once per pipeline, while it is built

@hookspec
def kv_layers(spec):
    """Declare K/V layers of the plugin's own model to keep in the pipeline's KV blocks, before they are allocated.

    A drafter with its own model (``speculative`` with a draft model) keeps the draft's K/V beside the target's:
    in the same blocks, addressed through the same block tables, inside the same memory budget. They are counted
    by ``kv_stats`` and go back with a sequence's blocks on finish, abort or preemption, so the drafter holds no
    KV of its own. After the build they are ``PipelineContext.kv_pool.extra[owner]``.

    :param spec: the target's :class:`tokenmill.hooktypes.KVCacheSpec` (its ``extra`` still empty).
    :return: a :class:`tokenmill.hooktypes.KVLayers` (``owner``: the plugin's name; the dtype is the target's),
        or None. Every implementation is called.
    """


@hookspec(firstresult=True)
def init_kv_cache(spec):
    """Allocate the KV pool for the pipeline's model, once, at pipeline build.

    :param spec: :class:`tokenmill.hooktypes.KVCacheSpec`: layers, KV heads, head size, dtype, device,
        max model length and max concurrent sequences, and the layers plugins declared through ``kv_layers``
        (``spec.extra``: ``spec.allocate`` lays them out; ``spec.bytes_per_token`` counts them).
    :return: :class:`tokenmill.hooktypes.KVPool` whose tensors the model runner reads and writes.
        First non-None result wins.
    """


@hookspec
def calibrate(context):
    """Look at the whole float model, once, after it is loaded and before ``quantize_layer`` is offered any layer.

    For rewrites that need more than one layer at a time: a quantizer that compensates rounding errors with
    calibration activations (GPTQ) runs the model on calibration text here, keeps its results, and hands them
    out from ``quantize_layer``. Called only when some plugin implements it, and not when it has nothing to
    do (e.g. a quantizer loading a saved checkpoint returns at once).

    :param context: :class:`tokenmill.hooktypes.CalibrationContext`: the loaded model (leave its modules and
        weights as they were when the hook returns: swaps go through ``quantize_layer``), its tokenizer,
        name, device and dtype, and whether a progress bar may be shown.
    :return: None. Every implementation is called.
    """


@hookspec(firstresult=True)
def quantize_layer(name, module, model_config):
    """Replace one layer of the freshly loaded model with a quantized (or otherwise rewritten) module.

    Called at load time for every ``torch.nn.Linear`` of the model, the LM head included (``lm_head``; when
    it is tied to the input embedding, replacing it unties the two), and for the input ``torch.nn.Embedding``
    (``model.embed_tokens``, offered before ``lm_head``; a replacement maps token ids ``[...]`` to
    ``[..., hidden]``), before the model runner is built.

    :param name: the module's qualified name, e.g. ``model.layers.3.mlp.up_proj`` or ``lm_head``.
    :param module: the module as loaded.
    :param model_config: the model's ``transformers`` config.
    :return: a module with the same call signature and output shape to use instead, or None to keep
        ``module``. First non-None result wins.
    """


@hookspec
def configure(context):
    """Learn about the built pipeline, once, after the model is loaded and quantized and the KV pool exists.

    Drafters use it to build their draft model (the target's tokenizer and vocabulary, its weights for a
    quantized self-draft, the device and limits).

    :param context: :class:`tokenmill.hooktypes.PipelineContext`.
    :return: None. Every implementation is called.
    """


@hookspec
def request_args():
    """Declare the per-request arguments (``SamplingParams.plugin_args`` keys) this plugin reads.

    Asked once, when the engine is built. A request naming a key no plugin declares is refused at submit,
    with the list of declared keys.

    :return: a dict ``{key: one-line description}`` (or None for none). Every implementation is called; two
        plugins may declare the same key (both read it).
    """


@hookspec
def wait_ready(timeout):
    """Block until the preparation a plugin runs in the background after ``configure`` is done.

    A plugin may move slow, optional preparation (the speculative drafter's ``torch.compile`` of its draft)
    off the build, so the pipeline serves at once and the plugin joins in when it is ready (output is the
    same either way, only speed differs). ``Pipeline.wait_ready()`` calls this, e.g. before a benchmark.

    :param timeout: seconds to wait at most (None: until done).
    :return: False if still preparing after ``timeout``; True or None otherwise. Every implementation is called.
    """


# -------------------- Step: every engine step (and the KV queries schedulers and the pipeline make)

@hookspec
def check_request(seq):
    """Check a request as it is submitted, before it is queued.

    Plugins validate the ``plugin_args`` keys they declared (and anything else of the request they depend
    on) and may prepare per-request state here (e.g. compile a grammar). Called for every submitted request
    on the engine's thread; keep it fast or cache what is slow.

    :param seq: the new :class:`tokenmill.sequence.Sequence` (its ``params``, prompt and ``seed``); it is not
        queued yet and holds no KV.
    :return: None. Every implementation is called.
    :raises ValueError: when the request is not acceptable to this plugin, with a message naming the
        argument and what is allowed. The request is then refused with a ``RequestError`` naming the plugin
        (nothing is queued; ``request_finished`` is called so state prepared by other plugins is dropped).
        Raise a ``tokenmill.RequestError(message, field=...)`` to name the request field it is about (a
        server points its 400 at it); otherwise the field is ``plugin_args``.
    """

@hookspec(firstresult=True)
def schedule(state):
    """Decide which sequences run this step and how many of their tokens each.

    Called once per engine step, before the forward pass. Allocate KV for every sequence you schedule
    through ``state.kv.allocate(seq, n)``; when it returns False you may preempt running sequences
    (list them in ``preempted``; the engine frees their KV and requeues them for recompute).

    :param state: :class:`tokenmill.hooktypes.ScheduleInput` with the ``waiting`` and ``running``
        sequences, the step ``limits`` (max sequences, token budget, max model length), the ``kv`` handle
        and the current time.
    :return: :class:`tokenmill.hooktypes.SchedulerOutput`. A sequence may appear in ``scheduled`` with
        ``num_new_tokens`` between 1 and its uncomputed tokens (less than all = chunked prefill); the
        total must not exceed ``limits.max_num_batched_tokens`` (a single prompt may exceed it only when
        the scheduler does not chunk and schedules it alone). First non-None result wins.
    :raises: nothing on purpose: if it raises, every request it was shown finishes with an error naming the
        plugin and its KV is freed; the engine carries on with later requests.
    """


@hookspec(firstresult=True)
def allocate_kv(seq, num_new_tokens, num_cached_tokens):
    """Reserve KV slots for ``num_new_tokens`` more tokens of ``seq``.

    Called by the engine's KV handle when a scheduler admits or continues a sequence. Must be atomic:
    on failure nothing is reserved.

    :param seq: the :class:`tokenmill.sequence.Sequence`; ``seq.num_computed_tokens`` tokens already have
        KV, slots are needed up to position ``seq.num_computed_tokens + num_cached_tokens + num_new_tokens``.
    :param num_new_tokens: how many token slots to add for tokens the model computes this step.
    :param num_cached_tokens: for a sequence starting from zero, how many leading tokens to take from the
        prefix cache (a value ``match_prefix`` returned; 0 otherwise). On success the engine counts them as
        computed.
    :return: :class:`tokenmill.hooktypes.KVAllocation` with the sequence's full block table, or ``False``
        when the pool has no room (nothing reserved; the scheduler may then preempt). None defers to the
        next plugin. First non-None result wins.
    """


@hookspec(firstresult=True)
def match_prefix(seq):
    """Count the leading tokens of a not-yet-started sequence whose KV the cache already holds.

    Read-only: nothing is reserved until ``allocate_kv`` is called with ``num_cached_tokens``. Only whole
    blocks count, and at least the last prompt token is always left to compute (its logits are needed).

    :param seq: a :class:`tokenmill.sequence.Sequence` with ``num_computed_tokens == 0``.
    :return: the number of reusable leading tokens (0 when there is no prefix cache).
        First non-None result wins.
    """


@hookspec
def free_kv(seq, reusable):
    """Return every KV block ``seq`` holds to the pool (finished, aborted, failed or preempted).

    Must tolerate a sequence that holds nothing (called again, or never allocated by this plugin).

    :param seq: the :class:`tokenmill.sequence.Sequence` whose blocks go back.
    :param reusable: False when the sequence's last step failed, so its blocks' contents must not be kept
        for prefix reuse.
    :return: None. Every implementation is called.
    """


@hookspec
def trim_kv(seq):
    """Release KV slots past ``seq.num_computed_tokens`` after drafts were rejected (rollback).

    Called after every step in which ``seq`` ran draft tokens. Rows of rejected drafts hold stale K/V; a
    paged cache returns whole blocks that are no longer needed, a contiguous one just forgets them.

    :param seq: the :class:`tokenmill.sequence.Sequence`, already updated to its accepted tokens.
    :return: None. Every implementation is called.
    """


@hookspec(firstresult=True)
def kv_stats():
    """Report the KV cache's measured state.

    :return: a dict with at least ``num_blocks``, ``block_size``, ``used_blocks``, ``free_blocks`` (blocks a
        new allocation can take), ``usage`` (0..1) and ``allocated_token_slots`` / ``used_token_slots``. The
        engine reads ``num_blocks``, ``free_blocks`` and ``block_size``. First non-None result wins.
    """


@hookspec(firstresult=True)
def clear_prefix_cache():
    """Drop every cached block that no running sequence uses.

    :return: the number of blocks freed (blocks in use are never touched). First non-None result wins.
    """


@hookspec(firstresult=True)
def propose_tokens(seqs, num_tokens, hidden, kv):
    """Propose draft tokens for the sequences that produce a token this step.

    :param seqs: list of :class:`tokenmill.sequence.Sequence` that produce a token this step: decodes and
        sequences whose final prefill chunk runs now. After the step all their tokens have KV.
    :param num_tokens: tokens the step forwards before any draft (every scheduled sequence's, prefill chunks
        included): what drafts add to, for a drafter that weighs their cost
        (:mod:`tokenmill.speculation.budget`; ``StepStats.num_forward_tokens`` reports the total afterwards).
    :param hidden: a list parallel to ``seqs``: the target's final (normed) hidden state, a ``[hidden_size]``
        tensor, at the position whose logits gave the sequence's last token, i.e. the state the next token is
        predicted from (what Medusa heads read); None for a sequence with no forward since its admission
        (its prompt's last chunk runs in this step). Read-only.
    :param kv: the :class:`tokenmill.hooktypes.KVHandle` schedulers get. A drafter whose model writes K/V into
        the sequences' blocks (layers declared through ``kv_layers``, or the target's own for a self-draft)
        reserves the slots of the positions it drafts at with ``kv.allocate(seq, n)`` first; the engine's own
        reservation for the drafts then finds them in place, and ``trim_kv`` returns what goes unused.
    :return: a list parallel to ``seqs``, each a :class:`tokenmill.speculation.Draft` (tokens and, for a
        sampling drafter, the distributions they were drawn from; or a tree of deterministic drafts through
        ``Draft.parents``, verified in one forward under a tree attention mask) or a plain token-id list
        (deterministic drafts; empty for none), or None for no speculation this step. The engine reserves
        KV for the drafts (a tree deeper than the request's room is cut by depth) and drops those it cannot
        place. First non-None result wins.
    """


@hookspec
def process_logits(batch):
    """Edit the logits of this step's producing rows before ``verify_tokens`` turns them into tokens.

    Logits processors live here: penalties, biases, banned tokens, grammars (structured output),
    watermarks. Every implementation is called, in pipeline order (YAML order, then autoload plugins, then
    the defaults: ``logits_processors``, which applies the request's ``SamplingParams`` penalties, biases
    and bad words, then ``structured_output``'s grammar masks), each seeing the edits of those before it.

    The rows include the rows of draft positions: row ``batch.row_start[i] + k`` of ``batch.logits`` is the
    distribution of the token that follows ``batch.seqs[i].token_ids + batch.follows(i, k)`` (its position is
    ``seqs[i].num_tokens + len(batch.follows(i, k))``). A processor that forbids a token at a draft row makes
    verification reject a draft carrying it there, so speculation stays exact under any processor.

    Edit ``batch.logits`` **in place** (a float32 ``[rows, vocab]`` tensor; the engine calls this hook under
    ``torch.inference_mode()``), e.g. ``batch.logits[r].masked_fill_(banned, float("-inf"))``. Leave at
    least one finite logit per row. Rows of requests a processor has nothing for are left as they are.

    :param batch: :class:`tokenmill.hooktypes.VerifyInput`, the same object ``verify_tokens`` gets next.
    :return: None. Every implementation is called.
    :raises: nothing on purpose: if it raises, the step's producing requests are retried one by one and only
        those it fails for finish with an error naming the plugin.
    """


@hookspec(firstresult=True)
def verify_tokens(batch):
    """Turn the target model's logits into the tokens each sequence emits this step.

    With no drafts this is plain sampling (greedy, temperature, top-k, top-p, min-p, per-request seed). The
    logits are those ``process_logits`` left.

    :param batch: :class:`tokenmill.hooktypes.VerifyInput` with the sequences, their logits rows,
        drafts and draft distributions.
    :return: a list parallel to ``batch.seqs``; each entry the accepted tokens in order (at least one: the
        accepted drafts followed by the target's own next token; for a draft tree, the tokens along one
        root-to-node path, then the target's token). First non-None result wins.
    """


# -------------------- Observe: after a step, and when the pipeline closes

@hookspec
def step_end(stats):
    """Observe a finished engine step (timing, metrics, tracing).

    :param stats: :class:`tokenmill.hooktypes.StepStats` measured for the step.
    :return: None. Every implementation is called, even after one raises; each failure is a
        ``RuntimeWarning`` naming the plugin, and no request fails for it.
    """


@hookspec
def request_finished(seq):
    """Observe that a request is done (finished, stopped, aborted, failed, or refused at submit).

    Called once per request after its KV is freed, so plugins can drop state they keep per request
    (a grammar matcher, a penalty table).

    :param seq: the finished :class:`tokenmill.sequence.Sequence` (``finish_reason`` says how it ended).
    :return: None. Every implementation is called, even after one raises; each failure is a
        ``RuntimeWarning`` naming the plugin, and nothing else fails for it.
    """


@hookspec
def shutdown():
    """Release what the plugin holds (files, threads, device memory), once, when the pipeline is closed.

    Called by ``Pipeline.close()`` (also on leaving ``with pipeline:``) after the requests still in flight
    were aborted; never called twice for one pipeline, which then takes no new requests.

    :return: None. Every implementation is called, even after one raises; each failure is a
        ``RuntimeWarning`` naming the plugin.
    """
