"""QAT prepare through the registry: fake quantization installed on the linear layers, MoE expert stacks and
tables a recipe's coverage plan names, learned scales, the fake-quant switches; and float8 training, the other
linear-layer swap.

Called by training's model setup (prepare, fake-quant delay) and by finalize (prepare, then
`forge_qat.qat.convert`). What is quantized is decided once by `forge_qat.qat.coverage.plan`, so both phases agree.
"""

import contextlib
import logging
import re
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field

import torch
from torchao.quantization import quantize_
from torchao.quantization.granularity import PerAxis, PerGroup, PerToken
from torchao.quantization.qat import FakeQuantizedLinear, QATConfig
from torchao.quantization.qat.fake_quantizer import IntxFakeQuantizer
from torchao.quantization.qat.linear import enable_linear_fake_quant
from torchao.quantization.quant_primitives import ZeroPointDomain

from forge_qat import hardware
from forge_qat.errors import ConfigError, ConversionError, HardwareError, InputError, choices_message
from forge_qat.formats.weights import true_shape
from forge_qat.qat import embeddings, experts, grouped_experts
from forge_qat.qat.config import FP8_RECIPES
from forge_qat.qat.coverage import OUTPUT_HEAD_NAMES, Coverage, check_useful, plan
from forge_qat.qat.experts import ProjectionFakeQuant
from forge_qat.qat.fake_quant import (
    SCALE_SUFFIX,
    AffineFakeQuantizer,
    AffineSpec,
    IntegerGridFakeQuantizedLinear,
    LearnedScaleFakeQuantizer,
    ScaleInit,
    initial_scale,
    is_learned_scale,
)
from forge_qat.qat.numerics import LayerSite
from forge_qat.qat.registry import Recipe, get_recipe, recipe_names

log = logging.getLogger(__name__)

def filter_for(names: set[str]) -> Callable[[torch.nn.Module, str], bool]:
    return lambda module, fqn: fqn in names


def _fused_spec(quantizer: torch.nn.Module) -> AffineSpec | None:
    """The fused equivalent of a torchao `IntxFakeQuantizer`, or None where numerics would differ."""
    if type(quantizer) is not IntxFakeQuantizer:
        return None
    c = quantizer.config
    if not c.is_dynamic or c.range_learning or c.zero_point_domain != ZeroPointDomain.INT:
        return None
    bits = {torch.int8: 8, **{getattr(torch, f"int{b}"): b for b in range(2, 8)}}.get(c.dtype)
    if bits is None:
        return None
    common = dict(bits=bits, eps=c.eps, scale_dtype=c.scale_precision)
    g = c.granularity
    if isinstance(g, PerToken) and not c.is_symmetric:
        return AffineSpec(granularity="per_token", symmetric=False, **common)
    if isinstance(g, PerGroup) and c.is_symmetric:
        return AffineSpec(granularity="per_group", symmetric=True, group_size=g.group_size, **common)
    if isinstance(g, PerAxis) and g.axis == 0 and c.is_symmetric:
        return AffineSpec(granularity="per_channel", symmetric=True, **common)
    return None


def _prepared_twin(in_features: int, out_features: int, bias: bool, dtype: torch.dtype,
                   recipe: Recipe) -> FakeQuantizedLinear:
    """The recipe's `FakeQuantizedLinear` for a linear of this shape, built on the meta device (no weight is
    allocated: torchao's `from_linear` would allocate one per layer, under ZeRO-3 the whole layer on every
    rank). Its fake quantizers are those of the recipe's record where it has one, else those torchao's
    `QATConfig(base, step="prepare")` chooses, with the quantizers that have a fused equivalent swapped
    for it."""
    plan = recipe.fake_quant
    if plan is not None:
        cls = IntegerGridFakeQuantizedLinear if plan.integer_matmul else FakeQuantizedLinear
        twin = cls(in_features, out_features, bias, device="meta", dtype=dtype)
        twin.activation_fake_quantizer = AffineFakeQuantizer(plan.activation) if plan.activation else None
        twin.weight_fake_quantizer = AffineFakeQuantizer(plan.weight) if plan.weight else None
        return twin
    holder = torch.nn.ModuleDict({"linear": torch.nn.Linear(in_features, out_features, bias, device="meta",
                                                            dtype=dtype)})
    quantize_(holder, QATConfig(recipe.base_config(), step="prepare"))
    twin = holder["linear"]
    for slot in ("activation_fake_quantizer", "weight_fake_quantizer"):
        spec = _fused_spec(getattr(twin, slot))
        if spec is not None:
            setattr(twin, slot, AffineFakeQuantizer(spec))
    return twin


def _fake_quantized_linear(linear: torch.nn.Linear, recipe: Recipe,
                           site: LayerSite | None = None) -> FakeQuantizedLinear:
    """The prepared replacement of `linear`, sharing its Parameter objects; `site`: where it sits, for a recipe
    whose quantizers depend on it."""
    if recipe.layer_quantizers is not None:
        prepared = FakeQuantizedLinear(linear.in_features, linear.out_features, linear.bias is not None,
                                       device="meta", dtype=linear.weight.dtype)
        prepared.activation_fake_quantizer, prepared.weight_fake_quantizer = recipe.layer_quantizers(site)
    else:
        prepared = _prepared_twin(linear.in_features, linear.out_features, linear.bias is not None,
                                  linear.weight.dtype, recipe)
    prepared.weight = linear.weight
    prepared.bias = linear.bias
    return prepared


def _expert_quantizers(module: torch.nn.Module, stacks: list[str], recipe: Recipe,
                       sites: Mapping[str, LayerSite] | None = None) -> dict[str, ProjectionFakeQuant]:
    """Per projection of an experts module, the fake quantizers of the recipe's linear of the same shape
    (none for a stack the plan keeps in float); `sites`: where each stack sits, by projection name, for a recipe
    whose quantizers depend on it."""
    quantizers = {}
    for proj in experts.projections(module):
        if proj.weight not in stacks:
            quantizers[proj.weight] = ProjectionFakeQuant(None, None, integer_grid=False)
            continue
        if recipe.layer_quantizers is not None:
            quantizers[proj.weight] = ProjectionFakeQuant(*recipe.layer_quantizers(sites[proj.weight]),
                                                          integer_grid=False)
            continue
        dtype = getattr(module, proj.weight).dtype
        twin = _prepared_twin(proj.in_features, proj.out_features, proj.bias is not None, dtype, recipe)
        quantizers[proj.weight] = ProjectionFakeQuant(twin.activation_fake_quantizer, twin.weight_fake_quantizer,
                                                      integer_grid=isinstance(twin, IntegerGridFakeQuantizedLinear))
    return quantizers


Gather = Callable[[torch.nn.Parameter], AbstractContextManager]
"""Makes a (ZeRO-3 partitioned) parameter whole inside its context."""


@dataclass(frozen=True, slots=True)
class LearnScales:
    """`--qat-learn-scales`: the weight scales of every quantized linear layer and MoE expert stack become a
    trainable Parameter (float32, one per output row and group; for a stack, per expert too), named
    `<layer>.weight_fake_quantizer.scale` and `<experts>.forge_fake_quant.<stack>.weight_fake_quantizer.scale`."""

    initial: Mapping[str, torch.Tensor] | None = None
    """Scales by parameter name (a checkpoint's, see `forge_qat.formats.checkpoint.read_learned_scales`); None:
    chosen from the weights as `init` says."""
    init: ScaleInit = "mse"
    """How scales chosen from the weights start (`forge_qat.qat.fake_quant.ScaleInit`)."""
    gather: Gather = field(default=lambda p: contextlib.nullcontext())
    """Makes a partitioned weight whole while its scales are chosen (ZeRO-3: one layer or stack at a time)."""
    unread: Callable[[torch.nn.Parameter, AffineSpec, ScaleInit], torch.Tensor | None] = \
        field(default=lambda p, spec, init: None)
    """The starting scales of a weight the engine has not read yet, chosen by the engine from the checkpoint (an
    expert-parallel stack, read after the wrap: `ZeroEngine.unread_scales`); None: chosen from the weight."""


@dataclass(frozen=True, slots=True)
class _ScaleSite:
    """Where a weight is fake-quantized: the module holding its `weight_fake_quantizer` (a prepared linear,
    or one projection's quantizers of an experts module), the weight, and the module whose forward reads
    the quantizer's learned scale (the linear; the experts module, whose eager loop reads one expert's slice)."""

    holder: torch.nn.Module
    weight: torch.nn.Parameter
    reader: torch.nn.Module


def _scale_sites(model: torch.nn.Module) -> dict[str, _ScaleSite]:
    """Every fake-quantized weight of a prepared model, by the name its learned scale's prefix has."""
    sites = {}
    for name, module in model.named_modules():
        if embeddings.is_fake_quantized_table(module):
            # The output head's grid is the input embedding's where they are tied (one weight, one grid):
            # embedding tables keep the scales chosen from their weights.
            continue
        if isinstance(module, FakeQuantizedLinear) and module.weight_fake_quantizer is not None:
            sites[name] = _ScaleSite(module, module.weight, module)
        elif experts.is_fake_quantized(module):
            for stack, quantizers in getattr(module, experts.FAKE_QUANT_ATTR).items():
                if quantizers.weight_fake_quantizer is not None:
                    sites[f"{name}.{experts.FAKE_QUANT_ATTR}.{stack}"] = _ScaleSite(
                        quantizers, getattr(module, stack), module)
    return sites


def _expected_scale_names(coverage: Coverage) -> set[str]:
    """The learned-scale names the prepared model will have (as `_scale_sites` names them + the suffix)."""
    stacks = {f"{name}.{experts.FAKE_QUANT_ATTR}.{stack}"
              for name, found in coverage.experts.items() for stack in found}
    return {name + SCALE_SUFFIX for name in set(coverage.linears) | stacks}


def _check_initial_scales(coverage: Coverage, initial: Mapping[str, torch.Tensor]) -> None:
    wanted = _expected_scale_names(coverage)
    missing, unused = sorted(wanted - set(initial)), sorted(set(initial) - wanted)
    if missing or unused:
        raise ConversionError(f"the checkpoint's learned scales do not match the model's quantized layers: "
                              f"missing {missing[:3]}, unexpected {unused[:3]}")


def _learn_scales(model: torch.nn.Module, learn: LearnScales) -> None:
    """Give every fake-quantized weight of the prepared `model` a `LearnedScaleFakeQuantizer` with its starting
    scales (one site at a time: under ZeRO-3 one gathered weight or stack at a time)."""
    for name, site in _scale_sites(model).items():
        quantizer = site.holder.weight_fake_quantizer
        if not isinstance(quantizer, AffineFakeQuantizer):
            raise ConfigError(f"{name}: its weight fake quantizer ({type(quantizer).__name__}) has no learnable "
                              f"scales")
        if learn.initial is not None:
            scale = learn.initial[name + SCALE_SUFFIX]
            rows = true_shape(site.weight)
            want = [*rows[:-1], rows[-1] // (quantizer.spec.group_size or rows[-1])
                    if quantizer.spec.granularity == "per_group" else 1]
            if list(scale.shape) != want:
                raise InputError(f"the checkpoint's learned scale {name + SCALE_SUFFIX} has shape "
                                 f"{list(scale.shape)}, the weight's grid needs {want} (the file was edited or "
                                 f"belongs to another model)")
            if not quantizer.spec.signed_scale and bool((scale < 0).any()):
                raise InputError(f"the checkpoint's learned scale {name + SCALE_SUFFIX} holds "
                                 f"{int((scale < 0).sum())} negative values; this recipe's grid stores positive "
                                 f"scales (the file was edited or belongs to another recipe)")
            scale = scale.to(site.weight.device)
        elif (scale := learn.unread(site.weight, quantizer.spec, learn.init)) is None:
            with learn.gather(site.weight):
                scale = initial_scale(site.weight.data, quantizer.spec, learn.init)
        site.holder.weight_fake_quantizer = LearnedScaleFakeQuantizer(quantizer.spec, scale)


def learned_scale_readers(model: torch.nn.Module) -> list[tuple[torch.nn.Module, torch.nn.Parameter]]:
    """(module, scale) for every learned scale read in a module's forward other than its quantizer's own: the
    integer-grid linear multiplies with it directly, an experts module's eager loop slices it per expert.
    ZeRO-3 gathers a parameter for the forward of the module that owns it; one read elsewhere it finds only
    when the read happens inside the engine's own forward (it then registers it on the fly). The engine
    registers these up front as external parameters of their readers
    (`deepspeed.zero.register_external_parameter`), so they are gathered with the reader however it is called."""
    return [(site.reader, site.holder.weight_fake_quantizer.scale) for site in _scale_sites(model).values()
            if isinstance(site.holder.weight_fake_quantizer, LearnedScaleFakeQuantizer)]


_LAYER_INDEX = re.compile(r"\.layers\.(\d+)\.")


def _layer_sites(model: torch.nn.Module, coverage: Coverage) -> dict[str, LayerSite]:
    """Where each planned linear sits in the model (its block index, the model's depth, tying, experts), for
    recipes whose numerics depend on it: read from the whole model's config, so never from one block."""
    config = getattr(model, "config", None)
    depth = getattr(config, "num_hidden_layers", None)
    if depth is None:
        raise ConfigError("this recipe chooses each layer's numerics by its place in the model: prepare the whole "
                          "model (its config's num_hidden_layers), not one block")
    tied = bool(getattr(config, "tie_word_embeddings", False))
    n_experts = int(getattr(config, "num_local_experts", 0) or getattr(config, "num_experts", 0) or 0)
    places = [(name, linear.in_features) for name, linear in coverage.linears.items()]
    for name, found in coverage.experts.items():
        module = model.get_submodule(name)
        places += [(f"{name}.{p.weight}", p.in_features) for p in experts.projections(module) if p.weight in found]
    sites = {}
    for name, in_features in places:
        found = _LAYER_INDEX.search(f".{name}")
        sites[name] = LayerSite(name=name, in_features=in_features, layer=int(found.group(1)) if found else None,
                                n_layers=depth, tied=tied, n_experts=n_experts)
    return sites


def prepare_qat(model: torch.nn.Module, recipe: Recipe, coverage: Coverage | None = None,
                learn: LearnScales | None = None) -> Coverage:
    """Install the recipe's fake quantization on its linear layers and MoE expert stacks, keeping the same
    Parameter objects (so the state dict, ZeRO-3 partitions and optimizer state are the float model's;
    with `learn`, plus one scale Parameter per quantized linear layer and expert stack).

    Returns the plan, counted by parameters. Raises before changing anything when the recipe would
    quantize nothing, or would leave weights it cannot handle silently in float (`check_useful`).
    `coverage`: this model's plan, when the caller has made it already."""
    coverage = coverage or plan(model, recipe)
    check_useful(coverage, recipe)
    if learn is not None:
        if not recipe.learnable_scales:
            raise ConfigError(f"{recipe.name} has no learnable weight scales; recipes that have: "
                              f"{', '.join(n for n in recipe_names() if get_recipe(n).learnable_scales)}")
        if learn.initial is not None:
            _check_initial_scales(coverage, learn.initial)
    modules = dict(model.named_modules())
    sites = _layer_sites(model, coverage) if recipe.layer_quantizers is not None else {}
    prepared = {name: _fake_quantized_linear(linear, recipe, sites.get(name))
                for name, linear in coverage.linears.items()}
    for name, layer in prepared.items():
        parent, _, child = name.rpartition(".")
        setattr(modules[parent] if parent else model, child, layer)
    for name, module in coverage.tables.items():
        parent, _, child = name.rpartition(".")
        setattr(modules[parent] if parent else model, child, embeddings.fake_quantized(module, recipe.embeddings))
    for name, stacks in coverage.experts.items():
        module = modules[name]
        experts.install_fake_quant(module, _expert_quantizers(
            module, stacks, recipe, {p: sites[f"{name}.{p}"] for p in stacks} if sites else None))
    if learn is not None:
        _learn_scales(model, learn)
    return coverage


def reinitialize_learned_scales(model: torch.nn.Module, full_tensor: Gather,
                                set_full: Callable[[torch.nn.Parameter, torch.Tensor], None],
                                init: ScaleInit = "mse") -> int:
    """Choose every learned scale again (as `init` says) from its weight now: where fake quantization starts
    after float steps, the scales start from the weights of that step, as they start from the initial
    weights otherwise. `full_tensor`/`set_full`: the engine's (collective: every rank runs this, in the same
    order). Returns the number of weights (linear layers and expert stacks)."""
    count = 0
    for site in _scale_sites(model).values():
        quantizer = site.holder.weight_fake_quantizer
        if not isinstance(quantizer, LearnedScaleFakeQuantizer):
            continue
        with full_tensor(site.weight) as weight:
            value = initial_scale(weight.to(quantizer.scale.device), quantizer.spec, init)
        set_full(quantizer.scale, value.reshape(true_shape(quantizer.scale)))  # not a ZeRO-3 partition's shape
        count += 1
    return count


def learned_scales(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """The learned weight-scale Parameters of a prepared model, by state-dict name."""
    return {n: p for n, p in model.named_parameters() if is_learned_scale(n)}


def set_fake_quant_enabled(model: torch.nn.Module, enabled: bool) -> None:
    """Turn every fake quantizer on or off (used to delay fake quantization)."""
    for module in model.modules():
        if experts.is_fake_quantized(module) or grouped_experts.is_fake_quantized(module):
            experts.set_fake_quant_enabled(module, enabled)
        elif isinstance(module, embeddings.FakeQuantizedEmbedding):
            module.weight_fake_quantizer.enabled = enabled
        else:
            enable_linear_fake_quant(module, enabled)


def set_activation_fake_quant_enabled(model: torch.nn.Module, enabled: bool) -> None:
    """Turn the activation fake quantizers on or off, leaving the weights' on: the model then computes what
    the artifact of a recipe without `artifact_activations` computes in transformers (float activations)."""
    for module in model.modules():
        quantizer = getattr(module, "activation_fake_quantizer", None)
        if quantizer is not None:
            quantizer.enabled = enabled


# ---- float8 training: the other linear-swap option -------------------------------------------

def prepare_float8_training(model: torch.nn.Module, fp8_recipe: str) -> int:
    """Swap linears for torchao's `Float8Linear` (CUDA sm89+ only)."""
    if fp8_recipe not in FP8_RECIPES:
        raise ConfigError(choices_message("fp8 recipe", fp8_recipe, list(FP8_RECIPES)))
    if not hardware.has_cuda_capability(8, 9):
        raise HardwareError(f"float8 training ({fp8_recipe}) needs a CUDA GPU with compute capability 8.9+")
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    names = {n for n, m in model.named_modules()
             if isinstance(m, torch.nn.Linear) and n.split(".")[-1] not in OUTPUT_HEAD_NAMES
             and m.in_features % 16 == 0 and m.out_features % 16 == 0}
    convert_to_float8_training(model, module_filter_fn=filter_for(names),
                               config=Float8LinearConfig.from_recipe_name(fp8_recipe))
    return len(names)
