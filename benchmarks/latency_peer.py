"""Batch-1 decode and prefill at each bit width, tokenmill against llama.cpp, same model, same threads, one run.

    python benchmarks/latency.py --peer llama.cpp [--threads 1,2] [--new-tokens 128] [--prefill-tokens 1000]
        [--compile] [--bits 8-bit,4-bit]

Rows (each in its own process, so thread settings and peak RSS are the row's own):

=========  ====================================================  ========================================
bits       tokenmill                                             llama.cpp (GGUF made from the same file)
=========  ====================================================  ========================================
fp32       ``pipelines/default.yaml``                            F32
bf16       ``default.yaml`` with ``dtype: bfloat16``             BF16
8-bit      ``pipelines/int8.yaml``, ``pipelines/int8-a8.yaml``   Q8_0
4-bit      ``pipelines/int4.yaml``, ``pipelines/gguf.yaml``      Q4_0, Q4_1 (the shipped file)
=========  ====================================================  ========================================

With ``--compile`` every tokenmill row runs a second time with its batch-1 decode step compiled
(``compile: {enabled: true, buckets: [1]}``); compiling happens at build and is cached across runs.
``int8-a8.yaml`` (int8 activations, which only a compiled step multiplies as integers) runs compiled only.
``--bits`` keeps the rows of the bit widths named.
Decode tok/s counts the tokens after the first one over the time after it (the prompt's processing left
out, on both engines); prefill tok/s is a ``--prefill-tokens`` prompt's processing up to the first token.
The fp32 and bf16 rows also run HF ``generate()`` in the same dtype and record whether the greedy tokens are
identical. Writes results/<name>.json and .png (tok/s per bit width, both engines) and prints the table.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, hf_generate_greedy, machine, run_child, write, write_child_result  # noqa: E402

PROMPT = "Write a short essay about the history of the printing press and its effect on science."
TOKENMILL_ROWS = [  # (bits, label, pipeline, dtype override, eager row too)
    ("fp32", "tokenmill fp32", "pipelines/default.yaml", None, True),
    ("bf16", "tokenmill bf16", "pipelines/default.yaml", "bfloat16", True),
    ("8-bit", "tokenmill int8", "pipelines/int8.yaml", None, True),
    ("8-bit", "tokenmill int8 W8A8", "pipelines/int8-a8.yaml", None, False),  # integer products only compiled
    ("4-bit", "tokenmill int4", "pipelines/int4.yaml", None, True),
    ("4-bit", "tokenmill gguf Q4_1", "pipelines/gguf.yaml", None, True),
]
PEER_ROWS = [("fp32", "F32"), ("bf16", "BF16"), ("8-bit", "Q8_0"), ("4-bit", "Q4_0"), ("4-bit", "Q4_1")]


def long_prompt(tokenizer, n: int) -> list[int]:
    """``n`` token ids of English prose-like text (Python's own documentation topics, as the perplexity eval)."""
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[k] for k in sorted(topics))
    return tokenizer(text[: n * 8])["input_ids"][:n]


# ------------------------------------------------------------------------------------------- the rows
def tokenmill_row(cfg: dict) -> dict:
    import torch

    from tokenmill import Pipeline, SamplingParams, load_spec

    torch.set_num_threads(cfg["threads"])
    spec = load_spec(ROOT / cfg["pipeline"])
    spec.threads = cfg["threads"]
    if cfg["dtype"]:
        spec.dtype = cfg["dtype"]
    if cfg.get("compile"):  # the batch-1 decode step compiled (the only bucket a batch-1 run meets)
        spec.compile.enabled = True
        spec.compile.buckets = [1]
    t0 = time.perf_counter()
    pipe = Pipeline(spec, progress=False)
    pipe.wait_ready()
    build_s = time.perf_counter() - t0
    ids = pipe.encode(PROMPT, chat=True)
    n = cfg["new_tokens"]
    params = SamplingParams(max_tokens=n, ignore_eos=True)

    def decode():
        t_first = None
        for chunk in pipe.stream(ids, params):
            if t_first is None and chunk.token_ids:
                t_first = time.perf_counter()
            if chunk.finished:
                return chunk.output.token_ids, (n - 1) / (time.perf_counter() - t_first)

    long_ids = long_prompt(pipe.tokenizer, cfg["prefill_tokens"])

    def prefill():
        pipe.clear_prefix_cache()
        t = time.perf_counter()
        pipe.generate([long_ids], SamplingParams(max_tokens=1, ignore_eos=True))
        return len(long_ids) / (time.perf_counter() - t)

    decode()  # warm-up (compiled rows compile here if the build did not)
    prefill()
    toks, best = None, 0.0
    for _ in range(cfg["repeats"]):
        toks, rate = decode()
        best = max(best, rate)
    pre = max(prefill() for _ in range(cfg["repeats"]))
    row = {"decode_tok_s": best, "prefill_tok_s": pre, "build_s": build_s, "tokens": toks,
           "weight_bytes": pipe.info()["weight_bytes"], "cpu_gemm": pipe.info().get("cpu_gemm")}
    if cfg["bits"] in ("fp32", "bf16"):
        from transformers import AutoModelForCausalLM

        hf = AutoModelForCausalLM.from_pretrained(pipe.loaded.path, dtype=pipe.loaded.dtype).eval()
        row["identical_to_hf"] = hf_generate_greedy(hf, ids, n)[0] == toks
    return row


def llamacpp_row(cfg: dict) -> dict:
    import llamacpp_peer
    from transformers import AutoTokenizer

    from tokenmill.model.resolve import resolve_model

    tok = AutoTokenizer.from_pretrained(resolve_model("smollm2-135m-instruct", progress=False)[0])
    text = tok.apply_chat_template([{"role": "user", "content": PROMPT}], tokenize=False, add_generation_prompt=True)
    ids = tok.encode(text, add_special_tokens=False)  # as Pipeline.encode(chat=True) makes them
    dec = llamacpp_peer.run(Path(cfg["gguf"]), ids, cfg["new_tokens"], cfg["threads"], cfg["repeats"])
    pre = llamacpp_peer.run(Path(cfg["gguf"]), long_prompt(tok, cfg["prefill_tokens"]), 0, cfg["threads"],
                            cfg["repeats"])
    return {"decode_tok_s": dec["decode_tok_s"], "prefill_tok_s": pre["prompt_tok_s"], "tokens": dec["tokens"],
            "file_bytes": Path(cfg["gguf"]).stat().st_size}


# ------------------------------------------------------------------------------------------- the run
def plot(name: str, rows: list[dict], threads: list[int]) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from matplotlib.patches import Patch

    bits = [b for b in ("fp32", "bf16", "8-bit", "4-bit") if any(r["bits"] == b for r in rows)]
    fig, axes = plt.subplots(1, len(threads), figsize=(6 * len(threads), 5), squeeze=False)
    for ax, t in zip(axes[0], threads):  # a bar per row, grouped by bit width
        x, ticks = 0.0, []
        for b in bits:
            for r in (r for r in rows if r.get("ok") and r["threads"] == t and r["bits"] == b):
                bar = ax.bar(x, r["decode_tok_s"], width=0.8, color="C1" if r["engine"] == "llama.cpp" else "C0")
                ax.bar_label(bar, fmt="%.0f", fontsize=7)
                ticks.append((x, f"{b}: {r['label'].removeprefix('tokenmill ')}"))
                x += 1
            x += 0.6
        ax.set_xticks([p for p, _ in ticks], [lab for _, lab in ticks], rotation=60, ha="right", fontsize=7)
        ax.set_title(f"batch-1 decode, {t} thread{'s' if t > 1 else ''}")
        ax.set_ylabel("tokens / s")
        ax.legend(handles=[Patch(color="C0", label="tokenmill"), Patch(color="C1", label="llama.cpp")])
    fig.tight_layout()
    path = RESULTS / f"{name}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(args) -> None:
    import llamacpp_peer

    from tokenmill.model.resolve import ALIASES, cache_dir, find_alias_gguf

    if not llamacpp_peer.available():
        sys.exit("--peer llama.cpp needs llama-cpp-python: pip install llama-cpp-python==0.3.36 (builds llama.cpp "
                 "from source, 5-15 min)")
    src = find_alias_gguf(ALIASES["smollm2-135m-instruct"])
    ggufs = {kind: llamacpp_peer.make_gguf(src, kind, cache_dir() / "llamacpp") for _, kind in PEER_ROWS}
    common = {"new_tokens": args.new_tokens, "prefill_tokens": args.prefill_tokens, "repeats": args.repeats}
    threads = [int(t) for t in args.threads.split(",")]
    bits = args.bits.split(",") if args.bits else None
    ours = [r for r in TOKENMILL_ROWS if bits is None or r[0] in bits]
    rows = []
    for t in threads:
        plan = [dict(common, engine="tokenmill", bits=b, label=lab, pipeline=p, dtype=d, threads=t)
                for b, lab, p, d, eager in ours if eager]
        if args.compile:
            plan += [dict(common, engine="tokenmill", bits=b, label=lab + " compiled", pipeline=p, dtype=d, threads=t,
                          compile=True) for b, lab, p, d, _ in ours]
        plan += [dict(common, engine="llama.cpp", bits=b, label=f"llama.cpp {k}", gguf=str(ggufs[k]), threads=t)
                 for b, k in PEER_ROWS if bits is None or b in bits]
        for cfg in plan:
            res = run_child(__file__, "row", json.dumps(cfg), ROOT)
            rows.append({**cfg, **res, "threads": t})  # (the row's torch threads are in the child's result too)
            print(f"{cfg['label']} ({t}t): " + (f"decode {res['decode_tok_s']:.1f} tok/s, prefill "
                                                  f"{res['prefill_tok_s']:.0f} tok/s" if res["ok"] else res["error"]),
                  file=sys.stderr, flush=True)
    peers = {(r["bits"], r["threads"]): r for r in rows if r["engine"] == "llama.cpp" and r.get("ok")
             and r["label"] != "llama.cpp Q4_1"}
    q41 = {r["threads"]: r for r in rows if r["label"] == "llama.cpp Q4_1" and r.get("ok")}
    for r in rows:
        peer = (q41 if "Q4_1" in r["label"] else {}).get(r["threads"]) or peers.get((r["bits"], r["threads"]))
        if r["engine"] == "tokenmill" and r.get("ok") and peer:
            r["peer"] = peer["label"]
            r["decode_vs_peer"] = r["decode_tok_s"] / peer["decode_tok_s"]
            r["prefill_vs_peer"] = r["prefill_tok_s"] / peer["prefill_tok_s"]
    out = write(args.name, {"rows": rows, **common})
    plot(args.name, rows, threads)
    print(f"{machine()['cpu']}\n\n| bits | threads | row | decode tok/s | vs llama.cpp | prefill tok/s | vs llama.cpp "
          f"| identical to HF |\n|---|---|---|---|---|---|---|---|")
    for r in rows:
        if not r.get("ok"):
            print(f"| {r['bits']} | {r['threads']} | {r['label']} | error: {r['error'][:80]} | | | | |")
            continue
        vs = (f"{r['decode_vs_peer']:.2f}x ({r['peer'].removeprefix('llama.cpp ')})", f"{r['prefill_vs_peer']:.2f}x") \
            if "peer" in r else ("", "")
        print(f"| {r['bits']} | {r['threads']} | {r['label']} | {r['decode_tok_s']:.1f} | {vs[0]} | "
              f"{r['prefill_tok_s']:.0f} | {vs[1]} | {r.get('identical_to_hf', '')} |")
    print(f"wrote {out}")


def child(args) -> None:
    cfg = json.loads(args.child_config)
    write_child_result(args.child_out, lambda: (tokenmill_row if cfg["engine"] == "tokenmill" else llamacpp_row)(cfg))


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--child")
    ap.add_argument("--child-config")
    ap.add_argument("--child-out")
    a = ap.parse_args()
    child(a)
