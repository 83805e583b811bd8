"""The QAT section of a run configuration: which recipe replaces the linear layers, when fake quantization
starts, and whether the weight scales are learned. Imports no torch (the CLI builds its options from it)."""

from collections.abc import Callable
from dataclasses import dataclass, field

from forge_qat.config_fields import at_least, one_of, option, positive_finite
from forge_qat.errors import ConfigError
from forge_qat.qat.registry import DEFAULT_RECIPE, Recipe, get_recipe, recipe_names

FP8_RECIPES = ("tensorwise", "rowwise", "rowwise_with_gw_hp")
"""torchao's float8 training recipes (`Float8LinearConfig.from_recipe_name`)."""


@dataclass(frozen=True, slots=True)
class LinearSwap:
    """A training option that replaces linear layers; at most one may be active per run."""

    option: str
    """`QatConfig` field holding the chosen recipe name."""
    choices: Callable[[], list[str]]

    @property
    def flag(self) -> str:
        return "--" + self.option.replace("_", "-")


LINEAR_SWAPS: tuple[LinearSwap, ...] = (
    LinearSwap("qat_recipe", recipe_names),
    LinearSwap("fp8_recipe", lambda: list(FP8_RECIPES)),
)


SCALE_INITS = ("mse", "absmax", "extreme")
"""`--qat-scale-init` choices (`forge_qat.qat.fake_quant.ScaleInit`, which imports torch)."""

NO_RECIPE = "none"
"""`--qat-recipe none`: train in float."""


@dataclass(kw_only=True)
class QatConfig:
    """The QAT section of a run configuration (and float8 training, the other linear-layer swap)."""

    qat_recipe: str | None = option(
        None, "QAT recipe (see `forge recipes`); 'none' trains in float. Default: the registry default "
              f"({DEFAULT_RECIPE}).")
    fake_quant_after_steps: int = option(0, "Train this many steps in float before enabling fake quantization.",
                                         resume_fixed=True)
    qat_learn_scales: bool | None = option(
        None, "Train the weight quantization scales with the model (initialised from the weights when fake "
              "quantization starts; the converted artifact uses the learned scales). Default: on for the int4 "
              "recipes (`forge recipes`).", resume_fixed=True)
    qat_scale_lr: float | None = option(None, "Peak learning rate of the learned scales (default: 1.75% of their "
                                              "median starting value).", resume_fixed=True)
    qat_scale_init: str = option("mse", "Where learned scales start: 'mse' searches each group's scale for the "
                                        "least squared error of its quantized weights (0.8-1x of absmax); "
                                        "'absmax' starts where plain QAT does; 'extreme' holds each group's "
                                        "largest weight exactly (llama.cpp's Q4_0 rule).", resume_fixed=True)
    fp8_recipe: str | None = option(None, "torchao float8 training recipe (CUDA sm89+ only).")
    recipe: Recipe | None = field(init=False, default=None, repr=False, compare=False)
    """The registry record of `recipe_name`, resolved once when the section is built: every consumer takes it
    from here (not an option: no flag, no YAML key)."""

    def __post_init__(self) -> None:
        at_least(self, 0, "fake_quant_after_steps")
        chosen = [s for s in LINEAR_SWAPS if getattr(self, s.option) not in (None, NO_RECIPE)]
        if len(chosen) > 1:
            given = " and ".join(f"{s.flag} {getattr(self, s.option)}" for s in chosen)
            raise ConfigError(f"{given} both replace the linear layers; choose one")
        for swap in chosen:
            one_of(self, swap.option, swap.choices())
        self.recipe = get_recipe(self.recipe_name) if self.recipe_name else None
        if self.fake_quant_after_steps and self.recipe is None:
            raise ConfigError("--fake-quant-after-steps needs a QAT recipe")
        if self.qat_learn_scales is None:  # the default: learned where the recipe says they help
            self.qat_learn_scales = self.recipe is not None and self.recipe.learn_scales_by_default
            if self.qat_scale_lr is not None and not self.qat_learn_scales:
                has = self.recipe is not None and self.recipe.learnable_scales
                raise ConfigError(f"--qat-scale-lr sets the learning rate of learned scales, and this run's recipe "
                                  f"({self.recipe_name or NO_RECIPE}) "
                                  + ("learns none by default: add --qat-learn-scales" if has else "has none"))
        if self.qat_scale_lr is not None and not self.qat_learn_scales:
            raise ConfigError("--qat-scale-lr sets the learning rate of learned scales: remove "
                              "--no-qat-learn-scales")
        one_of(self, "qat_scale_init", SCALE_INITS, "--qat-scale-init")
        if self.qat_learn_scales:
            self._check_learned_scales()

    def _check_learned_scales(self) -> None:
        able = [name for name in recipe_names() if get_recipe(name).learnable_scales]
        if self.recipe is None or not self.recipe.learnable_scales:
            raise ConfigError(f"--qat-learn-scales needs a QAT recipe whose weight scales can be learned "
                              f"({', '.join(able)}); this run's is {self.recipe_name or NO_RECIPE}")
        positive_finite("qat_scale_lr", self.qat_scale_lr)

    @property
    def recipe_name(self) -> str | None:
        """The QAT recipe this run applies: the registry default unless 'none' or float8 was chosen."""
        if self.qat_recipe == NO_RECIPE or (self.qat_recipe is None and self.fp8_recipe):
            return None
        return self.qat_recipe or DEFAULT_RECIPE

    def fake_quant_at(self, step: int) -> bool:
        """Whether fake quantization is on at (0-based) `step`."""
        return self.recipe_name is not None and step >= self.fake_quant_after_steps
