"""The output file of an export: what `--overwrite` may replace, and writing it whole or not at all.

Shared by the format modules (`gguf`, `executorch`).
"""

import os
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

from forge_qat.errors import OutputExistsError


def check_output(out: Path, overwrite: bool, ours: Callable[[Path], bool], kind: str) -> None:
    """Refuse an existing `out` unless `--overwrite` was given and `ours(out)` says forge wrote it (a `kind`
    file); forge replaces only its own outputs."""
    if not out.exists():
        return
    if not overwrite:
        raise OutputExistsError(f"{out} exists; pass --overwrite to replace it")
    if not ours(out):
        raise OutputExistsError(f"{out} is not {kind} forge wrote; --overwrite replaces only those: choose "
                                f"another --output")


@contextmanager
def temporary_output(out: Path):
    """A hidden sibling path to write `out` to; renamed to `out` when the block completes, removed if not."""
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
