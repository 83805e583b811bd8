"""Start N ranks of `forge train` on this machine and supervise them.

Called by `forge train --nproc N`. Each rank is a fresh process running
`forge_qat.distributed.worker` with the standard launcher environment (RANK, LOCAL_RANK, WORLD_SIZE,
MASTER_ADDR, MASTER_PORT), the same contract torchrun and the deepspeed launcher fulfil for
multi-node jobs. If any rank exits non-zero the others are stopped at once and the job fails with
that rank's error, so a crash never leaves the survivors waiting in a collective.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from forge_qat.config import TrainConfig
from forge_qat.errors import ConfigError, ForgeError

ERROR_FILE_ENV = "FORGE_ERROR_FILE"


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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_error(rank: int, error_file: Path, log_file: Path | None) -> str:
    if error_file.is_file() and error_file.read_text().strip():
        return error_file.read_text().strip()
    if log_file and log_file.is_file():
        lines = [line for line in log_file.read_text(errors="replace").splitlines() if line.strip()]
        return "\n".join(lines[-15:]) or "no output"
    return "no error message (see its output above)"


def launch(cfg: TrainConfig, worker: list[str] | None = None, poll_s: float = 0.2) -> None:
    """Run `cfg.nproc` ranks to completion, or raise `RankFailedError` for the first that fails."""
    check_nproc(cfg.nproc)
    worker = worker or [sys.executable, "-m", "forge_qat.distributed.worker"]
    with tempfile.TemporaryDirectory(prefix="forge-launch-") as tmp:
        tmp = Path(tmp)
        cfg_file = tmp / "config.json"
        cfg_file.write_text(json.dumps(cfg.to_dict()))
        port = _free_port()
        threads = max(1, (os.cpu_count() or 1) // cfg.nproc)
        procs, logs = [], []
        for rank in range(cfg.nproc):
            env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(cfg.nproc),
                   "LOCAL_WORLD_SIZE": str(cfg.nproc), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                   ERROR_FILE_ENV: str(tmp / f"error-{rank}.txt")}
            if not torch.cuda.is_available():
                env.setdefault("OMP_NUM_THREADS", str(threads))
            # Rank 0 talks to the terminal (progress bar); the others log to files shown on failure.
            log = None if rank == 0 else tmp / f"rank-{rank}.log"
            out = None if log is None else log.open("w")
            procs.append(subprocess.Popen([*worker, str(cfg_file)], env=env, stdout=out,
                                          stderr=subprocess.STDOUT if out else None, start_new_session=True,
                                          preexec_fn=_die_with(os.getpid())))
            logs.append(log)
        failed = None
        try:
            while not any(p.poll() not in (None, 0) for p in procs) and any(p.poll() is None for p in procs):
                time.sleep(poll_s)
            if any(p.poll() not in (None, 0) for p in procs):
                time.sleep(1.0)  # ranks broken by the same cause fail within moments: see them all
            failed = _cause([p.poll() for p in procs])
        finally:
            _stop(procs)
        if failed is not None:
            code = procs[failed].returncode
            if code < 0:  # killed by a signal: say so, and exit as a shell reports it (128 + signal number)
                raise RankFailedError(failed, 128 - code, f"killed by signal {signal.Signals(-code).name}")
            raise RankFailedError(failed, code, _rank_error(failed, tmp / f"error-{failed}.txt", logs[failed]))


def _cause(codes: list[int | None]) -> int | None:
    """Of the ranks that failed on their own (before the launcher stopped the rest), the one to report: one
    killed by a signal, else one with its own error, else one whose collective broke under it."""
    from forge_qat.distributed.worker import PEER_FAILURE_EXIT

    failed = [r for r, c in enumerate(codes) if c not in (None, 0)]
    return min(failed, key=lambda r: (0 if codes[r] < 0 else 2 if codes[r] == PEER_FAILURE_EXIT else 1, r),
               default=None)


def _die_with(launcher_pid: int):
    """For the rank being started: have the kernel SIGKILL it when the launcher dies (even by kill -9),
    so ranks never train on, two jobs writing one directory. Linux only (prctl PR_SET_PDEATHSIG);
    elsewhere ranks end at their next collective's timeout."""
    def setup() -> None:
        import ctypes
        import ctypes.util

        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
            libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError, TypeError):
            return
        if os.getppid() != launcher_pid:  # the launcher died before the request took effect
            os._exit(1)
    return setup


def _stop(procs: list[subprocess.Popen], grace_s: float = 10.0) -> None:
    """Terminate every rank still running (and its children), then kill what ignores SIGTERM."""
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for p in procs:
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
