"""Linear-layer swaps: QAT prepare/convert through the registry, and float8 training.

Called by training (prepare, fake-quant delay) and by finalize (prepare then convert). Which linear
layers are quantized is decided here once (`quantizable_linears`), so both phases agree.
"""

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torchao.quantization import quantize_
from torchao.quantization.granularity import PerAxis, PerGroup, PerToken
from torchao.quantization.qat import FakeQuantizedLinear, QATConfig
from torchao.quantization.qat.fake_quantizer import IntxFakeQuantizer
from torchao.quantization.qat.linear import enable_linear_fake_quant
from torchao.quantization.quant_primitives import ZeroPointDomain

from forge_qat import hardware
from forge_qat.errors import ConfigError, ConversionError, HardwareError, choices_message
from forge_qat.fake_quant import AffineFakeQuantizer, AffineSpec, FakeQuantPlan, IntegerGridFakeQuantizedLinear
from forge_qat.recipes import Recipe, get_recipe, recipe_names

log = logging.getLogger(__name__)

# Output heads stay in float: they are usually tied to the input embedding, which a linear-only
# recipe must not quantize, and they are the layer most sensitive to quantization.
SKIPPED_MODULE_NAMES = ("lm_head",)


def quantizable_linears(model: torch.nn.Module, recipe: Recipe) -> dict[str, torch.nn.Linear]:
    """The linear layers `recipe` applies to, by qualified name."""
    chosen, misfit = {}, []
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or name.split(".")[-1] in SKIPPED_MODULE_NAMES:
            continue
        if recipe.group_size and module.in_features % recipe.group_size:
            misfit.append(name)
            continue
        chosen[name] = module
    if misfit:
        log.warning(
            "%d linear layer(s) stay in float because in_features is not a multiple of %s's group size "
            "%d: %s", len(misfit), recipe.name, recipe.group_size, ", ".join(misfit[:5]),
        )
    return chosen


def _filter_for(names: set[str]) -> Callable[[torch.nn.Module, str], bool]:
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


def _fake_quantized(linear: torch.nn.Linear, plan: FakeQuantPlan) -> FakeQuantizedLinear:
    """The prepared replacement of `linear`, sharing its Parameter objects.

    Built on the meta device and then given the original parameters, so no full-size weight is
    allocated in passing (torchao's `from_linear` allocates one per layer before discarding it).
    """
    cls = IntegerGridFakeQuantizedLinear if plan.integer_matmul else FakeQuantizedLinear
    new = cls(linear.in_features, linear.out_features, linear.bias is not None, device="meta")
    new.weight = linear.weight
    new.bias = linear.bias
    new.activation_fake_quantizer = AffineFakeQuantizer(plan.activation) if plan.activation else None
    new.weight_fake_quantizer = AffineFakeQuantizer(plan.weight) if plan.weight else None
    return new


def prepare_qat(model: torch.nn.Module, recipe_name: str) -> int:
    """Install `FakeQuantizedLinear` on the recipe's layers, keeping the same Parameter objects.

    Returns the number of layers prepared. torchao infers the fake quantizers from the base config
    where it can; those it expresses as `IntxFakeQuantizer` are swapped for the fused equivalents.
    """
    recipe = get_recipe(recipe_name)
    modules = dict(model.named_modules())
    for name in quantizable_linears(model, recipe):
        linear = modules[name]
        if recipe.fake_quant is None:
            prepared = _torchao_prepared(linear, recipe)
        else:
            prepared = _fake_quantized(linear, recipe.fake_quant)
        parent, _, child = name.rpartition(".")
        setattr(modules[parent] if parent else model, child, prepared)
    return sum(isinstance(m, FakeQuantizedLinear) for m in model.modules())


def _torchao_prepared(linear: torch.nn.Linear, recipe: Recipe) -> FakeQuantizedLinear:
    """torchao's `QATConfig(base, step="prepare")` applied to a meta-device twin of `linear`, which
    then takes `linear`'s own Parameters: torchao chooses the fake quantizers, but no full-size
    weight is allocated (its `from_linear` would allocate one per layer; under ZeRO-3 that is the
    whole layer on every rank). Quantizers with a fused equivalent are swapped for it."""
    twin = torch.nn.ModuleDict({"linear": torch.nn.Linear(linear.in_features, linear.out_features,
                                                          linear.bias is not None, device="meta",
                                                          dtype=linear.weight.dtype)})
    quantize_(twin, QATConfig(recipe.base_config(), step="prepare"))
    prepared = twin["linear"]
    prepared.weight = linear.weight
    prepared.bias = linear.bias
    for slot in ("activation_fake_quantizer", "weight_fake_quantizer"):
        spec = _fused_spec(getattr(prepared, slot))
        if spec is not None:
            setattr(prepared, slot, AffineFakeQuantizer(spec))
    return prepared


def set_fake_quant_enabled(model: torch.nn.Module, enabled: bool) -> None:
    """Turn every fake quantizer on or off (used to delay fake quantization)."""
    model.apply(lambda m: enable_linear_fake_quant(m, enabled))


def check_convert_hardware(recipe_name: str) -> None:
    """Raise before any loading when this machine cannot run the recipe's real kernels."""
    recipe = get_recipe(recipe_name)
    missing = recipe.missing_for_convert()
    if missing:
        raise HardwareError(f"converting {recipe.name} needs {' and '.join(missing)}; this machine has not")


def convert_qat(model: torch.nn.Module, recipe_name: str) -> int:
    """Swap prepared layers for real low-bit tensor subclasses; returns how many were converted."""
    recipe = get_recipe(recipe_name)
    check_convert_hardware(recipe.name)
    names = {n for n, m in model.named_modules() if isinstance(m, FakeQuantizedLinear)}
    if not names:
        raise ConversionError("the model has no fake-quantized linear layers: nothing to convert")
    quantize_(model, QATConfig(recipe.base_config(), step="convert"), filter_fn=_filter_for(names))
    return len(names)


# ---- float8 training: the other linear-swap option -------------------------------------------

FP8_RECIPES = ("tensorwise", "rowwise", "rowwise_with_gw_hp")


def prepare_float8_training(model: torch.nn.Module, fp8_recipe: str) -> int:
    """Swap linears for torchao's `Float8Linear` (CUDA sm89+ only)."""
    if fp8_recipe not in FP8_RECIPES:
        raise ConfigError(choices_message("fp8 recipe", fp8_recipe, list(FP8_RECIPES)))
    if not hardware.has_cuda_capability(8, 9):
        raise HardwareError(f"float8 training ({fp8_recipe}) needs a CUDA GPU with compute capability 8.9+")
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    names = {n for n, m in model.named_modules()
             if isinstance(m, torch.nn.Linear) and n.split(".")[-1] not in SKIPPED_MODULE_NAMES
             and m.in_features % 16 == 0 and m.out_features % 16 == 0}
    convert_to_float8_training(model, module_filter_fn=_filter_for(names),
                               config=Float8LinearConfig.from_recipe_name(fp8_recipe))
    return len(names)


@dataclass(frozen=True, slots=True)
class LinearSwap:
    """A training option that replaces linear layers; at most one may be active per run."""

    option: str
    """TrainConfig field holding the chosen recipe name."""
    choices: Callable[[], list[str]]
    apply: Callable[[torch.nn.Module, str], int]

    @property
    def flag(self) -> str:
        return "--" + self.option.replace("_", "-")


LINEAR_SWAPS: tuple[LinearSwap, ...] = (
    LinearSwap("qat_recipe", recipe_names, prepare_qat),
    LinearSwap("fp8_recipe", lambda: list(FP8_RECIPES), prepare_float8_training),
)
