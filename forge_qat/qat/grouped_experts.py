"""Fake quantization of expert-parallel experts: DeepSpeed AutoEP's `GroupedExperts`, which holds one rank's
local experts as `w1` and `w3` (E_local, I, H), the gate and up projections, and `w2` (E_local, H, I), the down
projection, and runs them on tokens grouped by expert.

Installed by the ZeRO engine once AutoEP has replaced a model's MoE blocks (`forge_qat.distributed.
expert_parallel.unpark_expert_modules`), with the very quantizers `prepare` gave the transformers stack the
experts came from, so each rank fake-quantizes its own experts only, with that stack's numerics
(`forge_qat.qat.experts`, whose `gate_up_proj` is w1's rows then w3's): per expert, the gate and up rows as one
fused matmul (one activation quantization of each token), the gated activation, then the down projection. Imports
no deepspeed: the module is recognised by its Parameters.

LoRA and learned scales: a GroupedExperts module may carry the quantizers and the LoRA pairs of the transformers
stacks it replaced, for all E experts (`forge_fake_quant` with its learned scales (E, rows, groups), `forge_lora`
with (E, R, in) and (E, out, R) per stack; the engine moves them across AutoEP's replacement), and the index of
its first expert (`forge_first_expert`): local expert e uses row first + e of each, LoRA in the mode its pairs
were made with (`forge_qat.lora.adapters`).
"""

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from forge_qat.errors import ConfigError
from forge_qat.qat.experts import FAKE_QUANT_ATTR, LORA_ATTR, ProjectionFakeQuant

GATE_UP, DOWN = "gate_up_proj", "down_proj"
"""The two projections, by the transformers stacks they are (w1 and w3 fused as transformers stores them, and w2):
their quantizers and LoRA pairs carry these names, so learned scales and adapters are named as in the stack's."""
FIRST_EXPERT_ATTR = "forge_first_expert"
ACTIVATIONS = {"swiglu": lambda gate, up: F.silu(gate) * up}
"""AutoEP's expert activations forge fake-quantizes (Qwen3-MoE's and Mixtral's); others are refused."""


def is_grouped_experts(module: torch.nn.Module) -> bool:
    """AutoEP's `GroupedExperts` (by its Parameters and activation, not its class: qat/ imports no deepspeed)."""
    return all(isinstance(getattr(module, n, None), torch.nn.Parameter) for n in ("w1", "w2", "w3")) \
        and isinstance(getattr(module, "activation", None), str)


class FakeQuantizedGroupedExperts:
    """Mixin placed before the GroupedExperts class by `install_fake_quant`: same Parameters, a forward that
    fake-quantizes each local expert's matmuls. Tokens arrive grouped by expert (`num_tokens_per_expert`), with
    padding rows after them that come back as zeros, as AutoEP's own loop returns them."""

    def forward(self, x: torch.Tensor, num_tokens_per_expert: torch.Tensor) -> torch.Tensor:
        pairs = self._modules.get(LORA_ATTR)
        if pairs is not None and any(p.trains_merged() for p in pairs.values()):
            # Recomputed in backward, as the transformers stacks' merged LoRA is (`forge_qat.qat.experts`)
            return checkpoint(_forward, self, x, num_tokens_per_expert, use_reentrant=False,
                              preserve_rng_state=False)
        return _forward(self, x, num_tokens_per_expert)


def _pair(module: torch.nn.Module, projection: str):
    pairs = module._modules.get(LORA_ATTR)
    pair = pairs[projection] if pairs is not None and projection in pairs else None
    return pair if pair is not None and pair.enabled else None


def _forward(module: torch.nn.Module, x: torch.Tensor, num_tokens_per_expert: torch.Tensor) -> torch.Tensor:
    q = getattr(module, FAKE_QUANT_ATTR)
    act = ACTIVATIONS[module.activation]
    counts = num_tokens_per_expert.tolist()
    used = sum(counts)
    first = getattr(module, FIRST_EXPERT_ATTR, 0)
    pairs = {proj: pair for proj in (GATE_UP, DOWN) if (pair := _pair(module, proj)) is not None}
    # merged LoRA: W + s*B@A of these experts' rows, added as to the whole stack's merged weight
    deltas = {proj: pair.delta(module.w2.dtype, slice(first, first + len(counts))).unbind(0)
              for proj, pair in pairs.items() if pair.mode == "merged"}
    sides = {proj: pair for proj, pair in pairs.items() if pair.mode != "merged"}
    # learned scales: all E experts' (as the stack's), this rank's rows used
    scales = {proj: q[proj].expert_scales() for proj in (GATE_UP, DOWN)}
    w1, w2, w3 = module.w1.unbind(0), module.w2.unbind(0), module.w3.unbind(0)
    out = []
    for e, x_e in enumerate(torch.split(x[:used], counts, dim=0)):
        w = torch.cat([w1[e], w3[e]])  # transformers' gate_up_proj rows of this expert
        s = scales[GATE_UP][first + e] if scales[GATE_UP] is not None else None
        h = q[GATE_UP].linear(x_e, (w + deltas[GATE_UP][e] if GATE_UP in deltas else w).to(x.dtype), None, s)
        if GATE_UP in sides:
            h = h + sides[GATE_UP].path(x_e, first + e)
        gate, up = h.chunk(2, dim=-1)
        a = act(gate, up)
        w = w2[e] + deltas[DOWN][e] if DOWN in deltas else w2[e]
        s = scales[DOWN][first + e] if scales[DOWN] is not None else None
        y = q[DOWN].linear(a, w.to(x.dtype), None, s)
        if DOWN in sides:
            y = y + sides[DOWN].path(a, first + e)
        out.append(y)
    out.append(x.new_zeros(x.shape[0] - used, w2[0].shape[0]))
    return torch.cat(out)


def is_fake_quantized(module: torch.nn.Module) -> bool:
    return isinstance(module, FakeQuantizedGroupedExperts)


_CLASSES: dict[type, type] = {}


def install_fake_quant(module: torch.nn.Module, gate_up: ProjectionFakeQuant, down: ProjectionFakeQuant) -> None:
    """Give a GroupedExperts module the fake-quantized forward, keeping its Parameters."""
    if module.activation not in ACTIVATIONS:
        raise ConfigError(f"expert activation {module.activation!r}: forge fake-quantizes AutoEP experts with "
                          f"{', '.join(ACTIVATIONS)} (Qwen3-MoE, Mixtral)")
    cls = type(module)
    if cls not in _CLASSES:
        _CLASSES[cls] = type(f"FakeQuantized{cls.__name__}", (FakeQuantizedGroupedExperts, cls), {})
    setattr(module, FAKE_QUANT_ATTR, torch.nn.ModuleDict({GATE_UP: gate_up, DOWN: down}))
    module.__class__ = _CLASSES[cls]
