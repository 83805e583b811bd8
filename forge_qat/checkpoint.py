"""Run directories and HF-format float checkpoints, written atomically.

Called by training (save, resume) and by finalize/eval (find and read a checkpoint). A checkpoint is
an HF model directory (float weights under the original state_dict keys, tokenizer, config) plus
`forge_checkpoint.json` (recipe, step, training arguments) and `trainer_state.pt` (for --resume).
Each is written to a hidden temporary directory and renamed into place only when complete.
"""

import json
import os
import re
import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from forge_qat import __version__
from forge_qat.errors import InputError, OutputExistsError
from forge_qat.weights import tied_aliases

RUN_MARKER = "forge_run.json"
CHECKPOINT_META = "forge_checkpoint.json"
TRAINER_STATE = "trainer_state.pt"
METRICS = "metrics.jsonl"
_CKPT_RE = re.compile(r"^checkpoint-(\d+)$")


@contextmanager
def atomic_dir(final: Path):
    """Yield a temporary sibling of `final`; rename it to `final` only if the block completes."""
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


def prepare_run_dir(output_dir: Path, *, resume: bool, overwrite: bool, config: dict[str, Any]) -> None:
    """Create or validate the run directory; refuse to clobber anything that isn't ours."""
    is_run = (output_dir / RUN_MARKER).is_file()
    if output_dir.exists() and not output_dir.is_dir():
        raise OutputExistsError(f"output dir {output_dir} exists and is a file")
    non_empty = output_dir.is_dir() and any(output_dir.iterdir())
    if resume:
        if not is_run:
            raise InputError(f"--resume: {output_dir} is not a forge run directory (no {RUN_MARKER})")
        return
    if non_empty and not overwrite:
        what = "a forge run" if is_run else "not a forge run directory"
        hint = " Pass --resume to continue it or" if is_run else ""
        raise OutputExistsError(f"output dir {output_dir} exists and is {what}.{hint} pass --overwrite to replace it")
    if non_empty:
        shutil.rmtree(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    marker = {"forge_qat_version": __version__, "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "config": config}
    (output_dir / RUN_MARKER).write_text(json.dumps(marker, indent=2))


def checkpoint_dirs(output_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints in a run directory, oldest first."""
    found = []
    for p in output_dir.iterdir() if output_dir.is_dir() else ():
        m = _CKPT_RE.match(p.name)
        if m and (p / CHECKPOINT_META).is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def resolve_checkpoint(path: Path) -> Path:
    """A checkpoint directory itself, or the latest checkpoint of a run directory."""
    if (path / CHECKPOINT_META).is_file():
        return path
    ckpts = checkpoint_dirs(path)
    if ckpts:
        return ckpts[-1][1]
    return path


def read_checkpoint_meta(path: Path) -> dict[str, Any] | None:
    """forge metadata of a checkpoint directory, or None for a plain HF model directory."""
    meta = path / CHECKPOINT_META
    if not meta.is_file():
        return None
    try:
        return json.loads(meta.read_text())
    except json.JSONDecodeError as e:
        raise InputError(f"{meta} is corrupt: {e}") from None


def save_checkpoint(output_dir: Path, step: int, model, tokenizer, meta: dict[str, Any],
                    trainer_state: dict[str, Any], keep: int) -> Path:
    """Write checkpoint-{step} atomically, then prune to the newest `keep` checkpoints."""
    final = output_dir / f"checkpoint-{step:06d}"
    with atomic_dir(final) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        torch.save(trainer_state, tmp / TRAINER_STATE)
        write_checkpoint_meta(tmp, step, meta)
    prune_checkpoints(output_dir, keep)
    return final


def write_checkpoint_meta(directory: Path, step: int, meta: dict[str, Any]) -> None:
    """Written last: its presence marks a checkpoint complete."""
    (directory / CHECKPOINT_META).write_text(json.dumps({"step": step, "forge_qat_version": __version__, **meta},
                                                        indent=2))


def prune_checkpoints(output_dir: Path, keep: int) -> None:
    for _, old in checkpoint_dirs(output_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def load_trainer_state(ckpt: Path) -> dict[str, Any]:
    # weights_only=False: the file holds optimizer/scheduler dicts and RNG states this run wrote itself.
    return torch.load(ckpt / TRAINER_STATE, map_location="cpu", weights_only=False)


def load_weights_into(model: torch.nn.Module, ckpt: Path) -> None:
    """Load a checkpoint's float weights into an (already prepared) model of the same architecture."""
    from safetensors.torch import load_file

    state = {}
    for f in sorted(ckpt.glob("*.safetensors")):
        state.update(load_file(f))
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = set(missing) - tied_aliases(model)  # a tied parameter is stored under its first name only
    if missing or unexpected:
        raise InputError(f"{ckpt} does not match the model: missing {sorted(missing)[:5]}, "
                         f"unexpected {sorted(unexpected)[:5]}")


def trim_metrics(output_dir: Path, step: int) -> None:
    """On resume, drop metric records logged after the checkpoint being resumed."""
    path = output_dir / METRICS
    if path.is_file():
        kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        path.write_text("".join(line + "\n" for line in kept))
