"""The embedded demo: float vs PTQ vs QAT on a tiny Llama trained on CPython's own documentation.

Called by `forge demo`. Two runs share seed, data order and their first steps bit for bit: a float
run, and a QAT run that switches fake quantization on for its last `qat_steps`. The float run is
quantized after training (PTQ), the QAT run is converted, and all three are evaluated on held-out
text. No network, a few minutes on 2 CPU cores.
"""

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from forge_qat.config import TrainConfig
from forge_qat.errors import ConfigError, OutputExistsError
from forge_qat.eval.compare import Comparison, compare
from forge_qat.eval.plot import plot_loss_curves
from forge_qat.finalize.convert import finalize
from forge_qat.finalize.job import FinalizeRequest
from forge_qat.finalize.report import FinalizeReport
from forge_qat.qat.registry import DEMO_RECIPE, Recipe, get_recipe
from forge_qat.train.trainer import TrainObserver, run_training

DEMO_MARKER = "forge_demo.json"
EVAL_DATA = "builtin:python-docs-eval"


@dataclass(frozen=True, slots=True)
class DemoResult:
    root: Path
    comparison: Comparison
    ptq_report: FinalizeReport
    qat_report: FinalizeReport
    plot: Path


def _claim(root: Path) -> None:
    """Use `root` only if it is empty or an earlier demo (replaced); never delete anything else."""
    if root.exists() and not root.is_dir():
        raise OutputExistsError(f"{root} exists and is a file; choose another --output-dir")
    if root.is_dir() and any(root.iterdir()) and not (root / DEMO_MARKER).is_file():
        raise OutputExistsError(f"{root} is not empty and is not a forge demo directory; forge replaces only its "
                                f"own demos: choose another --output-dir")
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)


def run_demo(root: Path, *, recipe: Recipe | None = None, steps: int = 300, qat_steps: int = 100, seed: int = 0,
             observer: Callable[[str], TrainObserver | None] = lambda stage: None,
             on_stage: Callable[[str], None] = lambda stage: None) -> DemoResult:
    """`recipe`: the QAT recipe (default: the registry's `DEMO_RECIPE`)."""
    recipe = recipe or get_recipe(DEMO_RECIPE)
    recipe.check_convert_hardware()  # the demo finalizes: fail before training, not after
    if not 0 < qat_steps <= steps:
        raise ConfigError(f"--qat-steps must be between 1 and --steps ({steps}), got {qat_steps}")
    _claim(root)
    common = dict(max_steps=steps, eval_data=EVAL_DATA, eval_every=max(steps // 6, 1), save_every=0, seed=seed)
    (root / DEMO_MARKER).write_text(json.dumps({"recipe": recipe.name, "steps": steps, "qat_steps": qat_steps,
                                                "seed": seed}))

    on_stage(f"1/4 float training, {steps} steps")
    run_training(TrainConfig.from_flat(output_dir=str(root / "float"), qat_recipe="none", **common), observer("float"))
    on_stage(f"2/4 QAT training: float for {steps - qat_steps} steps, then {recipe.name} for {qat_steps}")
    run_training(TrainConfig.from_flat(output_dir=str(root / "qat"), qat_recipe=recipe.name,
                             fake_quant_after_steps=steps - qat_steps, **common), observer("qat"))
    on_stage("3/4 finalize: PTQ of the float run, convert of the QAT run")
    ptq = finalize(FinalizeRequest(source=root / "float", dest=root / f"float-ptq-{recipe.name}", ptq=recipe))
    qat = finalize(FinalizeRequest(source=root / "qat", dest=root / f"qat-{recipe.name}"))
    on_stage("4/4 evaluate on held-out text")
    comparison = compare(str(root / "float"), str(ptq.dest), str(qat.dest), EVAL_DATA)
    plot = plot_loss_curves({"float": root / "float", "QAT": root / "qat"}, root / "loss_curves.png",
                            finals=comparison.finals(), summary=comparison.summary())
    (root / "comparison.json").write_text(json.dumps(comparison.to_dict(), indent=2))
    return DemoResult(root, comparison, ptq, qat, plot)
