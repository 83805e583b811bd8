"""LoRA adapters on a fake-quantized model, trained on the numerics that ship.

`--lora-rank R` freezes the model's weights and gives each targeted linear layer (and each expert of a
targeted MoE stack) a trainable pair A (R, in), B (out, R), scaled by s = alpha / R. Two ways to combine
them with fake quantization (`--lora-qat`):

- `merged` (the default): the layer fake-quantizes the merged weight, `q(W + s*B@A)`, in every forward.
  Finalize merges the same way and converts `W + s*B@A` with the recipe, so the artifact computes what
  training computed (artifact == fake quant, atol 0, like full QAT).
- `separate`: `fq(W) x + s * B(A x)`, the adapters beside the quantized base on the unquantized input, as
  torchtune's QAT-LoRA recipe and Unsloth train it. Deploying merges and quantizes `q(W + s*B@A)`, a model
  that was not the one trained; finalize reports how far apart they are.

The adapters live on the layers themselves (`<layer>.forge_lora.lora_A`, `.lora_B`; for a stack
`<experts>.forge_lora.<stack>.lora_A` of shape (experts, R, in)), so they are partitioned, gathered and
checkpointed like any parameter, and are written apart from the float weights in PEFT's layout
(`adapter_model.safetensors` + `adapter_config.json`) by `forge_qat.formats.adapters`. The layer's class is
swapped for a generated subclass with the LoRA forward (the pattern `forge_qat.qat.experts` uses), keeping its
Parameters and state-dict names.
"""

import math
import zlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from forge_qat.errors import ConfigError, InputError
from forge_qat.formats.weights import check_shapes, true_shape
from forge_qat.lora.config import ADAPTER_ATTR, LoraConfig
from forge_qat.lora.grid_base import base_weight, grid_linear, grid_of, merged_grid_linear
from forge_qat.qat import experts as experts_mod
from forge_qat.qat.fake_quant import (
    AffineSpec,
    IntegerGridFakeQuantizedLinear,
    LearnedScaleFakeQuantizer,
    integer_grid_linear,
    is_learned_scale,
    quantize_dequantize,
)
from forge_qat.qat.grid import stack_grid


def delta(a: torch.Tensor, b: torch.Tensor, scaling: float, dtype: torch.dtype) -> torch.Tensor:
    """s * B @ A in the weight's dtype: the one expression training (merged mode) and finalize add to W,
    so the artifact's merged weight is the trained one bit for bit."""
    return (torch.matmul(b, a) * scaling).to(dtype)


class LoraPair(torch.nn.Module):
    """A and B of one linear layer, (R, in) and (out, R); of an expert stack, one pair per expert,
    (E, R, in) and (E, out, R). A starts as PEFT's default (uniform in +-1/sqrt(in), kaiming-uniform with
    a=sqrt(5)), B at zero, so training starts from the frozen model exactly. float32 whatever the model's
    dtype: the adapters are the only weights that train (under DeepSpeed bf16/fp16 the engine holds them in the
    module dtype with fp32 masters, as every trained parameter: `forge_qat.train.model_setup`)."""

    def __init__(self, in_features: int, out_features: int, rank: int, scaling: float, mode: str,
                 experts: int | None = None, device: torch.device | None = None, seed: int = 0):
        super().__init__()
        lead = (experts,) if experts else ()
        bound = 1.0 / math.sqrt(in_features)
        # Drawn from a generator of its own (seeded per layer by `install`), on the CPU: every rank and every
        # engine draws the same A whatever the random draws before it.
        a = torch.empty(*lead, rank, in_features).uniform_(-bound, bound, generator=torch.Generator().manual_seed(seed))
        self.lora_A = torch.nn.Parameter(a.to(device))
        self.lora_B = torch.nn.Parameter(torch.zeros(*lead, out_features, rank, device=device))
        self.scaling = scaling
        self.mode = mode
        self.enabled = True
        """False: the layer computes without its adapters (the `self` distillation teacher is the base)."""

    def trains_merged(self) -> bool:
        """Whether this forward trains the pair in merged mode (grad on, adapters trainable): then the layer
        (or experts module) recomputes q(W + s*BA) in backward instead of keeping it."""
        return self.enabled and self.mode == "merged" and torch.is_grad_enabled() and self.lora_A.requires_grad

    def delta(self, dtype: torch.dtype, experts: slice = slice(None)) -> torch.Tensor:
        """s * B @ A in `dtype` (the weight's): what merged mode adds to the weight, and finalize too. `experts`:
        of a stack's pairs, those experts' (an expert-parallel rank's own)."""
        return delta(self.lora_A[experts], self.lora_B[experts], self.scaling, dtype)

    def path(self, x: torch.Tensor, expert: int | None = None) -> torch.Tensor:
        """s * B (A x): separate mode's output beside the quantized layer (one expert's pair for a stack)."""
        a, b = (self.lora_A, self.lora_B) if expert is None else (self.lora_A[expert], self.lora_B[expert])
        return (F.linear(F.linear(x.to(a.dtype), a), b) * self.scaling).to(x.dtype)

    def extra_repr(self) -> str:
        return f"rank {self.lora_A.shape[-2]}, scaling {self.scaling:g}, {self.mode}"


def quantized_linear(layer: torch.nn.Linear, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """What the (prepared or float) linear `layer` computes with `weight` in place of its own: its fake
    quantizers and matmul, in the op order of its forward (`FakeQuantizedLinear`, the integer-grid
    linear, `nn.Linear`)."""
    act = getattr(layer, "activation_fake_quantizer", None)
    wq = getattr(layer, "weight_fake_quantizer", None)
    if isinstance(layer, IntegerGridFakeQuantizedLinear) and act is not None and wq is not None \
            and act.enabled and wq.enabled:
        learned = wq.scale if isinstance(wq, LearnedScaleFakeQuantizer) else None
        return integer_grid_linear(x, weight, layer.bias, act.spec, wq.spec, learned)
    if act is not None:
        x = act(x)
    if wq is not None:
        weight = wq(weight)
    return F.linear(x, weight, layer.bias)


def _merged_linear(layer: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """Merged mode's layer: the quantized linear of W + s*B@A (of G + s*B@A against G's scales on a grid base)."""
    delta = getattr(layer, ADAPTER_ATTR).delta(layer.weight.dtype)
    if grid_of(layer) is not None:
        return merged_grid_linear(layer, x, delta)
    return quantized_linear(layer, x, layer.weight + delta)


def _base_linear(layer: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """The frozen base's output: fq(W) x, computed on the grid where the base is held in one."""
    return quantized_linear(layer, x, layer.weight) if grid_of(layer) is None else grid_linear(layer, x)


class LoraLinear:
    """Mixin placed before a linear layer's class by `install`: same Parameters and state-dict names plus
    the adapter pair under `forge_lora`, and the LoRA forward."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pair: LoraPair = getattr(self, ADAPTER_ATTR)
        if not pair.enabled:
            return _base_linear(self, x)
        if pair.mode == "merged":
            if pair.trains_merged():
                # Recomputed in backward: autograd would otherwise keep, per layer until backward, the merged
                # weight's fake-quantized copy and the quantizer's masks, each the size of W (W itself is
                # frozen). The recompute runs the same ops under the same autocast state, so values and
                # gradients are those of the plain forward (tests/test_lora.py); the quantizers draw no
                # random numbers, so no RNG state is kept.
                return checkpoint(_merged_linear, self, x, use_reentrant=False, preserve_rng_state=False)
            return _merged_linear(self, x)
        return _base_linear(self, x) + pair.path(x)


_LORA_CLASSES: dict[type, type] = {}
_ORIGINAL_CLASSES: dict[type, type] = {}


def _swap_in(layer: torch.nn.Module, pair: torch.nn.Module) -> None:
    cls = type(layer)
    if cls not in _LORA_CLASSES:
        _LORA_CLASSES[cls] = type(f"Lora{cls.__name__}", (LoraLinear, cls), {})
        _ORIGINAL_CLASSES[_LORA_CLASSES[cls]] = cls
    setattr(layer, ADAPTER_ATTR, pair)
    layer.__class__ = _LORA_CLASSES[cls]


def is_lora_linear(module: torch.nn.Module) -> bool:
    return isinstance(module, LoraLinear)


def target_kind(name: str) -> str:
    """attention or mlp, for a linear layer's module name (experts stacks are found by their module)."""
    parts = name.split(".")
    return "attention" if any("attn" in p or "attention" in p for p in parts) else "mlp"


@dataclass(frozen=True, slots=True)
class Installed:
    """What `install` gave adapters, counted by the parameters they adapt and the parameters they add."""

    linears: list[str]
    stacks: dict[str, list[str]]
    adapted_numel: int
    adapter_numel: int

    def describe(self) -> str:
        return (f"LoRA adapters on {len(self.linears)} linear layers and "
                f"{sum(len(s) for s in self.stacks.values())} expert stacks ({self.adapted_numel:,} frozen "
                f"parameters adapted; {self.adapter_numel:,} adapter parameters train)")


def install(model: torch.nn.Module, cfg: LoraConfig, linears: list[str], stacks: dict[str, list[str]],
            seed: int = 0) -> Installed:
    """Give the named linear layers (module names) and expert stacks ({experts module: [stack, ...]}) of the
    targeted kinds adapter pairs, and freeze every other parameter of `model` that is not a learned scale.
    `linears`/`stacks`: the layers the recipe quantizes (`forge_qat.qat.coverage.plan`), or the float model's."""
    modules = dict(model.named_modules())
    chosen = [n for n in linears if target_kind(n) in cfg.targets]
    chosen_stacks = {n: s for n, s in stacks.items() if "experts" in cfg.targets}
    if not chosen and not chosen_stacks:
        raise ConfigError(f"--lora-targets {cfg.lora_targets}: the model has no such layers to adapt "
                          f"(it has {len(linears)} linear layers and {len(stacks)} experts modules)")
    too_small = sorted({n for n in chosen if min(true_shape(modules[n].weight)) < cfg.lora_rank}
                       | {n for n, s in chosen_stacks.items() for stack in s
                          if min(true_shape(getattr(modules[n], stack))[1:]) < cfg.lora_rank})
    if too_small:
        raise ConfigError(f"--lora-rank {cfg.lora_rank} exceeds the smaller dimension of {len(too_small)} adapted "
                          f"weight(s) (e.g. {too_small[0]}): a rank above min(in, out) adds parameters and no "
                          f"capacity; use a smaller --lora-rank")
    scaling = cfg.scaling
    adapted = added = 0
    for name in chosen:
        layer = modules[name]
        out_f, in_f = true_shape(layer.weight)
        pair = LoraPair(in_f, out_f, cfg.lora_rank, scaling, cfg.lora_qat, device=layer.weight.device,
                        seed=_layer_seed(seed, name))
        _swap_in(layer, pair)
        adapted += out_f * in_f
        added += sum(p.numel() for p in pair.parameters())
    for name, names in chosen_stacks.items():
        module = modules[name]
        pairs = {}
        for proj in experts_mod.projections(module):
            if proj.weight not in names:
                continue
            e, out_f, in_f = true_shape(getattr(module, proj.weight))
            pairs[proj.weight] = LoraPair(in_f, out_f, cfg.lora_rank, scaling, cfg.lora_qat, experts=e,
                                          device=getattr(module, proj.weight).device,
                                          seed=_layer_seed(seed, f"{name}.{proj.weight}"))
            adapted += e * out_f * in_f
            added += sum(p.numel() for p in pairs[proj.weight].parameters())
        experts_mod.install_lora(module, torch.nn.ModuleDict(pairs))
    for name, p in model.named_parameters():
        if not is_adapter(name) and not is_learned_scale(name):
            p.requires_grad_(False)
    return Installed(chosen, {n: list(s) for n, s in chosen_stacks.items()}, adapted, added)


def _layer_seed(seed: int, name: str) -> int:
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63


def readers(model: torch.nn.Module) -> list[tuple[torch.nn.Module, torch.nn.Parameter]]:
    """(module, adapter) for every adapter Parameter: they are read in the forward of the layer (or experts
    module) they adapt, not of the `LoraPair` that owns them. ZeRO-3 gathers a module's own parameters for its
    forward; the engine registers these as external parameters of their readers
    (`deepspeed.zero.register_external_parameter`), as it does learned scales."""
    found = []
    for module in model.modules():
        if is_lora_linear(module):
            pair = getattr(module, ADAPTER_ATTR)
            found += [(module, pair.lora_A), (module, pair.lora_B)]
        elif experts_mod.has_lora(module):
            for pair in getattr(module, experts_mod.LORA_ATTR).values():
                found += [(module, pair.lora_A), (module, pair.lora_B)]
    return found


def set_enabled(model: torch.nn.Module, enabled: bool) -> None:
    """Turn every adapter on or off (off: the frozen base model, e.g. as its own distillation teacher)."""
    for module in model.modules():
        if isinstance(module, LoraPair):
            module.enabled = enabled


def adapter_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """The adapters' Parameters by state-dict name."""
    return {n: p for n, p in model.named_parameters() if is_adapter(n)}


def is_adapter(name: str) -> bool:
    return f".{ADAPTER_ATTR}." in f".{name}"


@torch.no_grad()
def merge(model: torch.nn.Module) -> list[str]:
    """Fold every adapter into its weight, W <- W + s*B@A (G + s*B@A where the base is held in a grid: what
    merged mode trained; in the weight's dtype, the op merged mode's forward runs), and restore the layers'
    classes: the model finalize converts. Returns the merged weights' names."""
    merged = []
    for name, module in model.named_modules():
        if is_lora_linear(module):
            pair = getattr(module, ADAPTER_ATTR)
            base = base_weight(module) if pair.mode == "merged" else module.weight  # separate: deploys W + s*BA
            module.weight.data = base.detach() + pair.delta(module.weight.dtype)
            delattr(module, ADAPTER_ATTR)
            module.__class__ = _ORIGINAL_CLASSES[type(module)]
            merged.append(f"{name}.weight")
        elif experts_mod.has_lora(module):
            for stack, pair in getattr(module, experts_mod.LORA_ATTR).items():
                weight = getattr(module, stack)
                grid = stack_grid(module, stack) if pair.mode == "merged" else None
                base = weight.data if grid is None else grid.dequantize(weight.dtype)
                weight.data = base + pair.delta(weight.dtype)
                merged.append(f"{name}.{stack}")
            experts_mod.remove_lora(module)
    return merged


def adapted_weights(adapters: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(A, B) of every adapted weight, by the weight's state-dict name (`<layer>.weight`, `<experts>.<stack>`)."""
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in adapters.items():
        owner, _, part = name.rpartition(f".{ADAPTER_ATTR}.")
        stack, _, ab = part.rpartition(".")
        weight = f"{owner}.{stack}" if stack else f"{owner}.weight"
        pairs.setdefault(weight, {})[ab or part] = tensor
    return {w: (p["lora_A"], p["lora_B"]) for w, p in pairs.items()}


class MergedReader:
    """A `TensorReader` whose adapted weights read as W + s*B@A (`delta`, in the dtype read): what finalize
    converts block by block from a LoRA checkpoint. Reads of other tensors pass through. `grid`: the weights a
    merged-mode run held in a grid (`forge_qat.lora.grid_base.grid_specs`), which read as G + s*B@A, G their
    grid's values, as that run trained."""

    def __init__(self, reader, adapters: dict[str, torch.Tensor], scaling: float,
                 grid: dict[str, AffineSpec] | None = None):
        self._reader, self._pairs, self._scaling = reader, adapted_weights(adapters), scaling
        self._grid = grid or {}

    def keys(self) -> set[str]:
        return self._reader.keys()

    def shape(self, name: str) -> list[int]:
        return self._reader.shape(name)

    def __getattr__(self, name: str):  # anything else the wrapped reader offers (a layout reader's `layout`)
        return getattr(self._reader, name)

    def read_flat(self, name: str, start: int, out: torch.Tensor) -> None:
        if name not in self._pairs:
            self._reader.read_flat(name, start, out)
            return
        shape = self._reader.shape(name)
        whole = torch.empty(math.prod(shape), dtype=out.dtype)
        self._reader.read_flat(name, 0, whole)
        a, b = self._pairs[name]
        base = whole.view(shape)
        if name in self._grid:
            base = quantize_dequantize(base, self._grid[name])
        merged = base + delta(a, b, self._scaling, out.dtype)
        out.copy_(merged.view(-1)[start:start + out.numel()])


@torch.no_grad()
def merge_into(model: torch.nn.Module, adapters: dict[str, torch.Tensor], scaling: float) -> int:
    """W <- W + s*B@A for every weight a checkpoint's adapters adapt, in a float model (`forge eval` of a LoRA
    checkpoint without fake quantization). Returns the number of weights merged."""
    state = model.state_dict(keep_vars=True)
    pairs = adapted_weights(adapters)
    unknown = sorted(set(pairs) - set(state))
    if unknown:
        raise ConfigError(f"LoRA adapters for weights the model does not have: {unknown[:3]}")
    for name, (a, b) in pairs.items():
        weight = state[name]
        weight.data = weight.data + delta(a.to(weight.device), b.to(weight.device), scaling, weight.dtype)
    return len(pairs)


@torch.no_grad()
def load(model: torch.nn.Module, adapters: dict[str, torch.Tensor], source) -> None:
    """Copy a checkpoint's adapters into the pairs `install` gave `model`; they must match one to one, shape for
    shape (a smaller tensor would broadcast over the whole pair)."""
    state = model.state_dict(keep_vars=True)
    check_shapes(source, "LoRA adapters", adapters, {n: true_shape(p) for n, p in state.items() if is_adapter(n)})
    for name, value in adapters.items():
        state[name].copy_(value)


def check_pairs(adapters: dict[str, torch.Tensor], weight_shapes: dict[str, list[int]], rank: int, source) -> None:
    """A checkpoint's adapters against the weights they adapt, without a model holding pairs (the block-by-block
    finalize): each adapted weight is the model's, A is (*experts, rank, in) and B (*experts, out, rank)."""
    pairs = adapted_weights(adapters)
    unknown = sorted(set(pairs) - set(weight_shapes))
    if unknown:
        raise InputError(f"{source}: LoRA adapters for weights the model does not have: {unknown[:3]}")
    for name, (a, b) in pairs.items():
        *lead, out_f, in_f = weight_shapes[name]
        want = {"lora_A": [*lead, rank, in_f], "lora_B": [*lead, out_f, rank]}
        for part, value in (("lora_A", a), ("lora_B", b)):
            if list(value.shape) != want[part]:
                raise InputError(f"{source}: the {part} adapter of {name} has shape {list(value.shape)}, the model "
                                 f"and --lora-rank {rank} make it {want[part]} (the file was edited or belongs to "
                                 f"another model)")
