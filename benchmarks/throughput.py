"""Many requests at once: HF static batches vs HF continuous batching vs tokenmill dynamic vs continuous batching.

    python benchmarks/throughput.py [--workload mixed|shared-prefix|long] [--rows hf_static,hf_batch,dynamic,continuous]
                                    [--requests 64] [--new-tokens 64] [--rate R] [--quick]

Workloads (random token ids in [100, 40000), seeded; greedy; EOS ignored so every request makes exactly
``--new-tokens`` tokens):

* ``mixed`` (default): prompts of 16..256 tokens, 64 new tokens, all requests submitted at once.
* ``shared-prefix``: one 256-token system prompt + a unique 8..24-token question, 32 new tokens; tokenmill
  continuous batching + paged KV with and without ``prefix_caching``.
* ``long``: 16 requests of 1,500-token prompts, 128 new tokens, all at once (long-context decoding: the
  attention over each sequence's K/V dominates the step).
* ``--rate R``: the mixed workload arriving as a Poisson process at R requests/s, continuous pipeline only.

Rows (each in its own process, so peak RSS is per row):

* ``hf_static``: HF ``generate()`` on left-padded static batches of 16 in submission order.
* ``hf_batch``: HF ``generate_batch()``, transformers' own continuous batching (paged cache, sdpa on CPU), its
  KV budget and step limits set to those of ``pipelines/continuous.yaml``.
* ``dynamic``: tokenmill ``pipelines/dynamic.yaml`` (dynamic_batching + contiguous_kv).
* ``continuous``: tokenmill ``pipelines/continuous.yaml`` (continuous_batching + paged_kv, prefix caching on).
* ``continuous_noprefix``: the same with ``prefix_caching: false``.

Throughput is generated tokens / wall time from the first submit to the last finish (model load, pipeline
build and warm-up excluded). Latency and TTFT are per request, from its submission (or scheduled arrival).
Writes results/throughput[-<workload>][-rate<R>][-quick].json and .png and prints markdown tables.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

VOCAB_LO, VOCAB_HI = 100, 40000  # clear of the special tokens at the bottom of the vocab
SYSTEM_LEN = 256
LONG_PROMPT = 1500

LABELS = {
    "hf_static": "HF generate() static x16",
    "hf_batch": "HF generate_batch() (continuous)",
    "dynamic": "tokenmill dynamic + contiguous KV",
    "continuous": "tokenmill continuous + paged KV",
    "continuous_noprefix": "tokenmill continuous + paged KV, no prefix cache",
}
PIPELINES = {"dynamic": "pipelines/dynamic.yaml", "continuous": "pipelines/continuous.yaml",
             "continuous_noprefix": "pipelines/continuous.yaml"}


# ---------------------------------------------------------------------------------------------- workloads
def make_prompts(workload: str, n: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    draw = lambda k: [rng.randrange(VOCAB_LO, VOCAB_HI) for _ in range(k)]  # noqa: E731
    if workload == "mixed":
        return [draw(rng.randint(16, 256)) for _ in range(n)]
    if workload == "long":
        return [draw(LONG_PROMPT) for _ in range(n)]
    system = draw(SYSTEM_LEN)
    return [system + draw(rng.randint(8, 24)) for _ in range(n)]


def make_arrivals(n: int, rate: float | None, seed: int) -> list[float]:
    """Offsets (s) from the start: all 0 without a rate, else a seeded Poisson process at ``rate`` req/s."""
    if not rate:
        return [0.0] * n
    rng = random.Random(seed + 1)
    t, out = 0.0, []
    for _ in range(n):
        out.append(t)
        t += rng.expovariate(rate)
    return out


def dist(xs: list[float]) -> dict:
    import numpy as np

    if not xs:
        return {"mean": None, "p50": None, "p99": None}
    a = np.asarray(xs, dtype=float)
    return {"mean": float(a.mean()), "p50": float(np.percentile(a, 50)), "p99": float(np.percentile(a, 99))}


# ---------------------------------------------------------------------------------------------- child rows
def load_hf(cfg: dict):
    import torch
    from transformers import AutoModelForCausalLM

    from tokenmill.model.resolve import resolve_model

    src, _ = resolve_model(cfg["model"], progress=False)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32, attn_implementation="sdpa")
    return model.eval().requires_grad_(False)


def row_hf_static(cfg: dict, prompts: list[list[int]]) -> dict:
    import torch
    from transformers import LogitsProcessor, LogitsProcessorList

    class FirstCall(LogitsProcessor):
        """Records when the batch's first token is being picked (after the prefill forward)."""

        def __init__(self) -> None:
            self.t: float | None = None

        def __call__(self, input_ids, scores):
            if self.t is None:
                self.t = time.perf_counter()
            return scores

    model = load_hf(cfg)
    model.generation_config.eos_token_id = None
    n_new, bs, pad = cfg["new_tokens"], cfg["hf_batch_size"], 0

    def run(batch: list[list[int]], n: int, rec=None):
        width = max(map(len, batch))
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in batch])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=mask, max_new_tokens=n, do_sample=False, pad_token_id=pad,
                                 logits_processor=LogitsProcessorList([rec] if rec else []))
        assert out.shape[1] == width + n, f"expected {n} new tokens, got {out.shape[1] - width}"
        return out[:, width:].tolist()

    run([prompts[0][:16]] * 2, 2)  # warm-up
    ttft, lat, tokens = [], [], []
    t0 = time.perf_counter()
    for i in range(0, len(prompts), bs):
        rec = FirstCall()
        toks = run(prompts[i:i + bs], n_new, rec)
        t_end = time.perf_counter()
        for tk in toks:
            tokens.append(tk)
            ttft.append(rec.t - t0)
            lat.append(t_end - t0)
    wall = time.perf_counter() - t0
    return {"wall_s": wall, "ttft": ttft, "latency": lat, "tokens": tokens,
            "notes": f"left-padded static batches of {bs} in submission order; a request's latency is its "
                     "batch's end, its TTFT its batch's first token (LogitsProcessor first call), both from the start"}


def row_hf_batch(cfg: dict, prompts: list[list[int]]) -> dict:
    import logging

    from transformers import GenerationConfig
    from transformers.generation import ContinuousBatchingConfig
    from transformers.generation.continuous_batching.utils import logger as cb_logger

    from tokenmill import load_spec

    cb_logger.setLevel(logging.WARNING)
    model = load_hf(cfg)
    # same KV budget and step limits as the tokenmill continuous pipeline (the default would take 90 % of RAM)
    spec = load_spec(ROOT / PIPELINES["continuous"])
    kv_gb = next(p.options for p in spec.plugins if p.name == "paged_kv").kv_memory_gb or 1.5
    c = model.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    bytes_per_token = 2 * c.num_hidden_layers * c.num_key_value_heads * head_dim * 4
    page = ContinuousBatchingConfig().page_size
    cb = ContinuousBatchingConfig(num_blocks=int(kv_gb * 2**30 // (bytes_per_token * page)),
                                  max_batch_tokens=spec.limits.max_num_batched_tokens,
                                  max_requests_per_batch=spec.limits.max_num_seqs)
    gen = GenerationConfig(max_new_tokens=cfg["new_tokens"], do_sample=False, eos_token_id=-1, pad_token_id=0)
    t_call = time.perf_counter()
    # generate_batch builds the paged cache and warms up before it creates the requests (created_time)
    out = model.generate_batch(inputs=prompts, generation_config=gen, continuous_batching_config=cb,
                               record_timestamps=True, progress_bar=False)
    t_ret = time.perf_counter()
    res = list(out.values())
    errors = [r.error for r in res if r.error]
    if len(res) != len(prompts) or errors:
        raise RuntimeError(f"generate_batch returned {len(res)}/{len(prompts)} results; errors: {errors[:3]}")
    t0 = min(r.created_time for r in res)
    return {"wall_s": max(r.lifespan[1] for r in res) - t0,
            "ttft": [r.timestamps[0] - t0 for r in res], "latency": [r.lifespan[1] - t0 for r in res],
            "tokens": [list(r.generated_tokens) for r in res],
            "setup_s": t0 - t_call, "call_s": t_ret - t_call,
            "config": {"attn_implementation": model.config._attn_implementation, "page_size": page,
                       "num_blocks": cb.num_blocks, "max_batch_tokens": cb.max_batch_tokens,
                       "max_requests_per_batch": cb.max_requests_per_batch, "kv_memory_gb": kv_gb,
                       "allow_block_sharing": cb.allow_block_sharing},
            "notes": "times from GenerationOutput (record_timestamps=True): TTFT = first token timestamp, latency = "
                     "lifespan end, from the first request's created_time; setup_s (cache allocation + warm-up "
                     "inside generate_batch) is excluded from the throughput"}


def label(row: str) -> str:
    base, _, attention = row.partition("@")
    return LABELS[base] + (f" (attention: {attention})" if attention else "")


def row_tokenmill(cfg: dict, prompts: list[list[int]], row: str) -> dict:
    from tokenmill import Pipeline, SamplingParams, load_spec

    which, _, attention = row.partition("@")
    spec = load_spec(ROOT / PIPELINES[which])
    spec.model = cfg["model"]
    if attention:
        spec.attention = attention
    if which == "continuous_noprefix":
        next(p.options for p in spec.plugins if p.name == "paged_kv").prefix_caching = False
    pipe = Pipeline(spec, progress=False)
    pipe.wait_ready()  # background preparation (a compiled draft) done before timing
    pipe.generate([list(range(VOCAB_LO, VOCAB_LO + 32))], SamplingParams(max_tokens=4, ignore_eos=True))  # warm-up
    pipe.clear_prefix_cache()
    kv0 = pipe.stats()["kv"]
    params = SamplingParams(max_tokens=cfg["new_tokens"], ignore_eos=True)
    arrivals = make_arrivals(len(prompts), cfg["rate"], cfg["seed"])

    n = len(prompts)
    rids: list[str] = []
    lag: list[float] = []  # submit time - scheduled arrival
    steps: list[dict] = []
    done, last = 0, pipe.engine.stats.steps
    start = time.perf_counter()
    while done < n:
        now = time.perf_counter()
        while len(rids) < n and start + arrivals[len(rids)] <= now:
            lag.append(time.perf_counter() - (start + arrivals[len(rids)]))
            rids.append(pipe.submit(prompts[len(rids)], params))
        if done == len(rids):  # nothing in flight: wait for the next arrival
            time.sleep(max(0.0, start + arrivals[len(rids)] - time.perf_counter()))
            continue
        done += sum(1 for c in pipe.step() if c.finished)
        st = pipe.stats()
        if st["steps"] != last:
            last = st["steps"]
            s = pipe.engine.stats.last_step
            kv = st["kv"]
            steps.append({"prefill": s.num_prefill_tokens, "decode": s.num_decode_tokens, "seqs": s.num_seqs,
                          "waiting": s.num_waiting, "running": s.num_running, "forward_s": s.forward_s,
                          "used_blocks": kv["used_blocks"], "alloc": kv["allocated_token_slots"],
                          "used": kv["used_token_slots"]})
        elif pipe.engine.idle:
            time.sleep(0.0005)  # the scheduler holds back (batching window)
    end = time.perf_counter()
    outs = [pipe.collect(r) for r in rids]
    bad = [o.error or o.finish_reason for o in outs if o.finish_reason != "length"]
    if bad:
        raise RuntimeError(f"{len(bad)} requests did not finish by length: {bad[:3]}")
    kv1 = pipe.stats()["kv"]

    result = {"wall_s": max(lg + o.total_s for lg, o in zip(lag, outs)),
              "ttft": [lg + o.ttft_s for lg, o in zip(lag, outs)],
              "latency": [lg + o.total_s for lg, o in zip(lag, outs)],
              "tokens": [o.token_ids for o in outs], "steps": len(steps),
              "preemptions": sum(o.num_preemptions for o in outs),
              "prefill_forward_s": sum(s["forward_s"] for s in steps if s["prefill"]),
              "decode_forward_s": sum(s["forward_s"] for s in steps if not s["prefill"]),
              "pipeline": PIPELINES[which], "attention": pipe.info()["attention"],
              "plugins": {p.name: repr(p.options) for p in spec.plugins}}
    if cfg["rate"]:
        result["wall_s"] = end - start  # first scheduled arrival to last finish
        result["submit_lag_s"] = dist(lag)
    # ---- KV usage; steady state = decode-only steps (no prefill token in the step)
    steady = [s for s in steps if s["prefill"] == 0 and s["alloc"]]
    bs, nb, pool = kv1["block_size"], kv1["num_blocks"], kv1["pool_bytes"]
    bpt = pool / (nb * bs)
    mean = lambda xs: sum(xs) / len(xs) if xs else None  # noqa: E731
    mean_len = mean([s["used"] / s["running"] for s in steady if s["running"]])
    kvr = {"kind": kv1["kind"], "block_size": bs, "num_blocks": nb, "pool_bytes": pool,
           "bytes_per_token": bpt, "steady_state_steps": len(steady),
           "steady_state_definition": "engine steps with no prefill tokens (all decodes)",
           "steady_state_mean_waiting": mean([s["waiting"] for s in steady]),
           "steady_state_mean_running": mean([s["running"] for s in steady]),
           "unused_slot_fraction_steady": mean([1 - s["used"] / s["alloc"] for s in steady]),
           "unused_slot_fraction_definition": "mean over steady-state steps of 1 - used_token_slots / "
                                              "allocated_token_slots (kv_stats after the step)",
           "peak_used_blocks": max((s["used_blocks"] for s in steps), default=0),
           "peak_allocated_token_slots": max((s["alloc"] for s in steps), default=0),
           "peak_used_token_slots": max((s["used"] for s in steps), default=0),
           "mean_seq_len_steady": mean_len}
    if kv1["kind"] == "paged":
        kvr["max_concurrent_seqs"] = pool / (bpt * mean_len) if mean_len else None
        kvr["max_concurrent_seqs_formula"] = ("pool_bytes / (bytes_per_token * mean sequence length at steady "
                                              "state): every sequence holds only its own tokens (plus < 1 block)")
        blocks_per_seq = mean([s["used_blocks"] / s["running"] for s in steady if s["running"]])
        kvr["max_concurrent_seqs_by_blocks"] = nb / blocks_per_seq if blocks_per_seq else None
        kvr["max_concurrent_seqs_by_blocks_formula"] = ("num_blocks / mean(used_blocks / running) at steady state: "
                                                       "counts partial last blocks and shared prefix blocks once")
        q, h = kv1["prefix_queries_tokens"] - kv0["prefix_queries_tokens"], \
            kv1["prefix_hits_tokens"] - kv0["prefix_hits_tokens"]
        if h and kvr["unused_slot_fraction_steady"] is not None and kvr["unused_slot_fraction_steady"] < 0:
            kvr["unused_slot_fraction_note"] = (
                "negative because used_token_slots counts each sequence's tokens (a shared prefix once per sharer) "
                "while allocated_token_slots counts physical blocks once; not meaningful with prefix sharing")
        result["prefix_caching"] = kv1["prefix_caching"]
        result["prefix_hit_rate"] = h / q if q else 0.0
        result["prefix_hits_tokens"] = h
    else:
        kvr["max_concurrent_seqs"] = nb
        kvr["max_concurrent_seqs_formula"] = ("number of rows = pool_bytes / (bytes_per_token * max_model_len): "
                                              "every sequence reserves a max_model_len row whatever its length")
    result["kv"] = kvr
    return result


def child(row: str, cfg: dict, out_path: str) -> None:
    import torch

    from common import write_child_result

    torch.set_num_threads(cfg["threads"])
    prompts = make_prompts(cfg["workload"], cfg["requests"], cfg["seed"])

    def compute() -> dict:
        if row == "hf_static":
            res = row_hf_static(cfg, prompts)
        elif row == "hf_batch":
            res = row_hf_batch(cfg, prompts)
        else:
            res = row_tokenmill(cfg, prompts, row)
        gen = sum(len(t) for t in res["tokens"])
        res.update(generated_tokens=gen, tok_per_s=gen / res["wall_s"])
        short = [i for i, t in enumerate(res["tokens"]) if len(t) != cfg["new_tokens"]]
        if short:
            res["warning"] = f"{len(short)} requests did not produce exactly {cfg['new_tokens']} tokens"
        return res

    write_child_result(out_path, compute)


def run_row(row: str, cfg: dict) -> dict:
    from common import run_child

    return run_child(__file__, row, json.dumps(cfg), ROOT)


# ---------------------------------------------------------------------------------------------- parent
def fmt(x, spec=".2f", none="n/a") -> str:
    return none if x is None else format(x, spec)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workload", choices=("mixed", "shared-prefix", "long"), default="mixed")
    ap.add_argument("--rows", default=None, help="comma list of " + ", ".join(LABELS)
                    + "; a tokenmill row with @<backend> runs that attention backend (e.g. continuous@flex_paged)")
    ap.add_argument("--requests", type=int, default=None, help="default 64 (16 with --quick)")
    ap.add_argument("--new-tokens", type=int, default=None,
                    help="default 64 (mixed) / 32 (shared-prefix); 16 with --quick")
    ap.add_argument("--rate", type=float, default=None, help="Poisson arrivals at R req/s (mixed, continuous)")
    ap.add_argument("--quick", action="store_true", help="smoke run: 16 requests, 16 new tokens")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2, help="torch threads in each row's process")
    ap.add_argument("--hf-batch-size", type=int, default=16)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--name", default=None, help="output file stem under results/")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--child-config", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--child-out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.child, json.loads(args.child_config), args.child_out)

    import torch

    from common import bar_chart, write

    torch.set_num_threads(args.threads)
    if args.rate is not None and args.workload != "mixed":
        ap.error("--rate runs the mixed workload")
    if args.rate is not None and args.rate <= 0:
        ap.error("--rate must be > 0")
    requests = args.requests or (16 if args.quick or args.workload == "long" else 64)
    new_tokens = args.new_tokens or (16 if args.quick else {"mixed": 64, "long": 128}.get(args.workload, 32))
    if args.rows:
        rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    elif args.rate:
        rows = ["continuous"]
    elif args.workload == "mixed":
        rows = ["hf_static", "hf_batch", "dynamic", "continuous"]
    elif args.workload == "long":
        rows = ["hf_batch", "continuous"]
    else:
        rows = ["continuous", "continuous_noprefix"]
    unknown = [r for r in rows if r.partition("@")[0] not in LABELS
               or ("@" in r and r.partition("@")[0] not in PIPELINES)]
    if unknown:
        ap.error(f"unknown rows {unknown}; choose from {', '.join(LABELS)}")
    if args.rate and rows != ["continuous"]:
        ap.error("--rate runs the continuous pipeline only (--rows continuous)")
    name = args.name or "throughput" + ("" if args.workload == "mixed" else f"-{args.workload}") \
        + (f"-rate{args.rate:g}" if args.rate else "") + ("-quick" if args.quick else "")

    cfg = {"workload": args.workload, "requests": requests, "new_tokens": new_tokens, "rate": args.rate,
           "seed": args.seed, "threads": args.threads, "hf_batch_size": args.hf_batch_size, "model": args.model}
    prompts = make_prompts(args.workload, requests, args.seed)
    lens = [len(p) for p in prompts]
    results: dict[str, dict] = {}
    for row in rows:
        print(f"[{time.strftime('%H:%M:%S')}] {row} ...", file=sys.stderr, flush=True)
        r = results[row] = run_row(row, cfg)
        print(f"    {fmt(r.get('tok_per_s'), '.1f')} tok/s" if r["ok"] else f"    FAILED: {r['error']}",
              file=sys.stderr, flush=True)

    # ---- derived: summaries, ratio to HF generate_batch, greedy tokens vs a reference row
    base = results.get("hf_batch")
    base_tps = base["tok_per_s"] if base and base["ok"] else None
    ref_name = next((r for r in ("hf_static", "continuous_noprefix", "hf_batch", "dynamic", "continuous")
                     if r in results and results[r]["ok"]), None)
    ref_tokens = results[ref_name]["tokens"] if ref_name else None
    for row, r in results.items():
        r["label"] = label(row)
        if not r["ok"]:
            continue
        r["latency_s"] = dist(r.pop("latency"))
        r["ttft_s"] = dist(r.pop("ttft"))
        r["vs_hf_generate_batch"] = r["tok_per_s"] / base_tps if base_tps else None
        toks = r.pop("tokens")
        if ref_tokens is not None and row != ref_name:
            r["greedy_identical_to"] = ref_name
            r["greedy_identical_requests"] = sum(a == b for a, b in zip(toks, ref_tokens))
    for r in results.values():
        r.pop("tokens", None)
    payload = {"workload": args.workload, "requests": requests, "new_tokens": new_tokens, "rate": args.rate,
               "seed": args.seed, "model": args.model, "quick": args.quick,
               "prompt_tokens": {"min": min(lens), "max": max(lens), "mean": sum(lens) / len(lens),
                                 "total": sum(lens)},
               "token_ids": f"uniform in [{VOCAB_LO}, {VOCAB_HI})",
               "throughput_definition": "generated tokens / seconds from first submit (or first scheduled arrival) "
                                        "to last finish; model load, pipeline build and warm-up excluded",
               "rows": results}
    if args.rate:
        payload["offered_tokens_per_s"] = args.rate * new_tokens
    dyn, cont = results.get("dynamic"), results.get("continuous")
    if dyn and cont and dyn["ok"] and cont["ok"] and cont["kv"]["mean_seq_len_steady"]:
        budget, bpt = cont["kv"]["pool_bytes"], cont["kv"]["bytes_per_token"]
        mml = dyn["kv"]["block_size"]
        payload["kv_capacity_same_budget"] = {
            "budget_bytes": budget, "bytes_per_token": bpt, "max_model_len": mml,
            "contiguous_seqs": budget / (bpt * mml),
            "paged_seqs": budget / (bpt * cont["kv"]["mean_seq_len_steady"]),
            "formula": "contiguous: budget / (bytes_per_token * max_model_len); paged: budget / (bytes_per_token * "
                       "mean sequence length at steady state of the continuous row); budget = the paged pool"}
    out = write(name, payload)
    labels = [label(r) + ("" if results[r]["ok"] else " (failed)") for r in results]
    title = (f"{requests} requests, {new_tokens} new tokens, {args.workload}"
             + (f", {args.rate:g} req/s" if args.rate else ", all at once"))
    bar_chart(name, labels, [r.get("tok_per_s") or 0.0 for r in results.values()], "output tokens / s", title)

    # ---- tables
    print(f"\n{title} (prompts {min(lens)}..{max(lens)} tokens, {args.threads} threads per row)\n")
    print("| row | output tok/s | vs HF generate_batch | latency mean / p50 / p99 (s) | TTFT p50 / p99 (s) "
          "| peak RSS MB | greedy = " + (ref_name or "-") + " |")
    print("|---|---|---|---|---|---|---|")
    for row, r in results.items():
        if not r["ok"]:
            err = r["error"][:200].replace("|", "/").replace("\n", " ")
            print(f"| {r['label']} | error: {err} | | | | {r['peak_rss_mb']:.0f} | |")
            continue
        lat, tt = r["latency_s"], r["ttft_s"]
        same = (f"{r['greedy_identical_requests']}/{requests}" if "greedy_identical_requests" in r
                else "ref" if row == ref_name else "-")
        ratio = fmt(r["vs_hf_generate_batch"], ".2f") + ("x" if base_tps else "")
        print(f"| {r['label']} | {r['tok_per_s']:.1f} | {ratio} | "
              f"{lat['mean']:.2f} / {lat['p50']:.2f} / {lat['p99']:.2f} | {tt['p50']:.2f} / {tt['p99']:.2f} | "
              f"{r['peak_rss_mb']:.0f} | {same} |")
    tm = [(row, r) for row, r in results.items() if r["ok"] and "kv" in r]
    if tm:
        print("\n| tokenmill row | KV unused slots (steady) | peak used blocks | mean seq len (steady) "
              "| max concurrent seqs in its pool (by mean length / by blocks in use) | prefix hit rate | mean TTFT (s) "
              "| prefill forward (s) |")
        print("|---|---|---|---|---|---|---|---|")
        for row, r in tm:
            kv = r["kv"]
            unused = ("n/a (shared blocks)" if "unused_slot_fraction_note" in kv
                      else fmt(kv["unused_slot_fraction_steady"], ".1%"))
            fits = fmt(kv["max_concurrent_seqs"], ".0f")
            if "max_concurrent_seqs_by_blocks" in kv:
                fits += " / " + fmt(kv["max_concurrent_seqs_by_blocks"], ".0f")
            print(f"| {r['label']} | {unused} | {kv['peak_used_blocks']} "
                  f"(of {kv['num_blocks']} x {kv['block_size']}) | {fmt(kv['mean_seq_len_steady'], '.0f')} | "
                  f"{fits} | {fmt(r.get('prefix_hit_rate'), '.1%', '-')} | "
                  f"{r['ttft_s']['mean']:.2f} | {r['prefill_forward_s']:.2f} |")
    if "kv_capacity_same_budget" in payload:
        c = payload["kv_capacity_same_budget"]
        print(f"\nIn the same {c['budget_bytes'] / 2**30:.2f} GiB: contiguous rows of {c['max_model_len']} tokens fit "
              f"{c['contiguous_seqs']:.0f} sequences, paged blocks fit {c['paged_seqs']:.0f} sequences of the "
              "steady-state mean length.")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
