"""Outputs that appear whole or not at all, the one way every command writes: checked before any work (an
existing output is replaced only with `--overwrite` and only where forge wrote it), written under a hidden
temporary sibling and renamed into place when complete, temporaries of dead processes swept, and every
operating-system error while writing one line (`OutputWriteError`).

Used by every writer: checkpoints, run directories, artifacts, token caches, exports.
"""

import errno
import os
import re
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from forge_qat.errors import OutputExistsError, OutputWriteError

_TEMPORARY_RE = re.compile(r"^\..+\.(?:tmp|old|artifact)-(\d+)$")


def is_stale_temporary(path: Path) -> bool:
    """A hidden `.NAME.tmp-PID` / `.NAME.old-PID` / `.NAME.artifact-PID` left by a process that no longer runs."""
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
            _remove_quietly(p)
            removed.append(p)
    return removed


def _remove_quietly(path: Path) -> None:
    """Remove a temporary; a file system that refuses (read-only) leaves it for a later sweep, and the error the
    user sees stays the one that stopped the write."""
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    except OSError:
        pass


def temporary_sibling(final: Path, pid: int | None = None) -> Path:
    """Where `final` is written before the rename: `.NAME.tmp-PID` beside it (`pid`: the writing process's, which
    a multi-rank writer shares from rank 0)."""
    return final.with_name(f".{final.name}.tmp-{os.getpid() if pid is None else pid}")


def check_output(out: Path, *, overwrite: bool, ours: Callable[[Path], bool], kind: str,
                 directory: bool = False, foreign: str | None = None) -> None:
    """Before any work: `out` may be written. An existing one is replaced only with `--overwrite` and only where
    `ours(out)` says forge wrote it (a `kind`; `foreign`: the message when not); a symbolic link, or a file where
    a directory goes (or the reverse), is refused; the nearest existing parent must be writable. Changes
    nothing."""
    if out.is_symlink():
        raise OutputExistsError(f"{out} is a symbolic link; forge writes no output through a link: choose another "
                                f"path")
    if out.exists():
        if out.is_dir() != directory:
            raise OutputExistsError(f"{out} is {'a directory' if out.is_dir() else 'a file'}; the output is {kind}: "
                                    f"choose another path")
        if not overwrite:
            raise OutputExistsError(f"{out} exists; pass --overwrite to replace it")
        if not ours(out):
            raise OutputExistsError(foreign or f"{out} is not {kind} forge wrote; --overwrite replaces only those: "
                                               f"choose another path")
    parent = out.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise OutputWriteError(f"cannot write {out}: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputWriteError(f"cannot write {out}: {parent} is not writable")


@contextmanager
def _write_errors(final: Path, tmp: Path) -> Iterator[None]:
    """An operating-system error on the output (its temporary, its rename, or a write on an open file, which
    names no path) becomes one line naming the output; errors on other paths (inputs) pass through."""
    try:
        yield
    except OSError as e:
        names = [str(n) for n in (e.filename, e.filename2) if n is not None]
        if names and not any(n.startswith((str(tmp), str(final))) for n in names):
            raise
        reason = {errno.ENOSPC: "the disk is full", errno.EROFS: "the file system is read-only",
                  errno.EDQUOT: "the disk quota is exceeded"}.get(e.errno, e.strerror or str(e))
        raise OutputWriteError(f"cannot write {final}: {reason}; nothing was written there") from None


def _prepare(final: Path, tmp: Path) -> None:
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputWriteError(f"cannot write {final}: cannot create {e.filename or final.parent} "
                               f"({e.strerror or e})") from None
    remove_stale_temporaries(final.parent, final.name)
    _remove_quietly(tmp)


@contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a temporary sibling directory of `final`; rename it to `final` only if the block completes (a
    previous `final` is moved aside first, never lost midway)."""
    tmp = temporary_sibling(final)
    _prepare(final, tmp)
    try:
        with _write_errors(final, tmp):
            tmp.mkdir()
            yield tmp
            replace_dir(tmp, final)
    finally:
        if tmp.exists():
            _remove_quietly(tmp)


@contextmanager
def atomic_file(final: Path) -> Iterator[Path]:
    """Yield a temporary sibling path of the file `final`; renamed to `final` only if the block completes."""
    tmp = temporary_sibling(final)
    _prepare(final, tmp)
    try:
        with _write_errors(final, tmp):
            yield tmp
            os.replace(tmp, final)
    finally:
        _remove_quietly(tmp)


def replace_dir(tmp: Path, final: Path) -> None:
    """Rename a complete temporary into place; a previous `final` is moved aside first, never lost midway."""
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
