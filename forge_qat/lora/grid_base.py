"""`--lora-base-grid`: the frozen base of a LoRA run held in its recipe's grid, not in float.

With `--lora-rank` the base weights never change, so their fake quantization never changes either: each
quantized linear layer and expert stack keeps its weight as the codes and scales the recipe gives it
(`forge_qat.qat.grid`, int4 codes two to a byte), and its float Parameter keeps its shape, dtype and device over
one element
(a NaN, broadcast: anything that read it instead of the grid would turn the loss into NaN, not into a
plausible number). The layer then computes:

- separate mode (and with its adapters off, e.g. as the `self` distillation teacher): `act(x) @ G^T + s*B(Ax)`
  with `G` the grid's values, which are `fq(W)` bit for bit: today's numerics;
- merged mode: `q_G(G + s*B@A)`: the grid plus the adapters, quantized against the grid's own scales, which stay
  fixed (`FrozenGrid.requantize`), so at B = 0 the layer is the frozen quantized base exactly. (The recipe's
  dynamic quantizer would choose new scales from `G`: its largest value sits on the grid's end, not half a step
  beyond it as in W, so every value of a group would move.) The checkpoint keeps those scales as learned scales
  and finalize converts `G + s*B@A` with them, so the artifact is what trained. It differs from `q(W + s*B@A)`
  in that the adapters move the already rounded weights: a value leaves its grid point only when the adapters
  move it at least half a step.

`G` is made from the codes when a forward needs it and again in backward (`forge_qat.qat.grid.grid_matmul`), not
kept between them.
A grid run's first checkpoint reads the base's float weights from the model directory the run started from (the
grid is a function of them), one tensor at a time, and later ones hard-link it, so every checkpoint stays a
complete model that stock `from_pretrained` reads.

Called by `forge_qat.train.model_setup` (install), `forge_qat.lora.adapters` (the layers' forward) and
`forge_qat.train.checkpointing`.
"""

import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from forge_qat import heap
from forge_qat.errors import ConfigError, InputError
from forge_qat.formats.weights import TensorReader, tied_aliases
from forge_qat.lora.config import ADAPTER_ATTR
from forge_qat.qat import experts as experts_mod
from forge_qat.qat import host_experts, host_store
from forge_qat.qat.fake_quant import SCALE_SUFFIX, AffineSpec, IntegerGridFakeQuantizedLinear, consumer_dtype
from forge_qat.qat.grid import GRID_ATTR, FrozenGrid, grid_matmul, grid_of, gridable


def gridded_weights(model: torch.nn.Module) -> set[str]:
    """State-dict names of the weights held in a grid (their Parameters hold a placeholder)."""
    names = set()
    for name, module in model.named_modules():
        grids = module._modules.get(GRID_ATTR)
        if isinstance(grids, FrozenGrid):
            names.add(f"{name}.weight")
        elif isinstance(grids, torch.nn.ModuleDict):
            names.update(f"{name}.{stack}" for stack in grids)
    return names


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
    return grid_matmul(x, grid, dtype, layer.bias)


def merged_grid_linear(layer: torch.nn.Module, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """Merged mode on a grid: the layer's activation quantizer, then `G + s*B@A` fake-quantized against the grid's
    own, fixed scales (`FrozenGrid.requantize`): at B = 0 exactly the frozen base (the layer's dynamic quantizer
    would choose new scales from G and move every value)."""
    act = getattr(layer, "activation_fake_quantizer", None)
    if act is not None:
        x = act(x)
    grid = grid_of(layer)
    w = grid.requantize(grid.dequantize(layer.weight.dtype) + delta, consumer_dtype(layer.weight))
    return F.linear(x, w, layer.bias)


def grid_scales(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every grid's scales under the name a learned scale of that weight has (`<layer>.weight_fake_quantizer.scale`,
    `<experts>.forge_fake_quant.<stack>.weight_fake_quantizer.scale`): what a merged-mode grid run's checkpoint
    keeps in `learned_scales/`, so finalize converts against the scales training quantized with."""
    scales = {}
    for name, module in model.named_modules():
        grids = module._modules.get(GRID_ATTR)
        if isinstance(grids, FrozenGrid):
            scales[f"{name}{SCALE_SUFFIX}"] = grids.learned_scale().cpu()
        elif isinstance(grids, torch.nn.ModuleDict):
            for stack, grid in grids.items():
                scales[f"{name}.{experts_mod.FAKE_QUANT_ATTR}.{stack}{SCALE_SUFFIX}"] = grid.learned_scale().cpu()
    return scales


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
    stacks: int = 0
    params: int = 0
    grid_bytes: int = 0
    float_bytes: int = 0
    """The same weights as the model held them before, in `float_dtype`."""
    float_dtype: str = ""
    kept: Counter = field(default_factory=Counter)
    """Frozen quantized parameters left in float, by reason."""

    def describe(self) -> str:
        text = (f"LoRA base grid: {self.layers} linear layers and {self.stacks} expert stacks ({self.params:,} "
                f"frozen parameters) held as their "
                f"recipe's codes and scales, {self.grid_bytes / 1e6:,.1f} MB vs {self.float_bytes / 1e6:,.1f} MB "
                f"in {self.float_dtype or 'float'} ({self.grid_bytes / max(self.float_bytes, 1):.2f}x)")
        if self.kept:
            text += "; kept in float: " + ", ".join(f"{reason} {n:,}" for reason, n in sorted(self.kept.items()))
        return text


INTEGER_MATMUL = "integer-grid matmul layers (int8 x int8, not yet)"


def grid_obstacle(quantizers: torch.nn.Module) -> str | None:
    """Why the weight a prepared linear layer (or an experts module's `ProjectionFakeQuant`) quantizes can not be
    held in its grid; None when it can. The one rule training (`install`) and finalize (`grid_specs`) share."""
    if isinstance(quantizers, IntegerGridFakeQuantizedLinear) or getattr(quantizers, "integer_grid", False):
        return INTEGER_MATMUL
    return gridable(getattr(quantizers, "weight_fake_quantizer", None))


def _sites(model: torch.nn.Module, linears: list[str], stacks: dict[str, list[str]]):
    """(state-dict name, owning module, stack name or None, quantizers) of every quantized weight."""
    for name in linears:
        layer = model.get_submodule(name)
        yield f"{name}.weight", layer, None, layer
    for name, names in stacks.items():
        module = model.get_submodule(name)
        for stack in names:
            yield f"{name}.{stack}", module, stack, getattr(module, experts_mod.FAKE_QUANT_ATTR)[stack]


def grid_specs(model: torch.nn.Module, linears: list[str], stacks: dict[str, list[str]]) -> dict[str, AffineSpec]:
    """The grid of every weight a grid run held in one, by state-dict name, from the prepared `model`, its
    quantized `linears` (module names) and expert `stacks` (the coverage plan's): what finalize merges a grid
    run's adapters into."""
    return {name: q.weight_fake_quantizer.spec for name, _, _, q in _sites(model, linears, stacks)
            if grid_obstacle(q) is None}


@torch.no_grad()
def install(model: torch.nn.Module, linears: list[str], stacks: dict[str, list[str]],
            keep_weights: bool = False, source: TensorReader | None = None) -> GridBase:
    """Hold the frozen weights of the prepared `model`'s quantized `linears` (module names) and expert `stacks`
    ({experts module: [stack, ...]}), the coverage plan's, in their grids. `keep_weights`: leave the float weights
    in place too (finalize, which converts the weights without adapters from them). `source`: read each weight
    from it (under the model's names) as its grid is made, one at a time, instead of from the model, whose
    Parameters then need never have held them (`allocated`)."""
    report = GridBase()
    for name, owner, stack, quantizers in _sites(model, linears, stacks):
        weight = owner.weight if stack is None else getattr(owner, stack)
        if weight.requires_grad:
            raise ValueError(f"{name}: a grid holds frozen weights only")
        why = grid_obstacle(quantizers)
        if why is not None:
            report.kept[why] += weight.numel()
            continue
        value = weight
        if source is not None:
            value = torch.empty(weight.shape, dtype=weight.dtype)
            source.read_flat(name, 0, value.view(-1))
            value = value.to(weight.device)
        grid = FrozenGrid.of(value, quantizers.weight_fake_quantizer.spec)
        del value
        if source is not None:
            # the read and the grid's temporaries (a few times the weight) are free again: hand their pages back,
            # or glibc keeps them below the grids that stay and the load grows by the float weights after all
            heap.release_free_memory()
        report.layers += stack is None
        report.stacks += stack is not None
        report.params += weight.numel()
        report.grid_bytes += grid.nbytes()
        report.float_bytes += weight.numel() * weight.element_size()
        report.float_dtype = str(weight.dtype).removeprefix("torch.")
        _hold(owner, stack, weight, grid, keep_weights)
    return report


def _hold(owner: torch.nn.Module, stack: str | None, weight: torch.nn.Parameter, grid: FrozenGrid,
          keep_weights: bool) -> None:
    """Make `grid` the weight of `owner` (a linear layer; of an experts module, its stack `stack`); its Parameter
    keeps a placeholder unless `keep_weights`."""
    if stack is None:
        setattr(owner, GRID_ATTR, grid)
    else:
        if GRID_ATTR not in owner._modules:
            setattr(owner, GRID_ATTR, torch.nn.ModuleDict())
        owner._modules[GRID_ATTR][stack] = grid
    if not keep_weights:
        weight.data = torch.full((), float("nan"), dtype=weight.dtype, device=weight.device).expand(weight.shape)
    if stack is None and ADAPTER_ATTR not in owner._modules:  # a layer without adapters computes on its grid
        cls = type(owner)
        if cls not in _GRID_CLASSES:
            _GRID_CLASSES[cls] = type(f"Grid{cls.__name__}", (GridLinear, cls), {})
            _ORIGINAL_CLASSES[_GRID_CLASSES[cls]] = cls
        owner.__class__ = _GRID_CLASSES[cls]


@dataclass
class Offloaded:
    """What `offload_experts` put in host memory."""

    modules: int
    stacks: int
    params: int
    host_bytes: int
    shared_by: int = 1
    """Ranks of this machine mapping the one copy (`share_experts`)."""

    def describe(self, device: torch.device) -> str:
        where = ("the host is this run's device too: nothing moves" if device.type == host_experts.HOST.type
                 else f"{device} holds the rest")
        once = f", one copy shared by this machine's {self.shared_by} ranks" if self.shared_by > 1 else ""
        return (f"experts offload: {self.stacks} expert stacks in {self.modules} MoE layers ({self.params:,} frozen "
                f"parameters, {self.host_bytes / 1e6:,.1f} MB in their grid) held and computed in host memory"
                f"{once}; {where}")


def offload_experts(model: torch.nn.Module) -> Offloaded:
    """`--experts-offload host`: pin the grids of every experts module whose stacks `install` holds in them to the
    host, where their forward then runs (`forge_qat.qat.host_experts`). Raises ConfigError where none is held: the
    flag would do nothing."""
    report = Offloaded(0, 0, 0, 0)
    for module in model.modules():
        grids = module._modules.get(GRID_ATTR)
        if experts_mod.is_experts(module) and isinstance(grids, torch.nn.ModuleDict) and len(grids):
            host_experts.pin(module)
            report.modules += 1
            report.stacks += len(grids)
            report.params += sum(math.prod(g.shape) for g in grids.values())
            report.host_bytes += sum(g.nbytes() for g in grids.values())
    if not report.modules:
        raise ConfigError("--experts-offload host: this model has no expert stacks held in their grid to offload "
                          "(a dense model, or a recipe that leaves its experts in float)")
    return report


def _offloaded_grids(model: torch.nn.Module) -> dict[str, FrozenGrid]:
    return {f"{name}.{stack}": grid for name, module in model.named_modules() if host_experts.offloaded(module)
            for stack, grid in module._modules[GRID_ATTR].items()}


def share_experts(model: torch.nn.Module, ranks) -> Offloaded:
    """`--experts-offload host` under several ranks: one copy of the experts' grids per machine (`forge_qat.qat.
    host_store`). `ranks`: the engine (`rank`, `local_rank`, `ranks_on_machine`, `broadcast`, `barrier`). A machine's
    local rank 0 has made the grids (`install`) and offloads and publishes them; the others, whose `install` left
    the expert stacks out (their Parameters allocated, never read), attach views of the stacks it published and
    offload those."""
    leader = ranks.local_rank == 0
    path = Path(ranks.broadcast(str(host_store.new_path()) if ranks.rank == 0 else None))
    slots = None
    if leader:
        report = offload_experts(model)
        host_store.remove_stale()
        grids = _offloaded_grids(model)
        tensors = {f"{key}.{part}": getattr(grid, part) for key, grid in grids.items() for part in ("codes", "scale")}
        slots, views = host_store.publish(tensors, path)
        del tensors
        for key, grid in grids.items():
            grid.codes, grid.scale = views[f"{key}.codes"], views[f"{key}.scale"]
        heap.release_free_memory()
    slots = ranks.broadcast(slots if ranks.rank == 0 else None)  # the layout is the same on every machine
    ranks.barrier()  # every machine's file is written
    if not leader:
        views = host_store.attach(path, slots)
        for key in dict.fromkeys(slot.key.rsplit(".", 1)[0] for slot in slots):  # <experts module>.<stack>
            name, stack = key.rsplit(".", 1)
            module = model.get_submodule(name)
            weight = getattr(module, stack)
            spec = getattr(module, experts_mod.FAKE_QUANT_ATTR)[stack].weight_fake_quantizer.spec
            _hold(module, stack, weight, FrozenGrid(views[f"{key}.codes"], views[f"{key}.scale"], spec,
                                                    tuple(weight.shape), weight.dtype), keep_weights=False)
        report = offload_experts(model)
    ranks.barrier()  # every rank has mapped it: the name can go, the memory stays until the last one exits
    if leader:
        path.unlink(missing_ok=True)
    report.shared_by = ranks.ranks_on_machine
    return report


def allocated(config, dtype: torch.dtype) -> torch.nn.Module:
    """A model of `config` whose weights are allocated and never written (`no_init_weights`): the operating
    system gives their pages only when first written, so until `read_rest` and `install` fill them it holds
    none of their bytes, and a weight a grid holds never does. Its buffers (rotary frequencies) are computed."""
    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    with no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.tie_weights()
    return model


@torch.no_grad()
def read_rest(model: torch.nn.Module, source: TensorReader) -> int:
    """Read every frozen float weight of `model` its grids do not hold from `source` (under the model's names, one
    at a time, straight into the Parameter); returns the bytes read. Buffers the source lacks keep their values."""
    gridded, tied = gridded_weights(model), tied_aliases(model)
    params, keys = dict(model.named_parameters()), source.keys()
    read = 0
    for name, tensor in model.state_dict(keep_vars=True).items():
        if name in gridded or name in tied or (name in params and params[name].requires_grad):
            continue  # held in a grid, an alias, or added by forge and trained (adapters)
        if name not in keys:
            if name in params:
                raise InputError(f"the model directory has no {name}, which the model needs")
            continue  # a buffer the model computes itself
        source.read_flat(name, 0, tensor.data.view(-1))
        read += tensor.numel() * tensor.element_size()
    return read


@torch.no_grad()
def to_device(model: torch.nn.Module, device: torch.device) -> None:
    """`model.to(device)` for a model with grids: a held weight's placeholder is made again on `device` (moving it
    would write out its full size there)."""
    gridded = gridded_weights(model)
    for name, p in model.named_parameters():
        if name in gridded:
            p.data = torch.full((), float("nan"), dtype=p.dtype, device=device).expand(p.shape)
        else:
            p.data = p.data.to(device)
    move_buffers(model, device)


def move_buffers(model: torch.nn.Module, device: torch.device) -> None:
    """Every buffer of `model` (its grids' codes and scales among them) to `device`, except the grids pinned to the
    host (`forge_qat.qat.host_experts`)."""
    for module in model.modules():
        if isinstance(module, FrozenGrid) and module.on_host:
            continue
        for key, b in module._buffers.items():
            if b is not None:
                module._buffers[key] = b.to(device)


def remove(model: torch.nn.Module) -> None:
    """Take every grid out and restore the layers' classes (finalize, after merging)."""
    for module in model.modules():
        if GRID_ATTR in module._modules:
            delattr(module, GRID_ATTR)
            if type(module) in _ORIGINAL_CLASSES:
                module.__class__ = _ORIGINAL_CLASSES[type(module)]
