"""How `forge train` starts: in this process, or, for a DeepSpeed or multi-rank run not already inside a launcher,
as N ranks through the distributed launcher, each entering `rank_main` here.

Called by the CLI (`train_or_launch`) and, in each launched rank, by `forge_qat.distributed.worker`.
"""

import json
import os
import tempfile
from pathlib import Path

from forge_qat.config import TrainConfig
from forge_qat.train.trainer import TrainObserver, TrainResult, run_training


def launch_training(cfg: TrainConfig, worker: list[str] | None = None) -> None:
    """Run `cfg` as `cfg.distributed.nproc` ranks on this machine (raises `RankFailedError` when one fails).
    `worker`: the command that starts a rank (tests wrap forge's own)."""
    from forge_qat.distributed.launch import launch

    with tempfile.TemporaryDirectory(prefix="forge-config-") as tmp:
        cfg_file = Path(tmp) / "config.json"
        cfg_file.write_text(json.dumps(cfg.to_dict()))
        launch(cfg.distributed.nproc, __name__, [str(cfg_file)], worker)


def train_or_launch(cfg: TrainConfig, observer: TrainObserver | None = None) -> TrainResult | None:
    """Train here, or launch the ranks a DeepSpeed or data-parallel run needs (None: the ranks ran, rank 0
    reported)."""
    if cfg.distributed.launches:
        from forge_qat.distributed.launch import launched_by_a_launcher

        if not launched_by_a_launcher():
            launch_training(cfg)
            return None
    return run_training(cfg, observer)


def rank_main(args: list[str], console) -> int:
    """One launched rank: the configuration from the file the launcher passed; progress on rank 0."""
    from forge_qat.train.progress import RichTrainObserver

    cfg = TrainConfig.from_flat(**json.loads(Path(args[0]).read_text()))
    rank = int(os.environ.get("RANK", 0))
    result = run_training(cfg, RichTrainObserver(console) if rank == 0 else None)
    if rank == 0:
        console.print(f"trained {result.steps} steps: loss {result.final_loss:.4f}; checkpoint {result.checkpoint}")
    return 0
