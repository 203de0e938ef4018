"""The CPU fp32 GEMM dispatch (engine/cpu_gemm.py): every path equals F.linear to fp32 rounding."""
import pytest
import torch
import torch.nn.functional as F

from tokenmill.model.kernels.cpu_gemm import SKINNY_MAX_ROWS, CpuLinear


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
