"""Streaming finalize: a float checkpoint converted block by block into an artifact, with memory bounded by
one block plus one shard, flat in depth; verified structurally (shard headers and metadata), since a full
reload would need the whole quantized model.

Called by `forge_qat.finalize.convert.finalize` (`--streaming`, large checkpoints, ZeRO states) and by the live
finalize of a partitioned model (`forge_qat.finalize.live`).
"""

import torch
from transformers import AutoModelForCausalLM

from forge_qat.errors import ConversionError
from forge_qat.finalize.blocks import write_streamed
from forge_qat.finalize.job import ConvertJob, FinalizeRequest, convert_placement
from forge_qat.finalize.model_files import write_artifact_meta, write_model_files
from forge_qat.finalize.report import FinalizeReport, source_size, written_report
from forge_qat.formats.artifact import choose_format
from forge_qat.formats.atomic import atomic_dir
from forge_qat.formats.weights import TensorReader
from forge_qat.lora import adapters as lora_mod
from forge_qat.lora import grid_base
from forge_qat.models import load_config, load_tokenizer
from forge_qat.qat.coverage import check_useful
from forge_qat.qat.coverage import plan as plan_coverage
from forge_qat.qat.prepare import prepare_qat


def finalize_streaming(job: ConvertJob, req: FinalizeRequest,
                       reader: TensorReader | None = None) -> FinalizeReport:
    """Block-by-block finalize. `reader` supplies the float weights (default: the checkpoint's safetensors
    shards, through the model's layout)."""
    from transformers import GenerationConfig

    from forge_qat.formats.layouts import model_layout_reader
    from forge_qat.formats.weights import SafetensorsReader

    config = load_config(job.checkpoint)
    device, dtype = convert_placement(job)
    if job.zero_dir and job.recipe.convert_dtype is None:
        dtype = torch.float32  # a ZeRO state holds fp32 masters
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config, dtype=dtype)
    skeleton.tie_weights()
    coverage = plan_coverage(skeleton, job.recipe)
    check_useful(coverage, job.recipe)
    fmt, reason = choose_format(req.fmt, job.recipe.safetensors, [])
    tokenizer = load_tokenizer(job.checkpoint)
    try:
        generation_config = GenerationConfig.from_pretrained(job.checkpoint)
    except OSError:
        generation_config = None
    with atomic_dir(req.dest) as tmp:
        reader = reader or model_layout_reader(SafetensorsReader.from_dir(job.checkpoint), skeleton)
        lora_measured = {}
        if job.lora is not None:
            adapters = job.read_adapters()
            lora_mod.check_pairs(adapters, {n: list(t.shape) for n, t in skeleton.state_dict().items()},
                                 job.lora.lora_rank, job.checkpoint)
            reader = lora_mod.MergedReader(reader, adapters, job.lora.scaling, grid=_grid_specs(config, dtype, job))
            lora_measured["lora_merged"] = len(lora_mod.adapted_weights(adapters))
        stats, shards, total = write_streamed(skeleton, reader, job.recipe, tmp, fmt, req.max_shard_bytes, device,
                                              learn=job.learn_scales())
        if set(stats.converted) != set(coverage.quantized):
            raise ConversionError(f"the block-by-block convert quantized {len(stats.converted)} weights, the "
                                  f"coverage plan {len(coverage.quantized)}; nothing was written")
        write_model_files(tmp, config, generation_config, tokenizer, job.recipe, coverage)
        report = written_report(job, req, coverage, stats.converted, fmt, reason, shards,
                                artifact_bytes=total, **source_size(job, skeleton),
                                quantized_bytes=stats.quantized_bytes, quantized_numel=stats.quantized_numel,
                                streaming=True, **lora_measured)
        write_artifact_meta(tmp, job.checkpoint, report)
    return report


def _grid_specs(config, dtype: torch.dtype, job: ConvertJob) -> dict:
    """The weights a merged-mode `--lora-base-grid` run held in a grid, and their grids: the same rule training
    applied (`forge_qat.lora.grid_base.grid_specs`), read off a prepared meta-device skeleton."""
    if not (job.lora.lora_base_grid and job.lora.lora_qat == "merged"):
        return {}
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config, dtype=dtype)
    coverage = prepare_qat(skeleton, job.recipe)
    return grid_base.grid_specs(skeleton, list(coverage.linears), coverage.experts)
