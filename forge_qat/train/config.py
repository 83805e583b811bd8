"""The trainer's own sections of a run configuration: the run (model, output, evaluation and checkpoint
cadence) and the optimisation (steps, batches, learning rate, precision).

Composed into `forge_qat.config.TrainConfig`; read by `forge_qat.train.trainer` and `forge_qat.train.optim`.
"""

import logging
from dataclasses import dataclass, field
from typing import Literal

from forge_qat.config_fields import at_least, finite_at_least_zero, one_of, option, positive_finite
from forge_qat.errors import ConfigError
from forge_qat.qat.registry import Recipe, get_recipe

log = logging.getLogger(__name__)

Precision = Literal["auto", "bf16", "fp16", "fp32"]
Schedule = Literal["cosine", "linear", "constant"]
DEFAULT_WARMUP = 20


@dataclass(kw_only=True)
class RunConfig:
    model: str = option("tiny-llama", "Local Hugging Face model directory (safetensors), or a built-in preset.",
                        resume_fixed=True)
    output_dir: str = option("forge-runs/train", "Run directory: checkpoints, metrics.jsonl, run metadata.")
    seed: int = option(0, "Seed for model init, data order and dropout.", resume_fixed=True)
    finalize: str | None = option(None, "After training, finalize the last checkpoint with this recipe into "
                                        "OUTPUT_DIR/final-RECIPE (under ZeRO-3: gathered block by block).")
    eval_every: int = option(50, "Steps between eval-loss measurements (0: only at the end).")
    eval_batches: int = option(8, "Micro-batches per eval measurement.")
    save_every: int = option(100, "Steps between checkpoints (the last step is always saved).")
    save_total_limit: int = option(2, "Checkpoints kept in output_dir (oldest removed first).")
    report_to: str = option("none", "Experiment trackers that get each step's metrics (rank 0), comma-separated: "
                                    "none, tensorboard (OUTPUT_DIR/tensorboard), mlflow, wandb, trackio (each "
                                    "needs its package; where runs go: README).")
    resume: bool = option(False, "Continue from the latest checkpoint in output_dir.", cli_only=True)
    overwrite: bool = option(False, "Replace an existing output_dir.", cli_only=True)
    finalize_recipe: Recipe | None = field(init=False, default=None, repr=False, compare=False)
    """The registry record of `finalize`, resolved once when the section is built."""

    def __post_init__(self) -> None:
        at_least(self, 1, "eval_batches", "save_total_limit")
        at_least(self, 0, "eval_every", "save_every")
        from forge_qat.train import tracking

        tracking.parse(self.report_to)
        if self.resume and self.overwrite:
            raise ConfigError("--resume and --overwrite contradict each other: choose one")
        if self.finalize is not None:
            self.finalize_recipe = get_recipe(self.finalize)

    def eval_due(self, done: int, max_steps: int) -> bool:
        return done == max_steps or bool(self.eval_every and done % self.eval_every == 0)

    def save_due(self, done: int, max_steps: int) -> bool:
        return done == max_steps or bool(self.save_every and done % self.save_every == 0)


@dataclass(kw_only=True)
class OptimConfig:
    max_steps: int = option(300, "Optimizer steps to train for.")
    batch_size: int = option(8, "Sequences per micro-batch.", resume_fixed=True)
    grad_accum: int = option(1, "Micro-batches accumulated per optimizer step.", resume_fixed=True)
    lr: float | None = option(None, "Peak learning rate. Default: 1e-3 for a preset trained from scratch, 2e-5 for "
                                    "a pretrained model.", resume_fixed=True)
    lr_schedule: Schedule = option("cosine", "Decay after warmup: cosine, linear or constant.", resume_fixed=True)
    warmup_steps: int | None = option(None, "Linear warmup steps. Default: a tenth of --max-steps, at most 20.",
                                      resume_fixed=True)
    weight_decay: float = option(0.0, "AdamW weight decay.", resume_fixed=True)
    max_grad_norm: float = option(1.0, "Gradient clipping norm (0 disables).", resume_fixed=True)
    precision: Precision = option("auto", resume_fixed=True, help=(
        "Autocast precision: auto (bf16 where the hardware runs it natively, else fp16 on CUDA, else fp32), "
        "bf16, fp16 (CUDA only), fp32."))
    gradient_checkpointing: bool = option(False, "Recompute activations in backward (non-reentrant) to save "
                                                 "memory.")
    freeze_embeddings: bool = option(False, "Keep the input (and tied output) embedding frozen.")

    def __post_init__(self) -> None:
        at_least(self, 1, "max_steps", "batch_size", "grad_accum")
        if self.warmup_steps is None:  # resolved here, so a run records (and a resume keeps) the number
            self.warmup_steps = min(DEFAULT_WARMUP, self.max_steps // 10)
        at_least(self, 0, "warmup_steps")
        if self.warmup_steps >= self.max_steps:
            log.warning("--warmup-steps %d >= --max-steps %d: the learning rate never reaches its peak (every "
                        "step is warmup)", self.warmup_steps, self.max_steps)
        positive_finite("lr", self.lr)
        finite_at_least_zero(self, "weight_decay", "max_grad_norm", note=" (0 disables it)")
        one_of(self, "precision", Precision)
        one_of(self, "lr_schedule", Schedule)
