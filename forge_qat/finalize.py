"""Finalize: turn a trained float checkpoint into a deployable low-bit artifact, and verify it.

Called by `forge finalize` and the demo. A forge checkpoint holds float weights (dynamic fake quantizers
keep no state; learned weight scales are saved beside the weights), so finalize re-applies prepare
through the same registry record used in training, with the learned scales where there are some, and
then converts. The artifact is written to a temporary directory, reloaded with stock `transformers` and
compared with the in-memory converted model, and only then renamed into place.
"""

import json
import logging
import math
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from torchao.quantization import FqnToConfig
from transformers import AutoModelForCausalLM, TorchAoConfig

from forge_qat import __version__
from forge_qat import checkpoint as ckpt_io
from forge_qat import lora as lora_mod
from forge_qat.artifact import DEFAULT_MAX_SHARD_BYTES, ShardWriter, choose_format, tensor_bytes, unflattenable
from forge_qat.coverage import Coverage, check_useful
from forge_qat.coverage import plan as plan_coverage
from forge_qat.embeddings import torchao_config
from forge_qat.errors import ConfigError, ConversionError, InputError, OutputExistsError
from forge_qat.models import check_model_dir, is_quantized_artifact, load_config, load_model, load_tokenizer
from forge_qat.prepare import LearnScales, check_convert_hardware, convert_qat, prepare_qat, set_fake_quant_enabled
from forge_qat.recipes import Recipe, get_recipe, recipe_names
from forge_qat.stream_convert import FullTensor, LiveModelReader, follow_live_reads
from forge_qat.torchao_compat import EXPERTS_IMPLEMENTATION
from forge_qat.weights import TensorReader, tied_aliases

log = logging.getLogger(__name__)
ARTIFACT_META = "forge_artifact.json"


@dataclass(frozen=True, kw_only=True)
class FinalizeRequest:
    source: Path
    dest: Path
    qat_convert: str | None = None
    """Recipe to convert with; None means the one recorded in the checkpoint."""
    ptq: str | None = None
    """Explicit post-training quantization with this recipe (for baselines)."""
    fmt: str = "auto"
    dry_run: bool = False
    overwrite: bool = False
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES
    streaming: bool | None = None
    """Convert block by block with bounded memory (None: when the float weights exceed 2 GB)."""


@dataclass(frozen=True, slots=True)
class ConvertJob:
    """What a finalize converts and how, decided from the request and the checkpoint's metadata alone."""

    checkpoint: Path
    recipe: Recipe
    mode: str  # "qat" or "ptq"
    notes: tuple[str, ...]
    zero_dir: Path | None = None
    """A ZeRO-3 DeepSpeed checkpoint to read the weights from (config and tokenizer: `checkpoint`)."""
    learned_scales: bool = False
    """Convert with the weight scales the checkpoint learned (`--qat-learn-scales`) instead of choosing them."""

    lora: "lora_mod.LoraConfig | None" = None
    """The LoRA settings the checkpoint trained with: its adapters are merged (W + s*B@A) before converting."""

    def read_adapters(self) -> dict[str, torch.Tensor] | None:
        if self.lora is None:
            return None
        adapters = ckpt_io.read_adapters(self.checkpoint)
        if not adapters:
            raise InputError(f"{self.checkpoint} was trained with LoRA (--lora-rank {self.lora.lora_rank}) but lacks "
                             f"its adapters ({lora_mod.ADAPTER_DIR}/{lora_mod.PEFT_WEIGHTS}); the checkpoint is "
                             f"incomplete")
        return adapters

    def read_learned_scales(self) -> dict[str, torch.Tensor] | None:
        if not self.learned_scales:
            return None
        scales = ckpt_io.read_learned_scales(self.checkpoint)
        if scales is None:
            raise InputError(f"{self.checkpoint} was trained with --qat-learn-scales but lacks its scales "
                             f"({ckpt_io.LEARNED_SCALES}); the checkpoint is incomplete")
        return scales


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
    """`forge_qat.coverage.Coverage.to_dict()`: what was quantized and what stayed float, by parameters."""
    float_bytes: int
    artifact_bytes: int
    format: str = ""
    format_reason: str = ""
    bits_per_weight: float = 0.0
    max_logit_diff_vs_float: float = math.nan
    reload_max_diff: float = math.nan
    dry_run: bool = False
    streaming: bool = False
    learned_scales: bool = False
    """Whether the weight scales are those the checkpoint learned (`--qat-learn-scales`)."""
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


def choose_job(req: FinalizeRequest) -> ConvertJob:
    """Decide checkpoint, recipe and QAT-vs-PTQ from the request and the checkpoint metadata only."""
    job = _choose_job(req)
    if not job.recipe.artifact_activations:
        note = (f"{job.recipe.name}'s activation quantization has no torchao form: this artifact runs float "
                f"activations in transformers (its weights are the trained ones); `forge export --to gguf` writes "
                f"the model llama.cpp runs with the trained numerics")
        job = replace(job, notes=(*job.notes, note))
    return job


def _choose_job(req: FinalizeRequest) -> ConvertJob:
    job = _choose_recipe_job(req)
    return replace(job, lora=lora_mod.recorded_config(ckpt_io.read_checkpoint_meta(job.checkpoint)))


def _choose_recipe_job(req: FinalizeRequest) -> ConvertJob:
    if req.qat_convert and req.ptq:
        raise ConfigError("--qat-convert and --ptq both choose a recipe; give one")
    if not req.source.exists():
        raise InputError(f"source {req.source} does not exist")
    from forge_qat.distributed.zero_checkpoint import is_zero_checkpoint

    zero_dir = req.source if is_zero_checkpoint(req.source) else None
    ckpt = req.source.parent if zero_dir else ckpt_io.resolve_checkpoint(req.source)
    if zero_dir and not (ckpt / "config.json").is_file():
        raise InputError(f"ZeRO checkpoint {zero_dir} needs config.json and the tokenizer in {ckpt}")
    if not zero_dir:
        check_model_dir(ckpt)
        if is_quantized_artifact(ckpt):
            raise InputError(f"{ckpt} is already a quantized artifact; finalize converts float checkpoints (a "
                             f"checkpoint-N directory or a run directory of `forge train`)")
    meta = ckpt_io.read_checkpoint_meta(ckpt) or {}
    trained = meta.get("qat_recipe")
    learned = bool(meta.get("train_config", {}).get("qat_learn_scales"))
    unused = "; the weight scales it learned (--qat-learn-scales) are not used" if learned else ""
    if req.ptq:
        return ConvertJob(ckpt, get_recipe(req.ptq), "ptq", (f"{ckpt}: --ptq{unused}",) if unused else (), zero_dir)
    name = req.qat_convert or trained
    if name is None:
        raise ConfigError(f"{ckpt} records no QAT recipe; pass --qat-convert RECIPE or --ptq RECIPE "
                          f"(valid recipes: {', '.join(recipe_names())})")
    recipe = get_recipe(name)
    if trained is None:
        note = f"{ckpt} was not QAT-trained: converting it with {name} is post-training quantization"
        return ConvertJob(ckpt, recipe, "ptq", (note,), zero_dir)
    if trained != name:
        note = f"{ckpt} was QAT-trained with {trained}; converting with {name} is post-training quantization"
        return ConvertJob(ckpt, recipe, "ptq", (note + unused,), zero_dir)
    return ConvertJob(ckpt, recipe, "qat", (), zero_dir, learned_scales=learned)


def sample_batch(tokenizer, vocab_size: int, length: int = 64) -> torch.Tensor:
    """A fixed, real-text batch for verification: CPython's own documentation."""
    from pydoc_data.topics import topics

    ids = tokenizer(topics["if"] + topics["while"], add_special_tokens=False)["input_ids"][: 2 * length]
    ids = torch.tensor(ids, dtype=torch.long).clamp_(max=vocab_size - 1)
    return ids.view(2, -1)


def _weight_kind(name: str) -> str:
    """`q_proj` for `...q_proj.weight`, `experts.gate_up_proj` for an expert stack."""
    module, _, param = name.rpartition(".")
    return module.rpartition(".")[2] if param == "weight" else f"{module.rpartition('.')[2]}.{param}"


def _dedup_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """state_dict without the second name of tied parameters (safetensors can't store aliases)."""
    tied = tied_aliases(model)
    return {k: v for k, v in model.state_dict().items() if k not in tied}


def _dry_run(job: ConvertJob, req: FinalizeRequest) -> FinalizeReport:
    config = load_config(job.checkpoint)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    coverage = plan_coverage(skeleton, job.recipe)
    check_useful(coverage, job.recipe)
    float_bytes = artifact = 0
    for name, t in _dedup_state_dict(skeleton).items():
        float_bytes += t.numel() * 4
        if name in coverage.quantized:
            per_row = name.rpartition(".")[0] in coverage.tables
            group = t.shape[-1] if per_row else job.recipe.group_size or t.shape[-1]
            artifact += t.numel() * job.recipe.storage_bits // 8 + (t.numel() // group) * 5
        else:
            artifact += t.numel() * 4
    return FinalizeReport(dest=None, recipe=job.recipe.name, mode=job.mode, notes=list(job.notes),
                          converted=len(coverage.quantized),
                          by_module=dict(Counter(map(_weight_kind, coverage.quantized))),
                          coverage=coverage.to_dict(), float_bytes=float_bytes, artifact_bytes=artifact, dry_run=True,
                          format=choose_format(req.fmt, job.recipe.safetensors, [])[0])


def check_destination(req: FinalizeRequest, job: ConvertJob) -> None:
    """`--dest` may not overlap the source, and `--overwrite` replaces only a previous forge artifact (or an
    empty directory): never a checkpoint, a run, or anything forge did not write."""
    dest = req.dest.resolve()
    for source in {req.source.resolve(), job.checkpoint.resolve()}:
        if dest == source or dest in source.parents or source in dest.parents:
            raise ConfigError(f"--dest {req.dest} overlaps the source {source}: writing there would replace or "
                              f"nest inside the checkpoint being converted; choose a destination outside it")
    if not req.dest.exists():
        try:
            req.dest.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise InputError(f"cannot write --dest {req.dest}: {e.strerror or e}") from None
        return
    if not req.overwrite:
        raise OutputExistsError(f"destination {req.dest} exists; pass --overwrite to replace it")
    is_artifact = (req.dest / ARTIFACT_META).is_file()
    if not req.dest.is_dir() or not (is_artifact or not any(req.dest.iterdir())):
        raise OutputExistsError(f"destination {req.dest} is not a forge artifact (no {ARTIFACT_META}); --overwrite "
                                f"replaces only forge's own artifacts: choose another --dest")


def finalize(req: FinalizeRequest) -> FinalizeReport:
    """Prepare + convert the checkpoint through the registry, write, reload and verify the artifact."""
    job = choose_job(req)
    check_convert_hardware(job.recipe)  # before loading anything
    if req.dry_run:
        return _dry_run(job, req)
    check_destination(req, job)
    for note in job.notes:
        log.warning(note)

    if job.zero_dir:
        from forge_qat.distributed.zero_checkpoint import ZeroCheckpointReader

        return finalize_streaming(job, req, ZeroCheckpointReader(job.zero_dir))
    if _use_streaming(req, job):
        return finalize_streaming(job, req)
    device, dtype = convert_placement(job)
    model, tokenizer = load_model(str(job.checkpoint), dtype=dtype, device=device)
    model.eval()
    float_bytes = sum(tensor_bytes(t) for t in _dedup_state_dict(model).values())
    sample = sample_batch(tokenizer, model.config.vocab_size).to(device)
    lora_measured = {}
    with torch.no_grad():
        scales = job.read_learned_scales()
        learn = LearnScales(initial=scales) if scales is not None else None
        if job.lora is None:
            float_logits = model(sample).logits
            coverage = prepare_qat(model, job.recipe, learn=learn)
        else:
            coverage, float_logits, lora_measured = _prepare_merged(model, job, learn, sample)
        converted = convert_qat(model, job.recipe)
        quant_logits = model(sample).logits
        if lora_measured:
            lora_measured["lora_trained_vs_artifact"] = (quant_logits - lora_measured.pop("trained")).abs().max().item()

    state = _dedup_state_dict(model)
    fmt, reason = choose_format(req.fmt, job.recipe.safetensors, unflattenable(state))
    quantized = [state[n] for n in converted]
    quantized_numel = sum(t.numel() for t in quantized)
    quantized_bytes = sum(tensor_bytes(t) for t in quantized)
    del quantized

    with ckpt_io.atomic_dir(req.dest) as tmp:
        writer = ShardWriter(tmp, fmt, list(state), req.max_shard_bytes)
        for name in list(state):
            writer.add(name, state.pop(name))
        shards = writer.close()
        _write_extras(tmp, model.config, model.generation_config, tokenizer, job.recipe, coverage)
        reloaded = AutoModelForCausalLM.from_pretrained(tmp, dtype=dtype, trust_remote_code=False).to(device)
        with torch.no_grad():
            reload_diff = (reloaded(sample).logits - quant_logits).abs().max().item()
        if reload_diff > 1e-5:
            raise ConversionError(f"the written artifact does not reproduce the converted model "
                                  f"(max logit difference {reload_diff:.3e}); nothing was written")
        report = _report(req, job, coverage, converted, fmt, reason, shards, float_bytes=float_bytes,
                         artifact_bytes=writer.total_bytes, quantized_bytes=quantized_bytes,
                         quantized_numel=quantized_numel,
                         max_logit_diff_vs_float=(quant_logits - float_logits).abs().max().item(),
                         reload_max_diff=reload_diff, **lora_measured)
        _write_report(tmp, job, report)
    return report


def _prepare_merged(model: torch.nn.Module, job: ConvertJob, learn: LearnScales | None,
                    sample: torch.Tensor) -> tuple[Coverage, torch.Tensor, dict]:
    """A LoRA checkpoint, in memory: the model as it trained (fake quantization and adapters in their mode; the
    logits deploying is compared with), then the adapters merged into the weights (W + s*B@A, the expression
    merged-mode training used) and the float logits of the merged model: the prepared model convert takes."""
    coverage = prepare_qat(model, job.recipe, learn=learn)
    adapters = job.read_adapters()
    installed = lora_mod.install(model, job.lora, list(coverage.linears), coverage.experts)
    lora_mod.load(model, adapters, job.checkpoint)
    trained = model(sample).logits
    merged = lora_mod.merge(model)
    set_fake_quant_enabled(model, False)
    float_logits = model(sample).logits
    set_fake_quant_enabled(model, True)
    log.info("LoRA: adapters merged into %d weights (%s)", len(merged), installed.describe())
    return coverage, float_logits, {"trained": trained, "lora_merged": len(merged)}


def _report(req: FinalizeRequest, job: ConvertJob, coverage: Coverage, converted: list[str], fmt: str, reason: str,
            shards: list[Path], *, quantized_bytes: int, quantized_numel: int, **measured) -> FinalizeReport:
    """The report of a written artifact (in-memory or streamed); `measured`: the byte counts and logit
    checks the route made."""
    return FinalizeReport(
        dest=req.dest, recipe=job.recipe.name, mode=job.mode, notes=list(job.notes), converted=len(converted),
        by_module=dict(Counter(map(_weight_kind, converted))), coverage=coverage.to_dict(), format=fmt,
        format_reason=reason, bits_per_weight=8 * quantized_bytes / max(quantized_numel, 1),
        shards=[s.name for s in shards], learned_scales=job.learned_scales, **measured)


def _write_extras(directory: Path, config, generation_config, tokenizer, recipe: Recipe, coverage: Coverage) -> None:
    """What makes the shards a model stock transformers loads: config with quantization_config (and the
    experts implementation that runs quantized expert stacks), generation config, tokenizer."""
    not_converted = sorted(name.rpartition(".")[0] for name in coverage.kept if name.endswith(".weight"))
    quant_type = recipe.base_config()
    if coverage.tables:
        # Per-module configs (the linears by a pattern of their names: torchao deprecates "_default"), and the
        # flag that makes transformers' torchao loader take embeddings at all.
        linears = "|".join(sorted({name.rpartition(".")[2] for name in coverage.linears}))
        quant_type = FqnToConfig({**{name: torchao_config(recipe.embeddings) for name in coverage.tables},
                                  **({f"re:(.*\\.)?({linears})": quant_type} if linears else {})})
    config.quantization_config = TorchAoConfig(quant_type=quant_type, modules_to_not_convert=not_converted,
                                               include_input_output_embeddings=bool(coverage.tables))
    if coverage.experts:
        # A public config field (`PreTrainedConfig.__init__` reads it back): the eager expert loop selects one
        # expert's torchao tensor at a time; the default grouped_mm would call ops torchao does not implement.
        # Stacks whose tensor lacks that select in torchao name the module that adds it instead, so that stock
        # transformers refuses them at load, naming the import, rather than failing at the first forward.
        config.experts_implementation = (EXPERTS_IMPLEMENTATION if recipe.stacks_need_compat
                                         else "eager")
    config.save_pretrained(directory)
    if generation_config is not None:
        generation_config.save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def artifact_recipe(directory: Path) -> str | None:
    """The recipe a forge artifact was converted with (from its `forge_artifact.json`), or None when
    `directory` is no readable forge artifact."""
    try:
        recipe = json.loads((directory / ARTIFACT_META).read_text()).get("recipe")
    except (OSError, ValueError, AttributeError):
        return None
    return recipe if isinstance(recipe, str) else None


def _write_report(directory: Path, job: ConvertJob, report: "FinalizeReport") -> None:
    meta = {"forge_qat_version": __version__, "source": str(job.checkpoint), **report.to_dict()}
    (directory / ARTIFACT_META).write_text(json.dumps(meta, indent=2))


STREAMING_THRESHOLD_BYTES = 2 * 1024**3


def convert_placement(job: ConvertJob) -> tuple[torch.device, torch.dtype]:
    """Where and in which dtype a finalize converts and verifies: on the GPU for recipes whose kernels
    are CUDA kernels, in the dtype those kernels need (bf16), else in the checkpoint's own dtype, so
    the tensors that stay float are written as they came (a bf16 model's norms and embeddings in bf16)."""
    from forge_qat.weights import SafetensorsReader

    dtype = job.recipe.convert_dtype
    if dtype is None:
        try:
            dtype = SafetensorsReader.from_dir(job.checkpoint).float_dtype()
        except InputError:  # weights only in the ZeRO state (read as fp32 masters)
            dtype = torch.float32
    return job.recipe.convert_device, dtype


def _use_streaming(req: FinalizeRequest, job: ConvertJob) -> bool:
    if req.streaming is not None:
        return req.streaming
    return sum(f.stat().st_size for f in job.checkpoint.glob("*.safetensors")) > STREAMING_THRESHOLD_BYTES


def finalize_streaming(job: ConvertJob, req: FinalizeRequest,
                       reader: TensorReader | None = None) -> FinalizeReport:
    """Block-by-block finalize (forge_qat.stream_convert): bounded memory, structural verification
    of the shards instead of a full reload (which would need the whole quantized model). `reader`
    supplies the float weights (default: the checkpoint's safetensors shards)."""
    from transformers import GenerationConfig

    from forge_qat.layouts import model_layout_reader
    from forge_qat.stream_convert import write_streamed
    from forge_qat.weights import SafetensorsReader

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
    with ckpt_io.atomic_dir(req.dest) as tmp:
        reader = reader or model_layout_reader(SafetensorsReader.from_dir(job.checkpoint), skeleton)
        lora_measured = {}
        if job.lora is not None:
            adapters = job.read_adapters()
            reader = lora_mod.MergedReader(reader, adapters, job.lora.scaling)
            lora_measured["lora_merged"] = len(lora_mod.adapted_weights(adapters))
        stats, shards, total = write_streamed(skeleton, reader, job.recipe, tmp, fmt, req.max_shard_bytes, device,
                                              learned=job.read_learned_scales())
        if set(stats.converted) != set(coverage.quantized):
            raise ConversionError(f"the block-by-block convert quantized {len(stats.converted)} weights, the "
                                  f"coverage plan {len(coverage.quantized)}; nothing was written")
        _write_extras(tmp, config, generation_config, tokenizer, job.recipe, coverage)
        report = _report(req, job, coverage, stats.converted, fmt, reason, shards, float_bytes=stats.float_bytes,
                         artifact_bytes=total, quantized_bytes=stats.quantized_bytes,
                         quantized_numel=stats.quantized_numel, streaming=True, **lora_measured)
        _write_report(tmp, job, report)
    return report


def finalize_live(model: torch.nn.Module, checkpoint: Path, recipe: str, dest: Path, full_tensor: FullTensor, *,
                  main: bool) -> Path | None:
    """`forge train --finalize` of a model still partitioned across ranks (collective): the live model is
    gathered to rank 0 one block at a time, and only rank 0 converts and writes (the other ranks join the
    gathers). The artifact equals a streaming finalize of the saved `checkpoint`, whose config, tokenizer and
    metadata it uses. Returns the artifact on rank 0."""
    if not main:
        follow_live_reads(model, full_tensor)
        return None
    req = FinalizeRequest(source=checkpoint, dest=dest, qat_convert=recipe, overwrite=True)
    reader = LiveModelReader(model, full_tensor)
    artifact = finalize_streaming(choose_job(req), req, reader).dest
    reader.finish()
    return artifact
