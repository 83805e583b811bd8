"""The run configuration of `forge train`: one dataclass, read from YAML and overridden by flags.

The CLI builds one `--kebab-case` option per field from the `help` metadata here, so a new option is
one field. Combinations are validated in `TrainConfig.__post_init__`; values that depend on the model
(learning rate, precision) are resolved once in `resolve()` and logged by the trainer.
"""

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from forge_qat.errors import ConfigError, InputError, choices_message

Precision = Literal["auto", "bf16", "fp16", "fp32"]
Schedule = Literal["cosine", "linear", "constant"]
ChatLoss = Literal["last", "all"]
Packing = Literal["documents", "causal"]
KdTeacher = Literal["float", "self"]
NO_RECIPE = "none"


def _opt(default: Any, help: str, **kw: Any) -> Any:
    return field(default=default, metadata={"help": help, **kw})


@dataclass(kw_only=True)
class TrainConfig:
    # what to train
    model: str = _opt("tiny-llama", "Local Hugging Face model directory (safetensors), or a built-in preset.")
    data: str = _opt("builtin:python-docs",
                     "Training data: a .jsonl/.json/.parquet/.txt file, a directory of them, a "
                     "Dataset.save_to_disk directory, or builtin:NAME.")
    eval_data: str | None = _opt("builtin:python-docs-eval", "Held-out text for periodic eval loss ('none' to skip).")
    output_dir: str = _opt("forge-runs/demo", "Run directory: checkpoints, metrics.jsonl, run metadata.")
    # how data is read and tokenized (forge_qat.data): once into a cache that ranks and runs share
    chat_column: str | None = _opt(None, "Column holding conversations. Default: 'messages' or 'conversations', "
                                         "whichever a record has; ShareGPT from/value pairs are understood.")
    chat_loss: ChatLoss = _opt("last", "Assistant turns learned in chat data: last (the final message) or all.")
    packing: Packing = _opt(
        "documents", "documents: position ids restart at each packed document, so attention (sdpa, eager, flex, "
                     "flash) and loss stay inside it; causal: plain causal attention across the packed documents "
                     "(faster where attention then needs a mask, see docs/data.md).")
    data_cache: str | None = _opt(None, "Directory of tokenized-data caches. Default: $FORGE_DATA_CACHE, else "
                                        "~/.cache/forge_qat/tokens.")
    data_workers: int | None = _opt(None, "Processes tokenizing the data. Default: one per CPU core (at most 32).")
    # QAT and other linear-layer swaps (at most one; see forge_qat.prepare.LINEAR_SWAPS)
    qat_recipe: str | None = _opt(
        None, "QAT recipe (see `forge recipes`); 'none' trains in float. Default: the registry default.")
    fake_quant_after_steps: int = _opt(0, "Train this many steps in float before enabling fake quantization.")
    qat_learn_scales: bool = _opt(False, "Train the weight quantization scales with the model (initialised from "
                                         "the weights; the converted artifact uses the learned scales).")
    qat_scale_lr: float | None = _opt(None, "Peak learning rate of the learned scales (default: --lr).")
    fp8_recipe: str | None = _opt(None, "torchao float8 training recipe (CUDA sm89+ only).")
    # distillation (forge_qat.distill): loss = lm_weight * CE + kd_weight * KD against a float teacher
    kd_loss: str | None = _opt(None, "Distillation loss: kl, rkl, mse, kd (tempered KL), kl-top-k, rkl-top-k, cakld.")
    kd_weight: float = _opt(0.0, "Weight of the distillation loss (0: no distillation).")
    lm_weight: float = _opt(1.0, "Weight of the cross-entropy loss on the labels.")
    kd_teacher: KdTeacher = _opt("float", "float: the starting model, frozen (one more copy of the weights); "
                                          "self: the student with fake quantization off (one more forward).")
    kd_temperature: float = _opt(1.0, "Temperature of the kd loss.")
    kd_top_k: int = _opt(50, "Tokens kept by the top-k KD losses.")
    # optimisation
    max_steps: int = _opt(300, "Optimizer steps to train for.")
    batch_size: int = _opt(8, "Sequences per micro-batch.")
    grad_accum: int = _opt(1, "Micro-batches accumulated per optimizer step.")
    seq_len: int = _opt(128, "Tokens per training sequence (texts are packed).")
    lr: float | None = _opt(
        None, "Peak learning rate. Default: 1e-3 for a preset trained from scratch, 2e-5 for a pretrained model.")
    lr_schedule: Schedule = _opt("cosine", "Decay after warmup: cosine, linear or constant.")
    warmup_steps: int = _opt(20, "Linear warmup steps.")
    weight_decay: float = _opt(0.0, "AdamW weight decay.")
    max_grad_norm: float = _opt(1.0, "Gradient clipping norm (0 disables).")
    precision: Precision = _opt(
        "auto", "Autocast precision: auto (bf16 where the hardware runs it natively, else fp16 on CUDA, "
                 "else fp32), bf16, fp16 (CUDA only), fp32.")
    gradient_checkpointing: bool = _opt(False, "Recompute activations in backward (non-reentrant) to save memory.")
    seed: int = _opt(0, "Seed for model init, data order and dropout.")
    # distributed (forge_qat.distributed): DeepSpeed ZeRO across processes and machines
    nproc: int = _opt(1, "Processes to launch on this machine (each a rank); >1 needs --zero-stage.")
    zero_stage: int = _opt(0, "DeepSpeed ZeRO stage (0: no DeepSpeed, 1, 2 or 3).")
    deepspeed_config: str | None = _opt(None, "DeepSpeed JSON to use instead of the generated one.")
    dist_timeout_s: int = _opt(300, "Collective timeout: a hung or dead rank fails the job after this.")
    freeze_embeddings: bool = _opt(False, "Keep the input (and tied output) embedding frozen.")
    finalize: str | None = _opt(None, "After training, finalize the last checkpoint with this recipe into "
                                      "OUTPUT_DIR/final-RECIPE (under ZeRO-3: gathered block by block).")
    # evaluation, logging and checkpoints
    eval_every: int = _opt(50, "Steps between eval-loss measurements (0: only at the end).")
    eval_batches: int = _opt(8, "Micro-batches per eval measurement.")
    save_every: int = _opt(100, "Steps between checkpoints (the last step is always saved).")
    save_total_limit: int = _opt(2, "Checkpoints kept in output_dir (oldest removed first).")
    resume: bool = _opt(False, "Continue from the latest checkpoint in output_dir.", cli_only=True)
    overwrite: bool = _opt(False, "Replace an existing output_dir.", cli_only=True)

    def __post_init__(self) -> None:
        for name in ("max_steps", "batch_size", "grad_accum", "seq_len", "eval_batches", "save_total_limit"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("warmup_steps", "eval_every", "save_every", "fake_quant_after_steps"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be 0 or more, got {getattr(self, name)}")
        if self.lr is not None and not (math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"lr must be a positive finite number, got {self.lr}")
        for name in ("weight_decay", "max_grad_norm"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ConfigError(f"{name} must be a finite number >= 0 (0 disables it), got {value}")
        self._validate_distillation()
        if self.data_workers is not None and self.data_workers < 1:
            raise ConfigError(f"data_workers must be at least 1, got {self.data_workers}")
        for name, choices in (("precision", Precision), ("lr_schedule", Schedule), ("chat_loss", ChatLoss),
                              ("packing", Packing)):
            valid = list(typing.get_args(choices))
            if getattr(self, name) not in valid:
                raise ConfigError(choices_message(name.replace("_", " "), getattr(self, name), valid))
        if self.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"zero_stage must be 0, 1, 2 or 3, got {self.zero_stage}")
        if self.nproc < 1 or self.dist_timeout_s < 1:
            raise ConfigError("nproc and dist_timeout_s must be at least 1")
        if self.nproc > 1 and not (self.zero_stage or self.deepspeed_config):
            raise ConfigError(f"--nproc {self.nproc} needs DeepSpeed: add --zero-stage 3 (or --deepspeed-config)")
        if self.resume and self.overwrite:
            raise ConfigError("--resume and --overwrite contradict each other: choose one")
        self._validate_linear_swaps()

    def _validate_distillation(self) -> None:
        for name in ("kd_weight", "lm_weight", "kd_temperature"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ConfigError(f"{name} must be a finite number >= 0, got {value}")
        if self.kd_temperature == 0 or self.kd_top_k < 1:
            raise ConfigError("kd_temperature must be > 0 and kd_top_k at least 1")
        if self.kd_teacher not in typing.get_args(KdTeacher):
            raise ConfigError(choices_message("KD teacher", self.kd_teacher, list(typing.get_args(KdTeacher))))
        if self.kd_weight == 0:
            if self.kd_loss is not None:
                raise ConfigError(f"--kd-loss {self.kd_loss} has no effect with --kd-weight 0; give --kd-weight")
            if self.lm_weight == 0:
                raise ConfigError("--lm-weight 0 without distillation leaves nothing to train on")
            return
        from forge_qat.distill import KD_LOSSES

        if self.kd_loss not in KD_LOSSES:
            raise ConfigError(choices_message("KD loss name", self.kd_loss, list(KD_LOSSES)))
        if self.active_qat_recipe is None:
            raise ConfigError("distillation (--kd-weight) needs a QAT recipe: the teacher is the float model")

    def _validate_linear_swaps(self) -> None:
        from forge_qat.prepare import LINEAR_SWAPS

        chosen = [s for s in LINEAR_SWAPS if getattr(self, s.option) not in (None, NO_RECIPE)]
        if len(chosen) > 1:
            given = " and ".join(f"{s.flag} {getattr(self, s.option)}" for s in chosen)
            raise ConfigError(f"{given} both replace the linear layers; choose one")
        for swap in chosen:
            value = getattr(self, swap.option)
            if value not in swap.choices():
                raise ConfigError(choices_message(swap.option.replace("_", " "), value, swap.choices()))
        if self.fake_quant_after_steps and self.active_qat_recipe is None:
            raise ConfigError("--fake-quant-after-steps needs a QAT recipe")
        if self.qat_scale_lr is not None and not self.qat_learn_scales:
            raise ConfigError("--qat-scale-lr sets the learning rate of learned scales: add --qat-learn-scales")
        if self.qat_learn_scales:
            from forge_qat.recipes import RECIPES

            able = [name for name, r in RECIPES.items() if r.learnable_scales]
            if self.active_qat_recipe not in able:
                raise ConfigError(f"--qat-learn-scales needs a QAT recipe whose weight scales can be learned "
                                  f"({', '.join(able)}); this run's is {self.active_qat_recipe or NO_RECIPE}")
            if self.qat_scale_lr is not None and not (math.isfinite(self.qat_scale_lr) and self.qat_scale_lr > 0):
                raise ConfigError(f"qat_scale_lr must be a positive finite number, got {self.qat_scale_lr}")
            if self.fake_quant_after_steps:
                raise ConfigError("--qat-learn-scales chooses the scales from the weights when training starts; "
                                  "with --fake-quant-after-steps the float steps would move the weights away from "
                                  "them first. Use one or the other")
        if self.finalize is not None:
            from forge_qat.recipes import get_recipe

            get_recipe(self.finalize)

    @property
    def active_qat_recipe(self) -> str | None:
        """The QAT recipe this run applies: the registry default unless 'none' or float8 was chosen."""
        from forge_qat.recipes import DEFAULT_RECIPE

        if self.qat_recipe == NO_RECIPE or (self.qat_recipe is None and self.fp8_recipe):
            return None
        return self.qat_recipe or DEFAULT_RECIPE

    @property
    def uses_deepspeed(self) -> bool:
        return bool(self.zero_stage or self.deepspeed_config)

    @property
    def has_eval(self) -> bool:
        return self.eval_data not in (None, NO_RECIPE)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def fields_for_cli() -> list[dataclasses.Field]:
    return list(dataclasses.fields(TrainConfig))


def field_type(f: dataclasses.Field) -> type:
    """The scalar type a field holds (Optional and Literal unwrapped), for YAML checks and the CLI."""
    hint = typing.get_type_hints(TrainConfig)[f.name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        hint = args[0]
    if typing.get_origin(hint) is Literal:
        return str
    return hint


def _check_value(key: str, value: Any, f: dataclasses.Field, source: str) -> Any:
    expected = field_type(f)
    if value is None and f.default is None:
        return None
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if expected is float and isinstance(value, str):
        # YAML 1.1 (PyYAML) reads exponents without a dot, like 1e-3, as strings.
        try:
            return float(value)
        except ValueError:
            pass
    if (expected is int and isinstance(value, bool)) or not isinstance(value, expected):
        raise ConfigError(f"{source}: key {key!r} must be {expected.__name__}, got {value!r}")
    return value


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a run config; unknown keys and wrongly typed values are errors naming the key."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"config file {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must hold a mapping of option names to values")
    known = {f.name: f for f in dataclasses.fields(TrainConfig) if not f.metadata.get("cli_only")}
    values = {}
    for key, value in raw.items():
        name = str(key).replace("-", "_")
        if name not in known:
            raise ConfigError(f"{path}: {choices_message('key', key, sorted(known))}")
        values[name] = _check_value(key, value, known[name], str(path))
    return values


def build_config(yaml_path: str | Path | None = None, **overrides: Any) -> TrainConfig:
    """Defaults < YAML file < explicit overrides (None means 'not given').

    `--resume` without a YAML file continues the run with the configuration it recorded in its
    output directory, so `forge train --resume --output-dir RUN` needs nothing else."""
    values = load_yaml(yaml_path) if yaml_path else {}
    if overrides.get("resume") and not yaml_path:
        values = recorded_config(Path(overrides.get("output_dir") or TrainConfig.output_dir))
    values.update({k: v for k, v in overrides.items() if v is not None})
    return TrainConfig(**values)


def recorded_config(output_dir: Path) -> dict[str, Any]:
    """The config a run directory was started with (minus the one-off flags)."""
    import json

    from forge_qat.checkpoint import RUN_MARKER

    marker = output_dir / RUN_MARKER
    if not marker.is_file():
        raise InputError(f"--resume: {output_dir} is not a forge run directory (no {RUN_MARKER})")
    try:
        recorded = json.loads(marker.read_text()).get("config", {})
    except (ValueError, AttributeError):
        raise InputError(f"--resume: {marker} is corrupt; pass the run's options (or a YAML config) explicitly "
                         f"along with --resume") from None
    known = {f.name for f in dataclasses.fields(TrainConfig) if not f.metadata.get("cli_only")}
    return {k: v for k, v in recorded.items() if k in known}
