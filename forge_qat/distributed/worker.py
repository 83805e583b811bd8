"""One rank of a multi-process job: `python -m forge_qat.distributed.worker ENTRY ARGS...` runs
`ENTRY.rank_main(ARGS)` (for `forge train`: `forge_qat.train.entry`).

Started by `forge_qat.distributed.launch` through torch's elastic launcher (or by any launcher that sets
RANK/WORLD_SIZE/MASTER_*). Reports a failure in one line to stderr and to $FORGE_ERROR_DIR/error-RANK.txt,
and exits non-zero. Under forge's launcher it dies with it: the kernel kills it when the launcher dies.
Imports nothing of the product: the entry module is named on the command line.
"""

import logging
import os
import sys
import traceback
import warnings

from forge_qat.heap import map_large_allocations  # noqa: E402
from forge_qat.logs import console_logging, quiet_libraries  # noqa: E402

quiet_libraries()
# DeepSpeed 0.19 calls collectives torch 2.13 deprecated (all_gather_into_tensor, reduce_scatter_tensor):
# a warning per call site that no user can act on.
warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed.c10d_logger")


def main(argv: list[str] | None = None) -> int:
    import importlib

    from rich.console import Console
    from transformers.utils import logging as hf_logging

    from forge_qat.errors import ForgeError

    argv = sys.argv[1:] if argv is None else argv
    rank = int(os.environ.get("RANK", 0))
    _die_with_launcher()
    map_large_allocations()
    console = Console(stderr=True)
    console_logging(console, f"[rank {rank}] %(message)s", logging.INFO if rank == 0 else logging.WARNING)
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        return importlib.import_module(argv[0]).rank_main(argv[1:], console)
    except ForgeError as e:
        return _report(str(e), e.exit_code)
    except Exception as e:
        if _peer_failure(e):  # a consequence: the launcher reports the rank that caused it
            return _report(f"a collective failed because another rank stopped ({str(e).splitlines()[0][:120]})",
                           PEER_FAILURE_EXIT)
        # a bug or a library failure: keep the traceback for the log
        traceback.print_exc()
        return _report(f"{type(e).__name__}: {e}", 1)


PEER_FAILURE_EXIT = 3
"""Exit code of a rank whose collective broke because another rank died (see launch.py)."""


def _peer_failure(e: Exception) -> bool:
    import torch.distributed as dist

    text = str(e)
    return isinstance(e, getattr(dist, "DistError", ())) or any(
        s in text for s in ("Connection closed by peer", "Connection reset by peer", "Broken pipe"))


def exit_rank(code: int) -> None:
    """End the rank with `code`, without the interpreter's shutdown.

    After a failure the process group is still up: shutting the interpreter down with gloo's (or DeepSpeed's
    shared-memory) threads running aborts the process ("terminate called without an active exception",
    SIGABRT), which would then be reported instead of the rank's own error, and tearing the group down could
    wait on peers that are gone. A rank that succeeded has torn its group down (`ZeroEngine.close`), yet its
    shutdown still aborted now and then the same way (one CI run in many: rank 1 of a 2-rank run, after the
    checkpoint was written and both ranks had passed the closing barrier), and the launcher reported a
    finished run as failed. So every rank leaves at once: its outputs are closed and renamed by then (files
    are written under `with` blocks, trackers finished in the trainer), and the logging handlers and
    standard streams are flushed here."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _report(message: str, code: int) -> int:
    print(f"error: {message}", file=sys.stderr)
    directory = os.environ.get("FORGE_ERROR_DIR")
    if directory:
        with open(os.path.join(directory, f"error-{os.environ.get('RANK', 0)}.txt"), "w") as f:
            f.write(message)
    return code


def _die_with_launcher() -> None:
    """Have the kernel SIGKILL this rank when forge's launcher (its parent) dies, even by kill -9, so ranks
    never train on with no one to stop them. Linux only (prctl PR_SET_PDEATHSIG); elsewhere ranks end at
    their next collective's timeout. torch's launcher does not do this itself."""
    import ctypes
    import ctypes.util
    import signal

    launcher = os.environ.get("FORGE_LAUNCHER_PID")
    if not launcher or not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError, TypeError):
        return
    if os.getppid() != int(launcher):  # the launcher died before the request took effect
        os._exit(1)


if __name__ == "__main__":
    exit_rank(main())
