"""Experiment trackers (`--report-to`): the scalars of each step's metrics.jsonl record, written by rank 0 only.

Each tracker is the package its users already run, called through its own client API; forge adds only the
choice of where a run goes when the user set nothing (their environment variables win):

- `tensorboard`: torch's event writer (`torch.utils.tensorboard`), event files in OUTPUT_DIR/tensorboard.
- `mlflow`: `MlflowClient` on mlflow's tracking URI (`MLFLOW_TRACKING_URI`, else mlflow's default), experiment
  `MLFLOW_EXPERIMENT_NAME` or "forge", a run named after the output directory, the run's settings as params.
- `wandb`: `wandb.init` with project `WANDB_PROJECT` or "forge", the run's settings as its config, files under
  OUTPUT_DIR/wandb (`WANDB_MODE=offline` keeps it on this machine).
- `trackio`: Hugging Face's local tracker (`trackio.init`, project `TRACKIO_PROJECT` or "forge"), stored where
  `TRACKIO_DIR` says.

A tracker whose package is missing is refused before training starts. Scalars are named `train/<key>` and
`eval/loss`, the same for every tracker.
"""

import errno
import importlib.util
import math
import os
import time
from pathlib import Path
from typing import Any

from forge_qat.errors import ConfigError, HardwareError, OutputWriteError, choices_message

TRACKERS = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb", "trackio": "trackio"}
"""--report-to name -> the package it needs (importable name; `mlflow-skinny` also provides `mlflow`)."""
TENSORBOARD_DIR = "tensorboard"
"""Event files go to OUTPUT_DIR/tensorboard (`tensorboard --logdir OUTPUT_DIR/tensorboard`)."""
PROJECT = "forge"
"""The mlflow experiment / wandb and trackio project when the user's environment names none."""


def parse(value: str) -> list[str]:
    """`--report-to` as tracker names ('none' or empty: no tracker); unknown names and missing packages are
    errors naming the fix."""
    names = list(dict.fromkeys(n.strip() for n in value.split(",") if n.strip() and n.strip() != "none"))
    for name in names:
        if name not in TRACKERS:
            raise ConfigError(choices_message("--report-to tracker", name, ["none", *TRACKERS]))
        if importlib.util.find_spec(TRACKERS[name]) is None:
            raise HardwareError(f"--report-to {name} needs the {TRACKERS[name]} package: pip install "
                                f"{TRACKERS[name]}")
    return names


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """The finite numbers of a metrics.jsonl record, under the names every tracker shows."""
    out = {}
    for key, value in record.items():
        if key == "step" or isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            continue
        out["eval/loss" if key == "eval_loss" else f"train/{key}"] = float(value)
    return out


def _writable_dir(path: Path) -> Path:
    """`path`, made if missing; an OSError when it cannot be made or written (the tracker's own writer would
    fail later, in a thread of its own)."""
    path.mkdir(parents=True, exist_ok=True)
    if not os.access(path, os.W_OK | os.X_OK):
        raise PermissionError(errno.EACCES, "not writable", str(path))
    return path


class _TensorBoard:
    def __init__(self, output_dir: Path, config: dict[str, Any]) -> None:
        from torch.utils.tensorboard import SummaryWriter

        # The writer makes its directory in a thread of its own, where a failure is a traceback on stderr and
        # the run goes on without events: made (and checked) here instead.
        log_dir = _writable_dir(output_dir / TENSORBOARD_DIR)
        self.writer = SummaryWriter(log_dir=str(log_dir))

    def log(self, values: dict[str, float], step: int) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()


class _Mlflow:
    """Through `MlflowClient` (explicit run id) rather than the fluent `mlflow.start_run`: no process-global
    active run is left behind, e.g. for a user calling forge from Python."""

    def __init__(self, output_dir: Path, config: dict[str, Any]) -> None:
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient()
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME", PROJECT)
        experiment = self.client.get_experiment_by_name(name)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(name)
        self.run_id = self.client.create_run(experiment_id, run_name=output_dir.name).info.run_id
        params = [Param(k, str(v)[:6000]) for k, v in sorted(config.items())]
        for i in range(0, len(params), 100):  # mlflow's limit per batch
            self.client.log_batch(self.run_id, params=params[i:i + 100])

    def log(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in values.items()])

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


class _Wandb:
    def __init__(self, output_dir: Path, config: dict[str, Any]) -> None:
        import wandb

        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", PROJECT), name=output_dir.name,
                              dir=str(output_dir), config=config)

    def log(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step, commit=True)  # the step is complete: shown now, not at the next one

    def close(self) -> None:
        self.run.finish()


class _Trackio:
    def __init__(self, output_dir: Path, config: dict[str, Any]) -> None:
        import trackio
        from trackio.utils import TRACKIO_DIR

        # trackio writes its store in a thread that only warns when it cannot ("could not be persisted") and
        # the run goes on logging nothing: its directory is made (and checked) here instead.
        _writable_dir(Path(os.environ.get("TRACKIO_DIR") or TRACKIO_DIR))  # trackio reads the variable at import
        # No CPU/GPU sampling thread of its own: forge logs what it measures.
        self.run = trackio.init(project=os.environ.get("TRACKIO_PROJECT", PROJECT), name=output_dir.name,
                                config=config, auto_log_cpu=False, auto_log_gpu=False)

    def log(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def close(self) -> None:
        import trackio

        # The module-level finish, not the run's: it also forgets the run, which trackio's exit hook would
        # otherwise finish a second time (printing "Run finished" again when the process ends).
        trackio.finish()


_CLASSES = {"tensorboard": _TensorBoard, "mlflow": _Mlflow, "wandb": _Wandb, "trackio": _Trackio}


class Trackers:
    """The chosen trackers of one run (rank 0): `log` each step's record, `close` at the end. `config`: the
    run's settings (flat), recorded where the tracker keeps them (mlflow params, wandb/trackio config)."""

    def __init__(self, names: list[str], output_dir: Path, config: dict[str, Any] | None = None) -> None:
        self.writers = []
        for name in names:
            try:
                self.writers.append(_CLASSES[name](output_dir, config or {}))
            except Exception as e:  # the tracker's own message (a server it cannot reach, a store it refuses)
                self.close()
                first = (str(e).strip().splitlines() or [type(e).__name__])[0]
                if isinstance(e, OSError):  # a disk problem, not a configuration one
                    raise OutputWriteError(f"--report-to {name} cannot write its files: {first[:300]}") from None
                raise ConfigError(f"--report-to {name} could not start a run: {first[:300]}") from None

    def log(self, record: dict[str, Any]) -> None:
        values = scalars(record)
        for writer in self.writers:
            writer.log(values, record["step"])

    def close(self) -> None:
        for writer in self.writers:
            writer.close()
