"""What a recipe is in torch and torchao terms: its PTQ config, fake quantizers, embedding tables, convert
dtype and expert-stack converter.

`forge_qat.qat.registry` (the registry, which imports neither torch nor torchao so that `forge --help`, `forge
recipes` and argument errors start fast) names one builder here per recipe; a recipe's `Numerics` are built on
first use.
"""

from collections.abc import Callable
from dataclasses import dataclass, replace

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

from forge_qat.errors import ConfigError
from forge_qat.qat import ggml
from forge_qat.qat.embeddings import INT8_TABLES, TableQuant
from forge_qat.qat.fake_quant import AffineFakeQuantizer, AffineSpec, LinearQuantizers
from forge_qat.torchao_compat import IntxUnpackedToInt8Tensor, int8_weight_with_scale, set_intx_scale_dtype


@dataclass(frozen=True, kw_only=True, slots=True)
class Numerics:
    """The torch side of one recipe (see the `Recipe` properties of the same names)."""

    base_config: Callable[[], AOBaseConfig]
    """Builds the torchao PTQ config that `QATConfig(base, step="convert")` applies."""
    fake_quant: LinearQuantizers | None = None
    """Fake quantization for prepare when torchao cannot infer it from the base config; None means
    `QATConfig(base, step="prepare")` infers it."""
    embeddings: TableQuant | None = None
    """How the input embedding and output head are quantized (tied ones share the grid); None: kept in float."""
    convert_dtype: torch.dtype | None = None
    """The dtype convert's kernels need for weights and activations; None: the checkpoint's own dtype."""
    layer_quantizers: "Callable[[LayerSite], tuple[torch.nn.Module | None, torch.nn.Module]] | None" = None
    """The (activation, weight) fake quantizers of each linear layer where they depend on the layer (llama.cpp's
    Q4_K_M mix); None: `fake_quant` (or torchao's inference) for every layer."""


@dataclass(frozen=True, slots=True)
class LayerSite:
    """Where a linear layer sits in its model, for recipes whose numerics depend on it (`Numerics.layer_quantizers`)."""

    name: str
    """Its module name (`model.layers.3.mlp.down_proj`)."""
    in_features: int
    layer: int | None
    """Its decoder block's index; None outside the blocks."""
    n_layers: int
    tied: bool
    """Whether the model's input embedding is its output head."""
    n_experts: int


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


def convert_stack_to_ggml(config: AOBaseConfig, module: torch.nn.Module, name: str,
                          scale: torch.Tensor | None = None) -> None:
    """An expert stack in the llama.cpp type its fake quantizer trained it in (`ggml.convert_weight`)."""
    from forge_qat.qat.experts import FAKE_QUANT_ATTR

    if scale is not None:
        raise TypeError("learned scales of llama.cpp types are not implemented")
    ggml.convert_weight(module, name, getattr(module, FAKE_QUANT_ATTR)[name].weight_fake_quantizer.ggml_type)


@dataclass(frozen=True, slots=True)
class ExpertStackConverter:
    """Replaces the 3-D expert stack `module.<name>` (experts, out, in) by its torchao tensor, in place."""

    convert: Callable[[AOBaseConfig, torch.nn.Module, str, torch.Tensor | None], None]

    def __call__(self, config: AOBaseConfig, module: torch.nn.Module, name: str,
                 scale: torch.Tensor | None = None) -> None:
        """`scale`: the stack's learned weight scales (experts, out, groups); None: chosen from the weights."""
        self.convert(config, module, name, scale)


STACK_CONVERTERS: dict[str, ExpertStackConverter] = {
    "torchao": ExpertStackConverter(convert_stack_with_torchao_handler),
    "intx-unpacked": ExpertStackConverter(convert_stack_to_intx_unpacked),
    "ggml": ExpertStackConverter(convert_stack_to_ggml),
}
"""The converter of each `Recipe.expert_stacks` kind."""


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


def tables_of(tables: str | None, activation: AffineSpec | None = None) -> TableQuant | None:
    """The quantizers of a recipe's `tables` ("int8", or None: float); `activation`: the head's input
    quantization in training when it is not int8 per token (then the artifact's head runs float inputs)."""
    if tables is None:
        return None
    if activation is None:
        return INT8_TABLES
    return TableQuant(weight=INT8_TABLES.weight, activation=activation, artifact_activation=None)


def intx_dynamic(bits: int) -> Numerics:
    """int8 per-token asymmetric activations, int`bits` per-group(32) symmetric weights (torchao infers QAT)."""
    return Numerics(base_config=lambda: Int8DynamicActivationIntxWeightConfig(
        weight_dtype=getattr(torch, f"int{bits}"), weight_granularity=PerGroup(32)))


def int4_bf16_scales(tables: str | None) -> Numerics:
    """The default recipe with bf16 weight scales, and `tables` (see `tables_of`)."""
    return Numerics(base_config=_int4_bf16_scales, fake_quant=INT4_BF16_SCALES, embeddings=tables_of(tables))


GGML_Q4_0 = replace(INT4_BF16_SCALES.weight, signed_scale=True)
"""llama.cpp's Q4_0 weight grid: int4 per group of 32, the scale stored signed (bf16 here, held exactly by the
block's fp16 `d` where it is a normal fp16), so a chosen scale may put the group's extreme of either sign on -8."""


def llama_cpp_q4_0(tables: str | None) -> Numerics:
    """Weight-only torchao artifact of llama.cpp's Q4_0 grid, trained with its Q8_0 activations."""
    return Numerics(
        base_config=lambda: IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(32),
                                                 scale_dtype=torch.bfloat16),
        fake_quant=LinearQuantizers(activation=GGML_Q8_0, weight=GGML_Q4_0),
        embeddings=tables_of(tables, activation=GGML_Q8_0),
    )


def _q4_k_m_site(site: LayerSite) -> tuple[torch.nn.Module, torch.nn.Module]:
    ggml_type = ggml.q4_k_m_type(ggml.role_of(site.name), site.layer, site.n_layers, site.in_features,
                                 tied=site.tied, n_expert=site.n_experts)
    if ggml_type not in ggml.QUANTIZERS:
        raise ConfigError(f"{site.name}: llama.cpp's Q4_K_M stores it as {ggml_type}, which forge does not "
                          f"implement yet (it does {', '.join(ggml.QUANTIZERS)})")
    activation = (ggml.Q8KFakeQuantizer() if ggml.ACTIVATIONS[ggml_type] == "Q8_K"
                  else AffineFakeQuantizer(GGML_Q8_0))
    return activation, ggml.GgmlWeightFakeQuantizer(ggml_type)


def llama_cpp_q4_k_m(tables: str | None) -> Numerics:
    """llama.cpp's Q4_K_M: each linear layer in the type `llama-quantize … Q4_K_M` gives it (Q4_K, Q6_K, or the
    Q5_0 / Q8_0 fallbacks), its activations in the type llama.cpp's matmul quantizes them to (Q8_K, Q8_0); the
    embedding and head int8 per row (GGUF Q8_0). The torchao artifact holds every type but Q4_K as
    `IntxUnpackedToInt8Tensor` (weight-only); Q4_K's per-sub-block offsets (d * sc * q - dmin * m) have no torchao
    tensor: its weights are stored as their exact values, and their blocks beside them for `forge export`."""
    return Numerics(
        base_config=lambda: IntxWeightOnlyConfig(weight_dtype=torch.int5, granularity=PerGroup(32),
                                                 scale_dtype=torch.float16),
        embeddings=tables_of(tables, activation=GGML_Q8_0),
        layer_quantizers=_q4_k_m_site,
    )


def int8_int8() -> Numerics:
    # torchao has no QAT mapping for this config; this plan matches Int8Tensor's real kernel:
    # per-row symmetric, float32 scales and eps (torchao/quantization/quantize_/workflows/int8),
    # integer matmul scaled afterwards (torchao/kernel/intmm.py).
    eps = torch.finfo(torch.float32).eps
    return Numerics(
        base_config=lambda: Int8DynamicActivationInt8WeightConfig(),
        fake_quant=LinearQuantizers(
            activation=AffineSpec(bits=8, granularity="per_token", symmetric=True, eps=eps,
                                  scale_dtype=torch.float32),
            weight=AffineSpec(bits=8, granularity="per_channel", symmetric=True, eps=eps,
                              scale_dtype=torch.float32),
            integer_matmul=True,
        ),
    )


def int4_weight_only() -> Numerics:
    return Numerics(base_config=lambda: Int4WeightOnlyConfig(group_size=128), convert_dtype=torch.bfloat16)


def float8_float8() -> Numerics:
    return Numerics(base_config=lambda: Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()),
                    convert_dtype=torch.bfloat16)


def float8_int4() -> Numerics:
    return Numerics(base_config=lambda: Float8DynamicActivationInt4WeightConfig(), convert_dtype=torch.bfloat16)


def w4a16(group: int) -> Numerics:
    """int4 per-group(`group`) symmetric weights, activations left in the model dtype: compressed-tensors' W4A16
    (vLLM's and SGLang's Marlin / Machete kernels), built on CPU as torchao's `IntxUnpackedToInt8Tensor`, which
    stock transformers loads. Scale = absmax / 7.5 per group, as torchao and compressed-tensors both choose it."""
    return Numerics(
        base_config=lambda: IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(group)),
        fake_quant=LinearQuantizers(activation=None, weight=AffineSpec(bits=4, granularity="per_group",
                                                                        symmetric=True, group_size=group)),
    )
