"""What a finalize converts and how: the request (recipes already resolved by the caller), the job chosen from
it and the checkpoint's metadata alone, the destination check, and where and in which dtype convert runs.

Called by every finalize route (`forge_qat.finalize.convert`, `.streaming`, `.live`) before any weight loads.
"""

import typing
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from forge_qat.errors import ConfigError, InputError, choices_message
from forge_qat.formats import adapters as adapter_files
from forge_qat.formats.artifact import DEFAULT_MAX_SHARD_BYTES
from forge_qat.formats.artifact_meta import is_forge_artifact
from forge_qat.formats.atomic import check_output
from forge_qat.formats.checkpoint import LEARNED_SCALES, CheckpointMeta, read_checkpoint_meta, read_learned_scales
from forge_qat.formats.run_dir import resolve_checkpoint
from forge_qat.lora.config import LoraConfig
from forge_qat.models import check_model_dir, is_quantized_artifact
from forge_qat.qat.fake_quant import ScaleInit
from forge_qat.qat.prepare import LearnScales
from forge_qat.qat.registry import Recipe, get_recipe, recipe_names

STREAMING_THRESHOLD_BYTES = 2 * 1024**3


@dataclass(frozen=True, kw_only=True)
class FinalizeRequest:
    source: Path
    dest: Path
    qat_convert: Recipe | None = None
    """Recipe to convert with; None means the one recorded in the checkpoint."""
    ptq: Recipe | None = None
    """Explicit post-training quantization with this recipe (for baselines)."""
    fmt: str = "auto"
    dry_run: bool = False
    overwrite: bool = False
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES
    streaming: bool | None = None
    """Convert block by block with bounded memory (None: when the float weights exceed 2 GB)."""
    ptq_scales: ScaleInit | None = None
    """Post-training quantization: how the weight scales are chosen (`forge_qat.qat.fake_quant.ScaleInit`) for
    recipes whose torchao tensor takes chosen scales (`Recipe.learnable_scales`; others use their quantizer's);
    None: the recipe's `ptq_scales`."""

    def __post_init__(self) -> None:
        for name in ("qat_convert", "ptq"):
            if not isinstance(getattr(self, name), Recipe | None):  # a name: resolve it where it was given
                raise TypeError(f"FinalizeRequest.{name} takes a Recipe (forge_qat.qat.registry.get_recipe), "
                                f"got {getattr(self, name)!r}")
        if self.ptq_scales is not None and self.ptq_scales not in typing.get_args(ScaleInit):
            raise ConfigError(choices_message("--ptq-scales rule", self.ptq_scales, list(typing.get_args(ScaleInit))))


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

    lora: LoraConfig | None = None
    """The LoRA settings the checkpoint trained with: its adapters are merged (W + s*B@A) before converting."""
    chosen_scales: ScaleInit | None = None
    """Post-training quantization with scales chosen by this rule (`--ptq-scales`) instead of the recipe's
    dynamic quantizer's (absmax); None: the quantizer's, or the learned ones."""

    @property
    def weight_scales(self) -> str:
        """Where the artifact's weight scales come from: learned, or the `ScaleInit` rule that chose them."""
        if self.recipe.layer_quantizers is not None:
            return "llama.cpp"
        return "learned" if self.learned_scales else self.chosen_scales or "absmax"

    def learn_scales(self) -> LearnScales | None:
        """The scales prepare installs before convert: the checkpoint's learned ones, those `chosen_scales`'s rule
        chooses from the weights, or None (the recipe's dynamic quantizer)."""
        if self.learned_scales:
            return LearnScales(initial=self.read_learned_scales())
        return LearnScales(init=self.chosen_scales) if self.chosen_scales else None

    def read_adapters(self) -> dict[str, torch.Tensor] | None:
        if self.lora is None:
            return None
        adapters = adapter_files.read_adapters(self.checkpoint)
        adapter_files.check_adapter_config(self.checkpoint, self.lora)
        if not adapters:
            raise InputError(f"{self.checkpoint} was trained with LoRA (--lora-rank {self.lora.lora_rank}) but lacks "
                             f"its adapters ({adapter_files.ADAPTER_DIR}/{adapter_files.PEFT_WEIGHTS}); the "
                             f"checkpoint is incomplete")
        return adapters

    def read_learned_scales(self) -> dict[str, torch.Tensor] | None:
        if not self.learned_scales:
            return None
        scales = read_learned_scales(self.checkpoint)
        if scales is None:
            raise InputError(f"{self.checkpoint} was trained with --qat-learn-scales but lacks its scales "
                             f"({LEARNED_SCALES}); the checkpoint is incomplete")
        return scales


def choose_job(req: FinalizeRequest) -> ConvertJob:
    """Decide checkpoint, recipe and QAT-vs-PTQ from the request and the checkpoint metadata only; a recipe
    whose kernels this machine lacks is refused here, before anything loads."""
    job = _choose_recipe_job(req)
    job.recipe.check_convert_hardware()
    if not job.recipe.streams and (req.streaming or job.zero_dir):
        what = "a ZeRO state" if job.zero_dir else "--streaming"
        raise ConfigError(f"{job.recipe.name} chooses each layer's numerics by its place in the whole model, which "
                          f"block-by-block finalize does not see: {what} is not supported for it yet; finalize "
                          f"in memory (without --streaming"
                          f"{', from the checkpoint beside the ZeRO state' if job.zero_dir else ''})")
    rule = req.ptq_scales or job.recipe.ptq_scales
    if job.mode == "ptq" and rule != "absmax":
        if job.recipe.learnable_scales:
            job = replace(job, chosen_scales=rule)
        else:
            job = replace(job, notes=(*job.notes, f"--ptq-scales {rule} does not apply to {job.recipe.name} (its "
                                                  f"torchao tensor takes no chosen scale): its weight scales are "
                                                  f"absmax's"))
    if not job.recipe.artifact_activations:
        note = (f"{job.recipe.name}'s activation quantization has no torchao form: this artifact runs float "
                f"activations in transformers (its weights are the trained ones); `forge export --to gguf` writes "
                f"the model llama.cpp runs with the trained numerics")
        job = replace(job, notes=(*job.notes, note))
    return job


def _source(req: FinalizeRequest) -> tuple[Path, Path | None, CheckpointMeta | None]:
    """The checkpoint (config, tokenizer, metadata), the ZeRO state to read weights from if any, its metadata."""
    if not req.source.exists():
        raise InputError(f"source {req.source} does not exist")
    from forge_qat.distributed.zero_checkpoint import is_zero_checkpoint

    zero_dir = req.source if is_zero_checkpoint(req.source) else None
    ckpt = req.source.parent if zero_dir else resolve_checkpoint(req.source)
    if zero_dir and not (ckpt / "config.json").is_file():
        raise InputError(f"ZeRO checkpoint {zero_dir} needs config.json and the tokenizer in {ckpt}")
    meta = read_checkpoint_meta(ckpt) if zero_dir else None
    if meta is not None and meta.train_config.get("expert_parallel", 1) > 1:
        # DeepSpeed keeps AutoEP's layers there (each rank's experts as w1/w2/w3 stacks); the checkpoint beside it
        # holds the same fp32 weights gathered back into the transformers layout
        raise InputError(f"{zero_dir} is the DeepSpeed state of an --expert-parallel run, in AutoEP's layout; "
                         f"finalize the checkpoint, which holds the same weights in the transformers layout: "
                         f"forge finalize --source {ckpt} --dest {req.dest}")
    if not zero_dir:
        check_model_dir(ckpt)
        if is_quantized_artifact(ckpt):
            raise InputError(f"{ckpt} is already a quantized artifact; finalize converts float checkpoints (a "
                             f"checkpoint-N directory or a run directory of `forge train`)")
    return ckpt, zero_dir, meta if zero_dir else read_checkpoint_meta(ckpt)


def _choose_recipe_job(req: FinalizeRequest) -> ConvertJob:
    if req.qat_convert and req.ptq:
        raise ConfigError("--qat-convert and --ptq both choose a recipe; give one")
    ckpt, zero_dir, meta = _source(req)
    lora = meta.lora if meta else None
    trained = meta.qat_recipe if meta else None
    # a merged-mode LoRA run on a grid base quantized against the grid's scales, which its checkpoint keeps as learned
    learned = bool(meta and (meta.learns_scales or (lora and lora.lora_base_grid and lora.lora_qat == "merged")))
    unused = "; the weight scales it learned (--qat-learn-scales) are not used" if learned else ""
    if req.ptq:
        return ConvertJob(ckpt, req.ptq, "ptq", (f"{ckpt}: --ptq{unused}",) if unused else (), zero_dir, lora=lora)
    if req.qat_convert is None and trained is None:
        raise ConfigError(f"{ckpt} records no QAT recipe; pass --qat-convert RECIPE or --ptq RECIPE "
                          f"(valid recipes: {', '.join(recipe_names())})")
    recipe = req.qat_convert or _recorded_recipe(trained, ckpt)
    if trained is None:
        note = f"{ckpt} was not QAT-trained: converting it with {recipe.name} is post-training quantization"
        return ConvertJob(ckpt, recipe, "ptq", (note,), zero_dir, lora=lora)
    if trained != recipe.name:
        note = f"{ckpt} was QAT-trained with {trained}; converting with {recipe.name} is post-training quantization"
        return ConvertJob(ckpt, recipe, "ptq", (note + unused,), zero_dir, lora=lora)
    return ConvertJob(ckpt, recipe, "qat", (), zero_dir, learned_scales=learned, lora=lora)


def _recorded_recipe(name: str, ckpt: Path) -> Recipe:
    """The registry record of the recipe a checkpoint records: resolved where it is read from disk."""
    try:
        return get_recipe(name)
    except ConfigError as e:
        raise InputError(f"{ckpt} was trained with recipe {name!r}, which this forge_qat does not know ({e}); pass "
                         f"--qat-convert or --ptq with a known recipe") from None


def check_destination(req: FinalizeRequest, job: ConvertJob) -> None:
    """`--dest` may not overlap the source, and `--overwrite` replaces only a previous forge artifact (or an
    empty directory): never a checkpoint, a run, or anything forge did not write."""
    dest = req.dest.resolve()
    for source in {req.source.resolve(), job.checkpoint.resolve()}:
        if dest == source or dest in source.parents or source in dest.parents:
            raise ConfigError(f"--dest {req.dest} overlaps the source {source}: writing there would replace or "
                              f"nest inside the checkpoint being converted; choose a destination outside it")
    check_output(req.dest, overwrite=req.overwrite, directory=True, kind="an artifact directory",
                 ours=lambda d: is_forge_artifact(d) or not any(d.iterdir()),
                 foreign=f"destination {req.dest} is not a forge artifact (no forge_artifact.json); --overwrite "
                         f"replaces only forge's own artifacts: choose another --dest")


def convert_placement(job: ConvertJob) -> tuple[torch.device, torch.dtype]:
    """Where and in which dtype a finalize converts and verifies: on the GPU for recipes whose kernels
    are CUDA kernels, in the dtype those kernels need (bf16), else in the checkpoint's own dtype, so
    the tensors that stay float are written as they came (a bf16 model's norms and embeddings in bf16)."""
    from forge_qat.formats.weights import SafetensorsReader

    dtype = job.recipe.convert_dtype
    if dtype is None:
        try:
            dtype = SafetensorsReader.from_dir(job.checkpoint).float_dtype()
        except InputError:  # weights only in the ZeRO state (read as fp32 masters)
            dtype = torch.float32
    return job.recipe.convert_device, dtype


def use_streaming(req: FinalizeRequest, job: ConvertJob) -> bool:
    if req.streaming is not None:
        return req.streaming
    if not job.recipe.streams:
        return False
    return sum(f.stat().st_size for f in job.checkpoint.glob("*.safetensors")) > STREAMING_THRESHOLD_BYTES
