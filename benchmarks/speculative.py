"""Speculative decoding at batch 1 (and under load): plain decode vs every drafter, on chat and input-grounded prompts.

    python benchmarks/speculative.py [--rows plain,self_int8,self_int4,prompt_lookup,medusa,draft_model]
                                     [--new-tokens 128] [--prompts N] [--repeats 1] [--quick]
    python benchmarks/speculative.py --concurrent 32 [--new-tokens 64] [--quick]

Batch 1 (default): the default model (``--model``, fp32, CPU), greedy, ``--new-tokens`` tokens per prompt (EOS
ignored, so every row generates the same count), chat template on, over two prompt sets shipped with the
benchmark:

* ``benchmarks/data/chat_prompts.json``: 8 open-ended chat prompts (topics and forms unlike the Medusa training
  prompts in ``plugins/speculative/data/medusa_prompts.json``);
* ``benchmarks/data/grounded_prompts.json``: 8 input-grounded prompts (edit / repeat / summarize / fix a text or a
  piece of code given in the prompt, 150-400 tokens of it), where the answer copies a lot from the input.

Every row is the pipeline of ``pipelines/speculative.yaml`` (continuous_batching + paged_kv) with its drafter
swapped, ``adaptive: false`` (the adaptive switch is for batches):

* ``plain``: no drafter;
* ``self_int8`` / ``self_int4`` (/ ``self_nf4``): ``speculative`` with the target's own weights quantized (the
  plugin's self-draft defaults), the draft compiled (``compile_draft: true``; ``--no-compile-draft``: eager);
* ``self_int8_lookup`` / ``self_int4_lookup``: the self-draft with ``lookup_ngram: 3``: where the last 3 tokens
  occurred earlier, their continuation (up to ``--pl-k`` tokens) is proposed instead of drafting;
* ``prompt_lookup``: n-gram lookup in the prompt and output (``--pl-k`` drafts, default 16, ngram 3..1; a
  match shorter than 3 proposes at most ``--pl-short``, default 3, as in ``pipelines/prompt-lookup.yaml``);
* ``medusa``: the heads in ``pipelines/medusa/<model>`` (skipped, with a note, while they do not exist), a chain
  of each head's top token; ``medusa_tree``: the tree of ``pipelines/medusa.yaml``; ``medusa_auto:N``: the best tree
  of N candidates from the heads' measured accuracy (``tree_size: N``);
* ``draft_model``: ``speculative`` with a *locally built* draft: a layer-truncated copy of the default model (its
  first ``--draft-layers`` decoder layers, same embeddings / final norm / LM head, untrained), written once to
  ``results/draft-trunc<N>/``.

``ROW:K`` (e.g. ``prompt_lookup:8``) overrides a drafter's ``num_speculative_tokens``; ``prompt_lookup:K:S``
also its ``short_draft_tokens`` (0: no cap). Each row runs in its own
process (``--threads`` torch threads), plain first; with ``--repeats R`` the rows run round-robin R times and each
prompt keeps its fastest time (``--concurrent``: the run of median throughput is kept). ``@NAME`` rows run
``pipelines/NAME.yaml`` as shipped (its own drafter options, ``adaptive`` included). Before every timed prompt the prefix cache is cleared, so prompts are measured
independently of their order. tok/s = generated tokens / wall time of ``generate()`` (prefill included), one
value per prompt after one warm-up prompt, averaged over the set. Acceptance rate and mean accepted length
(``mean_tokens_per_step``: tokens emitted per drafting step, accepted drafts + the target's own token) are those of
``pipe.stats()["spec"]``, counted over the timed prompts only (warm-up excluded); ``tokens / forward`` is generated
tokens per target forward (engine step, prefill step included), which also counts steps without a draft.
Greedy tokens must equal the plain row's. Writes results/speculative[-quick].json and .png.

``--concurrent N``: N requests (chat and grounded prompts alternating; past the 16 distinct prompts a request gets
a numbered system message so no two are identical) submitted at once through continuous batching, ``--new-tokens``
(default 64) each. The default rows are every shipped speculative pipeline as it is (``@NAME``:
``pipelines/NAME.yaml``, with ``max_num_seqs`` raised to N so the whole burst is one batch) against the same
pipeline without its drafter (``plain``, i.e. ``@speculative/plain``; ``@full/plain`` for ``full.yaml``, whose
weights are int8); any drafter row above (``DRAFTER_adaptive`` for ``adaptive: true``) may be named too. Reports
throughput (generated tokens / seconds from the first submit to the last finish),
the ratio to no speculation, ``stats()["spec"]`` and, for the drafters, how many engine steps ran with speculation
on vs off (``steps_on`` / ``steps_off`` of the drafter plugin) and what its draft planner measured. Writes results/speculative-concurrent[-quick].json
and .png. ``--same-process`` (with ``--concurrent``): every row is built in one process and the rows' bursts
alternate for ``--repeats`` rounds (every other round in reverse order); a row's ratio is then the median over
rounds of its throughput over the reference's in the same round (the spread between processes on the dev box,
15-30 %, is larger than what speculation changes under load; drafters' planners keep what they learned from one
round to the next, as in a running service). ``--quick``: 2 prompts per set and 32 new tokens (batch 1), or at
most 8 requests of 16 tokens (concurrent).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

DATA = HERE / "data"
BASE_PIPELINE = ROOT / "pipelines" / "speculative.yaml"
DRAFTERS = ("speculative", "prompt_lookup", "medusa")
WARMUP_PROMPT = "Name three board games that are fun for a family of four, and say why in one line each."

BATCH1_ROWS = ("plain", "self_int8", "self_int4", "prompt_lookup", "medusa", "medusa_tree", "draft_model")
EXTRA_ROWS = ("self_nf4", "self_int8_lookup", "self_int4_lookup", "medusa_auto")
CONCURRENT_ROWS = ("plain", "@prompt-lookup", "@speculative", "@medusa", "@full/plain", "@full")


# ---------------------------------------------------------------------------------------------- prompts
def load_prompts(n: int | None) -> dict[str, list[dict]]:
    chat = json.loads((DATA / "chat_prompts.json").read_text())["prompts"]
    grounded = json.loads((DATA / "grounded_prompts.json").read_text())["prompts"]
    sets = {"chat": [{"id": p["id"], "text": p["prompt"]} for p in chat],
            "grounded": [{"id": p["id"], "text": p["instruction"] + "\n\n" + p["source"]} for p in grounded]}
    return {k: v[:n] if n else v for k, v in sets.items()}


def concurrent_requests(sets: dict[str, list[dict]], n: int) -> list[dict]:
    """``n`` requests alternating chat / grounded; repeats of a prompt get a numbered system message."""
    out = []
    for i in range(n):
        s = sets["chat" if i % 2 == 0 else "grounded"]
        j = (i // 2) % len(s)
        rnd = (i // 2) // len(s)
        messages = [{"role": "user", "content": s[j]["text"]}]
        if rnd:
            messages.insert(0, {"role": "system", "content": f"You are a helpful assistant. Session {rnd + 1}."})
        out.append({"id": f"{'chat' if i % 2 == 0 else 'grounded'}/{s[j]['id']}" + (f"#{rnd + 1}" if rnd else ""),
                    "messages": messages})
    return out


# ---------------------------------------------------------------------------------------------- rows
def medusa_tree() -> dict:
    """The candidate tree options of pipelines/medusa.yaml: ``{"tree": paths}`` or ``{"tree_size": N}``."""
    import yaml

    data = yaml.safe_load((ROOT / "pipelines" / "medusa.yaml").read_text())
    opts = next(p["medusa"] for p in data["plugins"] if isinstance(p, dict) and "medusa" in p)
    return {k: opts[k] for k in ("tree", "tree_size") if k in opts}


def parse_row(row: str) -> tuple[str, int | None]:
    base, _, k = row.partition(":")
    return base, (int(k.partition(":")[0]) if k else None)


def short_override(row: str) -> int | None:
    """``prompt_lookup:K:S`` -> S (``short_draft_tokens``; 0 = no cap), else None."""
    parts = row.split(":")
    return int(parts[2]) if len(parts) > 2 else None


def row_kind(row: str) -> str:
    """The drafter of a row name: ``prompt_lookup_adaptive:8`` -> ``prompt_lookup``."""
    return parse_row(row)[0].removesuffix("_adaptive")


def drafter_for(row: str, cfg: dict) -> tuple[str, dict | None, str]:
    """(base row, {plugin: options} or None, human label) for a row name."""
    base, k_override = parse_row(row)
    adaptive = base.endswith("_adaptive")
    kind = base.removesuffix("_adaptive")
    k = k_override or (cfg["pl_k"] if kind == "prompt_lookup" else cfg["k"])
    common = {"num_speculative_tokens": k, "adaptive": adaptive}
    ad = ", adaptive" if adaptive else ""
    if kind == "plain":
        return base, None, "plain decode (no drafter)"
    if kind in ("self_int8", "self_int4", "self_nf4"):
        cd = ", compiled draft" if cfg["compile_draft"] else ""
        return base, {"speculative": dict(common, draft=kind, compile_draft=cfg["compile_draft"])}, \
            f"speculative {kind}, k={k}{ad}{cd}"
    if kind in ("self_int8_lookup", "self_int4_lookup"):  # the self-draft, with long n-gram matches copied instead
        draft = kind.removesuffix("_lookup")
        cd = ", compiled draft" if cfg["compile_draft"] else ""
        return base, {"speculative": dict(common, draft=draft, compile_draft=cfg["compile_draft"], lookup_ngram=3,
                                          lookup_tokens=cfg["pl_k"])}, \
            f"speculative {draft}, k={k}{ad}{cd}; 3-gram matches copy up to {cfg['pl_k']} tokens instead"
    if kind == "prompt_lookup":
        short = short_override(row)
        short = cfg["pl_short"] if short is None else short
        cap = f", shorter matches <= {short}" if short else ""
        return base, {"prompt_lookup": dict(common, max_ngram=3, min_ngram=1, short_draft_tokens=short or None)}, \
            f"prompt_lookup ngram 3..1, k={k}{cap}{ad}"
    if kind == "medusa":
        return base, {"medusa": dict(common, heads=cfg["medusa_heads"], acceptance="exact")}, \
            f"medusa (exact), k={k}{ad}"
    if kind == "medusa_tree":  # the candidate tree of pipelines/medusa.yaml
        tree = medusa_tree()
        size = tree.get("tree_size") or len(tree.get("tree") or [])
        return base, {"medusa": dict(common, heads=cfg["medusa_heads"], acceptance="exact", **tree)}, \
            f"medusa (exact), tree of {size} candidates as in pipelines/medusa.yaml{ad}"
    if kind == "medusa_auto":  # medusa_auto:N: the best tree of N candidates from the heads' measured accuracy
        n = k_override or 4
        return base, {"medusa": dict(common, num_speculative_tokens=4, heads=cfg["medusa_heads"], acceptance="exact",
                                     tree_size=n)}, \
            f"medusa (exact), best tree of {n} from the heads' held-out accuracy{ad}"
    if kind == "draft_model":
        n, total = cfg["draft_layers"], cfg.get("target_layers", "?")
        return base, {"speculative": dict(common, draft=cfg["draft_dir"], compile_draft=cfg["compile_draft"])}, \
            f"draft_model: LOCAL layer-truncated copy of the default model ({n} of {total} layers, untrained), " \
            f"k={k}{ad}"
    raise ValueError(f"unknown row {row!r}")


def shipped_row(row: str, cfg: dict, max_num_seqs: int | None = None) -> tuple[dict, str | None, str]:
    """``@NAME``: pipelines/NAME.yaml as shipped; ``@NAME/plain``: the same without its drafter. The model is
    overridden, ``max_num_seqs`` (if given) raised to the request count, relative paths made absolute. ->
    (pipeline dict, drafter plugin name or None, label)."""
    import yaml

    name, _, plain = row[1:].partition("/")
    data = yaml.safe_load((ROOT / "pipelines" / f"{name}.yaml").read_text())
    data.update(model=cfg["model"], name=f"{name}-bench")
    if max_num_seqs:
        data["limits"] = dict(data.get("limits") or {}, max_num_seqs=max_num_seqs)
    plugins, drafter = [], None
    for p in data["plugins"]:
        plugin = p if isinstance(p, str) else next(iter(p))
        if plugin in DRAFTERS:
            drafter = plugin
            if plain:
                continue
            if isinstance(p, dict) and isinstance(p[plugin], dict):
                p = {plugin: {k: str((ROOT / "pipelines" / v).resolve())
                              if isinstance(v, str) and (ROOT / "pipelines" / v).exists() else v
                              for k, v in p[plugin].items()}}
        plugins.append(p)
    data["plugins"] = plugins
    label = f"pipelines/{name}.yaml" + (f" without {drafter}" if plain else "")
    return data, None if plain else drafter, label


def shipped_exists(row: str) -> bool:
    name, _, plain = row[1:].partition("/")
    return plain in ("", "plain") and (ROOT / "pipelines" / f"{name}.yaml").is_file()


def row_label(row: str, cfg: dict) -> str:
    return row[1:].replace("/plain", " without its drafter") if row.startswith("@") else drafter_for(row, cfg)[2]


def pipeline_dict(cfg: dict, drafter: dict | None, max_num_seqs: int | None = None) -> dict:
    """pipelines/speculative.yaml with its drafter replaced (or removed) and the model overridden."""
    import yaml

    data = yaml.safe_load(BASE_PIPELINE.read_text())
    data["model"] = cfg["model"]
    data["name"] = "speculative-bench"
    plugins = []
    for p in data["plugins"]:
        name = p if isinstance(p, str) else next(iter(p))
        if name not in DRAFTERS:
            plugins.append(p)
    if drafter:
        plugins.append(drafter)
    data["plugins"] = plugins
    if max_num_seqs:
        data["limits"] = dict(data.get("limits") or {}, max_num_seqs=max_num_seqs)
    return data


# ---------------------------------------------------------------------------------------------- child
class Counters:
    """Deltas of the engine's speculation counters and the drafter's on/off steps."""

    def __init__(self, pipe, plugin_name: str | None) -> None:
        self.pipe, self.plugin = pipe, pipe.plugins.get(plugin_name) if plugin_name else None
        self.start = self.read()

    def read(self) -> dict:
        st = self.pipe.engine.stats
        out = {"draft_tokens": st.draft_tokens, "accepted_tokens": st.accepted_draft_tokens,
               "draft_steps": st.draft_steps, "steps": st.steps, "generated": st.generated_tokens,
               "proposed_at": list(st.proposed_at), "accepted_at": list(st.accepted_at)}
        if self.plugin is not None and hasattr(self.plugin, "steps_on"):
            out.update(steps_on=self.plugin.steps_on, steps_off=self.plugin.steps_off)
        return out

    def delta(self) -> dict:
        now, s = self.read(), self.start
        d = {k: now[k] - s[k] for k in now if k not in ("proposed_at", "accepted_at")}
        pad = lambda xs, n: xs + [0] * (n - len(xs))  # noqa: E731
        n = len(now["proposed_at"])
        d["proposed_at"] = [a - b for a, b in zip(now["proposed_at"], pad(s["proposed_at"], n))]
        d["accepted_at"] = [a - b for a, b in zip(now["accepted_at"], pad(s["accepted_at"], n))]
        return d


def spec_summary(c: dict) -> dict:
    """The fields of ``stats()["spec"]``, computed over a counter delta."""
    dt, acc, ds = c["draft_tokens"], c["accepted_tokens"], c["draft_steps"]
    return {"draft_tokens": dt, "accepted_tokens": acc, "draft_steps": ds,
            "acceptance_rate": acc / dt if dt else 0.0,
            "acceptance_by_position": [a / p for a, p in zip(c["accepted_at"], c["proposed_at"]) if p],
            "mean_tokens_per_step": (acc + ds) / ds if ds else 0.0}


def build_row(row: str, cfg: dict, max_num_seqs: int | None = None) -> tuple:
    """A row's pipeline, built and ready (a compiled draft warmed up), ``max_num_seqs`` raised if given. ->
    (pipe, drafter plugin name, label, pipeline dict, build seconds)."""
    from tokenmill import Pipeline, load_spec

    if row.startswith("@"):
        data, plugin_name, label = shipped_row(row, cfg, max_num_seqs)
    else:
        _, drafter, label = drafter_for(row, cfg)
        plugin_name = next(iter(drafter)) if drafter else None
        data = pipeline_dict(cfg, drafter, max_num_seqs=max_num_seqs)
    t0 = time.perf_counter()
    pipe = Pipeline(load_spec(data), progress=False)
    pipe.wait_ready()  # a compiled draft warms up in the background: time the pipeline once it speculates
    return pipe, plugin_name, label, data, time.perf_counter() - t0


def child_batch1(row: str, cfg: dict) -> dict:
    from tokenmill import SamplingParams

    pipe, plugin_name, label, data, build_s = build_row(row, cfg)
    n = cfg["new_tokens"]
    params = SamplingParams(max_tokens=n, ignore_eos=True)
    t0 = time.perf_counter()
    pipe.generate([WARMUP_PROMPT], params, chat=True)
    warmup_s = time.perf_counter() - t0
    sets: dict[str, list[dict]] = {}
    total = Counters(pipe, plugin_name)
    for set_name, prompts in cfg["sets"].items():
        out = sets[set_name] = []
        for p in prompts:
            pipe.clear_prefix_cache()
            c = Counters(pipe, plugin_name)
            t = time.perf_counter()
            res = pipe.generate([p["text"]], params, chat=True)[0]
            dt = time.perf_counter() - t
            if res.error or len(res.token_ids) != n:
                raise RuntimeError(f"prompt {p['id']}: {len(res.token_ids)} tokens, finish {res.finish_reason}, "
                                   f"error {res.error}")
            d = c.delta()
            out.append({"id": p["id"], "prompt_tokens": len(res.prompt_token_ids), "seconds": dt,
                        "tok_per_s": n / dt, "tokens": res.token_ids, "forwards": d["steps"],
                        "spec": spec_summary(d)})
    tot = total.delta()
    res = {"label": label, "pipeline": data, "build_s": build_s, "warmup_s": warmup_s, "sets": sets,
           "spec_timed": spec_summary(tot),
           "stats_spec_cumulative": pipe.stats()["spec"]}  # as the engine reports it (warm-up included)
    if "steps_on" in tot:
        res["steps_on"], res["steps_off"] = tot["steps_on"], tot["steps_off"]
    return res


def time_concurrent(pipe, plugin_name: str | None, cfg: dict) -> dict:
    """One timed burst of ``cfg["requests_list"]`` through ``pipe`` (after a batch-1 warm-up, prefix cache cleared)."""
    from tokenmill import SamplingParams

    pipe.generate([WARMUP_PROMPT], SamplingParams(max_tokens=8, ignore_eos=True), chat=True)  # warm-up, batch 1
    pipe.clear_prefix_cache()
    params = SamplingParams(max_tokens=cfg["new_tokens"], ignore_eos=True)
    encoded = [pipe.encode(r["messages"]) for r in cfg["requests_list"]]
    c = Counters(pipe, plugin_name)
    batch_sizes = []
    start = time.perf_counter()
    rids = [pipe.submit(ids, params) for ids in encoded]
    pending = set(rids)
    while pending:
        for chunk in pipe.step():
            if chunk.finished:
                pending.discard(chunk.request_id)
        last = pipe.engine.stats.last_step
        if last is not None:
            batch_sizes.append(last.num_seqs)
    wall = time.perf_counter() - start
    outs = [pipe.collect(r) for r in rids]
    errors = [o.error for o in outs if o.error]
    if errors:
        raise RuntimeError(f"{len(errors)} requests failed: {errors[:3]}")
    d = c.delta()
    gen = sum(len(o.token_ids) for o in outs)
    res = {"wall_s": wall, "generated_tokens": gen,
           "tok_per_s": gen / wall, "engine_steps": d["steps"], "tokens_per_step": gen / d["steps"],
           "mean_batch_size": sum(batch_sizes) / len(batch_sizes) if batch_sizes else None,
           "tokens": [o.token_ids for o in outs], "prompt_tokens": [len(o.prompt_token_ids) for o in outs],
           "latency_s_mean": sum(o.total_s for o in outs) / len(outs),
           "spec": spec_summary(d), "stats_spec_cumulative": pipe.stats()["spec"]}
    if "steps_on" in d:
        res["steps_on"], res["steps_off"] = d["steps_on"], d["steps_off"]
        plugin = pipe.plugins[plugin_name]
        if hasattr(plugin, "budget_snapshot"):
            res["budget"] = plugin.budget_snapshot()
    short = [i for i, o in enumerate(outs) if len(o.token_ids) != cfg["new_tokens"]]
    if short:
        res["warning"] = f"{len(short)} requests did not produce exactly {cfg['new_tokens']} tokens"
    return res


def child_concurrent(row: str, cfg: dict) -> dict:
    pipe, plugin_name, label, data, build_s = build_row(row, cfg, max(cfg["requests"], 16))
    return dict(time_concurrent(pipe, plugin_name, cfg), label=label, pipeline=data, build_s=build_s)


def child_concurrent_same_process(rows: list[str], cfg: dict) -> dict:
    """``--same-process``: every row's pipeline built in this one process, then the bursts run round-robin
    ``cfg["repeats"]`` times (rows alternating, every other round in reverse order), so rows are compared without
    the spread between processes. -> ``{"runs": {row: [run, ...]}}``; a row that fails to build or run is one
    failed run."""
    import traceback

    built, runs = {}, {row: [] for row in rows}
    for row in rows:
        print(f"[{time.strftime('%H:%M:%S')}] building {row} ...", file=sys.stderr, flush=True)
        try:
            built[row] = build_row(row, cfg, max(cfg["requests"], 16))
        except Exception as exc:  # noqa: BLE001 - the row's error is reported in the table
            traceback.print_exc()
            runs[row].append({"ok": False, "error": f"{type(exc).__name__}: {exc}"})
    for rep in range(cfg["repeats"]):
        for row in rows if rep % 2 == 0 else rows[::-1]:  # every other round backwards: no row always runs first
            if row not in built or (runs[row] and not runs[row][-1]["ok"]):
                continue
            pipe, plugin_name, label, data, build_s = built[row]
            try:
                r = dict(time_concurrent(pipe, plugin_name, cfg), label=label, pipeline=data, build_s=build_s,
                         ok=True, round=rep)
            except Exception as exc:  # noqa: BLE001
                traceback.print_exc()
                r = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
            runs[row].append(r)
            print(f"[{time.strftime('%H:%M:%S')}] {row} (round {rep + 1}): "
                  + (f"{r['tok_per_s']:.1f} tok/s" if r["ok"] else f"FAILED {r['error']}"), file=sys.stderr, flush=True)
    return {"runs": runs}


def child(row: str, cfg_path: str, out_path: str) -> None:
    import torch

    from common import write_child_result

    cfg = json.loads(Path(cfg_path).read_text())
    torch.set_num_threads(cfg["threads"])
    if cfg["mode"] == "concurrent-same-process":
        compute = lambda: child_concurrent_same_process(row.split(","), cfg)  # noqa: E731
    elif cfg["mode"] == "concurrent":
        compute = lambda: child_concurrent(row, cfg)  # noqa: E731
    else:
        compute = lambda: child_batch1(row, cfg)  # noqa: E731
    write_child_result(out_path, compute)


def run_row(row: str, cfg_path: Path) -> dict:
    from common import run_child

    return run_child(__file__, row, str(cfg_path), ROOT)


# ---------------------------------------------------------------------------------------------- draft model
def build_truncated_draft(model: str, layers: int, out_dir: Path) -> dict:
    """A copy of ``model`` keeping its first ``layers`` decoder layers (embeddings, final norm, LM head kept);
    built once. Returns its description."""
    from transformers import AutoConfig

    from tokenmill.model import resolve_model

    src, name = resolve_model(model, progress=False)
    total = AutoConfig.from_pretrained(src).num_hidden_layers
    info = {"source": str(src), "source_name": name, "layers_kept": layers, "source_layers": total,
            "path": str(out_dir), "trained": False}
    if not (out_dir / "config.json").is_file():
        import shutil

        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if not 1 <= layers < total:
            raise SystemExit(f"--draft-layers must be in 1..{total - 1}")
        print(f"building the truncated draft ({layers} of {total} layers) in {out_dir} ...", file=sys.stderr)
        hf = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
        hf.model.layers = hf.model.layers[:layers]
        hf.config.num_hidden_layers = layers
        if isinstance(getattr(hf.config, "layer_types", None), list):
            hf.config.layer_types = hf.config.layer_types[:layers]
        tmp = out_dir.with_name(out_dir.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        hf.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(src).save_pretrained(tmp)
        (tmp / "TRUNCATED_DRAFT.json").write_text(json.dumps(info, indent=2))
        tmp.rename(out_dir)
    return info


# ---------------------------------------------------------------------------------------------- parent
def fmt(x, spec=".2f", none="n/a") -> str:
    return none if x is None else format(x, spec)


def mean(xs):
    xs = list(xs)
    return sum(xs) / len(xs) if xs else None


def median_run(runs: list[dict]) -> dict:
    """A concurrent row run several times: the run of median throughput, with every run's throughput."""
    ok = sorted((r for r in runs if r["ok"]), key=lambda r: r["tok_per_s"])
    if not ok:
        return runs[-1]
    return dict(ok[(len(ok) - 1) // 2], repeats=len(ok), tok_per_s_all=[r["tok_per_s"] for r in runs if r["ok"]])


def merge_repeats(runs: list[dict]) -> dict:
    """One row from several runs of it: each prompt keeps its fastest time (tokens must agree across runs)."""
    ok = [r for r in runs if r["ok"]]
    if not ok:
        return runs[-1]
    res = dict(ok[0])
    res["repeats"] = len(ok)
    res["sets"] = {}
    for set_name, prompts in ok[0]["sets"].items():
        merged = []
        for i, p in enumerate(prompts):
            versions = [r["sets"][set_name][i] for r in ok]
            best = min(versions, key=lambda v: v["seconds"])
            best = dict(best, seconds_all=[v["seconds"] for v in versions],
                        stable_tokens=all(v["tokens"] == p["tokens"] for v in versions))
            merged.append(best)
        res["sets"][set_name] = merged
    return res


def summarize_batch1(results: dict[str, dict], n: int) -> None:
    plain = results.get("plain")
    for row, r in results.items():
        if not r["ok"]:
            continue
        r["summary"] = {}
        for set_name, prompts in r["sets"].items():
            tps = mean(p["tok_per_s"] for p in prompts)
            tot = {k: sum(p["spec"][k] for p in prompts) for k in ("draft_tokens", "accepted_tokens", "draft_steps")}
            s = {"tok_per_s": tps, "tok_per_s_total": n * len(prompts) / sum(p["seconds"] for p in prompts),
                 "acceptance_rate": tot["accepted_tokens"] / tot["draft_tokens"] if tot["draft_tokens"] else None,
                 "mean_tokens_per_step": ((tot["accepted_tokens"] + tot["draft_steps"]) / tot["draft_steps"]
                                          if tot["draft_steps"] else None),
                 "tokens_per_forward": n * len(prompts) / sum(p["forwards"] for p in prompts),
                 "prompts": len(prompts), **tot}
            if plain and plain["ok"] and set_name in plain.get("sets", {}):
                ps = plain["summary"][set_name] if row != "plain" else s
                s["speedup_vs_plain"] = tps / ps["tok_per_s"]
                same = [a["tokens"] == b["tokens"] for a, b in zip(prompts, plain["sets"][set_name])]
                s["greedy_identical_to_plain"] = sum(same)
                s["greedy_mismatch_prompts"] = [p["id"] for p, ok in zip(prompts, same) if not ok]
            r["summary"][set_name] = s
    for r in results.values():  # token ids only matter for the comparison
        for prompts in r.get("sets", {}).values():
            for p in prompts:
                p.pop("tokens", None)


def print_batch1(results: dict[str, dict], sets: dict, n: int, threads: int) -> None:
    for set_name in sets:
        print(f"\n**{set_name}** prompts ({len(sets[set_name])}), batch 1, greedy, {n} new tokens, "
              f"{threads} threads\n")
        print("| row | tok/s | speedup vs plain | acceptance rate | mean accepted length (tokens/draft step) "
              "| tokens / forward | greedy = plain |")
        print("|---|---|---|---|---|---|---|")
        for row, r in results.items():
            label = r.get("label") or row
            if not r["ok"]:
                err = r["error"][:220].replace("|", "/").replace("\n", " ")
                print(f"| {label} | {'skipped' if r.get('skipped') else 'error'}: {err} | | | | | |")
                continue
            s = r["summary"][set_name]
            if "greedy_identical_to_plain" in s:
                same = "ref" if row == "plain" else ("yes" if not s["greedy_mismatch_prompts"] else "NO") + \
                    f" ({s['greedy_identical_to_plain']}/{s['prompts']})"
            else:
                same = "n/a (no plain row)"
            sp = fmt(s.get("speedup_vs_plain")) + ("x" if s.get("speedup_vs_plain") is not None else "")
            acc = "-" if row == "plain" else fmt(s["acceptance_rate"], ".1%")
            mtl = "-" if row == "plain" else fmt(s["mean_tokens_per_step"])
            print(f"| {label} | {s['tok_per_s']:.1f} | {sp} | {acc} | {mtl} | {s['tokens_per_forward']:.2f} | {same} |")


def chart_batch1(name: str, results: dict, sets: dict, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from common import RESULTS

    rows = list(results)
    fig, ax = plt.subplots(figsize=(max(6, 1.5 * len(rows)), 3.8))
    w = 0.8 / len(sets)
    for j, set_name in enumerate(sets):
        vals = [results[r]["summary"][set_name]["tok_per_s"] if results[r]["ok"] else 0.0 for r in rows]
        bars = ax.bar([i + (j - (len(sets) - 1) / 2) * w for i in range(len(rows))], vals, w, label=set_name)
        ax.bar_label(bars, fmt="%.1f", fontsize=8)
    def tick(r: str) -> str:
        note = "" if results[r]["ok"] else "\n(n/a)"
        if row_kind(r) == "draft_model":
            note += "\n(local truncated\ncopy, untrained)"
        return r + note

    ax.set_xticks(range(len(rows)), [tick(r) for r in rows], rotation=15, ha="right")
    ax.set_ylabel("generated tokens / s")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    path = RESULTS / f"{name}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", default=None,
                    help="comma list; batch 1: " + ", ".join(BATCH1_ROWS + EXTRA_ROWS) + "; --concurrent: "
                         + ", ".join(CONCURRENT_ROWS) + " (any drafter row, DRAFTER_adaptive for adaptive: true); "
                         "ROW:K sets num_speculative_tokens")
    ap.add_argument("--new-tokens", type=int, default=None, help="default 128 (batch 1) / 64 (--concurrent)")
    ap.add_argument("--prompts", type=int, default=None, help="use the first N prompts of each set")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: 2 prompts per set, 32 tokens (--concurrent: <= 8 requests, 16 tokens)")
    ap.add_argument("--concurrent", type=int, default=None, metavar="N", help="N requests at once instead")
    ap.add_argument("--repeats", type=int, default=1,
                    help="run the rows round-robin R times; batch 1: best time per prompt, --concurrent: the run of "
                         "median throughput")
    ap.add_argument("--same-process", action="store_true",
                    help="--concurrent: build every row in one process and alternate their runs (--repeats rounds); "
                         "each row's ratio is the median over rounds of its run / the reference's run of that round")
    ap.add_argument("--k", type=int, default=4, help="num_speculative_tokens of speculative / medusa / draft_model")
    ap.add_argument("--pl-k", type=int, default=16, help="num_speculative_tokens of prompt_lookup")
    ap.add_argument("--pl-short", type=int, default=3,
                    help="prompt_lookup short_draft_tokens: matches shorter than max_ngram propose at most this "
                         "many (0: no cap); a row prompt_lookup:K:S sets both")
    ap.add_argument("--no-compile-draft", action="store_true",
                    help="run draft models eagerly (default: compile_draft: true, as in pipelines/speculative.yaml)")
    ap.add_argument("--draft-layers", type=int, default=8, help="layers kept in the truncated draft model")
    ap.add_argument("--medusa-heads", default=None, help="default pipelines/medusa/<model>")
    ap.add_argument("--threads", type=int, default=2, help="torch threads in each row's process")
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--name", default=None, help="output file stem under results/")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--child-config", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--child-out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.child, args.child_config, args.child_out)

    from common import RESULTS, bar_chart, write

    concurrent = args.concurrent is not None
    if concurrent and args.concurrent < 1:
        ap.error("--concurrent must be >= 1")
    if args.same_process and not concurrent:
        ap.error("--same-process applies to --concurrent runs")
    n_prompts = args.prompts or (2 if args.quick and not concurrent else None)
    sets = load_prompts(n_prompts)
    if concurrent:
        new_tokens = args.new_tokens or (16 if args.quick else 64)
        requests = min(args.concurrent, 8) if args.quick else args.concurrent
    else:
        new_tokens = args.new_tokens or (32 if args.quick else 128)
    drafter_rows = [r for r in BATCH1_ROWS + EXTRA_ROWS if r != "plain"]
    allowed = (CONCURRENT_ROWS + tuple(r for d in drafter_rows for r in (d, d + "_adaptive")
                                       if r not in CONCURRENT_ROWS)
               if concurrent else BATCH1_ROWS + EXTRA_ROWS)
    rows = [r.strip() for r in args.rows.split(",") if r.strip()] if args.rows else list(
        CONCURRENT_ROWS if concurrent else BATCH1_ROWS)
    bad = [r for r in rows if not (shipped_exists(r) if r.startswith("@") else parse_row(r)[0] in allowed)]
    if bad:
        ap.error(f"unknown rows {bad}; choose from {', '.join(allowed)} (optionally ROW:K)"
                 + "; or @NAME / @NAME/plain for pipelines/NAME.yaml")
    if "plain" in rows:  # the reference runs first
        rows.remove("plain")
        rows.insert(0, "plain")

    heads = Path(args.medusa_heads) if args.medusa_heads else ROOT / "pipelines" / "medusa" / args.model
    cfg = {"model": args.model, "threads": args.threads, "new_tokens": new_tokens, "k": args.k, "pl_k": args.pl_k,
           "compile_draft": not args.no_compile_draft, "pl_short": args.pl_short,
           "medusa_heads": str(heads.resolve()), "draft_layers": args.draft_layers,
           "draft_dir": str((RESULTS / f"draft-trunc{args.draft_layers}").resolve())}
    draft_info = None
    if any(row_kind(r) == "draft_model" for r in rows):
        draft_info = build_truncated_draft(args.model, args.draft_layers, Path(cfg["draft_dir"]))
        cfg["target_layers"] = draft_info["source_layers"]
    skipped = {}
    for r in rows:
        if not r.startswith("@") and row_kind(r).startswith("medusa") and not ((heads / "medusa_config.json").is_file()
                                            and (heads / "medusa_heads.safetensors").is_file()):
            shown = heads.relative_to(ROOT) if heads.is_relative_to(ROOT) else heads
            skipped[r] = {"ok": False, "skipped": True, "label": drafter_for(r, cfg)[2],
                          "error": f"heads not found in {shown} (train them: tokenmill train-medusa "
                                   f"pipelines/continuous.yaml --out {shown})"}
    if concurrent:
        cfg.update(mode="concurrent-same-process" if args.same_process else "concurrent", repeats=args.repeats,
                   requests=requests, requests_list=concurrent_requests(sets, requests))
    else:
        cfg.update(mode="batch1", sets=sets)

    RESULTS.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        cfg_path = Path(tmp) / "config.json"
        cfg_path.write_text(json.dumps(cfg))
        runs: dict[str, list[dict]] = {r: [] for r in rows}
        if args.same_process:
            todo = [r for r in rows if r not in skipped]
            print(f"[{time.strftime('%H:%M:%S')}] {', '.join(todo)} in one process, {args.repeats} rounds ...",
                  file=sys.stderr, flush=True)
            both = run_row(",".join(todo), cfg_path)
            for r in todo:
                runs[r] = both["runs"][r] if both["ok"] else [dict(both)]
        for rep in range(0 if args.same_process else args.repeats):
            for row in rows:
                if row in skipped:
                    continue
                if rep and not runs[row][-1]["ok"]:
                    continue  # a row that failed once fails again
                print(f"[{time.strftime('%H:%M:%S')}] {row}" + (f" (repeat {rep + 1})" if args.repeats > 1 else "")
                      + " ...", file=sys.stderr, flush=True)
                r = run_row(row, cfg_path)
                runs[row].append(r)
                if not r["ok"]:
                    print(f"    FAILED: {r['error']}", file=sys.stderr, flush=True)
                elif concurrent:
                    print(f"    {r['tok_per_s']:.1f} tok/s", file=sys.stderr, flush=True)
                else:
                    print("    " + ", ".join(f"{k} {mean(p['tok_per_s'] for p in v):.1f} tok/s"
                                             for k, v in r["sets"].items()), file=sys.stderr, flush=True)
        for row in rows:
            results[row] = skipped[row] if row in skipped else (median_run(runs[row]) if concurrent
                                                                 else merge_repeats(runs[row]))
            results[row].setdefault("label", row_label(row, cfg))

    common_payload = {"model": args.model, "dtype": "float32", "device": "cpu", "threads_per_row": args.threads,
                      "new_tokens": new_tokens, "quick": args.quick,
                      "base_pipeline": str(BASE_PIPELINE.relative_to(ROOT)),
                      "greedy": True, "ignore_eos": True, "chat_template": True,
                      "num_speculative_tokens": {"speculative/medusa/draft_model": args.k, "prompt_lookup": args.pl_k},
                      "draft_model": draft_info, "medusa_heads": str(heads),
                      "same_process": args.same_process}
    if concurrent:
        name = args.name or "speculative-concurrent" + ("-quick" if args.quick else "")
        for row, r in results.items():
            if not r["ok"]:
                continue
            ref_row = row + "/plain" if row.startswith("@") and row + "/plain" in results else "plain"
            ref = results.get(ref_row)
            if ref is None or not ref["ok"] or ref is r:
                r["vs_no_speculation"] = 1.0 if ref is r else None
                continue
            r["vs_no_speculation"] = r["tok_per_s"] / ref["tok_per_s"]
            if args.same_process:  # paired by round: each run against the reference's run of the same round
                ref_runs = {x["round"]: x["tok_per_s"] for x in runs[ref_row] if x["ok"]}
                paired = sorted(x["tok_per_s"] / ref_runs[x["round"]] for x in runs[row]
                                if x["ok"] and x["round"] in ref_runs)
                r["vs_no_speculation_rounds"] = paired
                r["vs_no_speculation"] = paired[(len(paired) - 1) // 2] if paired else None
            r["greedy_identical_requests"] = sum(a == b for a, b in zip(r["tokens"], ref["tokens"]))
        for r in results.values():
            r.pop("tokens", None)
        payload = dict(common_payload, requests=requests,
                       request_ids=[q["id"] for q in cfg["requests_list"]],
                       throughput_definition="generated tokens / seconds from the first submit to the last finish "
                                             "(model load, pipeline build and a batch-1 warm-up excluded)",
                       rows=results)
        out = write(name, payload)
        title = f"{requests} concurrent requests (chat + grounded), {new_tokens} new tokens"
        bar_chart(name, [r for r in results], [r.get("tok_per_s") or 0.0 for r in results.values()],
                  "output tokens / s", title)
        print(f"\n{title}, continuous batching + paged KV, greedy, {args.threads} threads\n")
        print("| row | tok/s | vs no speculation | acceptance rate | mean accepted length | steps spec on / off "
              "| engine steps | mean batch | greedy = plain |")
        print("|---|---|---|---|---|---|---|---|---|")
        for row, r in results.items():
            if not r["ok"]:
                err = r["error"][:220].replace("|", "/").replace("\n", " ")
                print(f"| {r.get('label', row)} | error: {err} | | | | | | | |")
                continue
            s = r["spec"]
            onoff = f"{r['steps_on']} / {r['steps_off']}" if "steps_on" in r else "-"
            same = ("ref" if "greedy_identical_requests" not in r and r["vs_no_speculation"] == 1.0
                    else f"{r['greedy_identical_requests']}/{requests}"
                    if "greedy_identical_requests" in r else "n/a")
            print(f"| {r['label']} | {r['tok_per_s']:.1f} | {fmt(r['vs_no_speculation'])}x | "
                  f"{fmt(s['acceptance_rate'], '.1%') if s['draft_tokens'] else '-'} | "
                  f"{fmt(s['mean_tokens_per_step']) if s['draft_tokens'] else '-'} | {onoff} | {r['engine_steps']} | "
                  f"{fmt(r['mean_batch_size'], '.1f')} | {same} |"
                  + (f" rounds: {', '.join(f'{x:.2f}' for x in r['vs_no_speculation_rounds'])}"
                     if r.get("vs_no_speculation_rounds") else ""))
        print(f"\nwrote {out}")
        return

    name = args.name or "speculative" + ("-quick" if args.quick else "")
    summarize_batch1(results, new_tokens)
    payload = dict(common_payload, repeats=args.repeats,
                   prompt_sets={k: [p["id"] for p in v] for k, v in sets.items()},
                   prompt_files={"chat": "benchmarks/data/chat_prompts.json",
                                 "grounded": "benchmarks/data/grounded_prompts.json"},
                   warmup_prompt=WARMUP_PROMPT,
                   tok_per_s_definition="per prompt: generated tokens / wall time of generate() (prefill included, "
                                        "prefix cache cleared before each prompt); averaged over the set "
                                        "(tok_per_s_total: all tokens / all time)",
                   rows=results)
    mismatches = [(row, s, r["summary"][s]["greedy_mismatch_prompts"]) for row, r in results.items()
                  if r["ok"] for s in r["summary"] if r["summary"][s].get("greedy_mismatch_prompts")]
    payload["greedy_mismatches"] = [{"row": a, "set": b, "prompts": c} for a, b, c in mismatches]
    out = write(name, payload)
    png = chart_batch1(name, results, sets, f"batch 1, greedy, {new_tokens} new tokens")
    print_batch1(results, sets, new_tokens, args.threads)
    if draft_info:
        print(f"\ndraft_model = {draft_info['path']}: first {draft_info['layers_kept']} of "
              f"{draft_info['source_layers']} layers of {draft_info['source_name']} (built locally, not trained)")
    for row, set_name, ids in mismatches:
        print(f"WARNING: {row} greedy tokens differ from plain on {set_name}: {', '.join(ids)}", file=sys.stderr)
    print(f"\nwrote {out} and {png}")


if __name__ == "__main__":
    main()
