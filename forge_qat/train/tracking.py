"""Experiment trackers (`--report-to`): the scalars of each step's metrics.jsonl record, written by rank 0 only.

Only TensorBoard is built in: torch ships its event writer (`torch.utils.tensorboard`, needing the
`tensorboard` package). A tracker whose package is missing is refused before training starts.
"""

import importlib.util
import math
from pathlib import Path
from typing import Any

from forge_qat.errors import ConfigError, HardwareError, choices_message

TRACKERS = {"tensorboard": "tensorboard"}
"""--report-to name -> the package it needs."""
TENSORBOARD_DIR = "tensorboard"
"""Event files go to OUTPUT_DIR/tensorboard (`tensorboard --logdir OUTPUT_DIR/tensorboard`)."""


def parse(value: str) -> list[str]:
    """`--report-to` as tracker names ('none' or empty: no tracker); unknown names and missing packages are
    errors naming the fix."""
    names = [n.strip() for n in value.split(",") if n.strip() and n.strip() != "none"]
    for name in names:
        if name not in TRACKERS:
            raise ConfigError(choices_message("--report-to tracker", name, ["none", *TRACKERS]))
        if importlib.util.find_spec(TRACKERS[name]) is None:
            raise HardwareError(f"--report-to {name} needs the {TRACKERS[name]} package: pip install "
                                f"{TRACKERS[name]}")
    return names


class Trackers:
    """The chosen trackers of one run (rank 0): `log` each step's record, `close` at the end."""

    def __init__(self, names: list[str], output_dir: Path) -> None:
        self.writers = []
        if "tensorboard" in names:
            from torch.utils.tensorboard import SummaryWriter

            self.writers.append(SummaryWriter(log_dir=str(output_dir / TENSORBOARD_DIR)))

    def log(self, record: dict[str, Any]) -> None:
        step = record["step"]
        for key, value in record.items():
            if key == "step" or isinstance(value, bool) or not isinstance(value, int | float):
                continue
            if not math.isfinite(value):
                continue
            tag = "eval/loss" if key == "eval_loss" else f"train/{key}"
            for writer in self.writers:
                writer.add_scalar(tag, value, step)

    def close(self) -> None:
        for writer in self.writers:
            writer.flush()
            writer.close()
