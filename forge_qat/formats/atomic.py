"""Outputs that appear whole or not at all: a directory written under a hidden temporary sibling and renamed
into place when complete, and the sweep of temporaries that dead processes left.

Used by every writer of a directory: checkpoints, run directories, artifacts, token caches.
"""

import os
import re
import shutil
from contextlib import contextmanager
from pathlib import Path

_TEMPORARY_RE = re.compile(r"^\..+\.(?:tmp|old)-(\d+)$")


def is_stale_temporary(path: Path) -> bool:
    """A hidden `.NAME.tmp-PID` / `.NAME.old-PID` left by a process that no longer runs."""
    m = _TEMPORARY_RE.match(path.name)
    if not m:
        return False
    try:
        os.kill(int(m.group(1)), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def remove_stale_temporaries(directory: Path, name: str | None = None) -> list[Path]:
    """Delete the temporaries (of `name`, or of anything) that dead forge processes left in `directory`."""
    removed = []
    for p in directory.iterdir() if directory.is_dir() else ():
        if is_stale_temporary(p) and (name is None or p.name.startswith(f".{name}.")):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def temporary_sibling(final: Path, pid: int | None = None) -> Path:
    """Where `final` is written before the rename: `.NAME.tmp-PID` beside it (`pid`: the writing process's, which
    a multi-rank writer shares from rank 0)."""
    return final.with_name(f".{final.name}.tmp-{os.getpid() if pid is None else pid}")


@contextmanager
def atomic_dir(final: Path):
    """Yield a temporary sibling of `final`; rename it to `final` only if the block completes."""
    tmp = temporary_sibling(final)
    remove_stale_temporaries(final.parent, final.name)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_dir(tmp, final)


def replace_dir(tmp: Path, final: Path) -> None:
    """Rename a complete temporary into place; a previous `final` is moved aside first, never lost midway."""
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
