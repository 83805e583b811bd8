"""ExecuTorch (.pte, XNNPACK delegate) for on-device serving, from a forge artifact's torchao tensors.

Called by `forge export --to executorch`. The artifact's `IntxUnpackedToInt8Tensor` linears are what
ExecuTorch's XNNPACK backend recognises as dynamically quantized int8 x int4 (torchao's own docs name this
unpacked layout as the ExecuTorch format): the model is exported as transformers' ExecuTorch recipe does
(`TorchExportableModuleForDecoderOnlyLM`: a static KV cache, inputs `input_ids` and `cache_position`, one
program for prefill and decode with a dynamic sequence length), lowered with the XNNPACK partitioner, and
written with the metadata methods ExecuTorch's LLM runner reads. The tokenizer is written beside it. The
report counts the quantized linears XNNPACK took; an export where any stays outside is an error.

XNNPACK stores group scales in bf16: artifacts of `*-bf16-scales` recipes are exported exactly, others have
their scales rounded, and the report says how many groups moved. The whole artifact is loaded (this is for
models that fit a device), unlike the streaming GGUF export.
"""

import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from forge_qat.errors import ConfigError, ConversionError, InputError
from forge_qat.export.moe import make_exportable
from forge_qat.export.source import artifact_source_size
from forge_qat.formats.artifact_meta import ARTIFACT_META, ArtifactMeta
from forge_qat.formats.atomic import atomic_file, check_output
from forge_qat.models import load_config, load_model

log = logging.getLogger(__name__)

PTE_MAGIC_OFFSET = 4
"""A .pte is a flatbuffer whose file identifier ('ET..') sits at bytes 4-8."""

DELEGATED_RECIPES = ("int8-dynamic-act-int4-weight", "int8-dynamic-act-int4-weight-bf16-scales",
                     "int8-dynamic-act-int4-weight-int8-embeddings", "int8-dynamic-act-int8-weight",
                     "int8-dynamic-act-int3-weight", "int8-dynamic-act-int2-weight")
"""Recipes whose converted linears XNNPACK runs (int8 x int4, int2/int3 on its int4 kernels, int8 x int8 per
channel; tested). Others are refused: llama-cpp-q4-0's activations are llama.cpp's, the CUDA recipes'
tensors are not XNNPACK's."""


@dataclass
class ExecutorchReport:
    path: Path
    recipe: str
    max_seq_len: int
    quantized_linears: int
    delegated_linears: int
    """Linear ops inside XNNPACK subgraphs (the quantized ones and any float ones, e.g. the output head)."""
    rounded_scales: int
    """Group scales XNNPACK's bf16 storage changes (0 for *-bf16-scales recipes)."""
    expert_stacks: int = 0
    """Quantized expert stacks, run by ExecuTorch's portable kernels on the routed experts' codes."""
    bytes: int = 0
    tokenizer: Path | None = None
    source_bytes: int = 0
    source_dtype: str = ""
    """The checkpoint the artifact was finalized from, as stored (0 and "": not recorded)."""
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {**self.__dict__, "path": str(self.path), "tokenizer": str(self.tokenizer)}


def _is_pte(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(8)
    return len(head) == 8 and head[PTE_MAGIC_OFFSET:PTE_MAGIC_OFFSET + 2] == b"ET"


def _load(artifact: Path, max_seq_len: int):
    from transformers import GenerationConfig

    model, _ = load_model(str(artifact), dtype=torch.float32)  # corrupt shards and .bin payloads: one line
    model.eval().requires_grad_(False)
    stacks = make_exportable(model)  # mixture-of-experts stacks: gathered per routed expert
    for module in model.modules():
        if isinstance(module, torch.nn.Embedding):
            # padding_idx only masks gradients; the quantized-embedding fusion matches lookups without it
            module.padding_idx = None
    model.generation_config = GenerationConfig(use_cache=True, cache_implementation="static",
                                               cache_config={"batch_size": 1, "max_cache_len": max_seq_len})
    as_intx = _int8_linears_as_intx(model)
    widened = _narrow_grids_as_int4(model)
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if type(weight).__name__ == "IntxUnpackedToInt8Tensor" and weight.block_size[-1] == weight.shape[-1]:
            # XNNPACK's int8 per-channel weights take float32 scales (it rejects bf16 ones at load); exact.
            weight.scale = weight.scale.to(torch.float32)
    quantized = sum(1 for m in model.modules() if isinstance(m, torch.nn.Linear)
                    and type(m.weight).__name__ == "IntxUnpackedToInt8Tensor")
    rounded = sum(int((m.weight.scale.to(torch.bfloat16).float() != m.weight.scale.float()).sum())
                  for m in model.modules() if isinstance(m, torch.nn.Linear) and hasattr(m.weight, "scale")
                  and m.weight.block_size[-1] < m.weight.shape[-1])
    return model, quantized, rounded, as_intx, widened, stacks


def _narrow_grids_as_int4(model) -> int:
    """int2/int3 codes lie inside int4's [-8, 7]: marked int4, the same codes and scales run on XNNPACK's int4
    kernels exactly (XNNPACK has no 2- or 3-bit linear). Returns the parameters so widened."""
    count = 0
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if type(weight).__name__ == "IntxUnpackedToInt8Tensor" and weight.target_dtype in (torch.int2, torch.int3):
            weight.target_dtype = torch.int4
            count += weight.numel()
    return count


def _int8_linears_as_intx(model) -> int:
    """Give the int8 x int8 recipe's linears (`Int8Tensor`, per-row symmetric weights) the layout XNNPACK takes
    as int8 per-channel: the same codes and scales as an `IntxUnpackedToInt8Tensor`, whose linear quantizes
    activations asymmetrically per token (XNNPACK's dynamic quantization) where the recipe trained symmetric
    ones. Returns how many were re-expressed."""
    from forge_qat.torchao_compat import IntxUnpackedToInt8Tensor

    count = 0
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if not isinstance(module, torch.nn.Linear) or type(weight).__name__ != "Int8Tensor":
            continue
        rows, cols = weight.shape
        if list(weight.block_size) != [1, cols] or (weight.zero_point is not None and weight.zero_point.any()):
            raise ConfigError(f"an int8 weight of block size {list(weight.block_size)} is not XNNPACK's per-channel "
                              f"int8")
        intx = IntxUnpackedToInt8Tensor(weight.qdata, weight.scale.reshape(rows, 1).to(torch.float32),
                                        torch.zeros(rows, 1, dtype=torch.int8), torch.int8, (1, cols), weight.dtype,
                                        "int8_asym_per_token")
        module.weight = torch.nn.Parameter(intx, requires_grad=False)
        count += 1
    return count


def lower(model, max_seq_len: int):
    """The ExecuTorch program of `model` (prefill and decode in one method), lowered to XNNPACK, with the
    number of linear ops XNNPACK took."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.devtools.backend_debug import get_delegation_info
    from executorch.exir import to_edge_transform_and_lower
    from torchao.utils import unwrap_tensor_subclass
    from transformers.integrations.executorch import TorchExportableModuleForDecoderOnlyLM

    config = model.config
    t0 = time.perf_counter()
    log.info("exporting the model with torch.export (static KV cache of %d tokens)", max_seq_len)
    wrapped = TorchExportableModuleForDecoderOnlyLM(model, batch_size=1, max_cache_len=max_seq_len)
    # Plain tensors and torchao's quant ops: what torch.export and XNNPACK take. After the wrapper is built,
    # which sizes its KV cache in `model.dtype`, the first floating parameter: after unwrapping, that can be
    # a quantized embedding's bf16 scale.
    unwrap_tensor_subclass(model)
    seq = torch.export.Dim("seq_length", min=1, max=max_seq_len - 1)
    example = torch.tensor([[0, 1]], dtype=torch.long)
    with torch.no_grad():
        # strict (dynamo) export: the non-strict route fails in ExecuTorch 1.5's lowering on torch 2.13
        program = wrapped.export(input_ids=example, cache_position=torch.arange(2, dtype=torch.long),
                                 dynamic_shapes={"input_ids": {1: seq}, "cache_position": {0: seq}}, strict=True)
    eos = config.eos_token_id if isinstance(config.eos_token_id, list) else [config.eos_token_id]
    metadata = {"get_max_seq_len": max_seq_len, "get_max_context_len": max_seq_len,
                "get_vocab_size": config.vocab_size, "get_n_layers": config.num_hidden_layers,
                "use_kv_cache": True, "use_sdpa_with_kv_cache": False, "enable_dynamic_shape": True,
                "get_bos_id": config.bos_token_id if config.bos_token_id is not None else 0,
                "get_eos_ids": [e for e in eos if e is not None]}
    log.info("exported in %.0f s; lowering to XNNPACK (minutes for a model of 100M+ parameters on a small CPU)",
             time.perf_counter() - t0)
    edge = to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()], constant_methods=metadata)
    info = get_delegation_info(edge.exported_program().graph_module).get_operator_delegation_dataframe()
    linear = info[info.op_type == "aten_linear_default"]
    delegated = int(linear.occurrences_in_delegated_graphs.sum()) if len(linear) else 0
    outside = int(linear.occurrences_in_non_delegated_graphs.sum()) if len(linear) else 0
    # Quant fusion turns an int8 embedding's dequantize + lookup into ExecuTorch's quantized embedding kernel
    # (`quantized_decomposed::embedding_byte`: rows dequantized as looked up), registered by importing its
    # operator library.
    import executorch.kernels.quantized  # noqa: F401
    from executorch.exir import ExecutorchBackendConfig

    return edge.to_executorch(ExecutorchBackendConfig(do_quant_fusion_and_const_prop=True)), delegated, outside


def tokenizer_path(out: Path) -> Path:
    """Where the tokenizer goes beside a program: `model.pte` -> `model.tokenizer.json`."""
    return out.with_name(out.stem + ".tokenizer.json")


def check_destination(out: Path, overwrite: bool) -> None:
    """Before any work: the program and the tokenizer beside it may be written (forge replaces only a program
    and the tokenizer it wrote with one, and only with `--overwrite`)."""
    check_output(out, overwrite=overwrite, ours=_is_pte, kind="an ExecuTorch program")
    check_output(tokenizer_path(out), overwrite=overwrite, ours=lambda _: out.is_file() and _is_pte(out),
                 kind="the tokenizer forge writes beside an ExecuTorch program")


def export_executorch(artifact: Path, out: Path, *, max_seq_len: int | None = None,
                      overwrite: bool = False) -> ExecutorchReport:
    meta = ArtifactMeta.read(artifact) if artifact.is_dir() else None
    if meta is None:
        raise InputError(f"{artifact} is not a forge artifact (no {ARTIFACT_META})")
    recipe = meta.recipe
    if recipe not in DELEGATED_RECIPES:
        raise ConfigError(f"ExecuTorch export takes artifacts of {', '.join(DELEGATED_RECIPES)} (the linears XNNPACK "
                          f"runs); {artifact} was converted with {recipe}")
    check_destination(out, overwrite)
    limit = getattr(load_config(artifact), "max_position_embeddings", None) or 2048
    max_seq_len = min(limit, 2048) if max_seq_len is None else max_seq_len
    if not 2 < max_seq_len <= limit:
        raise ConfigError(f"--max-seq-len must be between 3 and the model's {limit} positions, got {max_seq_len}")
    model, quantized, rounded, as_intx, widened, stacks = _load(artifact, max_seq_len)
    program, delegated, outside = lower(model, max_seq_len)
    if outside or delegated < quantized:
        raise ConversionError(f"XNNPACK took {delegated} linear ops and left {outside} outside, for {quantized} "
                              f"quantized linears; nothing was written")
    tokenizer = tokenizer_path(out) if (artifact / "tokenizer.json").is_file() else None
    if tokenizer is not None:  # first: a program is never left beside another program's tokenizer
        with atomic_file(tokenizer) as tmp:
            shutil.copyfile(artifact / "tokenizer.json", tmp)
    with atomic_file(out) as tmp:
        tmp.write_bytes(program.buffer)
    report = ExecutorchReport(out, recipe, max_seq_len, quantized, delegated, rounded, stacks, out.stat().st_size,
                              tokenizer, *artifact_source_size(artifact))
    lookups = sum("embedding_byte" in str(n.target) for n in program.exported_program().graph_module.graph.nodes)
    if lookups:
        report.notes.append("the int8 embedding runs as ExecuTorch's quantized lookup (`embedding_byte`), a kernel of "
                            "ExecuTorch's quantized library: in Python `import executorch.kernels.quantized` before "
                            "loading the program (ExecuTorch's LLM runner links it)")
    if stacks:
        report.notes.append(f"{stacks} expert stacks are stored as int8 codes (one byte per weight, not packed): "
                            f"for each token only its routed experts' codes are gathered, dequantized and multiplied "
                            f"(XNNPACK has no quantized routed-expert kernel)")
    if widened:
        report.notes.append(f"{widened:,} int2/int3 weights run on XNNPACK's int4 kernels (their codes exactly, "
                            f"stored at 4 bits per weight: XNNPACK has no narrower linear)")
    if as_intx:
        report.notes.append(f"{as_intx} int8 x int8 linears run as XNNPACK's int8 per-channel linears, which quantize "
                            f"activations asymmetrically per token where {recipe} trained symmetric ones: the "
                            f"program's logits are within that rounding of the artifact's, not equal")
    if rounded:
        report.notes.append(f"XNNPACK stores group scales in bf16: {rounded} of the artifact's float32 scales were "
                            f"rounded (train with int8-dynamic-act-int4-weight-bf16-scales for an exact export)")
    return report
