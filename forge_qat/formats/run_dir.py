"""The run directory of `forge train`: its marker (`forge_run.json`, the run's configuration), its checkpoints
(`checkpoint-NNNNNN/`) and its metrics log. Imports no torch: `--resume` reads the recorded configuration
before a command loads torch.

Written by the trainer (`forge_qat.train`); read by config loading (`--resume`), finalize, eval and export.
"""

import json
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from forge_qat import __version__
from forge_qat.errors import InputError, OutputExistsError, OutputWriteError
from forge_qat.formats.atomic import is_stale_temporary, remove_stale_temporaries
from forge_qat.formats.versioned import check_version, read_json_object

RUN_MARKER = "forge_run.json"
METRICS = "metrics.jsonl"
CHECKPOINT_META = "forge_checkpoint.json"
"""A checkpoint's metadata file (`forge_qat.formats.checkpoint.CheckpointMeta`); written last, so its presence
marks a checkpoint complete."""
FORMAT_VERSION = 1
"""Version of `forge_run.json` this forge writes; files without one are version 1."""
_CKPT_RE = re.compile(r"^checkpoint-(\d+)$")


@dataclass(frozen=True, kw_only=True, slots=True)
class RunRecord:
    """`forge_run.json`: which forge started the run, when, and with which configuration (flat option names)."""

    config: dict[str, Any]
    created: str = ""
    forge_qat_version: str = __version__
    format_version: int = FORMAT_VERSION

    def to_json(self) -> str:
        return json.dumps({"format_version": self.format_version, "forge_qat_version": self.forge_qat_version,
                           "created": self.created, "config": self.config}, indent=2)

    @classmethod
    def read(cls, output_dir: Path) -> "RunRecord":
        """The record of a run directory; a clear InputError when it is none, or its marker is corrupt."""
        marker = output_dir / RUN_MARKER
        if not marker.is_file():
            raise InputError(f"--resume: {output_dir} is not a forge run directory (no {RUN_MARKER})")
        hint = "; pass the run's options (or a YAML config) explicitly along with --resume"
        raw = read_json_object(marker, "a forge run's marker", hint)
        if not isinstance(raw.get("config", {}), dict):
            raise InputError(f"{marker} is corrupt (its config is no mapping){hint}")
        version = check_version(raw, marker, FORMAT_VERSION)
        return cls(config=raw.get("config", {}), created=str(raw.get("created", "")),
                   forge_qat_version=str(raw.get("forge_qat_version", "")), format_version=version)


def is_run_dir(output_dir: Path) -> bool:
    return (output_dir / RUN_MARKER).is_file()


def check_run_dir(output_dir: Path, *, resume: bool, overwrite: bool) -> None:
    """Validate the run directory before any work; changes nothing. forge replaces only its own runs."""
    if output_dir.exists() and not output_dir.is_dir():
        raise OutputExistsError(f"output dir {output_dir} exists and is a file")
    if resume:
        RunRecord.read(output_dir)
        return
    is_run = is_run_dir(output_dir)
    non_empty = output_dir.is_dir() and any(p for p in output_dir.iterdir() if not is_stale_temporary(p))
    if non_empty and not is_run:
        raise OutputExistsError(f"output dir {output_dir} is not empty and is not a forge run (no {RUN_MARKER}); forge "
                                f"replaces only its own runs, even with --overwrite: choose another --output-dir")
    if non_empty and not overwrite:
        raise OutputExistsError(f"output dir {output_dir} holds a forge run. Pass --resume to continue it or "
                                f"--overwrite to replace it (once the new run's model and data have loaded)")


def start_run_dir(output_dir: Path, config: dict[str, Any]) -> None:
    """Begin a new run in `output_dir`, replacing a previous forge run there (validated by `check_run_dir`).

    Called only once the new run's model and data have loaded, so a bad input never costs the old run."""
    remove_stale_temporaries(output_dir)
    if is_run_dir(output_dir):
        for child in output_dir.iterdir():
            shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
    record = RunRecord(config=config, created=time.strftime("%Y-%m-%dT%H:%M:%S"))
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / RUN_MARKER).write_text(record.to_json())
    except OSError as e:
        raise OutputWriteError(f"cannot write to output dir {output_dir}: {e.strerror or e}") from None


def abandon_new_run(output_dir: Path) -> None:
    """Take back a run that `start_run_dir` began and nothing has trained in yet (its marker, what trackers made
    there), so the next start is not refused; the directory goes too when nothing else is left in it."""
    if checkpoint_dirs(output_dir):
        return  # not a new run: never delete checkpoints
    for child in output_dir.iterdir() if output_dir.is_dir() else ():
        shutil.rmtree(child, ignore_errors=True) if child.is_dir() and not child.is_symlink() \
            else child.unlink(missing_ok=True)
    try:
        output_dir.rmdir()
    except OSError:
        pass


def checkpoint_dirs(output_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints in a run directory, oldest first."""
    found = []
    for p in output_dir.iterdir() if output_dir.is_dir() else ():
        m = _CKPT_RE.match(p.name)
        if m and (p / CHECKPOINT_META).is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def checkpoint_path(output_dir: Path, step: int) -> Path:
    return output_dir / f"checkpoint-{step:06d}"


def resolve_checkpoint(path: Path) -> Path:
    """A checkpoint directory itself, or the latest checkpoint of a run directory."""
    if (path / CHECKPOINT_META).is_file():
        return path
    ckpts = checkpoint_dirs(path)
    if ckpts:
        return ckpts[-1][1]
    return path


def prune_checkpoints(output_dir: Path, keep: int) -> None:
    for _, old in checkpoint_dirs(output_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def trim_metrics(output_dir: Path, step: int) -> None:
    """On resume, drop metric records logged after the checkpoint being resumed."""
    path = output_dir / METRICS
    if path.is_file():
        kept = []
        for line in path.read_text(errors="replace").splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue  # a line a killed process left half-written
            if isinstance(record, dict) and record.get("step", step + 1) <= step:
                kept.append(line)
        path.write_text("".join(line + "\n" for line in kept))
