"""Mixture-of-experts stacks: finding them, fake-quantizing every expert, converting them to torchao tensors.

Called by `forge_qat.qat.coverage` (what is an expert stack), `forge_qat.qat.prepare` (install and convert) and
finalize. transformers 5 keeps a layer's experts as 3-D Parameters in one module (`Qwen3MoeExperts`,
`MixtralExperts`, ...: `gate_up_proj` (E, 2I, H) and `down_proj` (E, H, I)), marked by its
`@use_experts_implementation` decorator, whose flags (`has_gate`, `has_bias`, `is_transposed`, ...)
describe the layout.

Training keeps those Parameters (so checkpoints, ZeRO-3 partitioning and the optimizer see the same
tensors) and swaps the module's class for a subclass with a fake-quantized forward: expert e's weight
gets exactly what the same weight would get as an `nn.Linear` (per expert, per output row or group),
and its tokens' activations get the recipe's per-token activation quantization. In training that runs
through the batched kernel the float model uses (`_batched_kernel`); in eval mode through transformers'
eager expert loop. Convert then quantizes each stack with the recipe's `convert_expert_stack` and
restores the class; the converted model runs the same eager loop, selecting one expert's torchao
tensor at a time, so fake-quant (eval) and converted logits agree as they do for dense layers.

Under ZeRO-3 a stack is one Parameter of the experts module, gathered by DeepSpeed when the module
runs; every rank runs every experts module in every layer (the router's choice only decides which
slices a rank multiplies), so all ranks join the same gathers in the same order whatever the routing.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from forge_qat.errors import ConfigError
from forge_qat.formats.weights import true_shape
from forge_qat.qat import host_experts
from forge_qat.qat.fake_quant import (
    AffineFakeQuantizer,
    LearnedScaleFakeQuantizer,
    consumer_dtype,
    integer_grid_linear,
)
from forge_qat.qat.grid import GRID_ATTR, grid_matmul, stack_grid


@dataclass(frozen=True, slots=True)
class Projection:
    """One of an expert's matmuls, stored for all experts as a 3-D stack (experts, out, in)."""

    weight: str
    bias: str | None
    out_features: int
    in_features: int


def is_experts(module: torch.nn.Module) -> bool:
    """A transformers experts module: decorated by `use_experts_implementation`, with 3-D stacks."""
    down = getattr(module, "down_proj", None)
    return (hasattr(module, "has_gate") and hasattr(module, "is_transposed")
            and isinstance(down, torch.nn.Parameter) and len(true_shape(down)) == 3)


def projections(module: torch.nn.Module) -> list[Projection]:
    """The stacks of an experts module, in forward order."""
    if module.is_transposed:
        raise ConfigError(f"{type(module).__name__} stores its experts transposed (in, out), as gpt-oss does; forge "
                          "does not quantize that layout yet (supported: Qwen3-MoE, Mixtral, OLMoE, Qwen2-MoE, "
                          "DeepSeek-style experts stored (experts, out, in))")
    names = ["gate_up_proj" if module.has_gate else "up_proj", "down_proj"]
    result = []
    for name in names:
        _, out_features, in_features = true_shape(getattr(module, name))
        result.append(Projection(name, f"{name}_bias" if module.has_bias else None, out_features, in_features))
    return result


def num_experts(module: torch.nn.Module) -> int:
    return true_shape(module.down_proj)[0]


class ProjectionFakeQuant(torch.nn.Module):
    """The fake quantizers of one projection, applied to one expert's slice at a time. Holds no tensors,
    so the prepared model's state dict is exactly the float model's."""

    def __init__(self, activation: torch.nn.Module | None, weight: torch.nn.Module | None, integer_grid: bool):
        super().__init__()
        self.activation_fake_quantizer = activation
        self.weight_fake_quantizer = weight
        self.integer_grid = integer_grid

    def linear(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None,
               scale: torch.Tensor | None = None, on_grid: bool = False) -> torch.Tensor:
        """What the recipe's `FakeQuantizedLinear` computes for weight `w` (one expert's slice); `scale`: that
        expert's slice of the learned scales, where they are learned; `on_grid`: `w` is already the weight
        quantizer's output (a frozen stack's grid, `forge_qat.qat.grid`)."""
        act, wq = self.activation_fake_quantizer, self.weight_fake_quantizer
        if self.integer_grid and act is not None and wq is not None and act.enabled and wq.enabled:
            return integer_grid_linear(x, w, b, act.spec, wq.spec, scale)
        if act is not None:
            x = act(x)
        if wq is not None and not on_grid:
            w = wq(w) if scale is None else wq(w, scale)
        return F.linear(x, w, b)

    def grid_linear(self, x: torch.Tensor, grid, expert: int, b: torch.Tensor | None,
                    dtype: torch.dtype) -> torch.Tensor:
        """`linear` for a frozen stack held in its grid (`forge_qat.qat.grid`): expert `expert`'s values are made
        from its codes for this product and again in backward, never the whole stack's."""
        if self.activation_fake_quantizer is not None:
            x = self.activation_fake_quantizer(x)
        return grid_matmul(x, grid, dtype, b, expert)

    def expert_scales(self) -> tuple[torch.Tensor, ...] | None:
        """The learned scales as one view per expert (None where the scales are chosen dynamically). Read
        inside the experts module's forward: under ZeRO-3 the engine registers the scales as that module's
        external parameters (`forge_qat.qat.prepare.learned_scale_readers`), so they are gathered with it."""
        wq = self.weight_fake_quantizer
        return wq.scale.unbind(0) if isinstance(wq, LearnedScaleFakeQuantizer) else None

    def set_enabled(self, enabled: bool) -> None:
        for q in (self.activation_fake_quantizer, self.weight_fake_quantizer):
            if q is not None:
                q.enabled = enabled


FAKE_QUANT_ATTR = "forge_fake_quant"


class FakeQuantizedExperts:
    """Mixin placed before the experts class by `install_fake_quant` (the pattern of torch's
    `nn.utils.parametrize`, which also swaps in a generated subclass): same Parameters, same state dict,
    a forward that fake-quantizes each expert's matmuls.

    In training it runs the batched kernel the float model would run on fake-quantized operands
    (`_batched_kernel`). In eval mode, and for recipes whose numerics need it, it runs transformers'
    eager experts loop (`Qwen3MoeExperts.forward`, `MixtralExperts.forward`) in the same op order, so
    the converted model, which runs that loop, computes the same values bit for bit.
    """

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        if host_experts.offloaded(self) and not host_experts.computing_on_host():
            return host_experts.run(self, hidden_states, top_k_index, top_k_weights)  # which calls this again there
        if _trains_merged_lora(self) or (GRID_ATTR in self._modules and torch.is_grad_enabled()
                                         and self.training and _batched_kernel(self) is not None):
            # Recomputed in backward, like a merged-LoRA linear (`forge_qat.lora.adapters.LoraLinear`): autograd would
            # otherwise keep, per experts module until backward, each stack's W + s*B@A and its fake-quantized
            # copy (experts x out x in each: the stacks are most of an MoE model), or, in the batched kernel, the
            # values of a frozen stack's grid, which would undo what holding it in the grid saves (the eager loop
            # makes one expert's values at a time, again in backward: `grid_matmul`). Same ops, same autocast
            # state, no random draws: values and gradients are the plain forward's (tests/test_lora.py).
            return checkpoint(_fake_quant_forward, self, hidden_states, top_k_index, top_k_weights,
                              use_reentrant=False, preserve_rng_state=False)
        return _fake_quant_forward(self, hidden_states, top_k_index, top_k_weights)

    def _eager_forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                       top_k_weights: torch.Tensor) -> torch.Tensor:
        per_projection = getattr(self, FAKE_QUANT_ATTR)
        first, down = projections(self)
        final = torch.zeros_like(hidden_states)
        n = num_experts(self)
        with torch.no_grad():
            expert_mask = F.one_hot(top_k_index, num_classes=n + 1).permute(2, 1, 0)
            expert_hit = torch.greater(expert_mask.sum(dim=(-1, -2)), 0).nonzero()
        run1, run2 = _expert_matmul(self, first.weight), _expert_matmul(self, down.weight)
        side1, side2 = _separate_pair(self, first.weight), _separate_pair(self, down.weight)
        b1 = getattr(self, first.bias).unbind(0) if first.bias else None
        b2 = getattr(self, down.bias).unbind(0) if down.bias else None
        s1, s2 = per_projection[first.weight].expert_scales(), per_projection[down.weight].expert_scales()
        for expert_idx in expert_hit:
            e = int(expert_idx[0])
            if e == n:
                continue
            top_k_pos, token_idx = torch.where(expert_mask[e])
            x = hidden_states[token_idx]
            h = run1(x, e, b1[e] if b1 else None, s1[e] if s1 else None)
            if side1 is not None:
                h = h + side1.path(x, e)
            x = self._apply_gate(h) if self.has_gate else self.act_fn(h)
            h = run2(x, e, b2[e] if b2 else None, s2[e] if s2 else None)
            if side2 is not None:
                h = h + side2.path(x, e)
            if self.has_post_expert_norm:
                h = self.post_expert_norm(h)
            h = h * top_k_weights[token_idx, top_k_pos, None]
            final.index_add_(0, token_idx, h.to(final.dtype))
        return final


def _fake_quant_forward(module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                        top_k_weights: torch.Tensor) -> torch.Tensor:
    kernel = _batched_kernel(module) if module.training else None
    if kernel is not None:
        return _batched_fake_quant_forward(module, kernel, hidden_states, top_k_index, top_k_weights)
    return module._eager_forward(hidden_states, top_k_index, top_k_weights)


class StackView:
    """The experts module as transformers' batched kernels see it, with other stacks (fake-quantized ones in
    training; gathered-and-dequantized ones in an ExecuTorch export) and the down projection's input
    quantizer folded into the gate (or activation), which those kernels apply right before the down
    projection."""

    def __init__(self, module: torch.nn.Module, stacks: dict[str, torch.Tensor], down_input):
        self._module, self._stacks, self._down_input = module, stacks, down_input

    def __getattr__(self, name: str):
        if name in self._stacks:
            return self._stacks[name]
        return getattr(self._module, name)

    def _apply_gate(self, x: torch.Tensor) -> torch.Tensor:
        return self._down_input(self._module._apply_gate(x))

    def act_fn(self, x: torch.Tensor) -> torch.Tensor:
        return self._down_input(self._module.act_fn(x))


def _batched_kernel(module: torch.nn.Module):
    """transformers' batched experts kernel the model is configured to run (`grouped_mm`, its default, or
    `batched_mm`), when the recipe allows it; None means the eager loop.

    Those kernels are what the float model trains with, and on a GPU a Python loop over 128 experts
    starves the device. They are exact here because the recipe's linear is "fake-quantize the input
    rows, fake-quantize the weight rows/groups, multiply" and both quantizers work row by row: applied
    to whole stacks and to all tokens at once, each expert still gets exactly its own quantized operands.
    What differs from the eager loop is only the order of float additions inside the kernels. Integer-grid
    recipes multiply on the grid, and other kernels (fp8 `deepgemm`, `sonicmoe`) have their own numerics:
    both keep the eager loop, as does eval mode, so eval losses are the converted model's exactly."""
    from transformers.integrations.moe import batched_mm_experts_forward, grouped_mm_experts_forward

    if host_experts.computing_on_host():
        # the host keeps the experts' activations for backward, not recomputing them: the batched kernel would keep
        # every stack's values (their float size) where the eager loop makes one expert's at a time
        return None
    per_projection = getattr(module, FAKE_QUANT_ATTR)
    quantizers = [x for q in per_projection.values() for x in (q.activation_fake_quantizer, q.weight_fake_quantizer)
                  if x is not None]
    # forge's fused quantizers (learned scales too: one per expert, row and group) are row-wise for any rank
    # (tests/test_moe.py, tests/test_learned_scales.py); torchao's others (float8) are
    # not proven so on 3-D stacks and keep the eager loop.
    if any(_separate_pair(module, name) is not None for name in per_projection):
        return None  # separate LoRA adds each expert's own side path: the eager loop
    if module.has_post_expert_norm or any(q.integer_grid for q in per_projection.values()) \
            or not all(isinstance(x, AffineFakeQuantizer | LearnedScaleFakeQuantizer) for x in quantizers):
        return None
    config = getattr(module, "config", None)
    return {"grouped_mm": grouped_mm_experts_forward, "batched_mm": batched_mm_experts_forward}.get(
        getattr(config, "_experts_implementation", None))


def _batched_fake_quant_forward(module, kernel, hidden_states, top_k_index, top_k_weights):
    per_projection = getattr(module, FAKE_QUANT_ATTR)
    first, down = projections(module)

    def quantize(q, x):
        return x if q is None else q(x)

    def quantized_stack(name, q):
        stack, on_grid = _stack_on_grid(module, name)
        return stack if on_grid else quantize(q, stack)

    up, dn = per_projection[first.weight], per_projection[down.weight]
    stacks = {first.weight: quantized_stack(first.weight, up.weight_fake_quantizer),
              down.weight: quantized_stack(down.weight, dn.weight_fake_quantizer)}
    view = StackView(module, stacks, lambda x: quantize(dn.activation_fake_quantizer, x))
    return kernel(view, quantize(up.activation_fake_quantizer, hidden_states), top_k_index, top_k_weights)


LORA_ATTR = "forge_lora"
"""An experts module's LoRA pairs, by stack name (`forge_qat.lora.adapters`)."""


def _stack(module: torch.nn.Module, name: str) -> torch.Tensor:
    """The stack the expert matmuls use: the Parameter (its grid's values where a frozen stack is held in one),
    plus s*B@A per expert where merged LoRA adapts it."""
    weight = getattr(module, name)
    grid = stack_grid(module, name)
    base = weight if grid is None else grid.dequantize(weight.dtype)
    return base + _lora_pair(module, name).delta(weight.dtype) if _merged(module, name) else base


def _grid_in_use(module: torch.nn.Module, name: str):
    """The stack's grid (None: the stack is its Parameter), refusing a forward with fake quantization off, which a
    stack held only in its grid can not run."""
    grid = stack_grid(module, name)
    if grid is not None and not getattr(module, FAKE_QUANT_ATTR)[name].weight_fake_quantizer.enabled:
        raise RuntimeError(f"{name} is held in its grid only: it has no float weight to run with fake "
                           f"quantization off")
    return grid


def _merged(module: torch.nn.Module, name: str) -> bool:
    pair = _lora_pair(module, name)
    return pair is not None and pair.mode == "merged"


def _stack_on_grid(module: torch.nn.Module, name: str) -> tuple[torch.Tensor, bool]:
    """(stack, whether it is already quantized): a frozen stack held in its grid is multiplied as its grid's
    values (with merged adapters: G + s*B@A quantized against the grid's fixed scales), in the dtype the quantizer
    would emit; else `_stack`, for the stack's quantizer."""
    grid = _grid_in_use(module, name)
    if grid is None:
        return _stack(module, name), False
    dtype = consumer_dtype(getattr(module, name))
    if _merged(module, name):  # G + s*B@A against the grid's fixed scales
        return grid.requantize(_stack(module, name), dtype), True
    return grid.dequantize(dtype), True


def _expert_matmul(module: torch.nn.Module, name: str):
    """The eager loop's product for one projection, `(x, expert, bias, learned scale) -> h`: on a frozen stack's
    grid one expert's values are made for the product and again in backward (`grid_matmul`), never the whole
    stack's; otherwise the stack (`_stack_on_grid`) is split into one view per expert."""
    quantizers = getattr(module, FAKE_QUANT_ATTR)[name]
    grid = _grid_in_use(module, name)
    if grid is not None and not _merged(module, name):
        dtype = consumer_dtype(getattr(module, name))
        return lambda x, e, b, s: quantizers.grid_linear(x, grid, e, b, dtype)
    stack, on_grid = _stack_on_grid(module, name)
    # One view per expert from a single op: indexing the stack per expert (`w[e]`, as transformers' eager loop
    # does) makes autograd build a full-size zero gradient per expert and add it up, O(experts^2) memory
    # traffic; unbind's backward stacks the experts' gradients once.
    experts = stack.unbind(0)
    return lambda x, e, b, s: quantizers.linear(x, experts[e], b, s, on_grid)


def _lora_pair(module: torch.nn.Module, name: str):
    pairs = module._modules.get(LORA_ATTR)
    pair = pairs[name] if pairs is not None and name in pairs else None
    return pair if pair is not None and pair.enabled else None


def _separate_pair(module: torch.nn.Module, name: str):
    """The stack's LoRA pair when it trains beside the quantized stack (separate mode), else None."""
    pair = _lora_pair(module, name)
    return pair if pair is not None and pair.mode == "separate" else None


def _trains_merged_lora(module: torch.nn.Module) -> bool:
    """Whether this forward trains merged-mode adapters of the module's stacks (grad on, adapters trainable)."""
    pairs = module._modules.get(LORA_ATTR)
    return pairs is not None and any(p.trains_merged() for p in pairs.values())


def has_lora(module: torch.nn.Module) -> bool:
    return LORA_ATTR in getattr(module, "_modules", {})


def install_lora(module: torch.nn.Module, pairs: torch.nn.ModuleDict) -> None:
    """Attach LoRA pairs (per stack) to a fake-quantized experts module; its forward then uses them."""
    if not is_fake_quantized(module):
        raise ConfigError("LoRA on expert stacks runs through the fake-quantized experts forward: it needs a QAT "
                          "recipe that quantizes the experts (or --lora-targets without experts)")
    setattr(module, LORA_ATTR, pairs)


def remove_lora(module: torch.nn.Module) -> None:
    delattr(module, LORA_ATTR)


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
    per_projection = getattr(module, FAKE_QUANT_ATTR)
    names = [name for name, q in per_projection.items() if q.weight_fake_quantizer is not None]
    for name in names:
        wq = per_projection[name].weight_fake_quantizer
        learned = wq.converted_scale(getattr(module, name)) if isinstance(wq, LearnedScaleFakeQuantizer) else None
        recipe.convert_expert_stack(recipe.base_config(), module, name, learned)
    delattr(module, FAKE_QUANT_ATTR)
    module.__class__ = _ORIGINAL_CLASSES[type(module)]
    return names
