"""`--lora-base-grid`: the frozen base of a LoRA run held in its recipe's grid, not in float.

With `--lora-rank` the base weights never change, so their fake quantization never changes either: each
quantized linear layer keeps its weight as the codes and scales the recipe gives it (`forge_qat.qat.grid`,
int4 codes two to a byte), and its float `weight` Parameter keeps its shape, dtype and device over one element
(a NaN, broadcast: anything that read it instead of the grid would turn the loss into NaN, not into a
plausible number). The layer then computes:

- separate mode (and with its adapters off, e.g. as the `self` distillation teacher): `act(x) @ G^T + s*B(Ax)`
  with `G` the grid's values, which are `fq(W)` bit for bit: today's numerics;
- merged mode: `q(G + s*B@A)`: the recipe's quantizer on the grid plus the adapters, what finalize converts from
  a grid run (`forge_qat.finalize`), so the artifact is what trained. It differs from `q(W + s*B@A)` in that the
  adapters move the already rounded weights: a value can only leave its grid point when the adapters move it at
  least half a step.

`G` is made from the codes when a forward needs it and again in backward (`_GridMatmul`), not kept between them.
Checkpoints of a grid run link the base's float weights from the model directory the run started from (the grid
is a function of them), so every checkpoint stays a complete model that stock `from_pretrained` reads.

Called by `forge_qat.train.model_setup` (install), `forge_qat.lora.adapters` (the layers' forward) and
`forge_qat.train.checkpointing`.
"""

from collections import Counter
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from forge_qat.lora.config import ADAPTER_ATTR
from forge_qat.qat.fake_quant import AffineSpec, IntegerGridFakeQuantizedLinear, consumer_dtype
from forge_qat.qat.grid import FrozenGrid, gridable

GRID_ATTR = "forge_grid"
"""The attribute (a submodule) holding a layer's `FrozenGrid`."""


def grid_of(module: torch.nn.Module) -> FrozenGrid | None:
    return module._modules.get(GRID_ATTR)


def has_grid_base(model: torch.nn.Module) -> bool:
    return any(grid_of(m) is not None for m in model.modules())


def gridded_weights(model: torch.nn.Module) -> set[str]:
    """State-dict names of the weights held in a grid (their Parameters hold a placeholder)."""
    return {f"{name}.weight" for name, m in model.named_modules() if grid_of(m) is not None}


class _GridMatmul(torch.autograd.Function):
    """x @ G^T (+ bias) with G the grid's values in `dtype`: made from the codes in forward and again in
    backward, so autograd keeps no weight-sized tensor between them. The base is frozen: only x gets a gradient
    (the bias too, if it trains). Under autocast F.linear runs in the autocast dtype, as it does on the fake
    quantizer's output; backward multiplies in the dtype the forward did."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, bias: torch.Tensor | None, grid: FrozenGrid, dtype: torch.dtype):
        y = F.linear(x, grid.dequantize(dtype), bias)
        ctx.grid, ctx.dtype, ctx.x_dtype = grid, dtype, x.dtype
        ctx.bias_shape = None if bias is None else bias.shape
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad_x = grad_b = None
        if ctx.needs_input_grad[0]:
            w = ctx.grid.dequantize(ctx.dtype)
            grad_x = grad.to(w.dtype).matmul(w).to(ctx.x_dtype)
        if ctx.needs_input_grad[1]:
            grad_b = grad.reshape(-1, grad.shape[-1]).sum(0)
        return grad_x, grad_b, None, None


def grid_linear(layer: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The fake-quantized linear `layer` on its grid: its activation quantizer, then the product with the grid's
    values in the dtype its weight quantizer would have emitted."""
    if not layer.weight_fake_quantizer.enabled:
        raise RuntimeError("this layer's frozen weight is held in its grid only: it has no float weight to run "
                           "with fake quantization off")
    act = getattr(layer, "activation_fake_quantizer", None)
    if act is not None:
        x = act(x)
    grid = grid_of(layer)
    dtype = consumer_dtype(layer.weight)
    return _GridMatmul.apply(x, layer.bias, grid, dtype)


def base_weight(layer: torch.nn.Module) -> torch.Tensor:
    """The weight merged mode adds its adapters to: the grid's values where the layer has a grid, else W."""
    grid = grid_of(layer)
    return layer.weight if grid is None else grid.dequantize(layer.weight.dtype)


class GridLinear:
    """Mixin placed before a gridded layer's class when it has no adapters (a layer --lora-targets leaves out)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return grid_linear(self, x)


_GRID_CLASSES: dict[type, type] = {}
_ORIGINAL_CLASSES: dict[type, type] = {}


@dataclass
class GridBase:
    """What `install` put in a grid, counted by parameters."""

    layers: int = 0
    params: int = 0
    grid_bytes: int = 0
    float_bytes: int = 0
    """The same weights as the model held them before."""
    kept: Counter = field(default_factory=Counter)
    """Frozen quantized parameters left in float, by reason."""

    def describe(self) -> str:
        text = (f"LoRA base grid: {self.layers} linear layers ({self.params:,} frozen parameters) held as their "
                f"recipe's codes and scales, {self.grid_bytes / 1e6:,.1f} MB vs {self.float_bytes / 1e6:,.1f} MB "
                f"in float ({self.grid_bytes / max(self.float_bytes, 1):.2f}x)")
        if self.kept:
            text += "; kept in float: " + ", ".join(f"{reason} {n:,}" for reason, n in sorted(self.kept.items()))
        return text


INTEGER_MATMUL = "integer-grid matmul layers (int8 x int8, not yet)"
EXPERTS = "MoE expert stacks (not yet)"


def grid_obstacle(layer: torch.nn.Module) -> str | None:
    """Why a prepared linear layer's frozen weight can not be held in its grid; None when it can. The one rule
    training (`install`) and finalize (`grid_specs`) share."""
    if isinstance(layer, IntegerGridFakeQuantizedLinear):
        return INTEGER_MATMUL
    return gridable(getattr(layer, "weight_fake_quantizer", None))


def grid_specs(model: torch.nn.Module, linears: list[str]) -> dict[str, AffineSpec]:
    """The grid of every weight a grid run held in one, by state-dict name, from the prepared `model` and its
    quantized `linears` (module names, the coverage plan's): what finalize merges a grid run's adapters into."""
    layers = {name: model.get_submodule(name) for name in linears}
    return {f"{name}.weight": layer.weight_fake_quantizer.spec for name, layer in layers.items()
            if grid_obstacle(layer) is None}


@torch.no_grad()
def install(model: torch.nn.Module, linears: list[str], stacks: dict[str, list[str]],
            keep_weights: bool = False) -> GridBase:
    """Hold the frozen weights of the prepared `model`'s quantized `linears` (module names: the coverage plan's)
    in their grids.
    `stacks`: the quantized expert stacks, counted as kept in float (their grid is not implemented yet).
    `keep_weights`: leave the float weights in place too (finalize, which converts the layers without adapters
    from them)."""
    report = GridBase()
    modules = dict(model.named_modules())
    for name, names in stacks.items():
        report.kept[EXPERTS] += sum(getattr(modules[name], s).numel() for s in names)
    for name in linears:
        layer = modules[name]
        weight = layer.weight
        if weight.requires_grad:
            raise ValueError(f"{name}: a grid holds frozen weights only")
        why = grid_obstacle(layer)
        if why is not None:
            report.kept[why] += weight.numel()
            continue
        grid = FrozenGrid.of(weight, layer.weight_fake_quantizer.spec)
        report.layers += 1
        report.params += weight.numel()
        report.grid_bytes += grid.nbytes()
        report.float_bytes += weight.numel() * weight.element_size()
        setattr(layer, GRID_ATTR, grid)
        if not keep_weights:
            weight.data = torch.full((), float("nan"), dtype=weight.dtype, device=weight.device).expand(weight.shape)
        if ADAPTER_ATTR not in layer._modules:  # a layer without adapters computes on its grid
            cls = type(layer)
            if cls not in _GRID_CLASSES:
                _GRID_CLASSES[cls] = type(f"Grid{cls.__name__}", (GridLinear, cls), {})
                _ORIGINAL_CLASSES[_GRID_CLASSES[cls]] = cls
            layer.__class__ = _GRID_CLASSES[cls]
    return report


def remove(model: torch.nn.Module) -> None:
    """Take every grid out and restore the layers' classes (finalize, after merging)."""
    for module in model.modules():
        if grid_of(module) is not None:
            delattr(module, GRID_ATTR)
            if type(module) in _ORIGINAL_CLASSES:
                module.__class__ = _ORIGINAL_CLASSES[type(module)]
