"""A frozen weight held as its recipe's integer codes and scales: what the fake quantizer makes of it, stored in
the grid the artifact ships instead of in float.

A fake quantizer with dynamic scales (`forge_qat.qat.fake_quant.AffineFakeQuantizer`) gives a frozen weight the
same values in every forward: the scales are chosen from the weight, the codes rounded against them. Those values
are `codes * scale`, so a LoRA run (`--lora-base-grid`, `forge_qat.lora.grid_base`) keeps only the codes (two
4-bit codes to a byte, or one int8 code) and the scales, and computes the values from them when a forward needs
them. `FrozenGrid.dequantize` reproduces the fake quantizer's forward exactly (same ops, same dtypes, checked
when the grid is made), so training on the grid is training on today's fake-quantized base.

Called by `forge_qat.lora.grid_base` (which installs grids) and `forge_qat.qat.experts` (whose forward reads
them).
"""

import math

import torch

from forge_qat.qat.fake_quant import (
    AffineFakeQuantizer,
    AffineSpec,
    LearnedScaleFakeQuantizer,
    _grouped,
    _LearnedFakeQuantize,
    choose_qparams,
    quantize_dequantize,
)

GRID_ATTR = "forge_grid"
"""Where a module keeps its grids: a linear layer its weight's `FrozenGrid`, an experts module a ModuleDict of
them by stack name."""


def grid_of(module: torch.nn.Module) -> "FrozenGrid | None":
    """A linear layer's grid (None: its weight is its Parameter)."""
    grid = module._modules.get(GRID_ATTR)
    return grid if isinstance(grid, FrozenGrid) else None


def stack_grid(module: torch.nn.Module, stack: str) -> "FrozenGrid | None":
    """An experts module's grid of one stack (None: the stack is its Parameter)."""
    grids = module._modules.get(GRID_ATTR)
    return grids[stack] if isinstance(grids, torch.nn.ModuleDict) and stack in grids else None


def gridable(quantizer: torch.nn.Module | None) -> str | None:
    """Why a weight fake quantizer's output can not be held as a `FrozenGrid`; None when it can."""
    # a learned-scale quantizer only where scales are read back from a grid run's checkpoint (eval, finalize: the
    # grid's own scales); training with learned scales is refused before this (`forge_qat.lora.config`)
    if type(quantizer) not in (AffineFakeQuantizer, LearnedScaleFakeQuantizer):
        return "weight scales chosen by llama.cpp's rules" if quantizer is not None else "no quantizer"
    spec = quantizer.spec
    if spec.convention != "torchao" or not spec.symmetric or spec.bits > 8:
        return "a grid other than symmetric int2-int8"
    return None


CHUNK_ELEMENTS = 1 << 18
"""`FrozenGrid.of` quantizes and checks this many weight elements at a time (1 MB of float32 temporaries)."""


def _row_chunks(shape: torch.Size) -> list[slice]:
    rows, width = shape
    step = max(1, CHUNK_ELEMENTS // width)
    return [slice(start, min(start + step, rows)) for start in range(0, rows, step)]


class FrozenGrid(torch.nn.Module):
    """One weight (a linear layer's (out, in) or an expert stack's (experts, out, in)) as codes and scales.

    `codes`: uint8 holding two codes offset by 2**(bits-1) for grids of up to 4 bits (the low nibble first, in
    the order of the last dimension), else int8; `scale`: one per row or group, in the dtype the quantizer
    computes it. Non-persistent buffers: a model's state dict (and a checkpoint) never holds them; the float
    weights they were made from are the checkpoint's."""

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, spec: AffineSpec, shape: tuple[int, ...],
                 weight_dtype: torch.dtype):
        super().__init__()
        self.register_buffer("codes", codes, persistent=False)
        self.register_buffer("scale", scale, persistent=False)
        self.spec, self.shape, self.weight_dtype = spec, tuple(shape), weight_dtype
        self.on_host = False
        """Pinned to the host (`to_host`): moving the model moves everything but this grid."""

    def to_host(self) -> None:
        """Move the grid to the host and keep it there: `Module.to`/`cuda` (which reach a module's tensors through
        `_apply`) pass it by (`forge_qat.qat.host_experts`)."""
        self.codes, self.scale = self.codes.cpu(), self.scale.cpu()
        self.on_host = True

    def _apply(self, fn, recurse=True):
        return self if self.on_host else super()._apply(fn, recurse)

    @property
    def packed(self) -> bool:
        return self.spec.bits <= 4

    @classmethod
    @torch.no_grad()
    def of(cls, weight: torch.Tensor, spec: AffineSpec) -> "FrozenGrid":
        """The grid of `weight` under `spec`: the codes and scales `fake_quantize` computes for it, in its op
        order (`forge_qat.qat.fake_quant._quantize_dequantize`), a few rows at a time (`CHUNK_ELEMENTS`: the
        temporaries stay small whatever the weight). Raises ValueError if the grid's values are not the fake
        quantizer's bit for bit."""
        w = weight.detach()
        packed = spec.bits <= 4
        if packed and w.shape[-1] % 2:
            raise ValueError(f"a {spec.bits}-bit grid packs two codes per byte: last dim {w.shape[-1]} is odd")
        rows = w.reshape(-1, w.shape[-1])
        codes = torch.empty(rows.shape[0], rows.shape[1] // 2 if packed else rows.shape[1],
                            dtype=torch.uint8 if packed else torch.int8, device=w.device)
        scales = []
        for chunk in _row_chunks(rows.shape):
            grouped = _grouped(rows[chunk], spec)
            scale, _ = choose_qparams(grouped, spec)
            q = grouped * (1.0 / scale)
            q.round_()
            c = q.clamp_(spec.qmin, spec.qmax).to(torch.int8).view(-1, rows.shape[1])
            del q
            if packed:
                biased = (c.view(torch.uint8) + (1 << (spec.bits - 1))).view(-1, 2)  # uint8 arithmetic wraps
                c = (biased[:, 0] | (biased[:, 1] << 4)).view(-1, rows.shape[1] // 2)
            codes[chunk] = c
            scales.append(scale)
        grid = cls(codes.view(*w.shape[:-1], -1), torch.cat(scales), spec, tuple(w.shape), w.dtype)
        for chunk in _row_chunks(rows.shape):
            if not torch.equal(grid._rows(chunk, w.dtype), quantize_dequantize(rows[chunk], spec)):
                raise ValueError("the grid's values differ from the fake quantizer's")
        return grid

    def _width(self) -> int:
        return self.shape[-1]

    def _group(self) -> int:
        return self.spec.group_size if self.spec.granularity == "per_group" else self.shape[-1]

    def _int_rows(self, codes: torch.Tensor) -> torch.Tensor:
        """Packed (or int8) code rows as int8 rows of the weight's width."""
        if not self.packed:
            return codes
        lo = (codes & 0xF).to(torch.int8)
        hi = (codes >> 4).to(torch.int8)
        return (torch.stack((lo, hi), -1) - (1 << (self.spec.bits - 1))).view(codes.shape[0], -1)

    def int_codes(self) -> torch.Tensor:
        """The codes as int8, in the weight's shape."""
        return self._int_rows(self.codes.reshape(-1, self.codes.shape[-1])).view(self.shape)

    def _rows(self, rows: slice, dtype: torch.dtype) -> torch.Tensor:
        """Rows `rows` of the weight (flattened to 2-D) as the grid's values in `dtype` (see `dequantize`)."""
        values = torch.promote_types(self.weight_dtype, self.scale.dtype)
        codes = self._int_rows(self.codes.reshape(-1, self.codes.shape[-1])[rows])
        per_row = self._width() // self._group()
        scale = self.scale[rows.start * per_row:rows.stop * per_row]
        return (codes.reshape(-1, self._group()).to(values) * scale).to(dtype).view(-1, self._width())

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        """codes * scale, computed in the dtype the fake quantizer computes it in (the weight's and the scale's
        promotion), then rounded once to `dtype`: the fake quantizer's forward for that output dtype."""
        return self._rows(slice(0, math.prod(self.shape[:-1])), dtype).view(self.shape)

    def values(self, dtype: torch.dtype, expert: int | None = None) -> torch.Tensor:
        """`dequantize`, or of an expert stack only expert `expert`'s (out, in) slice."""
        if expert is None:
            return self.dequantize(dtype)
        out = self.shape[-2]
        return self._rows(slice(expert * out, (expert + 1) * out), dtype).view(self.shape[-2:])

    def learned_scale(self) -> torch.Tensor:
        """The scales as a `LearnedScaleFakeQuantizer` holds them (float32, one per group: (*rows, groups)), for
        checkpoints (`learned_scales/`) and for `requantize`."""
        return self.scale.float().reshape(*self.shape[:-1], self._width() // self._group())

    def requantize(self, w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """`w` (the grid's values plus a merged LoRA update) fake-quantized against this grid's scales, which stay
        fixed: a value leaves its grid point only when the update moves it half a step. The learned-scale
        quantizer's forward and straight-through gradient (for `w` only), so convert with these scales as the
        checkpoint's learned scales ships it exactly."""
        return _LearnedFakeQuantize.apply(w, self.learned_scale(), self.spec, dtype)

    def nbytes(self) -> int:
        return self.codes.numel() * self.codes.element_size() + self.scale.numel() * self.scale.element_size()

    def extra_repr(self) -> str:
        return f"int{self.spec.bits} {tuple(self.shape)}, {self.nbytes():,} bytes"


class _GridMatmul(torch.autograd.Function):
    """x @ G^T (+ bias) with G the grid's values in `dtype` (one expert's, for a stack): made from the codes in
    forward and again in backward, so autograd keeps no weight-sized tensor between them. The base is frozen: only
    x gets a gradient (the bias too, if it trains). Under autocast F.linear runs in the autocast dtype, as it
    does on a fake quantizer's output; backward multiplies in the dtype the forward did."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, bias: torch.Tensor | None, grid: FrozenGrid, dtype: torch.dtype,
                expert: int | None):
        y = torch.nn.functional.linear(x, grid.values(dtype, expert), bias)
        ctx.grid, ctx.dtype, ctx.expert, ctx.x_dtype = grid, dtype, expert, x.dtype
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad_x = grad_b = None
        if ctx.needs_input_grad[0]:
            w = ctx.grid.values(ctx.dtype, ctx.expert)
            grad_x = grad.to(w.dtype).matmul(w).to(ctx.x_dtype)
        if ctx.needs_input_grad[1]:
            grad_b = grad.reshape(-1, grad.shape[-1]).sum(0)
        return grad_x, grad_b, None, None, None


def grid_matmul(x: torch.Tensor, grid: FrozenGrid, dtype: torch.dtype, bias: torch.Tensor | None = None,
                expert: int | None = None) -> torch.Tensor:
    """x @ G^T (+ bias), G the grid's values in `dtype` (of an expert stack: expert `expert`'s), never kept for
    backward (`_GridMatmul`)."""
    return _GridMatmul.apply(x, bias, grid, dtype, expert)
