"""Fused affine fake quantizers: torchao's numerics in fewer passes over memory.

`forge_qat.qat.prepare` installs these inside torchao's `FakeQuantizedLinear` in place of torchao's own
`IntxFakeQuantizer` (same forward values and gradients, proven by tests/test_fake_quant.py), and as
the fake quantizers of recipes for which torchao has no QAT mapping (int8 weights).

Why not torchao's quantizer as-is: it composes ~10 eager ops per call (amin, amax, mul, round, add,
clamp, copy, sub, mul, cast) and autograd keeps the pre-clamp tensor of each for the backward pass.
On CPU these memory-bound passes cost as much as the matmul they precede. Here one autograd node does
the whole fake quantization with in-place ops and keeps only a 1-byte clip mask for the
straight-through backward, which reproduces torchao's gradient exactly:
``grad_x = ((grad * scale) * in_range) * (1 / scale)``.
"""

import typing
from dataclasses import dataclass
from typing import Literal

import torch
from torchao.quantization.qat import FakeQuantizedLinear

Granularity = Literal["per_token", "per_group", "per_channel"]
Convention = Literal["torchao", "ggml"]
SCALE_SUFFIX = ".weight_fake_quantizer.scale"
"""How the state dict names a linear layer's learned weight scales (`LearnedScaleFakeQuantizer.scale`)."""


def is_learned_scale(name: str) -> bool:
    """Whether a state-dict name is a learned weight scale (kept apart from the HF weights in checkpoints)."""
    return name.endswith(SCALE_SUFFIX)


@dataclass(frozen=True, kw_only=True, slots=True)
class AffineSpec:
    """What to simulate: an integer grid, its granularity and how scales are chosen."""

    bits: int
    """Width of the integer grid: values lie in [-2**(bits-1), 2**(bits-1) - 1]."""
    granularity: Granularity
    """per_token: one scale per row of the last dim; per_group: `group_size` columns share one."""
    symmetric: bool
    """Symmetric grids have zero point 0; asymmetric ones fit [min(x, 0), max(x, 0)] exactly."""
    group_size: int | None = None
    """Columns per scale, required for per_group."""
    eps: float | None = None
    """Smallest scale; None means the smallest normal number of the input dtype (torchao's default)."""
    scale_dtype: torch.dtype | None = None
    """dtype the scale is computed and applied in; None means the input's dtype (torchao's default)."""
    convention: Convention = "torchao"
    """torchao: scales and values as torchao's quantize/dequantize compute them. ggml: llama.cpp's Q8_0
    activation quantization (symmetric only): scale d = amax / qmax, values round(x * (qmax / amax)) in
    [-qmax, qmax], dequantized with d rounded to `scale_dtype` (fp16, as the block stores it)."""
    signed_scale: bool = False
    """Whether a chosen (learned or searched) weight scale may be negative, for formats that store it signed
    (GGUF's Q4_0 `d`): the grid's longer end (-8 of [-8, 7]) then takes the extreme of either sign, as
    llama.cpp's quantizer maps the signed extreme to -8 (`d = max / -8`), where torchao's absmax / 7.5 clips a
    positive extreme to 7. Only for recipes whose every deployment takes a negative scale (XNNPACK refuses
    one)."""

    def __post_init__(self) -> None:
        if self.granularity == "per_group" and not self.group_size:
            raise ValueError("per_group fake quantization needs a group_size")
        if self.convention == "ggml" and not self.symmetric:
            raise ValueError("the ggml convention is symmetric")

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1))

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1


def _grouped(x: torch.Tensor, spec: AffineSpec) -> torch.Tensor:
    """View `x` as (rows, columns-sharing-one-scale)."""
    if spec.granularity == "per_group":
        if x.shape[-1] % spec.group_size:
            raise ValueError(f"last dim {x.shape[-1]} is not a multiple of group_size {spec.group_size}")
        return x.reshape(-1, spec.group_size)
    return x.reshape(-1, x.shape[-1])


@torch.no_grad()
def choose_qparams(xg: torch.Tensor, spec: AffineSpec) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale and zero point per row of `xg`, computed exactly as torchao's `choose_qparams_affine`."""
    scale_dtype = spec.scale_dtype or xg.dtype
    eps = _eps(spec, xg.dtype)
    # Two reductions, not torch.aminmax: on CPU builds aminmax over short rows is 6-20x slower.
    lo = torch.clamp(xg.amin(dim=-1, keepdim=True), max=0)
    hi = torch.clamp(xg.amax(dim=-1, keepdim=True), min=0)
    if spec.symmetric:
        scale = torch.max(-lo, hi) / (float(spec.qmax - spec.qmin) / 2)
        return torch.clamp(scale, min=eps).to(scale_dtype), None
    scale = torch.clamp((hi - lo) / float(spec.qmax - spec.qmin), min=eps)
    zero_point = torch.clamp(spec.qmin - torch.round(lo / scale), spec.qmin, spec.qmax)
    return scale.to(scale_dtype), zero_point


def _quantize_dequantize(xg: torch.Tensor, spec: AffineSpec):
    """quantize -> clamp -> dequantize of grouped `xg` in torchao's op order; also returns the scale, its
    inverse and the mask of clipped values (what the straight-through backward needs)."""
    scale, zero_point = choose_qparams(xg, spec)
    inv_scale = 1.0 / scale
    q = xg * inv_scale
    q.round_()
    if zero_point is not None:
        q.add_(zero_point.to(q.dtype))
    clamped = q.clamp(spec.qmin, spec.qmax)
    clipped = clamped != q
    del q
    if zero_point is not None:
        clamped.sub_(zero_point.to(clamped.dtype))
    clamped.mul_(scale)
    return clamped, scale, inv_scale, clipped


@torch.no_grad()
def quantize_dequantize(x: torch.Tensor, spec: AffineSpec) -> torch.Tensor:
    """The fake quantizer's forward values without autograd, in plain aten ops (what an exported program
    computes where no backend kernel takes the quantization, e.g. ExecuTorch's gathered expert stacks)."""
    return _quantize_dequantize(_grouped(x, spec), spec)[0].to(x.dtype).view(x.shape)


class _FakeQuantize(torch.autograd.Function):
    """quantize -> clamp -> dequantize with a straight-through, clip-masked gradient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, spec: AffineSpec, out_dtype: torch.dtype) -> torch.Tensor:
        values, scale, inv_scale, clipped = _quantize_dequantize(_grouped(x, spec), spec)
        ctx.save_for_backward(scale, inv_scale, clipped)
        ctx.grad_dtype = x.dtype
        return values.to(out_dtype).view(x.shape)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        scale, inv_scale, clipped = ctx.saved_tensors
        # Same op sequence (and dtype) as autograd through torchao's quantize/dequantize.
        g = grad.reshape(clipped.shape).to(ctx.grad_dtype) * scale
        g.masked_fill_(clipped, 0)
        g.mul_(inv_scale)
        return g.to(ctx.grad_dtype).view(grad.shape), None, None


class _GgmlFakeQuantize(torch.autograd.Function):
    """llama.cpp's `quantize_row_q8_0` (x86 SIMD path) then its dequantization: per block, d = amax / 127 stored
    as fp16, codes round-half-even(x * 127 / amax) (0 for an all-zero block), value = code * fp16(d). Nothing
    is clipped (|code| <= 127 by construction), so the gradient is straight through."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, spec: AffineSpec, out_dtype: torch.dtype) -> torch.Tensor:
        xg = _grouped(x, spec).float()
        amax = xg.abs().amax(dim=-1, keepdim=True)
        inv = torch.where(amax > 0, spec.qmax / amax, torch.zeros_like(amax))
        q = (xg * inv).round_()
        q.mul_((amax / spec.qmax).to(spec.scale_dtype or torch.float32).float())
        ctx.x_dtype = x.dtype
        return q.to(out_dtype).view(x.shape)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad.to(ctx.x_dtype), None, None


def fake_quantize(x: torch.Tensor, spec: AffineSpec, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Fake-quantize `x` (any leading dims; scales along the last dim) as described by `spec`.

    `out_dtype` (default: x's dtype) is the dtype the result is rounded to once at the end; giving the
    autocast dtype when the consumer is an autocast op produces exactly what autocast's own cast would.
    """
    if spec.convention == "ggml":
        return _GgmlFakeQuantize.apply(x, spec, out_dtype or x.dtype)
    return _FakeQuantize.apply(x, spec, out_dtype or x.dtype)


def consumer_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a fake quantizer emits. Its consumer is F.linear in FakeQuantizedLinear, which autocast
    runs in the autocast dtype: emitting that dtype skips a full-size cast per call (autocast cannot cache
    casts of non-leaf tensors) and its backward, with bit-identical results."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


class AffineFakeQuantizer(torch.nn.Module):
    """Drop-in for torchao's `IntxFakeQuantizer` slots in `FakeQuantizedLinear`.

    Keeps the `enabled` flag that torchao's `enable_linear_fake_quant` toggles. Holds no tensors, so a
    prepared model's state_dict is exactly the float model's (`LearnedScaleFakeQuantizer` adds its scales).
    """

    def __init__(self, spec: AffineSpec):
        super().__init__()
        self.spec = spec
        self.enabled = True

    @property
    def config(self) -> AffineSpec:
        """torchao's convert step reads `weight_fake_quantizer.config` (to detect range learning)."""
        return self.spec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        return fake_quantize(x, self.spec, consumer_dtype(x))

    def extra_repr(self) -> str:
        return repr(self.spec)


ScaleInit = Literal["mse", "absmax", "extreme"]
"""How weight scales are chosen from the weights: where learned scales start, and the scales `finalize --ptq`
uses (`--ptq-scales`). absmax: the scales the dynamic quantizer chooses (torchao's largest magnitude / 7.5 for
int4, which rounds a positive extreme to 8 and clips it to 7), so training starts where plain QAT does. mse: per
group (per row for per-channel grids), the candidate `SCALE_SEARCH_FACTORS` x absmax whose quantized weights are
nearest the float ones in squared error: clipping a few outliers buys a finer grid for the rest; for a grid with
`AffineSpec.signed_scale`, the same multiples of llama.cpp's signed scale (the signed extreme on -8) are
candidates too. extreme: the finest scale that holds the group's largest-magnitude weight exactly: llama.cpp's
Q4_0 rule (`d = max / -8`, where a weight of the other sign as large rounds to 8 and is clipped to 7) on a
signed-scale grid, max(largest / 7, -smallest / 8) on int4 otherwise (nothing clipped)."""

SCALE_SEARCH_FACTORS = tuple(round(1.0 - 0.01 * i, 2) for i in range(21))
"""Candidates of the mse start, as multiples of the absmax scale: 1.00 first (a tie keeps it; the start is
never further from the weights than absmax's), down to 0.80. Nearer weights are not a better model before
training (on bench/quality.py's fine-tuned SmolLM2 this start scores worse than absmax PTQ), but QAT from it
ends better: the shipped-defaults rows recover 2-5 points more of the PTQ gap on three of six rows and as
much on the rest (docs/benchmarks.md, "Where learned scales start")."""

SEARCH_CHUNK_ELEMENTS = 1 << 24
"""The mse search works on this many weight elements at a time (a few 64 MB float32 buffers), whatever the
size of the weight or expert stack."""


def initial_scale(weight: torch.Tensor, spec: AffineSpec, init: ScaleInit = "mse") -> torch.Tensor:
    """Starting values of a weight's learned scales (see `ScaleInit`), in float32, shaped (*rows, groups).
    Deterministic: every rank of a job that chooses them from the same weight gets the same values."""
    if not spec.symmetric:
        raise ValueError("learned scales are implemented for symmetric weight grids only")
    if init not in typing.get_args(ScaleInit):
        raise ValueError(f"unknown scale init {init!r}")
    rows = weight.shape[:-1]
    grouped = _grouped(weight.detach(), spec)
    if init == "extreme":
        return _extreme_scale(grouped, spec).reshape(*rows, -1)
    scale, _ = choose_qparams(grouped, spec)
    scale = scale.to(torch.float32)
    if init == "mse":
        scale = _searched_scale(grouped, scale, spec)
    return scale.reshape(*rows, -1)


@torch.no_grad()
def _extreme_scale(grouped: torch.Tensor, spec: AffineSpec) -> torch.Tensor:
    """Per row of `grouped`, the `extreme` rule's scale (see `ScaleInit`) in float32, on the recipe's scale dtype's
    grid as the learned forward applies it, a chunk of rows at a time."""
    out = []
    rows_per_chunk = max(1, SEARCH_CHUNK_ELEMENTS // grouped.shape[-1])
    for start in range(0, grouped.shape[0], rows_per_chunk):
        w = grouped[start:start + rows_per_chunk].to(torch.float32)
        if spec.signed_scale:
            scale = _signed_extreme_scale(w, spec)
        else:
            top = w.amax(-1, keepdim=True).clamp(min=0) / spec.qmax
            bottom = w.amin(-1, keepdim=True).clamp(max=0) / spec.qmin
            scale = torch.maximum(top, bottom).clamp(min=_eps(spec, grouped.dtype))
        out.append(scale.to(spec.scale_dtype).to(torch.float32) if spec.scale_dtype is not None else scale)
    return torch.cat(out)


def _signed_extreme_scale(w: torch.Tensor, spec: AffineSpec) -> torch.Tensor:
    """Per row of `w` (float32), llama.cpp's Q4_0 scale generalized to the grid: the element of largest
    magnitude divided by the grid's negative end (`d = max / -8`), so that element quantizes to qmin exactly."""
    extreme = w.gather(-1, w.abs().argmax(-1, keepdim=True))
    scale = extreme / float(spec.qmin)
    eps = _eps(spec, w.dtype)
    return torch.where(scale.abs() < eps, torch.full_like(scale, eps), scale)  # an all-zero row: as absmax's


def _eps(spec: AffineSpec, dtype: torch.dtype) -> float:
    """The smallest scale magnitude: the spec's, else the smallest normal number of `dtype` (torchao's default)."""
    return spec.eps if spec.eps is not None else torch.finfo(dtype).smallest_normal


@torch.no_grad()
def _searched_scale(grouped: torch.Tensor, absmax: torch.Tensor, spec: AffineSpec) -> torch.Tensor:
    """Per row of `grouped`, the candidate multiple of `absmax` (float32, one per row), and for a signed-scale
    grid of the signed extreme's scale, with the least squared quantization error, the candidate applied as
    the learned forward applies it (rounded to the recipe's scale dtype, values multiplied by the inverse
    scale) and returned as applied (on that dtype's grid, as the absmax start is). absmax x 1.00 is tried
    first and a tie keeps the earlier candidate: the result is never further from the weights than absmax's."""
    best = absmax.clone()
    rows_per_chunk = max(1, SEARCH_CHUNK_ELEMENTS // grouped.shape[-1])
    for start in range(0, grouped.shape[0], rows_per_chunk):
        w = grouped[start:start + rows_per_chunk].to(torch.float32)
        bases = [absmax[start:start + rows_per_chunk]]
        if spec.signed_scale:
            bases.append(_signed_extreme_scale(w, spec))
        chosen = best[start:start + rows_per_chunk]
        least = None
        for base in bases:
            for factor in SCALE_SEARCH_FACTORS:
                applied = base * factor
                if spec.scale_dtype is not None:
                    applied = applied.to(spec.scale_dtype)
                q = (w * (1.0 / applied)).round_().clamp_(spec.qmin, spec.qmax).mul_(applied)
                err = q.sub_(w).square_().sum(-1, keepdim=True)
                if least is None:
                    least = err
                    continue
                better = err < least
                least = torch.where(better, err, least)
                chosen.copy_(torch.where(better, applied.to(torch.float32), chosen))
    return best


class _LearnedFakeQuantize(torch.autograd.Function):
    """clamp(round(w / s)) * s with a trainable `s` (LSQ, without its gradient scaling; the gradients
    torchao's range learning gets from autograd through `_Round`): straight through for `w` inside the
    grid, and ``d/ds = q - w / s`` inside it, ``q`` (the clamp bound) where clipped. The grid values and
    rounding are those of torchao's `quantize_affine` with a custom scale (`input * (1.0 / scale)`), so
    the converted tensor holds exactly the values this forward multiplies by."""

    @staticmethod
    def forward(ctx, w: torch.Tensor, scale: torch.Tensor, spec: AffineSpec, out_dtype: torch.dtype) -> torch.Tensor:
        wg = _grouped(w, spec)
        s = scale.reshape(-1, 1)
        if spec.scale_dtype is not None:
            # The recipe stores its scales in this dtype (bf16: what XNNPACK and GGUF Q4_0 hold exactly), and
            # its converted tensor rounds the learned scale to it before quantizing: so does the forward. The
            # rounding is straight through for the gradient (the scale stays a float32 Parameter that can move
            # by less than a bf16 step per update and cross one later).
            s = s.to(spec.scale_dtype)
        inv_scale = 1.0 / s  # in the scale's dtype, as torchao's quantize_affine computes it
        ratio = wg * inv_scale
        q = torch.round(ratio)
        clamped = q.clamp(spec.qmin, spec.qmax)
        clipped = clamped != q
        del q
        # d(out)/ds per element, kept for backward instead of the weight (which ZeRO-3 frees after forward).
        ds = torch.where(clipped, clamped, clamped - ratio)
        del ratio
        out = clamped.mul_(s)
        ctx.save_for_backward(s.to(scale.dtype), inv_scale.to(scale.dtype), clipped, ds)
        ctx.shapes = (w.shape, scale.shape, w.dtype, scale.dtype)
        return out.to(out_dtype).view(w.shape)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        s, inv_scale, clipped, ds = ctx.saved_tensors
        w_shape, s_shape, w_dtype, s_dtype = ctx.shapes
        g = grad.reshape(clipped.shape).to(s.dtype)
        grad_w = grad_s = None
        if ctx.needs_input_grad[0]:
            grad_w = (g * s).masked_fill_(clipped, 0).mul_(inv_scale).to(w_dtype).view(w_shape)
        if ctx.needs_input_grad[1]:
            grad_s = (g * ds).sum(-1).to(s_dtype).view(s_shape)
        return grad_w, grad_s, None, None


class LearnedScaleFakeQuantizer(torch.nn.Module):
    """A weight fake quantizer whose scales are a trainable Parameter (`scale`, float32, one per group),
    for recipes with symmetric per-group or per-channel weights. Made by `forge_qat.qat.prepare` for
    `--qat-learn-scales`; convert hands `scale` to torchao as the tensor's custom scale."""

    def __init__(self, spec: AffineSpec, scale: torch.Tensor):
        super().__init__()
        if spec.granularity == "per_token" or not spec.symmetric:
            raise ValueError(f"learned scales need symmetric per-group or per-channel weights, not {spec}")
        self.spec = spec
        self.enabled = True
        self.scale = torch.nn.Parameter(scale.to(torch.float32), requires_grad=True)

    @property
    def config(self) -> AffineSpec:
        return self.spec

    def forward(self, w: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
        """Fake-quantize `w` with `scale` (default: all of `self.scale`; an MoE stack's eager loop passes one
        expert's slice of it with that expert's weight)."""
        scale = self.scale if scale is None else scale
        if not self.enabled:
            # The scales join the graph with a zero gradient, so the optimizer steps them (by nothing) in every
            # step on every engine: Adam's step count is then the same in one process as under DeepSpeed,
            # which steps every parameter of a group, when fake quantization starts later.
            return w + scale.sum().to(w.dtype) * 0
        out_dtype = consumer_dtype(w)  # read before autocast is switched off below
        with torch.autocast(w.device.type, enabled=False):
            return _LearnedFakeQuantize.apply(w, scale, self.spec, out_dtype)

    def converted_scale(self, weight: torch.Tensor) -> torch.Tensor:
        """The scale convert hands torchao for `weight`: on its device, and in its dtype where the recipe names no
        scale dtype (as torchao's own choice would be): a float32 scale in a bf16 model's tensor is cast to bf16
        when stock transformers loads the artifact, which then would not reproduce the converted model."""
        scale = self.scale.detach().to(weight.device)
        return scale if self.spec.scale_dtype is not None else scale.to(weight.dtype)

    def extra_repr(self) -> str:
        return f"{self.spec!r}, learned scale {tuple(self.scale.shape)}"


@dataclass(frozen=True, kw_only=True, slots=True)
class LinearQuantizers:
    """How a recipe fake-quantizes a linear layer when torchao cannot infer it from the base config."""

    activation: AffineSpec | None
    weight: AffineSpec | None
    integer_matmul: bool = False
    """Multiply on the integer grid and scale afterwards, as int8 x int8 kernels do (see IntegerGridLinear)."""


def _to_grid(t: torch.Tensor, spec: AffineSpec) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Integer values (as floats), per-row scale and in-range mask of a symmetric quantization."""
    scale, _ = choose_qparams(t, spec)
    q = t * (1.0 / scale)
    q.round_()
    grid = q.clamp(spec.qmin, spec.qmax)
    return grid, scale, grid == q


class _IntegerGridLinear(torch.autograd.Function):
    """y = ((x_q @ w_q^T) * s_x) * s_w, in the order of torchao's Int8Tensor linear on CPU and CUDA
    (`int_scaled_matmul`, then the weight scale). Products of int8 values summed in fp32 are exact
    for in_features up to 1040, so the forward matches the converted kernel bit for bit there; a
    fake quantizer that scales first (`F.linear(fq(x), fq(w))`) differs by float rounding, which
    flips rounding decisions of later layers and compounds with depth. Backward is the usual
    straight-through estimator, masked where values were clipped."""

    @staticmethod
    def forward(ctx, x, weight, bias, act_spec: AffineSpec, weight_spec: AffineSpec):
        with torch.autocast(x.device.type, enabled=False):
            xg = x.reshape(-1, x.shape[-1])
            xq, xs, x_in = _to_grid(xg, act_spec)
            wq, ws, w_in = _to_grid(weight, weight_spec)
            y = (xq @ wq.t().to(xq.dtype)) * xs
            y = y.to(x.dtype) * ws.reshape(1, -1)
            if bias is not None:
                y = y + bias
        ctx.save_for_backward(xq.to(torch.int8), xs, x_in, wq.to(torch.int8), ws, w_in)
        ctx.dtypes = (x.dtype, weight.dtype)
        ctx.has_bias = bias is not None
        return y.to(x.dtype).reshape(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad):
        xq, xs, x_in, wq, ws, w_in = ctx.saved_tensors
        x_dtype, w_dtype = ctx.dtypes
        with torch.autocast(grad.device.type, enabled=False):
            g = grad.reshape(-1, grad.shape[-1]).float()
            grad_x = grad_w = grad_b = None
            if ctx.needs_input_grad[0]:
                grad_x = (g @ (wq.float() * ws)).mul_(x_in).to(x_dtype).reshape(*grad.shape[:-1], -1)
            if ctx.needs_input_grad[1]:
                grad_w = (g.t() @ (xq.float() * xs)).mul_(w_in).to(w_dtype)
            if ctx.has_bias and ctx.needs_input_grad[2]:
                grad_b = g.sum(0).to(w_dtype)
        return grad_x, grad_w, grad_b, None, None


class _LearnedScaleIntegerGridLinear(torch.autograd.Function):
    """`_IntegerGridLinear` with the weight's per-row scale a trainable tensor: the weight codes are
    clamp(round(w * (1 / s))) (torchao's quantize with a given scale, what the converted `Int8Tensor` holds),
    the product is scaled in the same order, and `s` gets `_LearnedFakeQuantize`'s gradient: with
    P = grad_out^T @ x_dequantized (the gradient of the fake-quantized weight), d/ds = sum_i P * (q - w / s)
    inside the grid, P * q where clipped."""

    @staticmethod
    def forward(ctx, x, weight, bias, scale, act_spec: AffineSpec, weight_spec: AffineSpec):
        with torch.autocast(x.device.type, enabled=False):
            xg = x.reshape(-1, x.shape[-1])
            xq, xs, x_in = _to_grid(xg, act_spec)
            ws = scale.reshape(-1, 1)
            ratio = weight * (1.0 / ws)
            q = torch.round(ratio)
            wq = q.clamp(weight_spec.qmin, weight_spec.qmax)
            w_in = wq == q
            ds = torch.where(w_in, wq - ratio, wq)
            del q, ratio
            y = (xq @ wq.t().to(xq.dtype)) * xs
            y = y.to(x.dtype) * ws.reshape(1, -1)
            if bias is not None:
                y = y + bias
        ctx.save_for_backward(xq.to(torch.int8), xs, x_in, wq.to(torch.int8), ws, w_in, ds)
        ctx.dtypes = (x.dtype, weight.dtype, scale.dtype, scale.shape)
        ctx.has_bias = bias is not None
        return y.to(x.dtype).reshape(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad):
        xq, xs, x_in, wq, ws, w_in, ds = ctx.saved_tensors
        x_dtype, w_dtype, s_dtype, s_shape = ctx.dtypes
        with torch.autocast(grad.device.type, enabled=False):
            g = grad.reshape(-1, grad.shape[-1]).float()
            grad_x = grad_w = grad_b = grad_s = None
            if ctx.needs_input_grad[0]:
                grad_x = (g @ (wq.float() * ws)).mul_(x_in).to(x_dtype).reshape(*grad.shape[:-1], -1)
            if ctx.needs_input_grad[1] or ctx.needs_input_grad[3]:
                p = g.t() @ (xq.float() * xs)
                if ctx.needs_input_grad[3]:
                    grad_s = (p * ds).sum(-1).to(s_dtype).view(s_shape)
                if ctx.needs_input_grad[1]:
                    grad_w = p.mul_(w_in).to(w_dtype)
            if ctx.has_bias and ctx.needs_input_grad[2]:
                grad_b = g.sum(0).to(w_dtype)
        return grad_x, grad_w, grad_b, grad_s, None, None


def integer_grid_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                        act_spec: AffineSpec, weight_spec: AffineSpec,
                        weight_scale: torch.Tensor | None = None) -> torch.Tensor:
    """The integer-grid linear; `weight_scale`: learned per-row weight scales (else chosen from the weight)."""
    if weight_scale is not None:
        return _LearnedScaleIntegerGridLinear.apply(x, weight, bias, weight_scale, act_spec, weight_spec)
    return _integer_grid_linear(x, weight, bias, act_spec, weight_spec)


def _integer_grid_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                         act_spec: AffineSpec, weight_spec: AffineSpec) -> torch.Tensor:
    if not (act_spec.symmetric and weight_spec.symmetric):
        raise ValueError("integer-grid fake quantization needs symmetric activations and weights")
    return _IntegerGridLinear.apply(x, weight, bias, act_spec, weight_spec)


class IntegerGridFakeQuantizedLinear(FakeQuantizedLinear):
    """torchao's `FakeQuantizedLinear` (so torchao's convert step recognises it) whose forward
    multiplies on the integer grid while both fake quantizers are enabled."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act, weight = self.activation_fake_quantizer, self.weight_fake_quantizer
        if act is not None and weight is not None and act.enabled and weight.enabled:
            learned = weight.scale if isinstance(weight, LearnedScaleFakeQuantizer) else None
            return integer_grid_linear(x, self.weight, self.bias, act.spec, weight.spec, learned)
        return super().forward(x)
