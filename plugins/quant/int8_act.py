"""int8 activations for the int8 weights (``int8: {activations: int8}``): W8A8 one-row products on AVX512-VNNI.

A one-row product over int8 weights in float (what a compiled decode step runs otherwise) widens every code to
float32 before the multiply; llama.cpp's Q8_0 instead quantizes the activations to int8 too and multiplies
integers (``vpdpbusd``). PyTorch reaches the same instruction through oneDNN's quantized linear
(``onednn::qlinear_pointwise``, u8 activations x s8 weights), which inductor lowers, with ``freezing`` and its
CPU GEMM template (``max_autotune_gemm``), to a VNNI micro-kernel inside the compiled step. One model's worth of
the default model's decode projections, 1 thread, AMD EPYC: 4.3 ms against 9.3 ms for the float reduction.

Per-row activation scales lose more than llama.cpp's per-32 blocks (the kernel takes one activation scale), so
two measured corrections are calibrated at build from ~2,000 tokens of text and six chat requests (the plugin's
``calibrate``):

* SmoothQuant's migration: a per-input-channel factor ``f = amax_x**a / amax_w**(1-a)`` divides the activation
  and multiplies the weight's column before the weight is quantized (``smooth_alpha``, ``a``);
* the ``outlier_channels`` input channels with the largest smoothed activations enter the int8 product as up to
  :data:`MAX_SPLIT` copies, each carrying a share of the value, so the row's scale follows the quieter channels.

Perplexity of the default model (``tokenmill eval perplexity``, 4,096 tokens): float32 11.7285, int8 weights
11.8066, int8 weights and activations 11.8705 (11.8774 without split channels). Speed: a compiled batch-1 step
at 1 thread 1.18x the weight-only int8 step; at 2 threads 0.90-0.95x (docs/benchmarks.md).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

# what the compiled step needs from inductor: weights as constants (freezing) and the CPU GEMM template, which
# holds the VNNI micro-kernel (ATEN stays a backend for the step's other products, e.g. attention's bmm)
INDUCTOR_OPTIONS = {"freezing": True, "max_autotune_gemm": True, "max_autotune_gemm_backends": "CPP,ATEN"}
ZERO_POINT = 128  # activations as u8: round(x / s) + 128, s = the row's absmax / 127
MAX_SPLIT = 16  # at most this many copies of a loud channel in the int8 product


_lowering_installed = False


def template_only_for_plain_weights() -> None:
    """Lower a quantized linear whose weight is a plain ``[K, N]`` int8 tensor to the CPU GEMM template only.

    The template packs the weight itself; oneDNN's own kernel (the ATEN choice, which the autotuner would run
    next to it) needs the weight prepacked into a oneDNN tensor and crashes on a plain one. Prepacked, the weight
    is a constant inductor's FX graph cache cannot pickle, so every process compiled the step again (270-290 s
    for the batch-1 bucket); plain, a second build loads it from the cache. Quantized linears with prepacked
    weights lower as before. Installed once per process, around inductor's own lowering."""
    global _lowering_installed
    if _lowering_installed:
        return
    from torch._inductor import config, lowering, mkldnn_lowerings  # noqa: F401  (registers the oneDNN lowerings)
    from torch._inductor.virtualized import V

    op = torch.ops.onednn.qlinear_pointwise.default
    inner = lowering.lowerings[op]

    def lower(x, x_scale, x_zp, weight, *args, **kwargs):
        w = V.graph.constants.get(weight.get_name()) if hasattr(weight, "get_name") else None
        if w is None or w.is_mkldnn:
            return inner(x, x_scale, x_zp, weight, *args, **kwargs)
        with config.patch(max_autotune_gemm_backends="CPP"):
            return inner(x, x_scale, x_zp, weight, *args, **kwargs)

    lowering.lowerings[op] = lower
    _lowering_installed = True


def available() -> bool:
    """Whether this PyTorch build has oneDNN's quantized linear (any x86 CPU runs it; VNNI makes it fast)."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.onednn, "qlinear_pointwise")


def smoothing(act_amax: torch.Tensor, weight: torch.Tensor, alpha: float) -> torch.Tensor:
    """SmoothQuant's per-input-channel divisor ``amax_x**alpha / amax_w**(1 - alpha)`` (1 where a channel never
    carried a value)."""
    w_amax = weight.float().abs().amax(0).clamp(min=1e-5)
    f = act_amax.float().clamp(min=1e-5) ** alpha / w_amax ** (1 - alpha)
    return torch.where(act_amax > 0, f, torch.ones_like(f))


def outlier_channels(act_amax: torch.Tensor, smooth: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``count`` channels whose smoothed activation reaches the largest magnitude (sorted), and into how many
    copies each is split so that a copy reaches no more than the loudest other channel (at most MAX_SPLIT)."""
    count = min(count, act_amax.numel())
    if not count:
        return torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)
    a = act_amax.float() / smooth
    idx = a.topk(count).indices.sort().values
    rest = a.clone()
    rest[idx] = 0
    splits = torch.ceil(a[idx] / rest.max().clamp(min=1e-20)).clamp(1, MAX_SPLIT).long()
    return idx, splits


class ActInt8(torch.nn.Module):
    """What one :class:`~tokenmill.plugins.quant.int8.Int8Linear` keeps for int8 activations: the smoothing
    divisor, the split channels and the int8 weight as the GEMM template takes it."""

    inductor_options = INDUCTOR_OPTIONS  # read by the model runner for its compiled step

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, in_features: int, smooth: torch.Tensor,
                 outliers: torch.Tensor, splits: torch.Tensor, max_rows: int) -> None:
        super().__init__()
        n, kp = qweight.shape
        self.in_features, self.max_rows = in_features, max_rows
        self.register_buffer("smooth", smooth.float().contiguous())
        self.register_buffer("outliers", outliers.long().contiguous())
        self.register_buffer("splits", splits.long().contiguous())
        # the loud channels enter the int8 product SPLIT times, each copy carrying 1/SPLIT of the value: the row's
        # scale follows the quieter channels, and no extra kernel runs (the weight gets the copies' columns)
        scale_in = torch.ones(kp)
        scale_in[in_features:] = 0
        scale_in[self.outliers] = 1 / self.splits.float()
        self.register_buffer("scale_in", scale_in, persistent=False)
        copies = torch.zeros(kp)
        copies[self.outliers] = self.splits.float() - 1
        self.register_buffer("copies", copies, persistent=False)  # extra copies per channel (0 for most)
        ext = self.outliers.repeat_interleave(self.splits - 1)
        pad = -(kp + ext.numel()) % 4  # the VNNI layout takes K in fours
        ext = torch.cat([ext, torch.full((pad,), kp - 1 if kp > in_features else 0, dtype=torch.long)])
        self.register_buffer("ext", ext, persistent=False)
        wq = torch.cat([qweight, qweight.index_select(1, ext)], 1)
        wq[:, kp + ext.numel() - pad:] = 0
        # [K, N]: the layout of oneDNN's prepacked weight, as a plain tensor (template_only_for_plain_weights)
        self.register_buffer("packed", wq.t().contiguous(), persistent=False)
        template_only_for_plain_weights()
        self.register_buffer("w_zero", torch.zeros(n, dtype=torch.int32), persistent=False)

    @staticmethod
    def _codes(x, scale_in, copies):
        """The row scale ``s``, each channel's copy code ``q`` and its own code ``q_main``: a loud channel's copies
        take ``round(x / splits / s)`` and its own column the remainder, so that their sum is ``x`` to half a step."""
        s = (x * scale_in).abs().amax(-1, keepdim=True).clamp(min=1e-20) / 127
        q = torch.round(x * scale_in / s)
        q_main = torch.round(x / s - copies * q).clamp(-128, 127)
        return q, q_main, s

    def fake_quantize(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` (smoothed, ``[M, K]``) rounded as :meth:`matmul` rounds it, in float: what the other paths multiply,
        so that every row count and the evaluation compute what the compiled step does."""
        k = self.in_features
        q, q_main, s = self._codes(x, self.scale_in[:k], self.copies[:k])
        return (q_main + self.copies[:k] * q) * s

    def matmul(self, x: torch.Tensor, scales: torch.Tensor) -> torch.Tensor | None:
        """``x`` (smoothed, float32, ``[M, K]``) times the weight while torch.compile traces a step of up to
        ``max_rows`` rows on CPU; None elsewhere (the caller's float paths)."""
        if not torch.compiler.is_compiling() or x.device.type != "cpu" or x.shape[0] > self.max_rows:
            return None
        q, q_main, s = self._codes(F.pad(x, (0, self.scale_in.numel() - self.in_features)), self.scale_in, self.copies)
        xq = (torch.cat([q_main, q.index_select(1, self.ext)], 1) + ZERO_POINT).to(torch.uint8)
        return torch.ops.onednn.qlinear_pointwise(xq, 1.0, ZERO_POINT, self.packed, scales, self.w_zero, None, 1.0,
                                                  0, torch.float32, "none", [], "") * s


# calibration requests in the chat template besides plain text: the template's special tokens drive channels that
# plain text leaves quiet (calibrated on text alone, the default model answered "What is the capital of France?"
# with "L'Etoile, la Cite, ..." where the float activations say "The capital of France is Paris.")
CHAT_PROMPTS = (
    "What is the capital of France?",
    "Write a Python function that returns the n-th Fibonacci number.",
    "Summarize the following text in one sentence: The committee met on Tuesday and agreed to postpone the vote.",
    "Tell me a short joke about computers.",
    "Explain why the sky is blue to a ten-year-old.",
    "Translate 'good morning, how are you?' into Spanish.",
)


def calibration_samples(tokenizer, text_ids: torch.Tensor) -> list[torch.Tensor]:
    """The text chunks ``text_ids`` (``[samples, seq_len]``) and, where the tokenizer has a chat template,
    :data:`CHAT_PROMPTS` as single-turn requests."""
    samples = list(text_ids)
    if getattr(tokenizer, "chat_template", None):
        for prompt in CHAT_PROMPTS:
            text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                 add_generation_prompt=True)
            samples.append(torch.tensor(tokenizer.encode(text, add_special_tokens=False)))
    return samples


@torch.no_grad()
def activation_absmax(model, names: list[str], samples: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per input channel, the largest ``|x|`` each named linear layer of ``model`` reads over ``samples``
    (1-D token ids, one forward each)."""
    mods = dict(model.named_modules())
    amax: dict[str, torch.Tensor] = {}

    def hook(name):
        def record(module, args):
            a = args[0].detach().reshape(-1, args[0].shape[-1]).abs().amax(0).float()
            amax[name] = a if name not in amax else torch.maximum(amax[name], a)
        return record

    handles = [mods[n].register_forward_pre_hook(hook(n)) for n in names]
    try:
        device = next(model.parameters()).device
        for row in samples:
            model(row[None].to(device))
    finally:
        for h in handles:
            h.remove()
    return amax
