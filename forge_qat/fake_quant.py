"""Fused affine fake quantizers: torchao's numerics in fewer passes over memory.

`forge_qat.prepare` installs these inside torchao's `FakeQuantizedLinear` in place of torchao's own
`IntxFakeQuantizer` (same forward values and gradients, proven by tests/test_fake_quant.py), and as
the fake quantizers of recipes for which torchao has no QAT mapping (int8 weights).

Why not torchao's quantizer as-is: it composes ~10 eager ops per call (amin, amax, mul, round, add,
clamp, copy, sub, mul, cast) and autograd keeps the pre-clamp tensor of each for the backward pass.
On CPU these memory-bound passes cost as much as the matmul they precede. Here one autograd node does
the whole fake quantization with in-place ops and keeps only a 1-byte clip mask for the
straight-through backward, which reproduces torchao's gradient exactly:
``grad_x = ((grad * scale) * in_range) * (1 / scale)``.
"""

from dataclasses import dataclass
from typing import Literal

import torch

Granularity = Literal["per_token", "per_group", "per_channel"]


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

    def __post_init__(self) -> None:
        if self.granularity == "per_group" and not self.group_size:
            raise ValueError("per_group fake quantization needs a group_size")

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
    eps = spec.eps if spec.eps is not None else torch.finfo(xg.dtype).smallest_normal
    lo, hi = torch.aminmax(xg, dim=-1, keepdim=True)
    lo = torch.clamp(lo, max=0)
    hi = torch.clamp(hi, min=0)
    if spec.symmetric:
        scale = torch.max(-lo, hi) / (float(spec.qmax - spec.qmin) / 2)
        return torch.clamp(scale, min=eps).to(scale_dtype), None
    scale = torch.clamp((hi - lo) / float(spec.qmax - spec.qmin), min=eps)
    zero_point = torch.clamp(spec.qmin - torch.round(lo / scale), spec.qmin, spec.qmax)
    return scale.to(scale_dtype), zero_point


class _FakeQuantize(torch.autograd.Function):
    """quantize -> clamp -> dequantize with a straight-through, clip-masked gradient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, spec: AffineSpec) -> torch.Tensor:
        xg = _grouped(x, spec)
        scale, zero_point = choose_qparams(xg, spec)
        inv_scale = 1.0 / scale
        q = xg * inv_scale
        q.round_()
        if zero_point is not None:
            q.add_(zero_point.to(q.dtype))
        clamped = q.clamp(spec.qmin, spec.qmax)
        in_range = clamped == q
        del q
        if zero_point is not None:
            clamped.sub_(zero_point.to(clamped.dtype))
        clamped.mul_(scale)
        ctx.save_for_backward(scale, inv_scale, in_range)
        ctx.grad_dtype = x.dtype
        return clamped.to(x.dtype).view(x.shape)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        scale, inv_scale, in_range = ctx.saved_tensors
        g = grad.reshape(in_range.shape) * scale
        g.masked_fill_(~in_range, 0)
        g.mul_(inv_scale)
        return g.to(ctx.grad_dtype).view(grad.shape), None


def fake_quantize(x: torch.Tensor, spec: AffineSpec) -> torch.Tensor:
    """Fake-quantize `x` (any leading dims; scales along the last dim) as described by `spec`."""
    return _FakeQuantize.apply(x, spec)


class AffineFakeQuantizer(torch.nn.Module):
    """Drop-in for torchao's `IntxFakeQuantizer` slots in `FakeQuantizedLinear`.

    Keeps the `enabled` flag that torchao's `enable_linear_fake_quant` toggles. Holds no tensors, so a
    prepared model's state_dict is exactly the float model's.
    """

    def __init__(self, spec: AffineSpec):
        super().__init__()
        self.spec = spec
        self.enabled = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        return fake_quantize(x, self.spec)

    def extra_repr(self) -> str:
        return repr(self.spec)
