"""Mixture-of-experts stacks: finding them, fake-quantizing every expert, converting them to torchao tensors.

Called by `forge_qat.coverage` (what is an expert stack), `forge_qat.prepare` (install and convert) and
finalize. transformers 5 keeps a layer's experts as 3-D Parameters in one module (`Qwen3MoeExperts`,
`MixtralExperts`, ...: `gate_up_proj` (E, 2I, H) and `down_proj` (E, H, I)), marked by its
`@use_experts_implementation` decorator, whose flags (`has_gate`, `has_bias`, `is_transposed`, ...)
describe the layout.

Training keeps those Parameters (so checkpoints, ZeRO-3 partitioning and the optimizer see the same
tensors) and swaps the module's class for a subclass whose forward is transformers' eager expert loop
with each expert's two matmuls done as the recipe's fake-quantized linear: expert e's weight gets
exactly what the same weight would get as an `nn.Linear` (per expert, per output row or group), and
its tokens' activations get the recipe's per-token activation quantization. Convert then quantizes each
stack with the recipe's `convert_expert_stack` and restores the class; the converted model runs the
same eager loop, selecting one expert's torchao tensor at a time, so fake-quant and converted logits
agree as they do for dense layers.

Under ZeRO-3 a stack is one Parameter of the experts module, gathered by DeepSpeed when the module
runs; every rank runs every experts module in every layer (the router's choice only decides which
slices a rank multiplies), so all ranks join the same gathers in the same order whatever the routing.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from forge_qat.errors import ConfigError
from forge_qat.fake_quant import integer_grid_linear


@dataclass(frozen=True, slots=True)
class Projection:
    """One of an expert's matmuls, stored for all experts as a 3-D stack (experts, out, in)."""

    weight: str
    bias: str | None
    out_features: int
    in_features: int


def _shape(p: torch.Tensor) -> tuple[int, ...]:
    return tuple(getattr(p, "ds_shape", p.shape))  # ZeRO-3 keeps the true shape in ds_shape


def is_experts(module: torch.nn.Module) -> bool:
    """A transformers experts module: decorated by `use_experts_implementation`, with 3-D stacks."""
    down = getattr(module, "down_proj", None)
    return (hasattr(module, "has_gate") and hasattr(module, "is_transposed")
            and isinstance(down, torch.nn.Parameter) and len(_shape(down)) == 3)


def projections(module: torch.nn.Module) -> list[Projection]:
    """The stacks of an experts module, in forward order."""
    if module.is_transposed:
        raise ConfigError(f"{type(module).__name__} stores its experts transposed (in, out), as gpt-oss does; forge "
                          "does not quantize that layout yet (supported: Qwen3-MoE, Mixtral, OLMoE, Qwen2-MoE, "
                          "DeepSeek-style experts stored (experts, out, in))")
    names = ["gate_up_proj" if module.has_gate else "up_proj", "down_proj"]
    result = []
    for name in names:
        _, out_features, in_features = _shape(getattr(module, name))
        result.append(Projection(name, f"{name}_bias" if module.has_bias else None, out_features, in_features))
    return result


def num_experts(module: torch.nn.Module) -> int:
    return _shape(module.down_proj)[0]


class ProjectionFakeQuant(torch.nn.Module):
    """The fake quantizers of one projection, applied to one expert's slice at a time. Holds no tensors,
    so the prepared model's state dict is exactly the float model's."""

    def __init__(self, activation: torch.nn.Module | None, weight: torch.nn.Module | None, integer_grid: bool):
        super().__init__()
        self.activation_fake_quantizer = activation
        self.weight_fake_quantizer = weight
        self.integer_grid = integer_grid

    def linear(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        """What the recipe's `FakeQuantizedLinear` computes for weight `w` (one expert's slice)."""
        act, wq = self.activation_fake_quantizer, self.weight_fake_quantizer
        if self.integer_grid and act is not None and wq is not None and act.enabled and wq.enabled:
            return integer_grid_linear(x, w, b, act.spec, wq.spec)
        if act is not None:
            x = act(x)
        if wq is not None:
            w = wq(w)
        return F.linear(x, w, b)

    def set_enabled(self, enabled: bool) -> None:
        for q in (self.activation_fake_quantizer, self.weight_fake_quantizer):
            if q is not None:
                q.enabled = enabled


FAKE_QUANT_ATTR = "forge_fake_quant"


class FakeQuantizedExperts:
    """Mixin placed before the experts class by `install_fake_quant` (the pattern of torch's
    `nn.utils.parametrize`, which also swaps in a generated subclass): same Parameters, same state dict,
    a forward that fake-quantizes each expert's matmuls.

    The loop is transformers' eager experts forward (`Qwen3MoeExperts.forward`, `MixtralExperts.forward`)
    in the same op order, so the converted model, which runs that forward, computes the same values.
    """

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        fq = getattr(self, FAKE_QUANT_ATTR)
        first, down = projections(self)
        final = torch.zeros_like(hidden_states)
        n = num_experts(self)
        with torch.no_grad():
            expert_mask = F.one_hot(top_k_index, num_classes=n + 1).permute(2, 1, 0)
            expert_hit = torch.greater(expert_mask.sum(dim=(-1, -2)), 0).nonzero()
        for expert_idx in expert_hit:
            e = expert_idx[0]
            if e == n:
                continue
            top_k_pos, token_idx = torch.where(expert_mask[e])
            h = fq[first.weight].linear(hidden_states[token_idx], getattr(self, first.weight)[e],
                                        getattr(self, first.bias)[e] if first.bias else None)
            h = self._apply_gate(h) if self.has_gate else self.act_fn(h)
            h = fq[down.weight].linear(h, getattr(self, down.weight)[e],
                                       getattr(self, down.bias)[e] if down.bias else None)
            if self.has_post_expert_norm:
                h = self.post_expert_norm(h)
            h = h * top_k_weights[token_idx, top_k_pos, None]
            final.index_add_(0, token_idx, h.to(final.dtype))
        return final


_FAKE_QUANTIZED_CLASSES: dict[type, type] = {}
_ORIGINAL_CLASSES: dict[type, type] = {}


def install_fake_quant(module: torch.nn.Module, quantizers: dict[str, ProjectionFakeQuant]) -> None:
    """Give `module` (an experts module) the fake-quantized forward, keeping its Parameters."""
    cls = type(module)
    if cls not in _FAKE_QUANTIZED_CLASSES:
        _FAKE_QUANTIZED_CLASSES[cls] = type(f"FakeQuantized{cls.__name__}", (FakeQuantizedExperts, cls), {})
        _ORIGINAL_CLASSES[_FAKE_QUANTIZED_CLASSES[cls]] = cls
    setattr(module, FAKE_QUANT_ATTR, torch.nn.ModuleDict(quantizers))
    module.__class__ = _FAKE_QUANTIZED_CLASSES[cls]


def is_fake_quantized(module: torch.nn.Module) -> bool:
    return isinstance(module, FakeQuantizedExperts)


def set_fake_quant_enabled(module: torch.nn.Module, enabled: bool) -> None:
    for q in getattr(module, FAKE_QUANT_ATTR).values():
        q.set_enabled(enabled)


def convert(module: torch.nn.Module, recipe) -> list[str]:
    """Replace the fake-quantized stacks of `module` by the recipe's torchao tensors and restore the
    experts class; returns the names of the converted stacks."""
    names = [name for name, q in getattr(module, FAKE_QUANT_ATTR).items() if q.weight_fake_quantizer is not None]
    for name in names:
        recipe.convert_expert_stack(recipe.base_config(), module, name)
    delattr(module, FAKE_QUANT_ATTR)
    module.__class__ = _ORIGINAL_CLASSES[type(module)]
    return names
