"""The recipe registry: the one place a QAT recipe name is written.

Training (prepare), finalize (convert), the CLI's choices, `forge recipes`, the docs table and the
Jinja templates' `qat_recipes()` all read `RECIPES`. Adding a recipe is one `Recipe` record.
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torchao.core.config import AOBaseConfig
from torchao.quantization import (
    Float8DynamicActivationFloat8WeightConfig,
    Float8DynamicActivationInt4WeightConfig,
    FqnToConfig,
    Int4WeightOnlyConfig,
    Int8DynamicActivationInt8WeightConfig,
    Int8DynamicActivationIntxWeightConfig,
    IntxWeightOnlyConfig,
    PerGroup,
    PerRow,
    quantize_,
)

from forge_qat import hardware
from forge_qat.embeddings import INT8_TABLES, TableQuant
from forge_qat.errors import UnknownRecipeError, choices_message
from forge_qat.fake_quant import AffineSpec, LinearQuantizers
from forge_qat.torchao_compat import IntxUnpackedToInt8Tensor, int8_weight_with_scale, set_intx_scale_dtype


@dataclass(frozen=True, slots=True)
class Requirement:
    """Something convert needs from the machine, checked at call time (so tests can monkeypatch)."""

    description: str
    is_met: Callable[[], bool]


CUDA = Requirement("a CUDA GPU", lambda: hardware.cuda_available())
SM89 = Requirement("CUDA compute capability 8.9+ (Ada/Hopper)", lambda: hardware.has_cuda_capability(8, 9))
SM90 = Requirement("CUDA compute capability 9.0+ (Hopper)", lambda: hardware.has_cuda_capability(9, 0))
MSLK = Requirement("the mslk kernel package (pip install mslk)", lambda: hardware.has_mslk())


def convert_stack_with_torchao_handler(config: AOBaseConfig, module: torch.nn.Module, name: str,
                                       scale: torch.Tensor | None = None) -> None:
    """torchao's own parameter-level quantization (`FqnToConfig` with a parameter name), for configs whose
    tensors take 3-D weights: the result selects per expert to the tensor an `nn.Linear` would get. With
    learned `scale` (experts, out, 1) (int8 per-row weights only), the same tensor built with those scales."""
    if scale is None:
        quantize_(module, FqnToConfig({name: config}), filter_fn=None)
        return
    if not isinstance(config, Int8DynamicActivationInt8WeightConfig):
        raise TypeError(f"learned scales for {type(config).__name__} expert stacks are not implemented")
    weight = getattr(module, name).detach()
    setattr(module, name, torch.nn.Parameter(int8_weight_with_scale(weight, config, scale.to(weight.device)),
                                             requires_grad=False))


def convert_stack_to_intx_unpacked(config: AOBaseConfig, module: torch.nn.Module, name: str,
                                   scale: torch.Tensor | None = None) -> None:
    """`Int8DynamicActivationIntxWeightConfig` and `IntxWeightOnlyConfig` assert 2-D weights in torchao 0.18,
    but the tensor they build is defined for any rank: build it for the stack with the config's own arguments
    and a block of one row per expert (tests check every expert equals its 2-D conversion bit for bit). With
    learned `scale` (experts, out, groups): built with those scales and zero points 0, as the config's handler
    builds a linear's tensor from a `custom_scale`."""
    weight = getattr(module, name)
    if isinstance(config, IntxWeightOnlyConfig):
        g, mapping, scale_dtype, activation = config.granularity, config.mapping_type, config.scale_dtype, None
    else:
        g, mapping, scale_dtype = config.weight_granularity, config.weight_mapping_type, config.weight_scale_dtype
        activation = "int8_asym_per_token"
    group = g.group_size if isinstance(g, PerGroup) else weight.shape[-1]
    learned = {} if scale is None else dict(
        intx_choose_qparams_algorithm=None, custom_scale=scale.to(weight.device),
        custom_zero_point=torch.zeros_like(scale, dtype=torch.int8, device=weight.device))
    stack = IntxUnpackedToInt8Tensor.from_hp(
        weight.detach(), (1,) * (weight.dim() - 1) + (group,), config.weight_dtype,
        mapping_type=mapping, activation_quantization=activation,
        **({"intx_choose_qparams_algorithm": config.intx_choose_qparams_algorithm} | learned),
    )
    if scale_dtype is not None and scale_dtype != weight.dtype:
        set_intx_scale_dtype(stack, weight.detach(), scale_dtype)  # as the config does for 2-D
    setattr(module, name, torch.nn.Parameter(stack, requires_grad=False))


@dataclass(frozen=True, slots=True)
class ExpertStackConverter:
    """Replaces the 3-D expert stack `module.<name>` (experts, out, in) by its torchao tensor, in place."""

    convert: Callable[[AOBaseConfig, torch.nn.Module, str, torch.Tensor | None], None]
    load_needs_compat: bool = False
    """Whether loading the artifact needs `import forge_qat.torchao_compat` (an operator torchao lacks)."""

    def __call__(self, config: AOBaseConfig, module: torch.nn.Module, name: str,
                 scale: torch.Tensor | None = None) -> None:
        """`scale`: the stack's learned weight scales (experts, out, groups); None: chosen from the weights."""
        self.convert(config, module, name, scale)


TORCHAO_STACK = ExpertStackConverter(convert_stack_with_torchao_handler)
INTX_UNPACKED_STACK = ExpertStackConverter(convert_stack_to_intx_unpacked, load_needs_compat=True)


@dataclass(frozen=True, kw_only=True, slots=True)
class Recipe:
    """One QAT scheme: how to fake-quantize it in training and how to convert it for deployment."""

    name: str
    """kebab-case name used on the command line, in configs and in checkpoint metadata."""
    description: str
    """One line for tables and help."""
    base_config: Callable[[], AOBaseConfig]
    """Builds the torchao PTQ config that `QATConfig(base, step="convert")` applies."""
    fake_quant: LinearQuantizers | None = None
    """Fake quantization for prepare when torchao cannot infer it from the base config; None means
    `QATConfig(base, step="prepare")` infers it."""
    convert_requires: tuple[Requirement, ...] = ()
    """What the real low-bit kernels of convert need; training (fake quant) runs anywhere."""
    safetensors: bool = True
    """Whether torchao can flatten the converted tensor subclass into safetensors."""
    storage_bits: int = 8
    """Bits each weight value occupies in the artifact (int4 values may be stored unpacked in int8)."""
    group_size: int | None = None
    """in_features must be a multiple of this for a linear layer to be quantized."""
    convert_expert_stack: ExpertStackConverter | None = None
    """How convert turns a mixture-of-experts stack into a torchao tensor; None: torchao 0.18 offers this
    recipe no route for 3-D expert weights, and a model with experts is refused before training."""
    learnable_scales: bool = False
    """Whether `--qat-learn-scales` can train this recipe's weight scales: its weights are symmetric
    per-group/per-channel with a fused fake quantizer, and its torchao tensor takes a custom scale."""
    learn_scales_by_default: bool = False
    """Whether a run learns them without `--qat-learn-scales`: where a benchmark showed them to help (int4
    groups: bench/quality.py). Not for int2/int3 (the embedded demo's int2 run recovered 49% of the PTQ gap with
    them, 84% without) nor int8 per-channel (not measured)."""
    artifact_activations: bool = True
    """Whether the torchao artifact quantizes activations as training does. False where torchao has no such
    scheme (llama.cpp's per-block activations): the artifact then runs float activations in transformers,
    and the trained numerics run where the format has them (`forge export --to gguf`)."""
    embeddings: TableQuant | None = None
    """How the input embedding and output head are quantized (tied ones share the grid); None: kept in float."""
    convert_dtype: torch.dtype | None = None
    """The dtype convert's kernels need for weights and activations (bf16 for the CUDA recipes); None: the
    checkpoint's own dtype."""

    @property
    def convert_device(self) -> torch.device:
        """Where convert and its verification run: on the GPU when the recipe's kernels are CUDA kernels."""
        return torch.device("cuda" if CUDA in self.convert_requires else "cpu")

    @property
    def experts_support(self) -> str:
        """How this recipe treats mixture-of-experts stacks, for tables and `forge recipes`."""
        if self.convert_expert_stack is None:
            return "no (models with experts are refused)"
        if self.convert_expert_stack.load_needs_compat:
            return "yes (loading the artifact needs `import forge_qat.torchao_compat`; without it loading fails)"
        return "yes"

    @property
    def embeddings_support(self) -> str:
        """What this recipe does with the input embedding and output head, for tables and `forge recipes`."""
        if self.embeddings is None:
            return "float"
        w = self.embeddings.weight
        scales = f", {str(w.scale_dtype).removeprefix('torch.')} scales" if w.scale_dtype else ""
        return f"int{w.bits} per row{scales} (tied: one grid)"

    def missing_for_convert(self) -> list[str]:
        """Descriptions of the convert requirements this machine does not meet (empty: can convert)."""
        return [r.description for r in self.convert_requires if not r.is_met()]


def _int4_bf16_scales() -> Int8DynamicActivationIntxWeightConfig:
    return Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4, weight_granularity=PerGroup(32),
                                                 weight_scale_dtype=torch.bfloat16)


INT4_BF16_SCALES = LinearQuantizers(
    activation=AffineSpec(bits=8, granularity="per_token", symmetric=False),
    weight=AffineSpec(bits=4, granularity="per_group", symmetric=True, group_size=32, scale_dtype=torch.bfloat16),
)
"""torchao's QAT cannot infer fake quantizers for `weight_scale_dtype` (it asserts it is None): the default
recipe's quantizers with the weight scales rounded to bf16, as its convert rounds them before quantizing
(tests/test_parity.py checks fake quant == converted, atol 0)."""


GGML_Q8_0 = AffineSpec(bits=8, granularity="per_group", group_size=32, symmetric=True, scale_dtype=torch.float16,
                       convention="ggml")
"""How llama.cpp quantizes the activations of its Q4_0 and Q8_0 matmuls (`quantize_row_q8_0`)."""


RECIPES: dict[str, Recipe] = {
    r.name: r
    for r in (
        Recipe(
            name="int8-dynamic-act-int4-weight",
            description="int8 per-token dynamic activations, int4 per-group(32) symmetric weights",
            base_config=lambda: Int8DynamicActivationIntxWeightConfig(
                weight_dtype=torch.int4, weight_granularity=PerGroup(32)
            ),
            storage_bits=8,  # IntxUnpackedToInt8Tensor: int4 values held one per int8
            group_size=32,
            convert_expert_stack=INTX_UNPACKED_STACK,
            learnable_scales=True,
            learn_scales_by_default=True,
        ),
        Recipe(
            name="int8-dynamic-act-int4-weight-bf16-scales",
            description="the default recipe with bf16 weight scales: the grid GGUF Q4_0 and XNNPACK store exactly",
            base_config=_int4_bf16_scales,
            fake_quant=INT4_BF16_SCALES,
            storage_bits=8,
            group_size=32,
            convert_expert_stack=INTX_UNPACKED_STACK,
            learnable_scales=True,  # rounded to bf16 in every forward, as convert stores them
            learn_scales_by_default=True,
        ),
        Recipe(
            name="int8-dynamic-act-int4-weight-int8-embeddings",
            description="the bf16-scales recipe with int8 per-row embedding and output head: small end to end",
            base_config=_int4_bf16_scales,
            fake_quant=INT4_BF16_SCALES,
            embeddings=INT8_TABLES,
            storage_bits=8,
            group_size=32,
            convert_expert_stack=INTX_UNPACKED_STACK,
            learnable_scales=True,  # rounded to bf16 in every forward, as convert stores them
            learn_scales_by_default=True,
        ),
        Recipe(
            name="llama-cpp-q4-0",
            description="llama.cpp's Q4_0 numerics: int4 per-group(32) weights, int8 per-block(32) activations "
                        "(Q8_0), int8 embedding and head; for GGUF",
            base_config=lambda: IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(32),
                                                     scale_dtype=torch.bfloat16),
            fake_quant=LinearQuantizers(activation=GGML_Q8_0, weight=INT4_BF16_SCALES.weight),
            artifact_activations=False,
            embeddings=TableQuant(weight=INT8_TABLES.weight, activation=GGML_Q8_0, artifact_activation=None),
            storage_bits=8,
            group_size=32,
            convert_expert_stack=INTX_UNPACKED_STACK,
            learnable_scales=True,  # rounded to bf16 in every forward, as convert stores them
            learn_scales_by_default=True,
        ),
        *(Recipe(
            name=f"int8-dynamic-act-int{bits}-weight",
            description=f"int8 per-token dynamic activations, int{bits} per-group(32) symmetric weights",
            base_config=lambda bits=bits: Int8DynamicActivationIntxWeightConfig(
                weight_dtype=getattr(torch, f"int{bits}"), weight_granularity=PerGroup(32)
            ),
            storage_bits=8,  # IntxUnpackedToInt8Tensor: one value per int8
            group_size=32,
            convert_expert_stack=INTX_UNPACKED_STACK,
            learnable_scales=True,
        ) for bits in (3, 2)),
        Recipe(
            name="int8-dynamic-act-int8-weight",
            description="int8 per-token symmetric activations, int8 per-channel weights (fast on x86 CPUs)",
            base_config=lambda: Int8DynamicActivationInt8WeightConfig(),
            # torchao has no QAT mapping for this config; this plan matches Int8Tensor's real kernel:
            # per-row symmetric, float32 scales and eps (torchao/quantization/quantize_/workflows/int8),
            # integer matmul scaled afterwards (torchao/kernel/intmm.py).
            fake_quant=LinearQuantizers(
                activation=AffineSpec(bits=8, granularity="per_token", symmetric=True,
                                      eps=torch.finfo(torch.float32).eps, scale_dtype=torch.float32),
                weight=AffineSpec(bits=8, granularity="per_channel", symmetric=True,
                                  eps=torch.finfo(torch.float32).eps, scale_dtype=torch.float32),
                integer_matmul=True,
            ),
            convert_expert_stack=TORCHAO_STACK,
            learnable_scales=True,  # per-row scales on the integer grid (fake_quant._LearnedScaleIntegerGridLinear)
        ),
        Recipe(
            name="int4-weight-only",
            convert_dtype=torch.bfloat16,
            description="int4 per-group(128) weights, bf16 activations (CUDA + mslk kernels)",
            base_config=lambda: Int4WeightOnlyConfig(group_size=128),
            convert_requires=(CUDA, MSLK),
            storage_bits=4,
            group_size=128,
        ),
        Recipe(
            name="float8-dynamic-act-float8-weight",
            convert_dtype=torch.bfloat16,
            description="float8 e4m3 per-row dynamic activations and weights (CUDA sm89+)",
            base_config=lambda: Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()),
            convert_requires=(CUDA, SM89),
            # Float8Tensor quantizes 3-D weights and selects per expert; needs CUDA, so it is covered by
            # the GPU suite (tests/gpu), not on CPU.
            convert_expert_stack=TORCHAO_STACK,
        ),
        Recipe(
            name="float8-dynamic-act-int4-weight",
            convert_dtype=torch.bfloat16,
            description="float8 per-row activations, int4 preshuffled weights (Hopper + mslk)",
            base_config=lambda: Float8DynamicActivationInt4WeightConfig(),
            convert_requires=(CUDA, SM90, MSLK),
            # Int4PreshuffledTensor is not among torchao's safetensors-flattenable subclasses.
            safetensors=False,
            storage_bits=4,
            group_size=128,
        ),
    )
}

DEFAULT_RECIPE = "int8-dynamic-act-int4-weight"
DEMO_RECIPE = "int8-dynamic-act-int2-weight"
"""`forge demo`'s recipe. With int4 weights PTQ of the tiny preset costs ~0.003 nats of eval loss, too
little for QAT's share of it to be more than noise; 2-bit weights cost ~0.05 and QAT wins most of it
back, the same across seeds (docs/benchmarks.md, "Embedded demo")."""


def recipe_names() -> list[str]:
    return list(RECIPES)


def get_recipe(name: str) -> Recipe:
    """The registry record for `name`, or an error listing every valid name."""
    try:
        return RECIPES[name]
    except KeyError:
        raise UnknownRecipeError(choices_message("recipe", name, recipe_names())) from None
