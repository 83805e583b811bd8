"""The distillation section of a run configuration (`--kd-weight` and friends). Imports no torch: the CLI
builds its options from it; the objective itself is `forge_qat.distill.objective`."""

from dataclasses import dataclass
from typing import Literal

from forge_qat.config_fields import finite_at_least_zero, one_of, option
from forge_qat.errors import ConfigError, choices_message
from forge_qat.qat.config import QatConfig

KD_LOSS_NAMES = ("kl", "rkl", "mse", "kd", "kl-top-k", "rkl-top-k", "cakld")
"""`--kd-loss` choices: the keys of `forge_qat.distill.objective.KD_LOSSES` (tests/test_distill.py checks they
agree)."""

KdTeacher = Literal["float", "self"]


@dataclass(kw_only=True)
class DistillConfig:
    """The distillation section of a run configuration: loss = lm_weight * CE + kd_weight * KD."""

    kd_loss: str | None = option(None, "Distillation loss: kl, rkl, mse, kd (tempered KL), kl-top-k, rkl-top-k, "
                                       "cakld.", resume_fixed=True)
    kd_weight: float = option(0.0, "Weight of the distillation loss (0: no distillation).", resume_fixed=True)
    lm_weight: float = option(1.0, "Weight of the cross-entropy loss on the labels.", resume_fixed=True)
    kd_teacher: KdTeacher = option("float", "float: the starting model, frozen (one more copy of the weights); "
                                            "self: the student with fake quantization off (one more forward).",
                                   resume_fixed=True)
    kd_temperature: float = option(1.0, "Temperature of the kd loss.", resume_fixed=True)
    kd_top_k: int = option(50, "Tokens kept by the top-k KD losses.", resume_fixed=True)

    def __post_init__(self) -> None:
        finite_at_least_zero(self, "kd_weight", "lm_weight", "kd_temperature")
        if self.kd_temperature == 0 or self.kd_top_k < 1:
            raise ConfigError("kd_temperature must be > 0 and kd_top_k at least 1")
        one_of(self, "kd_teacher", KdTeacher, "KD teacher")
        if not self.enabled:
            if self.kd_loss is not None:
                raise ConfigError(f"--kd-loss {self.kd_loss} has no effect with --kd-weight 0; give --kd-weight")
            if self.lm_weight == 0:
                raise ConfigError("--lm-weight 0 without distillation leaves nothing to train on")
            return
        if self.kd_loss not in KD_LOSS_NAMES:
            raise ConfigError(choices_message("KD loss name", self.kd_loss, list(KD_LOSS_NAMES)))

    @property
    def enabled(self) -> bool:
        return bool(self.kd_weight)

    @property
    def needs_float_teacher(self) -> bool:
        """A frozen copy of the starting model is built beside the student."""
        return self.enabled and self.kd_teacher == "float"

    def check_with(self, qat: QatConfig) -> None:
        """Distillation teaches a quantized student: without QAT there is nothing to distil into."""
        if self.enabled and qat.recipe_name is None:
            raise ConfigError("distillation (--kd-weight) needs a QAT recipe: the teacher is the float model")
