"""Tensor parallelism (gloo, two ranks of one thread): the same greedy tokens and logits as one rank, with
continuous batching + paged KV, int8 and a speculative drafter; uneven head splits; each rank's share of the
weights; refusals; and a dead rank failing its requests and the server, leaving no process behind."""
from __future__ import annotations

import os
import signal

import httpx
import psutil
import pytest
import torch

from tests.conftest import make_tiny_model, tiny_pipeline_dict
from tests.serve.helpers import cli_server, wait_until
from tokenmill import Pipeline, SamplingParams
from tokenmill.errors import PipelineError
from tokenmill.plugin import Plugin, hookimpl

PROMPTS = ["The capital of France is", "def add(a, b):", "Once upon a time", "x y z x y z x y"]
PAGED = [{"continuous_batching": {}}, {"paged_kv": {"block_size": 4, "num_blocks": 256, "prefix_caching": True}}]
INT8 = {"int8": {"lm_head": True, "embed_tokens": True, "compute_dtype": "float32"}}  # bf16 partial sums differ
CASES = {"paged": PAGED, "int8": PAGED + [INT8],
         "prompt_lookup": PAGED + [{"prompt_lookup": {"num_speculative_tokens": 3, "min_ngram": 1}}]}


@pytest.fixture(autouse=True)
def _keep_threads():  # ``threads: 1`` sets the whole process's thread count: give the suite its own back
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


class Rows(Plugin):
    """Records the logits row of every request's next token (driver side)."""

    name = "rows"

    def __init__(self) -> None:
        super().__init__(None)
        self.rows: dict[tuple[str, int], torch.Tensor] = {}

    @hookimpl(tryfirst=True)
    def process_logits(self, batch) -> None:
        for i, seq in enumerate(batch.seqs):
            self.rows[(seq.request_id, seq.num_output_tokens)] = batch.logits[batch.row_start[i]].clone()


def run(model_dir, plugins, tp: int, **params):
    pipe = Pipeline.from_dict(tiny_pipeline_dict(model_dir, plugins=plugins, threads=1,
                                                 parallel={"tensor_parallel_size": tp}), progress=False)
    try:
        rows = Rows()
        pipe.pm.register(rows, name="rows")
        outs = pipe.generate(PROMPTS, [SamplingParams(max_tokens=24, ignore_eos=True, **params)] * len(PROMPTS))
        return outs, rows.rows, pipe.info()
    finally:
        pipe.close()


@pytest.fixture(scope="module")
def uneven_dir(tmp_path_factory, tokenizer):  # 3 KV heads over 2 ranks: 2 + 1, with q/k/v biases (Qwen 2)
    return make_tiny_model("qwen2", tmp_path_factory.mktemp("tp-uneven"), tokenizer, num_attention_heads=6,
                           num_key_value_heads=3, hidden_size=96, intermediate_size=160)


def children() -> set[int]:
    return {p.pid for p in psutil.Process().children(recursive=True)}


@pytest.mark.parametrize("case", list(CASES))
def test_two_ranks_give_one_ranks_tokens_and_logits(tiny_llama_dir, case):
    before = children()
    ref, ref_rows, _ = run(tiny_llama_dir, CASES[case], 1)
    outs, rows, info = run(tiny_llama_dir, CASES[case], 2)
    assert [o.token_ids for o in outs] == [o.token_ids for o in ref]
    assert rows.keys() == ref_rows.keys()
    assert max(float((rows[k] - ref_rows[k]).abs().max()) for k in rows) <= 1e-3
    one = info["tensor_parallel"]["weight_bytes_per_rank"]
    assert len(one) == 2 and all(b > 0 for b in one)
    assert children() == before  # the worker rank is gone after close


def test_uneven_head_split_and_weight_shares(uneven_dir):
    ref, ref_rows, ref_info = run(uneven_dir, PAGED, 1, temperature=0.8, seed=3)
    outs, rows, info = run(uneven_dir, PAGED, 2, temperature=0.8, seed=3)
    assert [o.token_ids for o in outs] == [o.token_ids for o in ref]
    assert max(float((rows[k] - ref_rows[k]).abs().max()) for k in rows) <= 1e-3
    shares = [b / ref_info["weight_bytes"] for b in info["tensor_parallel"]["weight_bytes_per_rank"]]
    assert all(s <= 0.55 for s in shares) and 0.99 <= sum(shares) <= 1.01, shares


def test_bad_parallel_settings_are_refused(tiny_llama_dir, tokenizer, tmp_path):
    before = children()
    with pytest.raises(PipelineError, match="tensor_parallel_size must be an integer >= 1, got 0"):
        Pipeline.from_dict(tiny_pipeline_dict(tiny_llama_dir, parallel={"tensor_parallel_size": 0}))
    with pytest.raises(PipelineError, match="'compile' cannot be enabled with parallel.tensor_parallel_size > 1"):
        Pipeline.from_dict(tiny_pipeline_dict(tiny_llama_dir, parallel={"tensor_parallel_size": 2},
                                              compile={"enabled": True}))
    with pytest.raises(ValueError, match="tensor_parallel_size 3 is more than the model's 2 KV heads; allowed: 1 to 2"):
        Pipeline.from_dict(tiny_pipeline_dict(tiny_llama_dir, threads=1, parallel={"tensor_parallel_size": 3}),
                           progress=False)
    assert children() == before  # refused before any rank started
    with pytest.raises(ValueError, match="tensor parallelism cannot split q_proj .*Int4"):
        Pipeline.from_dict(tiny_pipeline_dict(tiny_llama_dir, threads=1, plugins=[{"int4": {}}],
                                              parallel={"tensor_parallel_size": 2}), progress=False)
    with pytest.raises(PipelineError, match="the self-draft 'self_int8' cannot run with tensor_parallel_size 2"):
        Pipeline.from_dict(tiny_pipeline_dict(tiny_llama_dir, threads=1, plugins=[{"speculative": {
            "draft": "self_int8"}}], parallel={"tensor_parallel_size": 2}), progress=False)
    assert children() == before  # the ranks started for the refused builds are gone


def _worker_pids(parent: int) -> list[int]:
    return [p.pid for p in psutil.Process(parent).children(recursive=True)
            if "tokenmill.parallel.worker" in " ".join(p.cmdline())]


def test_a_dead_rank_fails_its_request_and_the_pipeline(tiny_llama_dir):
    pipe = Pipeline.from_dict(tiny_pipeline_dict(tiny_llama_dir, plugins=PAGED, threads=1,
                                                 parallel={"tensor_parallel_size": 2}), progress=False)
    try:
        assert pipe.generate("hello", SamplingParams(max_tokens=4))[0].finish_reason == "length"
        (pid,) = _worker_pids(os.getpid())
        os.kill(pid, signal.SIGKILL)
        wait_until(lambda: pipe.runner.fatal, timeout=10, interval=0.02, what="the watcher to see the rank die")
        out = pipe.generate("hello again", SamplingParams(max_tokens=4))[0]
        assert out.finish_reason == "error"
        assert f"tensor-parallel rank 1 (pid {pid}) died (killed by signal 9)" in out.error, out.error
        assert pipe.runner.fatal and not pipe.engine.has_unfinished()
    finally:
        pipe.close()


def _serve(model_dir, tmp_path):
    yaml = tmp_path / "tp.yaml"
    yaml.write_text(f"name: tp-cli\nmodel: {model_dir}\nthreads: 1\nparallel: {{tensor_parallel_size: 2}}\n"
                    "limits: {max_model_len: 512, max_num_seqs: 4, max_num_batched_tokens: 512}\n")
    return cli_server(yaml, timeout=120)


def test_killing_a_rank_of_the_cli_server_fails_the_request_and_exits(tiny_llama_dir, tmp_path):
    proc, base = _serve(tiny_llama_dir, tmp_path)
    try:
        (worker,) = _worker_pids(proc.pid)
        with httpx.Client(base_url=base, timeout=60) as c, \
                c.stream("POST", "/v1/generate", json={"prompt": "hi", "max_tokens": 400, "ignore_eos": True,
                                                        "stream": True}) as s:
            lines = s.iter_lines()
            next(lines)
            os.kill(worker, signal.SIGKILL)
            body = "\n".join(lines)
        assert "tensor-parallel rank 1" in body and "died" in body, body
        assert proc.wait(timeout=30) != 0
        out = proc.stdout.read()
        assert "tensor-parallel rank 1" in out, out
        assert not psutil.pid_exists(worker) or psutil.Process(worker).status() == psutil.STATUS_ZOMBIE
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_sigterm_stops_the_cli_server_and_its_ranks(tiny_llama_dir, tmp_path):
    proc, base = _serve(tiny_llama_dir, tmp_path)
    try:
        (worker,) = _worker_pids(proc.pid)
        r = httpx.post(base + "/v1/generate", json={"prompt": "hi", "max_tokens": 8}, timeout=60)
        assert r.status_code == 200, r.text
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0, proc.stdout.read()
        assert not psutil.pid_exists(worker) or psutil.Process(worker).status() == psutil.STATUS_ZOMBIE
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
