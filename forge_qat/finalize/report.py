"""What a finalize reports: the `FinalizeReport` of a written (or, with `--dry-run`, planned) artifact, built the
same way by every route.

Called by the finalize routes; printed by the CLI, written into `forge_artifact.json` by `forge_qat.formats`.
"""

import math
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from forge_qat.errors import InputError
from forge_qat.formats.artifact import choose_format
from forge_qat.formats.weights import SafetensorsReader, tied_aliases
from forge_qat.qat.coverage import Coverage


@dataclass
class FinalizeReport:
    dest: Path | None
    recipe: str
    mode: str
    notes: list[str]
    converted: int
    """Weights converted to torchao tensors: linear layers and MoE expert stacks."""
    by_module: dict[str, int]
    coverage: dict
    """`forge_qat.qat.coverage.Coverage.to_dict()`: what was quantized and what stayed float, by parameters."""
    source_bytes: int
    """The source checkpoint's weights as it stores them (`source_size`), what `artifact_bytes` is compared with."""
    source_dtype: str
    """The floating dtype the source holds most of its weights in ("bfloat16"; "float32" for a ZeRO state's
    masters)."""
    artifact_bytes: int
    format: str = ""
    format_reason: str = ""
    bits_per_weight: float = 0.0
    max_logit_diff_vs_float: float = math.nan
    """max |logit| difference between the artifact and the same checkpoint unquantized, on the verification batch
    (`forge_qat.finalize.convert.sample_batch`); NaN: not measured (streaming)."""
    float_logit_std: float = math.nan
    """The unquantized model's logits' standard deviation on that batch: the scale the change is read against."""
    top1_agreement: float = math.nan
    """Share of that batch's positions whose most likely next token is the unquantized model's."""
    verification_positions: int = 0
    """Positions in the verification batch."""
    reload_max_diff: float = math.nan
    dry_run: bool = False
    streaming: bool = False
    learned_scales: bool = False
    """Whether the weight scales are those the checkpoint learned (`--qat-learn-scales`)."""
    weight_scales: str = "absmax"
    """Where the weight scales come from: learned (the checkpoint's), or the rule that chose them
    (`forge_qat.qat.fake_quant.ScaleInit`: extreme, mse, or absmax, the recipe's own quantizer)."""
    llama_cpp_types: dict[str, int] = field(default_factory=dict)
    """Parameters of the linear layers by llama.cpp type, for recipes whose layers take llama.cpp's types
    (llama-cpp-q4-k-m); Q4_K ones are stored as their values, their blocks in `forge_blocks/q4_k.safetensors`."""
    lora_merged: int = 0
    """Weights into which LoRA adapters were merged (W + s*B@A) before converting."""
    lora_trained_vs_artifact: float = math.nan
    """max |logit| difference between the model as LoRA trained it (fake quantization, adapters in their
    --lora-qat mode) and the artifact, on the verification batch: 0 for merged mode; what deploying a
    separate-mode run changes. NaN: not measured (streaming finalize)."""
    shards: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["dest"] = str(self.dest) if self.dest else None
        return d


def weight_kind(name: str) -> str:
    """`q_proj` for `...q_proj.weight`, `experts.gate_up_proj` for an expert stack."""
    module, _, param = name.rpartition(".")
    return module.rpartition(".")[2] if param == "weight" else f"{module.rpartition('.')[2]}.{param}"


def dedup_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """state_dict without the second name of tied parameters (safetensors can't store aliases)."""
    tied = tied_aliases(model)
    return {k: v for k, v in model.state_dict().items() if k not in tied}


def source_size(job, model: torch.nn.Module) -> dict:
    """`source_bytes` and `source_dtype` of `job`'s checkpoint: from its safetensors headers (the bytes as stored, in
    the dtype it was saved in, whatever dtype finalize converts in); a ZeRO state (fp32 masters) or a
    `pytorch_model.bin` checkpoint is counted from `model`'s parameters in the dtype they were loaded in."""
    if job.zero_dir is None:
        try:
            reader = SafetensorsReader.from_dir(job.checkpoint)
        except InputError:
            pass
        else:
            return {"source_bytes": reader.stored_bytes(),
                    "source_dtype": str(reader.float_dtype()).removeprefix("torch.")}
    params = dedup_state_dict(model).values()
    if job.zero_dir is not None:  # fp32 masters, whatever dtype the model was built in
        return {"source_bytes": 4 * sum(t.numel() for t in params), "source_dtype": "float32"}
    by_dtype: Counter[torch.dtype] = Counter()
    for t in params:
        by_dtype[t.dtype] += t.numel()
    floating = {d: n for d, n in by_dtype.items() if d.is_floating_point}
    return {"source_bytes": sum(n * d.itemsize for d, n in by_dtype.items()),
            "source_dtype": str(max(floating, key=floating.get, default=torch.float32)).removeprefix("torch.")}


def written_report(job, req, coverage: Coverage, converted: list[str], fmt: str, reason: str, shards: list[Path], *,
                   quantized_bytes: int, quantized_numel: int, **measured) -> FinalizeReport:
    """The report of a written artifact (in-memory or streamed); `measured`: the byte counts and logit checks
    the route made. `job`, `req`: `forge_qat.finalize.job`'s ConvertJob and FinalizeRequest."""
    return FinalizeReport(
        dest=req.dest, recipe=job.recipe.name, mode=job.mode, notes=list(job.notes), converted=len(converted),
        by_module=dict(Counter(map(weight_kind, converted))), coverage=coverage.to_dict(), format=fmt,
        format_reason=reason, bits_per_weight=8 * quantized_bytes / max(quantized_numel, 1),
        shards=[s.name for s in shards], learned_scales=job.learned_scales,
        weight_scales=job.weight_scales, **measured)


def planned_report(job, req, skeleton: torch.nn.Module, coverage: Coverage) -> FinalizeReport:
    """`--dry-run`: what the artifact would hold, estimated from a meta-device skeleton in the dtype finalize
    converts in (the tensors kept in float are written in it)."""
    artifact = 0
    for name, t in dedup_state_dict(skeleton).items():
        if name in coverage.quantized:
            per_row = name.rpartition(".")[0] in coverage.tables
            group = t.shape[-1] if per_row else job.recipe.group_size or t.shape[-1]
            artifact += t.numel() * job.recipe.storage_bits // 8 + (t.numel() // group) * 5
        else:
            artifact += t.numel() * t.dtype.itemsize
    return FinalizeReport(dest=None, recipe=job.recipe.name, mode=job.mode, notes=list(job.notes),
                          converted=len(coverage.quantized),
                          by_module=dict(Counter(map(weight_kind, coverage.quantized))),
                          coverage=coverage.to_dict(), artifact_bytes=artifact, dry_run=True,
                          **source_size(job, skeleton),
                          learned_scales=job.learned_scales, weight_scales=job.weight_scales,
                          format=choose_format(req.fmt, job.recipe.safetensors, [])[0])
