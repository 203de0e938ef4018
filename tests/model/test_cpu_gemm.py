"""The CPU fp32 GEMM dispatch (engine/cpu_gemm.py): every path equals F.linear to fp32 rounding."""
import pytest
import torch
import torch.nn.functional as F

from tokenmill.model.kernels.cpu_gemm import CHOICES, SKINNY_MAX_ROWS, CpuLinear


@pytest.mark.parametrize("onednn", [True, False])
def test_every_row_count_matches_f_linear(onednn):
    lin = CpuLinear(onednn=onednn)
    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(97, 40, generator=g), torch.randn(97, generator=g)
    for m in (1, 2, 3, SKINNY_MAX_ROWS, SKINNY_MAX_ROWS + 1, 17, 64, 65, 300):
        x = torch.randn(m, 40, generator=g)
        for bias in (None, b):
            with torch.inference_mode():
                out = lin(x, w, bias)
            assert out.shape == (m, 97) and out.is_contiguous() and out.dtype == torch.float32
            torch.testing.assert_close(out, F.linear(x, w, bias), rtol=1e-5, atol=1e-5)


def test_weight_views_and_empty_input():
    """Fused q/k/v weights are row slices of one matrix; zero rows (an empty step) still work."""
    lin = CpuLinear()
    g = torch.Generator().manual_seed(1)
    fused = torch.randn(120, 32, generator=g)
    w = fused[40:80]
    for m in (0, 1, 9):
        x = torch.randn(m, 32, generator=g)
        with torch.inference_mode():
            torch.testing.assert_close(lin(x, w, None), F.linear(x, w), rtol=1e-5, atol=1e-5)


def test_onednn_found_when_this_build_has_it():
    """Guard against silently losing the fast path: a CPU build with oneDNN must pick it."""
    lin = CpuLinear()
    expected = "onednn" if torch.backends.mkldnn.is_available() else "mkl"
    assert lin.backend == expected
    assert CpuLinear(onednn=False).backend == "mkl"


@pytest.mark.parametrize("fast", list(CHOICES))
def test_the_runner_keeps_the_fastest_small_row_path(tiny_llama_dir, monkeypatch, fast):
    """tune_cpu_gemm times whole decode steps on every small-row path and keeps the fastest; greedy output is
    the same either way. The clock is faked: each step through a slow path reads 3 ticks instead of 1."""
    from tests.conftest import tiny_pipeline_dict
    from tokenmill import Pipeline, SamplingParams
    from tokenmill.model import runner as runner_mod

    if not torch.backends.mkldnn.is_available():
        pytest.skip("no oneDNN in this build: nothing to choose")
    pipe = Pipeline.from_dict(tiny_pipeline_dict(tiny_llama_dir), progress=False)
    runner, cpu = pipe.runner, pipe.runner.arch.linear.cpu
    ref = pipe.generate(["hello world"], SamplingParams(max_tokens=8, ignore_eos=True))[0].token_ids
    clock = [0.0]

    def fake_clock():
        clock[0] += 1.0 if (cpu.skinny_max_rows, cpu.pad_rows) == CHOICES[fast] else 3.0
        return clock[0]

    monkeypatch.setattr(runner_mod.time, "perf_counter", fake_clock)
    assert runner.tune_cpu_gemm() == fast
    assert (cpu.skinny_max_rows, cpu.pad_rows) == CHOICES[fast]
    monkeypatch.undo()
    assert pipe.info()["cpu_gemm"] == runner.cpu_gemm
    assert pipe.generate(["hello world"], SamplingParams(max_tokens=8, ignore_eos=True))[0].token_ids == ref


def test_the_runner_finds_up_to_how_many_rows_the_skinny_path_wins(tiny_llama_dir, monkeypatch):
    """After the one-row choice, tune_cpu_gemm times steps of 2, 3, ... rows both ways and keeps ``W @ x^T`` only
    up to the last row count where it was faster. The clock is faked: a step of 1-2 rows reads 1 tick through
    ``W @ x^T`` and 3 through oneDNN, a longer one the other way round."""
    from tests.conftest import tiny_pipeline_dict
    from tokenmill import Pipeline, SamplingParams
    from tokenmill.model import runner as runner_mod

    if not torch.backends.mkldnn.is_available():
        pytest.skip("no oneDNN in this build: nothing to choose")
    pipe = Pipeline.from_dict(dict(tiny_pipeline_dict(tiny_llama_dir), cpu_gemm="packed"), progress=False)
    runner, cpu = pipe.runner, pipe.runner.arch.linear.cpu
    ref = pipe.generate(["hello world"], SamplingParams(max_tokens=8, ignore_eos=True))[0].token_ids
    rows, clock = [1], [0.0]
    run = runner.run

    def counting_run(items, **kw):
        rows[0] = sum(len(item[0]) for item in items)
        return run(items, **kw)

    def fake_clock():
        skinny = 0 < rows[0] <= cpu.skinny_max_rows
        one_row_fast = (cpu.skinny_max_rows, cpu.pad_rows) == CHOICES["skinny"]
        clock[0] += (1.0 if one_row_fast else 3.0) if rows[0] == 1 else \
            1.0 if skinny == (rows[0] <= 2) else 3.0
        return clock[0]

    monkeypatch.setattr(runner, "run", counting_run)
    monkeypatch.setattr(runner_mod.time, "perf_counter", fake_clock)
    assert runner.tune_cpu_gemm() == "skinny"
    monkeypatch.undo()
    assert runner.cpu_gemm_skinny_rows == cpu.skinny_max_rows == 2
    assert pipe.info()["cpu_gemm_skinny_rows"] == 2
    assert pipe.generate(["hello world"], SamplingParams(max_tokens=8, ignore_eos=True))[0].token_ids == ref


def test_compiled_gemv_is_the_one_row_path_of_a_compiled_step_only():
    """Traced by torch.compile, one row becomes a product and a sum (any weight dtype; int8 codes are the caller's
    to scale) equal to F.linear; eagerly, or for more rows, it leaves the call to the caller's kernel."""
    from tokenmill.model.kernels.cpu_gemm import compiled_gemv

    g = torch.Generator().manual_seed(2)
    w, x = torch.randn(48, 64, generator=g), torch.randn(1, 64, generator=g)
    assert compiled_gemv(x, w) is None and compiled_gemv(torch.randn(2, 64), w) is None
    codes = torch.randint(-127, 128, (48, 64), generator=g, dtype=torch.int8)
    fn = torch.compile(lambda x, w: compiled_gemv(x, w, bf16_pairs=True), dynamic=False, fullgraph=True)
    widen = torch.compile(lambda x, w: compiled_gemv(x, w), dynamic=False, fullgraph=True)
    with torch.inference_mode():
        torch.testing.assert_close(fn(x, w), F.linear(x, w), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(fn(x.bfloat16(), w.bfloat16()), F.linear(x.bfloat16(), w.bfloat16()).float(),
                                   rtol=2e-2, atol=2e-2)
        torch.testing.assert_close(fn(x, codes), F.linear(x, codes.float()), rtol=1e-5, atol=1e-4)
        # bf16 read as int32 pairs: exact products of the bf16 weights, summed in float32
        wb = w.bfloat16()
        torch.testing.assert_close(fn(x, wb), F.linear(x, wb.float()), rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(widen(x, wb), F.linear(x, wb.float()), rtol=1e-5, atol=1e-4)
        sliced = wb[:, 2:]  # not contiguous: the widening path
        torch.testing.assert_close(fn(x[:, 2:], sliced), F.linear(x[:, 2:], sliced.float()), rtol=1e-5, atol=1e-4)
        odd = torch.randn(48, 63, generator=g).bfloat16()  # an odd row length takes the widening path
        torch.testing.assert_close(fn(x[:, :63], odd), F.linear(x[:, :63], odd.float()), rtol=1e-5, atol=1e-4)


def test_packed_weights_give_the_plain_weights_values():
    """A weight in oneDNN's layout (cpu_gemm: packed) gives bit for bit the plain weight's oneDNN result at every
    row count above the small-row path (below it the plain weight is read)."""
    lin = CpuLinear()
    if lin.onednn is None:
        pytest.skip("no oneDNN in this build")
    g = torch.Generator().manual_seed(3)
    w, b = torch.randn(97, 40, generator=g), torch.randn(97, generator=g)
    packed = lin.pack(w)
    for m in (1, SKINNY_MAX_ROWS, SKINNY_MAX_ROWS + 1, 17, 64, 300):
        x = torch.randn(m, 40, generator=g)
        for bias in (None, b):
            with torch.inference_mode():
                assert torch.equal(lin(x, w, bias, packed), lin(x, w, bias))


def test_packed_pipeline_matches_hf_and_reports_its_bytes(tiny_llama_dir):
    """``cpu_gemm: packed`` keeps every plain projection also in oneDNN's layout: a batch of many rows reads it,
    greedy output stays HF's, and the added bytes are reported; a bad value is refused with the allowed ones."""
    from transformers import AutoModelForCausalLM

    from tests.conftest import tiny_pipeline_dict
    from tests.engine.test_hf_equality import hf_greedy
    from tokenmill import Pipeline, SamplingParams
    from tokenmill.errors import PipelineError

    if not torch.backends.mkldnn.is_available():
        pytest.skip("no oneDNN in this build")
    pipe = Pipeline.from_dict(tiny_pipeline_dict(tiny_llama_dir, cpu_gemm="packed"), progress=False)
    linear = pipe.runner.arch.linear
    assert len(linear.packed) == linear.plain > 0
    assert pipe.info()["packed_weight_bytes"] == pipe.runner.packed_weight_bytes > 0
    reads = []
    real = linear.cpu.onednn
    linear.cpu.onednn = lambda x, w, *a: reads.append(any(w is p for p in linear.packed.values())) or real(x, w, *a)
    prompts = ["hello world", "the quick brown fox jumps over", "one two three four five six seven"]
    outs = pipe.generate(prompts, SamplingParams(max_tokens=8, ignore_eos=True))
    assert reads and all(reads)  # the prompts' prefill rows went through the packed copies
    hf = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    for p, o in zip(prompts, outs):
        assert o.token_ids == hf_greedy(hf, pipe.encode(p), 8), p
    assert Pipeline.from_dict(tiny_pipeline_dict(tiny_llama_dir), progress=False).info()["packed_weight_bytes"] == 0
    with pytest.raises(PipelineError, match="'cpu_gemm' must be auto | packed; got 'fast'"):
        Pipeline.from_dict(tiny_pipeline_dict(tiny_llama_dir, cpu_gemm="fast"), progress=False)


def test_bf16_pairs_are_asked_for_on_one_thread_only():
    """The model layer reads bf16 weights as int32 pairs where that was measured to pay (a step built to run on one
    thread; at two the weights stream at the memory's rate either way and the split inputs cost more)."""
    from tokenmill.model.archs.base import Linear

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert Linear(False).bf16_pairs
        torch.set_num_threads(2)
        assert not Linear(False).bf16_pairs
    finally:
        torch.set_num_threads(before)
