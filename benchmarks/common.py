"""Shared helpers for benchmarks: timing, RSS, JSON + PNG output, HF baselines."""
from __future__ import annotations

import json
import os
import platform
import resource
import time
from pathlib import Path

import torch

RESULTS = Path(os.environ.get("TOKENMILL_BENCH_OUT", "results"))


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cpu_model() -> str:
    """The CPU's model name and the SIMD extensions torch's CPU kernels care about (speeds differ by CPU)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or "?"
    name = next((ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith("model name")), "?")
    flags = next((ln.split(":", 1)[1].split() for ln in text.splitlines() if ln.startswith("flags")), [])
    simd = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8") if f in flags]
    return f"{name} ({', '.join(simd) or 'no AVX2'})"


def machine() -> dict:
    return {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "cpu": cpu_model(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def hf_generate_greedy(model, ids: list[int], n: int, **kw) -> tuple[list[int], float]:
    """HF eager greedy generate of exactly ``n`` new tokens (EOS disabled); returns tokens and seconds."""
    model.generation_config.eos_token_id = None
    x = torch.tensor([ids], device=model.device)
    t0 = time.perf_counter()
    out = model.generate(x, max_new_tokens=n, do_sample=False, pad_token_id=0, **kw)
    dt = time.perf_counter() - t0
    assert out.shape[1] == len(ids) + n
    return out[0, len(ids):].tolist(), dt


def write(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    payload = dict(payload, machine=machine(), timestamp=time.strftime("%Y-%m-%dT%H:%M:%S"))
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2))
    return path


def bar_chart(name: str, labels: list[str], values: list[float], ylabel: str, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(5, 1.4 * len(labels)), 3.6))
    bars = ax.bar(labels, values, color="#4a7ab8")
    ax.bar_label(bars, fmt="%.1f")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    plt.xticks(rotation=15, ha="right")
    fig.tight_layout()
    path = RESULTS / f"{name}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------- row processes
def run_child(script: str, row: str, config: str, cwd: Path) -> dict:
    """Run ``script --child ROW --child-config CONFIG --child-out FILE`` in a fresh process (so peak RSS is the
    row's own) and return the JSON it wrote, or an error row with the end of its stderr; adds ``process_s``."""
    import subprocess
    import sys
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "row.json"
        env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, script, "--child", row, "--child-config", config,
                               "--child-out", str(out)], cwd=cwd, env=env, capture_output=True, text=True)
        took = time.perf_counter() - t0
        if out.exists():
            res = json.loads(out.read_text())
        else:
            res = {"ok": False, "error": f"child exited with {proc.returncode}: {proc.stderr.strip()[-400:]}"}
        if not res["ok"]:
            sys.stderr.write(proc.stderr[-3000:])
    res["process_s"] = took
    return res


def write_child_result(out_path: str, compute) -> None:
    """In a row's process: ``compute()`` (a dict) marked ``ok``, or the exception recorded as the row's error
    (shown in the table instead of a number), plus peak RSS and torch threads, written as JSON."""
    try:
        res = dict(compute(), ok=True)
    except Exception as exc:
        import traceback

        traceback.print_exc()
        res = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
    res["peak_rss_mb"] = peak_rss_mb()
    res["threads"] = torch.get_num_threads()
    Path(out_path).write_text(json.dumps(res))
