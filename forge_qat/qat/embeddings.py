"""Quantized input embeddings and output head, a recipe option (`Recipe.embeddings`): the grid, its fake
quantization in training and the torchao tensor convert makes of it.

Called by `forge_qat.qat.prepare` (prepare_qat installs, convert_qat converts) for the tables
`forge_qat.qat.coverage.plan` chose. One grid serves both tables: int8, symmetric, one scale per row (per
token for the embedding, per output channel for the head), so a tied embedding and head share it by
construction, and the converted tensor is GGUF's `Q8_0` and XNNPACK's int8 per-channel exactly when the
scales are fp16/bf16 values. The head also quantizes its input per token, as the converted tensor's linear
does (torchao's `IntxUnpackedToInt8Tensor` with `int8_asym_per_token`); the embedding lookup ignores that.
"""

from dataclasses import dataclass

import torch
from torchao.core.config import AOBaseConfig
from torchao.quantization import Int8DynamicActivationIntxWeightConfig, IntxWeightOnlyConfig, PerAxis
from torchao.quantization.qat import FakeQuantizedLinear
from torchao.quantization.quant_primitives import MappingType

from forge_qat.errors import ConversionError
from forge_qat.qat.fake_quant import AffineFakeQuantizer, AffineSpec, fake_quantize
from forge_qat.torchao_compat import IntxUnpackedToInt8Tensor, set_intx_scale_dtype


@dataclass(frozen=True, kw_only=True, slots=True)
class TableQuant:
    """How a recipe quantizes the input embedding and output head."""

    weight: AffineSpec
    """The tables' grid: per_channel (one scale per row) and symmetric, so the grid of a looked-up row does
    not depend on the other rows."""
    activation: AffineSpec
    """The head's dynamic input quantization in training."""
    artifact_activation: str | None = "int8_asym_per_token"
    """The input quantization the converted head applies in the torchao artifact (`activation_quantization`
    of `IntxUnpackedToInt8Tensor`): the same as `activation`, or None where torchao has no such scheme (the
    llama.cpp recipe's per-block activations: the artifact then runs its head on float inputs)."""

    def __post_init__(self) -> None:
        if self.weight.granularity != "per_channel" or not self.weight.symmetric:
            raise ValueError("embedding tables are quantized per row, symmetrically")


INT8_TABLES = TableQuant(
    weight=AffineSpec(bits=8, granularity="per_channel", symmetric=True, scale_dtype=torch.bfloat16),
    activation=AffineSpec(bits=8, granularity="per_token", symmetric=False),
)
"""int8 rows with bf16 scales: GGUF `Q8_0` and XNNPACK's int8 per-channel hold them exactly."""


class FakeQuantizedEmbedding(torch.nn.Embedding):
    """An `nn.Embedding` whose lookups return fake-quantized rows. With one scale per row, quantizing the rows
    looked up equals looking them up in the quantized table, so the table itself (150k rows for Qwen3) is
    never fake-quantized whole. The rows keep the table's dtype (not autocast's: they enter the residual
    stream, which an unquantized embedding leaves in the weight's dtype)."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = super().forward(ids)
        quantizer = self.weight_fake_quantizer
        return fake_quantize(rows, quantizer.spec) if quantizer.enabled else rows


class FakeQuantizedHead(FakeQuantizedLinear):
    """The output head's `FakeQuantizedLinear`: its own type, so convert gives it the tables' tensor rather
    than the recipe's linear one."""


def torchao_config(tables: TableQuant) -> AOBaseConfig:
    """torchao's config of the converted tables, for the artifact's `quantization_config` (per module)."""
    if tables.artifact_activation is None:
        return IntxWeightOnlyConfig(weight_dtype=torch.int8, granularity=PerAxis(0),
                                    scale_dtype=tables.weight.scale_dtype)
    return Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int8, weight_granularity=PerAxis(0),
                                                 weight_scale_dtype=tables.weight.scale_dtype)


def fake_quantized(table: torch.nn.Module, tables: TableQuant) -> torch.nn.Module:
    """The prepared replacement of an input embedding or output head (`forge_qat.qat.coverage` chose it)."""
    if isinstance(table, torch.nn.Embedding):
        return fake_quantized_embedding(table, tables)
    return fake_quantized_head(table, tables)


def fake_quantized_embedding(embedding: torch.nn.Embedding, tables: TableQuant) -> FakeQuantizedEmbedding:
    """The prepared replacement of `embedding`, sharing its Parameter (so a tied head keeps sharing it)."""
    if type(embedding) is not torch.nn.Embedding:
        raise TypeError(f"{type(embedding).__name__} is not a plain nn.Embedding")
    e = embedding
    prepared = FakeQuantizedEmbedding(e.num_embeddings, e.embedding_dim, e.padding_idx, e.max_norm, e.norm_type,
                                      e.scale_grad_by_freq, e.sparse, device="meta", dtype=e.weight.dtype)
    prepared.weight = e.weight
    prepared.weight_fake_quantizer = AffineFakeQuantizer(tables.weight)
    return prepared


def fake_quantized_head(head: torch.nn.Linear, tables: TableQuant) -> FakeQuantizedHead:
    """The prepared replacement of the output head, sharing its Parameters."""
    prepared = FakeQuantizedHead(head.in_features, head.out_features, head.bias is not None, device="meta",
                                 dtype=head.weight.dtype)
    prepared.weight, prepared.bias = head.weight, head.bias
    prepared.activation_fake_quantizer = AffineFakeQuantizer(tables.activation)
    prepared.weight_fake_quantizer = AffineFakeQuantizer(tables.weight)
    return prepared


def is_fake_quantized_table(module: torch.nn.Module) -> bool:
    return isinstance(module, (FakeQuantizedEmbedding, FakeQuantizedHead))


def quantize_table(weight: torch.Tensor, tables: TableQuant) -> IntxUnpackedToInt8Tensor:
    """The torchao tensor of a table on the tables' grid (the values the fake quantizer multiplied by): one
    scale per row, scales rounded to the grid's `scale_dtype` before the values are quantized, as torchao's
    `weight_scale_dtype` does."""
    tensor = IntxUnpackedToInt8Tensor.from_hp(weight, (1, weight.shape[-1]), torch.int8,
                                              mapping_type=MappingType.SYMMETRIC,
                                              activation_quantization=tables.artifact_activation)
    dtype = tables.weight.scale_dtype
    if dtype is not None and dtype != weight.dtype:
        set_intx_scale_dtype(tensor, weight, dtype)
    return tensor


def convert_tables(model: torch.nn.Module, tables: TableQuant | None) -> list[str]:
    """Swap the fake-quantized embedding and head for plain modules holding the converted tensor (one tensor
    for tied tables, so they stay tied); returns the converted weights' names, a tied pair once."""
    converted: dict[int, torch.nn.Parameter] = {}
    names = []
    for name, module in list(model.named_modules()):
        if not is_fake_quantized_table(module):
            continue
        if tables is None:
            raise ConversionError(f"{name} was prepared with quantized tables, which this recipe does not have")
        key = id(module.weight)
        if key not in converted:
            tensor = quantize_table(module.weight.detach(), tables)
            converted[key] = torch.nn.Parameter(tensor, requires_grad=False)
            names.append(f"{name}.weight")
        if isinstance(module, FakeQuantizedEmbedding):
            plain = torch.nn.Embedding(module.num_embeddings, module.embedding_dim, module.padding_idx,
                                       module.max_norm, module.norm_type, module.scale_grad_by_freq, module.sparse,
                                       device="meta")
        else:
            plain = torch.nn.Linear(module.in_features, module.out_features, module.bias is not None, device="meta")
            plain.bias = module.bias
        plain.weight = converted[key]
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, plain)
    return names
