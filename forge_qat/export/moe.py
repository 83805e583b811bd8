"""Mixture-of-experts stacks in a form torch.export and ExecuTorch take, with the artifact's numerics.

Called by the ExecuTorch export before it exports a model with experts. A converted artifact's expert
stacks are `IntxUnpackedToInt8Tensor`s that transformers runs in its eager per-expert loop, whose
data-dependent shapes torch.export cannot trace, and unwrapping them would dequantize every expert on
every call. Here each stack becomes its codes, scales and zero points as buffers, and the experts module
runs transformers' `batched_mm` kernel (each token through its routed experts by a batched matmul) on
stacks that, indexed by the routed expert ids, dequantize only those experts' rows: work in proportion to
the active experts, in plain aten ops (gather, subtract, multiply, batched matmul) that ExecuTorch runs.
The inputs of each projection are quantized as the artifact's linear does (int8 asymmetric per token,
`forge_qat.qat.fake_quant.quantize_dequantize`, proven equal to torchao's), so the program computes the
artifact's values up to the order of float additions.
"""

from dataclasses import dataclass

import torch
from transformers.integrations.moe import _default_apply_gate

from forge_qat.errors import ConfigError
from forge_qat.qat import experts
from forge_qat.qat.fake_quant import AffineSpec, quantize_dequantize

PER_TOKEN_INT8_ASYM = AffineSpec(bits=8, granularity="per_token", symmetric=False)
"""`IntxUnpackedToInt8Tensor`'s `int8_asym_per_token` input quantization."""


@dataclass(frozen=True, slots=True)
class _Stack:
    """How to read one stack's buffers back (their names on the experts module)."""

    name: str
    group: int
    dtype: torch.dtype
    quantizes_input: bool


class _GatheredStack:
    """A quantized stack as the batched kernel indexes it: `stack[expert_ids]` gives those experts'
    dequantized weights (S, out, in), computed from their codes alone, in torchao's dequantize order."""

    def __init__(self, module: torch.nn.Module, stack: _Stack):
        self.module, self.stack = module, stack

    def __getitem__(self, ids: torch.Tensor) -> torch.Tensor:
        s = self.stack
        qdata = getattr(self.module, f"{s.name}_qdata")[ids].to(s.dtype)
        zero = getattr(self.module, f"{s.name}_zero_point")[ids].to(s.dtype)
        scale = getattr(self.module, f"{s.name}_scale")[ids]

        def per_value(t: torch.Tensor) -> torch.Tensor:  # (S, out, groups) -> (S, out, groups * group)
            return t.unsqueeze(-1).expand(*t.shape, s.group).reshape(*t.shape[:-1], -1)

        return ((qdata - per_value(zero)) * per_value(scale)).to(s.dtype)


class ExportableExperts:
    """Mixin placed before the experts class (as `forge_qat.qat.experts.install_fake_quant` does): a forward
    that runs the batched kernel on the gathered stacks."""

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        # transformers' `batched_mm_experts_forward` in export-friendly ops: its `repeat_interleave` makes
        # ExecuTorch's lowering fix the sequence length, so each token's row is repeated by expand instead.
        tokens, k = top_k_index.shape
        ids = top_k_index.reshape(-1)
        x = hidden_states.unsqueeze(1).expand(tokens, k, hidden_states.shape[-1]).reshape(tokens * k, -1)
        first, down = self.forge_order
        h = self._project(first, x, ids)
        h = self._export_gate(h) if self.has_gate else self.act_fn(h)
        h = self._project(down, h, ids)
        if self.has_post_expert_norm:
            h = self.post_expert_norm(h)
        h = h * top_k_weights.reshape(-1, 1)
        return h.view(tokens, k, -1).sum(dim=1).to(hidden_states.dtype)

    def _export_gate(self, h: torch.Tensor) -> torch.Tensor:
        """transformers' default gate (`act(gate) * up`, gate the first half) by slicing: its `chunk` lowers to
        a list-returning op whose check in ExecuTorch 1.5's verifier (`len()` of the first result) fixes the
        sequence length."""
        half = h.shape[-1] // 2
        return self.act_fn(h[..., :half]) * h[..., half:]

    def _project(self, name: str, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Each row of `x` through its expert's `name` projection (as the artifact's linear: input quantized
        per token, then the dequantized weight)."""
        stack = self.forge_stacks.get(name)
        if stack is None:
            weight = getattr(self, name)[ids]
        else:
            weight = _GatheredStack(self, stack)[ids]
            if stack.quantizes_input:
                x = quantize_dequantize(x, PER_TOKEN_INT8_ASYM)
        out = torch.bmm(weight, x.unsqueeze(-1)).squeeze(-1)
        if self.has_bias:
            out = out + getattr(self, f"{name}_bias")[ids]
        return out


_CLASSES: dict[type, type] = {}


def make_exportable(model: torch.nn.Module) -> int:
    """Turn every experts module's quantized stacks into gathered buffers (in place); returns the number of
    stacks. Float stacks stay as they are."""
    count = 0
    for module in list(model.modules()):
        if not experts.is_experts(module):
            continue
        stacks = {}
        order = tuple(proj.weight for proj in experts.projections(module))
        for proj in experts.projections(module):
            weight = getattr(module, proj.weight)
            if type(weight).__name__ != "IntxUnpackedToInt8Tensor":
                continue
            delattr(module, proj.weight)
            for part in ("qdata", "scale", "zero_point"):
                module.register_buffer(f"{proj.weight}_{part}", getattr(weight, part).detach())
            stacks[proj.weight] = _Stack(proj.weight, weight.block_size[-1], weight.dtype,
                                         weight.activation_quantization is not None)
        if not stacks:
            continue
        if module.has_gate and type(module)._apply_gate is not _default_apply_gate:
            raise ConfigError(f"{type(module).__name__} gates its experts its own way; the ExecuTorch export covers "
                              f"transformers' default gate (Qwen3-MoE, Mixtral, OLMoE, ...)")
        cls = type(module)
        if cls not in _CLASSES:
            _CLASSES[cls] = type(f"Exportable{cls.__name__}", (ExportableExperts, cls), {})
        module.forge_stacks, module.forge_order = stacks, order
        module.__class__ = _CLASSES[cls]
        count += len(stacks)
    return count
