"""Loss curves of training runs as a PNG, with the finished models' eval losses beside them.

Called by `forge compare --plot` and the demo.
"""

import json
from pathlib import Path

from forge_qat.errors import ConfigError, InputError
from forge_qat.formats.atomic import atomic_file, check_output
from forge_qat.formats.run_dir import METRICS

PLOT_SOFTWARE = "forge_qat loss curves"
"""Written into every PNG forge plots: a later plot replaces only files that carry it."""


def check_plot(out: Path, runs: list[Path]) -> None:
    """Before any work: `--plot` writes a PNG, of runs that have metrics, to a path that holds no file forge did
    not plot."""
    if out.suffix.lower() != ".png":
        raise ConfigError(f"--plot {out}: the plot is a PNG; name the file *.png")
    if not runs:
        raise ConfigError("--plot needs the run directories to plot: add --runs DIR (repeatable)")
    for run_dir in runs:
        read_metrics(run_dir)
    check_output(out, overwrite=True, ours=_is_forge_plot, kind="a plot",
                 foreign=f"--plot {out} exists and is not a plot forge wrote: choose another path")


def _is_forge_plot(path: Path) -> bool:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return image.info.get("Software") == PLOT_SOFTWARE
    except (OSError, UnidentifiedImageError, ValueError):
        return False


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / METRICS
    if not path.is_file():
        raise InputError(f"{run_dir} has no {METRICS}; give forge run directories to plot")
    records = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a line a killed process left half-written (resume drops it too)
        if isinstance(record, dict) and isinstance(record.get("step"), int) and isinstance(record.get("loss"), float):
            records.append(record)
    return records


def plot_loss_curves(runs: dict[str, Path], out: Path, finals: dict[str, float] | None = None,
                     summary: str = "") -> Path:
    """PNG of train loss (light) and eval loss (points) against step, one colour per run. With `finals` (label ->
    eval loss, e.g. float, PTQ and QAT-converted from a comparison), a panel beside the curves shows them side by
    side on their own scale, `summary` under it: the PTQ gap and what QAT won back at a glance. The curves'
    y-range follows the eval losses and the later train loss, not the first steps, which would flatten the
    rest."""
    if not runs:
        raise ConfigError("no runs to plot")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    if finals:
        fig, (ax, side) = plt.subplots(1, 2, figsize=(11, 5), dpi=120, gridspec_kw={"width_ratios": [3, 1]})
    else:
        fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    shown: list[float] = []  # values the curves' y-range must include
    switched = False
    for i, (label, run_dir) in enumerate(runs.items()):
        records = read_metrics(run_dir)
        color = f"C{i}"
        losses = [r["loss"] for r in records]
        ax.plot([r["step"] for r in records], losses, color=color, alpha=0.3, lw=1, label=f"{label} train")
        shown += losses[len(losses) // 4:]  # the train loss once past its first quarter
        evals = [r for r in records if "eval_loss" in r]
        if evals:
            ax.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", color=color, ms=4,
                    label=f"{label} eval")
            shown += [r["eval_loss"] for r in evals[len(evals) // 3:]]
        switch = next((r["step"] for r in records if r.get("fake_quant")), None)
        if switch and switch > 1:
            ax.axvline(switch, color=color, ls=":", lw=1)
            switched = True
    if shown:
        lo, hi = min(shown), max(shown)
        pad = max(hi - lo, 1e-3) * 0.1
        ax.set_ylim(lo - pad, hi + pad)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("training" + (" (dotted: fake quantization starts)" if switched else ""), fontsize=10)
    ax.legend(fontsize=8, loc="upper right")
    ax.grid(alpha=0.3)
    if finals:
        labels, values = list(finals), list(finals.values())
        side.plot(range(len(values)), values, "o", ms=8, color="C3")
        for x, v in enumerate(values):
            side.annotate(f"{v:.4f}", (x, v), xytext=(0, 7), textcoords="offset points", ha="center", fontsize=8)
        lo, hi = min(values), max(values)
        pad = max(hi - lo, 1e-3) * 0.3
        side.set_ylim(lo - pad, hi + pad)
        side.set_xlim(-0.6, len(values) - 0.4)
        side.set_xticks(range(len(values)), labels, fontsize=8)
        side.set_title("eval loss of the finished models", fontsize=10)
        side.grid(alpha=0.3, axis="y")
        if summary:
            side.set_xlabel(summary, fontsize=8)
    fig.tight_layout()
    with atomic_file(out) as tmp:
        fig.savefig(tmp, format="png", metadata={"Software": PLOT_SOFTWARE})
    plt.close(fig)
    return out
