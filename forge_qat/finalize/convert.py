"""Finalize: turn a trained float checkpoint into a deployable low-bit artifact, and verify it.

Called by `forge finalize`, `forge train --finalize` (one process), export's `--recipe` and the demo. A forge
checkpoint holds float weights (dynamic fake quantizers keep no state; learned weight scales are saved beside
the weights), so finalize re-applies prepare through the same registry record used in training, with the
learned scales where there are some, and then converts. In memory, the artifact is written to a temporary
directory, reloaded with stock `transformers` and compared with the converted model, and only then renamed
into place; large checkpoints and ZeRO states go block by block (`forge_qat.finalize.streaming`).
"""

import logging
from dataclasses import replace

import torch
from transformers import AutoModelForCausalLM

from forge_qat.errors import ConversionError
from forge_qat.finalize.blocks import check_finite
from forge_qat.finalize.job import (
    ConvertJob,
    FinalizeRequest,
    check_destination,
    choose_job,
    convert_placement,
    use_streaming,
)
from forge_qat.finalize.model_files import write_artifact_meta, write_model_files
from forge_qat.finalize.report import FinalizeReport, dedup_state_dict, planned_report, source_size, written_report
from forge_qat.finalize.streaming import finalize_streaming
from forge_qat.formats import q4_k_blocks
from forge_qat.formats.artifact import ShardWriter, choose_format, tensor_bytes, unflattenable
from forge_qat.formats.atomic import atomic_dir
from forge_qat.lora import adapters as lora_mod
from forge_qat.lora import grid_base
from forge_qat.models import load_config, load_model
from forge_qat.qat.convert import convert_qat
from forge_qat.qat.convert import q4_k_blocks as convert_q4_k_blocks
from forge_qat.qat.coverage import Coverage, check_useful
from forge_qat.qat.coverage import plan as plan_coverage
from forge_qat.qat.ggml import ggml_types
from forge_qat.qat.prepare import LearnScales, prepare_qat, set_fake_quant_enabled

log = logging.getLogger(__name__)


def sample_batch(tokenizer, vocab_size: int, length: int = 64) -> torch.Tensor:
    """A fixed, real-text batch for verification: CPython's own documentation."""
    from pydoc_data.topics import topics

    ids = tokenizer(topics["if"] + topics["while"], add_special_tokens=False)["input_ids"][: 2 * length]
    ids = torch.tensor(ids, dtype=torch.long).clamp_(max=vocab_size - 1)
    return ids.view(2, -1)


def finalize(req: FinalizeRequest) -> FinalizeReport:
    """Prepare + convert the checkpoint through the registry, write, reload and verify the artifact."""
    job = choose_job(req)  # refuses a recipe this machine cannot convert, before loading anything
    if req.dry_run:
        return _dry_run(job, req)
    check_destination(req, job)
    for note in job.notes:
        log.warning(note)
    if job.zero_dir:
        from forge_qat.distributed.zero_checkpoint import ZeroCheckpointReader

        return finalize_streaming(job, req, ZeroCheckpointReader(job.zero_dir))
    if use_streaming(req, job):
        return finalize_streaming(job, req)
    return _finalize_in_memory(job, req)


def _dry_run(job: ConvertJob, req: FinalizeRequest) -> FinalizeReport:
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(load_config(job.checkpoint), dtype=convert_placement(job)[1])
    coverage = plan_coverage(skeleton, job.recipe)
    check_useful(coverage, job.recipe)
    return planned_report(job, req, skeleton, coverage)


def _finalize_in_memory(job: ConvertJob, req: FinalizeRequest) -> FinalizeReport:
    if job.lora is not None and job.chosen_scales:
        # in memory the model is prepared (its scales chosen) before the adapters merge into the weights: the rule
        # would choose the base weights' scales; block by block the merged weights are read, and it applies
        job = replace(job, chosen_scales=None, notes=(
            *job.notes, f"--ptq-scales {job.chosen_scales} is not applied to a LoRA checkpoint finalized in memory "
                        f"(its scales would be chosen before the adapters merge): absmax scales; --streaming "
                        f"applies it"))
    device, dtype = convert_placement(job)
    model, tokenizer = load_model(str(job.checkpoint), dtype=dtype, device=device)
    model.eval()
    source = source_size(job, model)
    sample = sample_batch(tokenizer, model.config.vocab_size).to(device)
    lora_measured = {}
    with torch.no_grad():
        learn = job.learn_scales()
        if job.lora is None:
            float_logits = model(sample).logits
            coverage = prepare_qat(model, job.recipe, learn=learn)
        else:
            coverage, float_logits, lora_measured = _prepare_merged(model, job, learn, sample)
        types = ggml_types(model)
        converted = convert_qat(model, job.recipe)
        quant_logits = model(sample).logits
        if lora_measured:
            lora_measured["lora_trained_vs_artifact"] = (quant_logits - lora_measured.pop("trained")).abs().max().item()

    q4_k = convert_q4_k_blocks(model)
    state = dedup_state_dict(model)
    fmt, reason = choose_format(req.fmt, job.recipe.safetensors, unflattenable(state))
    quantized = [state[n] for n in converted]
    quantized_numel = sum(t.numel() for t in quantized)
    quantized_bytes = sum(tensor_bytes(t) for t in quantized)
    del quantized

    with atomic_dir(req.dest) as tmp:
        writer = ShardWriter(tmp, fmt, list(state), req.max_shard_bytes)
        for name in list(state):
            check_finite(name, state[name])
            writer.add(name, state.pop(name))
        shards = writer.close()
        q4_k_blocks.write(tmp, {name: blocks.parts() for name, blocks in q4_k.items()})
        write_model_files(tmp, model.config, model.generation_config, tokenizer, job.recipe, coverage,
                          stored_as_values=sorted(q4_k))
        reloaded = AutoModelForCausalLM.from_pretrained(tmp, dtype=dtype, trust_remote_code=False).to(device)
        with torch.no_grad():
            reload_diff = (reloaded(sample).logits - quant_logits).abs().max().item()
        if not reload_diff <= 1e-5:  # NaN too
            raise ConversionError(f"the written artifact does not reproduce the converted model "
                                  f"(max logit difference {reload_diff:.3e}); nothing was written")
        report = written_report(job, req, coverage, converted, fmt, reason, shards, **source,
                                artifact_bytes=writer.total_bytes, quantized_bytes=quantized_bytes,
                                quantized_numel=quantized_numel,
                                **_agreement(float_logits, quant_logits),
                                reload_max_diff=reload_diff, llama_cpp_types=types, **lora_measured)
        write_artifact_meta(tmp, job.checkpoint, report)
    return report


def _agreement(float_logits: torch.Tensor, quant_logits: torch.Tensor) -> dict:
    """How far the artifact's logits are from the unquantized model's on the verification batch, with a yardstick:
    the largest change, the float logits' spread, and the share of positions whose top-1 token is the same."""
    same = quant_logits.argmax(-1) == float_logits.argmax(-1)
    return {"max_logit_diff_vs_float": (quant_logits - float_logits).abs().max().item(),
            "float_logit_std": float_logits.float().std().item(), "top1_agreement": same.float().mean().item(),
            "verification_positions": same.numel()}


def _unquantized_logits(model: torch.nn.Module, sample: torch.Tensor) -> torch.Tensor:
    set_fake_quant_enabled(model, False)
    try:
        return model(sample).logits
    finally:
        set_fake_quant_enabled(model, True)


def _prepare_merged(model: torch.nn.Module, job: ConvertJob, learn: LearnScales | None,
                    sample: torch.Tensor) -> tuple[Coverage, torch.Tensor, dict]:
    """A LoRA checkpoint, in memory: the model as it trained (fake quantization and adapters in their mode; the
    logits deploying is compared with), then the adapters merged into the weights (W + s*B@A, the expression
    merged-mode training used) and the float logits of the merged model: the prepared model convert takes."""
    coverage = prepare_qat(model, job.recipe, learn=learn)
    adapters = job.read_adapters()
    installed = lora_mod.install(model, job.lora, list(coverage.linears), coverage.experts)
    lora_mod.load(model, adapters, job.checkpoint)
    grid = bool(job.lora.lora_base_grid)
    if grid:  # the unquantized logits first: a grid holds no float base to run
        float_logits = _unquantized_logits(model, sample)
        log.info("%s", grid_base.install(model, list(coverage.linears), coverage.experts, keep_weights=True).describe())
    trained = model(sample).logits
    merged = lora_mod.merge(model)  # into the grid's values where training held the base in a grid
    if grid:
        grid_base.remove(model)
    else:
        float_logits = _unquantized_logits(model, sample)
    log.info("LoRA: adapters merged into %d weights (%s)", len(merged), installed.describe())
    return coverage, float_logits, {"trained": trained, "lora_merged": len(merged)}
