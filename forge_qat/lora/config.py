"""The LoRA section of a run configuration (`--lora-rank` and friends). Imports no torch: the CLI builds its
options from it; the adapters themselves are `forge_qat.lora.adapters`."""

import math
from dataclasses import dataclass
from typing import Literal

from forge_qat.config_fields import at_least, one_of, option
from forge_qat.errors import ConfigError

LoraMode = Literal["merged", "separate"]
LORA_MODES = ("merged", "separate")
EXPERTS_OFFLOAD = ("none", "host")
ADAPTER_ATTR = "forge_lora"
"""The attribute holding a layer's adapters: its state-dict names are `<layer>.forge_lora.lora_A` / `.lora_B`."""
TARGET_KINDS = ("attention", "mlp", "experts")
DEFAULT_TARGETS = ",".join(TARGET_KINDS)


@dataclass(kw_only=True)
class LoraConfig:
    """The LoRA section of a run configuration."""

    lora_rank: int = option(0, "Train LoRA adapters of this rank on a frozen model (0: train every weight).",
                            resume_fixed=True)
    lora_alpha: float | None = option(None, "LoRA scaling numerator: adapters add alpha/rank * B@A (default: "
                                            "2 x rank).", resume_fixed=True)
    lora_targets: str = option(DEFAULT_TARGETS, "Comma-separated module kinds that get adapters: attention, mlp, "
                                                "experts.", resume_fixed=True)
    lora_qat: LoraMode = option("merged", "merged: fake-quantize W + s*BA, the weight that ships; separate: "
                                          "fq(W) + s*BA beside it, as peers train.", resume_fixed=True)
    lora_base_grid: bool | None = option(
        None, "Hold the frozen base's quantized linear layers as the recipe's codes and scales (int4: ~0.3x of "
              "bf16), not in float; merged mode then trains q(G + s*BA) against G's scales. Default: on where "
              "exact (--lora-qat separate, no learned scales, no DeepSpeed, a model directory).",
        resume_fixed=True)
    experts_offload: Literal["none", "host"] = option(
        "none", "host: hold the frozen expert stacks in host memory, in their grid, and compute them there (CPU "
                "kernels); the accelerator holds the rest. Needs --lora-qat separate and the grid base.")

    def __post_init__(self) -> None:
        at_least(self, 0, "lora_rank")
        one_of(self, "lora_qat", list(LORA_MODES), label="--lora-qat mode")
        one_of(self, "experts_offload", list(EXPERTS_OFFLOAD), label="--experts-offload place")
        unknown = [t for t in self.targets if t not in TARGET_KINDS]
        if unknown or not self.targets:
            raise ConfigError(f"--lora-targets {self.lora_targets!r}: valid kinds are {', '.join(TARGET_KINDS)}")
        if self.lora_alpha is not None and not (math.isfinite(self.lora_alpha) and self.lora_alpha > 0):
            raise ConfigError(f"lora_alpha must be a finite number > 0, got {self.lora_alpha}")
        if not self.enabled:
            defaults = {"lora_alpha": None, "lora_targets": DEFAULT_TARGETS, "lora_qat": "merged"}
            given = [f"--{f.replace('_', '-')}" for f, default in defaults.items() if getattr(self, f) != default]
            if given:
                raise ConfigError(f"{' and '.join(given)} set{'s' if len(given) == 1 else ''} LoRA adapters, which "
                                  f"--lora-rank 0 (the default) turns off: add --lora-rank R, or drop "
                                  f"{'it' if len(given) == 1 else 'them'} to train every weight")

    def check_with(self, qat, distill, distributed, preset: bool) -> None:
        """Resolve `lora_base_grid` (None: on where it is exact) against the rest of the run; refuse an explicit
        --lora-base-grid the run can not honour, with the reason."""
        offload = self.experts_offload == "host"
        if not self.enabled:
            if offload:
                raise ConfigError("--experts-offload host holds a LoRA run's frozen experts in host memory; full QAT "
                                  "trains the experts (their gradients and optimizer state would be there too): add "
                                  "--lora-rank R")
            if self.lora_base_grid:
                raise ConfigError("--lora-base-grid holds a LoRA run's frozen base in its grid: add --lora-rank R")
            self.lora_base_grid = False
            return
        why = grid_obstacle(qat, distill, distributed, preset)
        if self.lora_base_grid and why:
            raise ConfigError(f"--lora-base-grid: {why}")
        if self.lora_base_grid is None:  # on where it is exact: separate mode computes today's numerics on it
            self.lora_base_grid = why is None and self.lora_qat == "separate"
        if offload:
            if self.lora_qat != "separate":
                raise ConfigError("--experts-offload host computes the frozen experts' grid beside separate adapters; "
                                  "merged mode quantizes each stack plus its adapters on every step: add --lora-qat "
                                  "separate")
            if not self.lora_base_grid:
                raise ConfigError(f"--experts-offload host holds the experts in their grid: "
                                  f"{why or 'drop --no-lora-base-grid'}")

    @property
    def enabled(self) -> bool:
        return self.lora_rank > 0

    @property
    def scaling(self) -> float:
        """s in W + s*B@A."""
        return self.alpha / self.lora_rank

    @property
    def targets(self) -> list[str]:
        return [t.strip() for t in self.lora_targets.split(",") if t.strip()]

    @property
    def alpha(self) -> float:
        return self.lora_alpha if self.lora_alpha is not None else 2.0 * self.lora_rank


def grid_obstacle(qat, distill, distributed, preset: bool) -> str | None:
    """Why this run's frozen base can not be held in its grid exactly; None when it can."""
    if qat.recipe is None:
        return "a float run (--qat-recipe none) has no grid to hold the base in"
    if qat.qat_learn_scales:
        return ("learned weight scales (--qat-learn-scales) would move the base's codes, which the grid fixes; "
                "add --no-qat-learn-scales")
    if qat.fake_quant_after_steps:
        return "--fake-quant-after-steps trains on the float base first, which the grid does not keep"
    if distill.enabled and distill.kd_teacher == "self":
        return "--kd-teacher self runs the float base as the teacher, which the grid does not keep"
    if distributed.uses_deepspeed:
        return ("not under DeepSpeed yet (ZeRO-3 partitions the float base); train on one process, or data "
                "parallel (--nproc N without --zero-stage)")
    if preset:
        return "checkpoints link the base's weight files from the model directory: a preset has none"
    return None


CONFIG_FIELDS = ("lora_rank", "lora_alpha", "lora_targets", "lora_qat", "lora_base_grid", "experts_offload")
