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

import torch

from forge_qat.qat.fake_quant import AffineFakeQuantizer, AffineSpec, _grouped, choose_qparams, quantize_dequantize

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
    if type(quantizer) is not AffineFakeQuantizer:
        return "weight scales learned or chosen by llama.cpp's rules" if quantizer is not None else "no quantizer"
    spec = quantizer.spec
    if spec.convention != "torchao" or not spec.symmetric or spec.bits > 8:
        return "a grid other than symmetric int2-int8"
    return None


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

    @property
    def packed(self) -> bool:
        return self.spec.bits <= 4

    @classmethod
    @torch.no_grad()
    def of(cls, weight: torch.Tensor, spec: AffineSpec) -> "FrozenGrid":
        """The grid of `weight` under `spec`: the codes and scales `fake_quantize` computes for it, in its op
        order (`forge_qat.qat.fake_quant._quantize_dequantize`). Raises ValueError if the grid's values are not
        the fake quantizer's bit for bit."""
        grouped = _grouped(weight.detach(), spec)
        scale, _ = choose_qparams(grouped, spec)
        q = grouped * (1.0 / scale)
        q.round_()
        codes = q.clamp_(spec.qmin, spec.qmax).to(torch.int8)
        del q
        if spec.bits <= 4:
            if weight.shape[-1] % 2:
                raise ValueError(f"a {spec.bits}-bit grid packs two codes per byte: last dim {weight.shape[-1]} "
                                 f"is odd")
            biased = (codes.view(torch.uint8) + (1 << (spec.bits - 1))).view(-1, 2)  # uint8 arithmetic wraps
            codes = (biased[:, 0] | (biased[:, 1] << 4)).view(*weight.shape[:-1], weight.shape[-1] // 2)
        else:
            codes = codes.view(weight.shape)
        grid = cls(codes, scale, spec, tuple(weight.shape), weight.dtype)
        if not torch.equal(grid.dequantize(weight.dtype), quantize_dequantize(weight.detach(), spec)):
            raise ValueError("the grid's values differ from the fake quantizer's")
        return grid

    def int_codes(self) -> torch.Tensor:
        """The codes as int8, in the weight's shape."""
        if not self.packed:
            return self.codes
        lo = (self.codes & 0xF).to(torch.int8)
        hi = (self.codes >> 4).to(torch.int8)
        return (torch.stack((lo, hi), -1) - (1 << (self.spec.bits - 1))).view(self.shape)

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        """codes * scale, computed in the dtype the fake quantizer computes it in (the weight's and the scale's
        promotion), then rounded once to `dtype`: the fake quantizer's forward for that output dtype."""
        values = torch.promote_types(self.weight_dtype, self.scale.dtype)
        spec = self.spec
        codes = self.int_codes()
        grouped = codes.reshape(-1, spec.group_size if spec.granularity == "per_group" else self.shape[-1])
        return (grouped.to(values) * self.scale).to(dtype).view(self.shape)

    def nbytes(self) -> int:
        return self.codes.numel() * self.codes.element_size() + self.scale.numel() * self.scale.element_size()

    def extra_repr(self) -> str:
        return f"int{self.spec.bits} {tuple(self.shape)}, {self.nbytes():,} bytes"
