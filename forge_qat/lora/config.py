"""The LoRA section of a run configuration (`--lora-rank` and friends). Imports no torch: the CLI builds its
options from it; the adapters themselves are `forge_qat.lora.adapters`."""

import math
from dataclasses import dataclass
from typing import Literal

from forge_qat.config_fields import at_least, one_of, option
from forge_qat.errors import ConfigError

LoraMode = Literal["merged", "separate"]
LORA_MODES = ("merged", "separate")
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

    def __post_init__(self) -> None:
        at_least(self, 0, "lora_rank")
        one_of(self, "lora_qat", list(LORA_MODES), label="--lora-qat mode")
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


CONFIG_FIELDS = ("lora_rank", "lora_alpha", "lora_targets", "lora_qat")
