"""Start N ranks of an entry module on this machine through torch's elastic launcher, and report failures.

Called by `forge_qat.train.entry` for `forge train --nproc N`; knows nothing of what the ranks run.
`torch.distributed.launcher.api.elastic_launch` (what torchrun runs) starts each rank as
`python -m forge_qat.distributed.worker ENTRY ARGS...`, with the standard environment (RANK,
LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT) that torchrun and the deepspeed launcher also give
multi-node jobs, and stops every rank as soon as one fails. The rendezvous is c10d on port 0: the
launcher's store binds a free port itself and the ranks join that store, so no port is picked and then
raced for. What forge adds: rank 0 talks to the terminal and the others log to files; the failure is
reported as the rank that caused it (see `_cause`) with that rank's one-line error; a rank killed by a
signal says so.
"""

import logging
import os
import signal
import sys
import tempfile
import uuid
from pathlib import Path

import torch

from forge_qat.errors import ConfigError, ForgeError

ERROR_DIR_ENV = "FORGE_ERROR_DIR"
LAUNCHER_PID_ENV = "FORGE_LAUNCHER_PID"


class RankFailedError(ForgeError):
    """A rank of a multi-process job failed; carries that rank's exit code and message."""

    def __init__(self, rank: int, exit_code: int, message: str):
        super().__init__(f"rank {rank} failed (exit code {exit_code}): {message}")
        self.rank, self.exit_code = rank, exit_code


def launched_by_a_launcher() -> bool:
    """True inside a rank started by forge, torchrun or deepspeed (don't launch again)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def check_nproc(nproc: int) -> None:
    if torch.cuda.is_available():
        have, what = torch.cuda.device_count(), "CUDA devices"
    else:
        have, what = os.cpu_count() or 1, "CPU cores"
    if nproc > have:
        raise ConfigError(f"--nproc {nproc} exceeds the {have} {what} of this machine; use at most {have}, "
                          f"or a multi-node launcher (torchrun, deepspeed) for more")


def _rank_error(rank: int, error_dir: Path, log_file: Path | None) -> str:
    error_file = error_dir / f"error-{rank}.txt"
    if error_file.is_file() and error_file.read_text().strip():
        return error_file.read_text().strip()
    if log_file and log_file.is_file():
        return _log_tail(log_file) or "no output"
    return "no error message (see its output above)"


def _log_tail(log_file: Path, lines: int = 15) -> str:
    said = [line for line in log_file.read_text(errors="replace").splitlines() if line.strip()]
    return "\n".join(said[-lines:])


def launch(nproc: int, entry: str, args: list[str], worker: list[str] | None = None) -> None:
    """Run `nproc` ranks of `entry` (a module with `rank_main(args) -> int`) to completion, or raise
    `RankFailedError` for the rank whose failure ended it. `worker`: the command that starts a rank (tests wrap
    forge's own)."""
    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs, Std
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    check_nproc(nproc)
    worker = worker or [sys.executable, "-m", "forge_qat.distributed.worker"]
    with tempfile.TemporaryDirectory(prefix="forge-launch-") as tmp:
        tmp = Path(tmp)
        (tmp / "errors").mkdir()
        os.environ[ERROR_DIR_ENV] = str(tmp / "errors")
        os.environ[LAUNCHER_PID_ENV] = str(os.getpid())
        if not torch.cuda.is_available():  # ranks share the cores (torchrun sets 1; this keeps them busy)
            os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
        # c10d's C++ warnings (e.g. "No backend of type 0 found for Process Group" at teardown) are for torch
        # developers; a user's own TORCH_CPP_LOG_LEVEL wins
        os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
        run_id = uuid.uuid4().hex[:12]
        # Rank 0 keeps the terminal (progress bar); the others write files, shown when they fail.
        quiet = {r: Std.ALL for r in range(1, nproc)}
        config = LaunchConfig(
            min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=run_id, rdzv_backend="c10d",
            rdzv_endpoint="localhost:0", max_restarts=0, monitor_interval=0.2, start_method="spawn",
            logs_specs=DefaultLogsSpecs(log_dir=str(tmp / "logs"), redirects=quiet))
        logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)  # forge reports the failure
        try:
            elastic_launch(config, entrypoint=worker[0])(*worker[1:], entry, *args)
        except ChildFailedError as e:
            codes = {rank: failure.exitcode for rank, failure in e.failures.items()}
            failed = _cause(codes)
            code = codes[failed]
            logs = sorted((tmp / "logs").glob(f"{run_id}*/attempt_0/{failed}/stderr.log"))
            if code < 0:  # killed by a signal: say so, with what it printed last (a rank > 0 logs to a file
                # that goes with this directory), and exit as a shell reports it (128 + signal number)
                said = _log_tail(logs[0]) if logs else ""
                raise RankFailedError(failed, 128 - code, f"killed by signal {signal.Signals(-code).name}"
                                      + (f"; its last output:\n{said}" if said else "")) from None
            raise RankFailedError(failed, code, _rank_error(failed, tmp / "errors", logs[0] if logs else None)) \
                from None
        finally:
            os.environ.pop(ERROR_DIR_ENV, None)
            os.environ.pop(LAUNCHER_PID_ENV, None)


def _cause(codes: dict[int, int]) -> int:
    """The failed rank to report: one killed by a signal, else one with its own error, else one whose
    collective broke under it, else one the launcher itself stopped (torch's launcher lists the ranks it
    sent SIGTERM to after the first failure among the failures)."""
    from forge_qat.distributed.worker import PEER_FAILURE_EXIT

    def consequence(rank: int) -> int:
        code = codes[rank]
        if code == -signal.SIGTERM:
            return 3
        return 0 if code < 0 else 2 if code == PEER_FAILURE_EXIT else 1

    return min(codes, key=lambda r: (consequence(r), r))

