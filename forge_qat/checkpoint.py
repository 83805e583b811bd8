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

from forge_qat import __version__, lora
from forge_qat.artifact import DEFAULT_MAX_SHARD_BYTES, ShardWriter
from forge_qat.errors import InputError, OutputExistsError, OutputWriteError
from forge_qat.fake_quant import is_learned_scale
from forge_qat.layouts import Layout, model_layout_reader
from forge_qat.safe_load import UNSAFE_PICKLE
from forge_qat.train.config import RUN_MARKER
from forge_qat.train.engine import Engine, full_tensors
from forge_qat.weights import SafetensorsReader, tied_aliases

CHECKPOINT_META = "forge_checkpoint.json"
TRAINER_STATE = "trainer_state.pt"
METRICS = "metrics.jsonl"
LEARNED_SCALES = Path("learned_scales") / "scales.safetensors"
"""A checkpoint's learned weight scales (`--qat-learn-scales`), by state-dict name. Kept apart from the HF
weights, in a subdirectory no `*.safetensors` glob of the checkpoint sees, so the checkpoint stays a plain
float model for transformers and for `--model`."""
_CKPT_RE = re.compile(r"^checkpoint-(\d+)$")


def _is_stale_temporary(path: Path) -> bool:
    """A hidden `.NAME.tmp-PID` / `.NAME.old-PID` left by a process that no longer runs."""
    m = re.match(r"^\..+\.(?:tmp|old)-(\d+)$", path.name)
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
        if _is_stale_temporary(p) and (name is None or p.name.startswith(f".{name}.")):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
            removed.append(p)
    return removed


@contextmanager
def atomic_dir(final: Path):
    """Yield a temporary sibling of `final`; rename it to `final` only if the block completes."""
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    remove_stale_temporaries(final.parent, final.name)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _replace(tmp, final)


def rng_state() -> dict[str, Any]:
    """The random-number generator states a resumed run restores: the CPU generator, and each CUDA
    device's where CUDA is in use (dropout and other random ops on the GPU draw from those)."""
    state: dict[str, Any] = {"torch_rng": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda_rng"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Set what `rng_state` recorded. A checkpoint from a CUDA run resumed without CUDA (or on fewer
    devices) restores the CPU generator and says what it could not restore."""
    import logging

    torch.set_rng_state(state["torch_rng"])
    cuda = state.get("cuda_rng")
    if cuda is None:
        return
    if torch.cuda.is_available() and torch.cuda.device_count() >= len(cuda):
        torch.cuda.set_rng_state_all(cuda)
    else:
        logging.getLogger(__name__).warning(
            "the checkpoint holds the random state of %d CUDA device(s), which this machine lacks; random ops on "
            "the GPU (dropout) will not continue the original sequence", len(cuda))


def check_run_dir(output_dir: Path, *, resume: bool, overwrite: bool) -> None:
    """Validate the run directory before any work; changes nothing. forge replaces only its own runs."""
    if output_dir.exists() and not output_dir.is_dir():
        raise OutputExistsError(f"output dir {output_dir} exists and is a file")
    is_run = (output_dir / RUN_MARKER).is_file()
    if resume:
        if not is_run:
            raise InputError(f"--resume: {output_dir} is not a forge run directory (no {RUN_MARKER})")
        return
    non_empty = output_dir.is_dir() and any(p for p in output_dir.iterdir() if not _is_stale_temporary(p))
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
    if (output_dir / RUN_MARKER).is_file():
        for child in output_dir.iterdir():
            shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
    marker = {"forge_qat_version": __version__, "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "config": config}
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / RUN_MARKER).write_text(json.dumps(marker, indent=2))
    except OSError as e:
        raise OutputWriteError(f"cannot write to output dir {output_dir}: {e.strerror or e}") from None


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


def save_checkpoint(engine: Engine, model: torch.nn.Module, output_dir: Path, step: int, tokenizer,
                    meta: dict[str, Any], keep: int, layout: Layout | None = None,
                    trainer_state: dict[str, Any] | None = None) -> Path | None:
    """Write checkpoint-{step} (collective): the engine's state for --resume, the float weights gathered one
    tensor at a time and written by rank 0 under the checkpoint names of `layout` (the input model's, e.g.
    per-expert tensors for fused MoE stacks, so stock `from_pretrained` reads it as it read the input),
    learned scales apart, config, tokenizer and metadata. `trainer_state`: more that `--resume` gets back (plain
    data and tensors). Written under `.checkpoint-N.tmp-PID` (rank 0's PID,
    shared with every rank) and renamed when complete; then pruned to the newest `keep` checkpoints.
    Returns the checkpoint on rank 0, None elsewhere."""
    main = engine.rank == 0
    final = output_dir / f"checkpoint-{step:06d}"
    tmp = final.with_name(f".{final.name}.tmp-{engine.broadcast(os.getpid())}")
    try:
        if main:
            remove_stale_temporaries(output_dir, final.name)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        engine.barrier()
        engine.save_state(tmp, {"step": step, **rng_state(), **(trainer_state or {})})
        shared = engine.broadcast(str(frozen_base_source(output_dir, model, meta) or "") if main else None)
        write_weights(tmp if main else None, engine, model, layout or Layout(),  # every rank skips alike
                      base_from=Path(shared) if shared else None)
        if main:
            model.config.save_pretrained(tmp)
            if model.generation_config is not None:
                model.generation_config.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            write_checkpoint_meta(tmp, step, meta)
            if (tmp / lora.ADAPTER_DIR).is_dir():
                write_adapter_config(tmp, lora.recorded_config(meta), str(meta["train_config"].get("model", "")))
            _replace(tmp, final)
            prune_checkpoints(output_dir, keep)
    except OSError as e:
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise OutputWriteError(f"cannot write checkpoint {final} (disk full or not writable?): "
                               f"{str(e).splitlines()[0][:200]}; the previous checkpoints are intact") from None
    engine.barrier()
    return final if main else None


def write_weights(directory: Path | None, engine: Engine, model: torch.nn.Module, layout: Layout,
                  max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, base_from: Path | None = None) -> None:
    """Gather every tensor (all ranks, in the same order); rank 0 (`directory` given) appends each to the
    current shard, learned scales to their own file. Rank 0 never holds more than one tensor plus one shard.
    `base_from`: a checkpoint of this run with the same frozen base (`frozen_base_source`; the same on every
    rank): its weight files are linked instead, and only the trained tensors are gathered."""
    tied = tied_aliases(model)
    names = [n for n in model.state_dict() if n not in tied and not is_learned_scale(n) and not lora.is_adapter(n)]
    writer = None
    if directory is not None and base_from is None:
        writer = ShardWriter(directory, "safetensors", layout.checkpoint_keys(names), max_shard_bytes)
    elif directory is not None:
        _link_weight_files(base_from, directory)
    scales, adapters = {}, {}
    trained = None if base_from is None else (lambda n: is_learned_scale(n) or lora.is_adapter(n))
    for name, tensor in full_tensors(engine, model, only=trained):
        if directory is None:
            continue
        if is_learned_scale(name):
            scales[name] = tensor
        elif lora.is_adapter(name):
            adapters[name] = tensor
        else:
            for key, piece in layout.checkpoint_tensors(name, tensor):
                writer.add(key, piece)
    if directory is None:
        return
    if writer is not None:
        writer.close()
    if scales:
        write_learned_scales(directory, scales)
    if adapters:
        write_adapters(directory, adapters)


_WEIGHT_FILE_RE = re.compile(r"^model(-\d{5}-of-\d{5})?\.safetensors(\.index\.json)?$")


def weight_files(ckpt: Path) -> list[Path]:
    """The float weight files `write_weights` wrote in a checkpoint (shards and index)."""
    return sorted(p for p in ckpt.iterdir() if _WEIGHT_FILE_RE.match(p.name))


def frozen_base_source(output_dir: Path, model: torch.nn.Module, meta: dict[str, Any]) -> Path | None:
    """The newest checkpoint of this run whose float weights a new checkpoint can share, or None.

    A LoRA run trains only its adapters (and learned scales, saved apart): the base weights are frozen, so
    every checkpoint of the run holds the same bytes (a 30B model: 60 GB each). Only a checkpoint of this run
    qualifies (`start_run_dir` empties the directory for a new run; resumed runs keep the model and LoRA
    settings, checked again here from the metadata), and only while every base parameter is frozen."""
    if not lora.adapter_parameters(model) or any(
            p.requires_grad for n, p in model.named_parameters() if not lora.is_adapter(n) and not is_learned_scale(n)):
        return None
    ckpts = checkpoint_dirs(output_dir)
    if not ckpts:
        return None
    previous = ckpts[-1][1]
    before, now = (read_checkpoint_meta(previous) or {}).get("train_config", {}), meta.get("train_config", {})
    if any(before.get(k) != now.get(k) for k in ("model", "lora_rank", "lora_targets")) \
            or not before.get("lora_rank") or not weight_files(previous):
        return None
    return previous


def _link_weight_files(source: Path, directory: Path) -> None:
    """Hard-link (else copy) `source`'s weight files into `directory`: each checkpoint stays a complete
    model directory that stock `from_pretrained` reads, pruning one checkpoint frees nothing another uses,
    and the disk holds the base once."""
    for f in weight_files(source):
        try:
            os.link(f, directory / f.name)
        except OSError:  # a file system without hard links
            shutil.copyfile(f, directory / f.name)


def _replace(tmp: Path, final: Path) -> None:
    """Rename a complete temporary into place; a previous `final` is moved aside first, never lost midway."""
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


def write_learned_scales(directory: Path, scales: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    (directory / LEARNED_SCALES).parent.mkdir(exist_ok=True)
    save_file({n: t.detach().to("cpu", torch.float32).contiguous() for n, t in scales.items()},
              directory / LEARNED_SCALES)


def write_adapters(directory: Path, adapters: dict[str, torch.Tensor]) -> None:
    """LoRA adapters in PEFT's layout under `adapter/` (expert-stack pairs in a file beside it); its
    adapter_config.json is written by `write_adapter_config` from the run's settings."""
    from safetensors.torch import save_file

    folder = directory / lora.ADAPTER_DIR
    folder.mkdir(exist_ok=True)
    dense, stacks = lora.to_peft({n: t.detach().to("cpu").contiguous() for n, t in adapters.items()})
    save_file(dense, folder / lora.PEFT_WEIGHTS)
    if stacks:
        save_file(stacks, folder / lora.EXPERT_WEIGHTS)


def write_adapter_config(directory: Path, cfg: "lora.LoraConfig", base_model: str) -> None:
    from safetensors import safe_open

    folder = directory / lora.ADAPTER_DIR
    with safe_open(folder / lora.PEFT_WEIGHTS, "pt") as f:  # the names only: no tensor is read
        keys = list(f.keys())
    (folder / lora.PEFT_CONFIG).write_text(json.dumps(lora.peft_config(cfg, keys, base_model), indent=2) + "\n")


def read_adapters(ckpt: Path) -> dict[str, torch.Tensor] | None:
    """A checkpoint's LoRA adapters by state-dict name, or None when it has none."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = ckpt / lora.ADAPTER_DIR
    if not (folder / lora.PEFT_WEIGHTS).is_file():
        return None
    try:
        stacks = load_file(folder / lora.EXPERT_WEIGHTS) if (folder / lora.EXPERT_WEIGHTS).is_file() else {}
        return lora.from_peft(load_file(folder / lora.PEFT_WEIGHTS), stacks)
    except (SafetensorError, OSError) as e:
        raise InputError(f"{folder} is truncated or corrupt ({str(e).splitlines()[0][:200]})") from None


def read_learned_scales(ckpt: Path) -> dict[str, torch.Tensor] | None:
    """A checkpoint's learned weight scales, or None when it was trained without them."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = ckpt / LEARNED_SCALES
    if not path.is_file():
        return None
    try:
        return load_file(path)
    except (SafetensorError, OSError) as e:
        raise InputError(f"{path} is truncated or corrupt ({str(e).splitlines()[0][:200]})") from None


def write_checkpoint_meta(directory: Path, step: int, meta: dict[str, Any]) -> None:
    """Written last: its presence marks a checkpoint complete."""
    (directory / CHECKPOINT_META).write_text(json.dumps({"step": step, "forge_qat_version": __version__, **meta},
                                                        indent=2))


def prune_checkpoints(output_dir: Path, keep: int) -> None:
    for _, old in checkpoint_dirs(output_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def save_trainer_state(directory: Path, state: dict[str, Any]) -> None:
    """One process's optimizer, scheduler and RNG state, for --resume."""
    try:
        torch.save(state, directory / TRAINER_STATE)
    except RuntimeError as e:  # a full disk shows as torch.save's "unexpected pos" as often as an OSError
        raise OSError(str(e)) from None


def load_trainer_state(ckpt: Path) -> dict[str, Any]:
    """Optimizer, scheduler and RNG state for --resume, unpickled as plain data only."""
    path = ckpt / TRAINER_STATE
    if not path.is_file():
        raise InputError(f"--resume: {path} is missing; the checkpoint is incomplete, resume from an earlier one "
                         f"or start again with --overwrite")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except UNSAFE_PICKLE as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InputError(f"--resume: cannot load {path} as plain data (corrupt, truncated, or carrying code, which "
                         f"forge never runs): {first[:200]}") from None


def load_weights_into(model: torch.nn.Module, ckpt: Path) -> None:
    """Load a checkpoint's float weights (in the layout it was written in: MoE checkpoints keep their input's
    per-expert tensors) and learned scales into an (already prepared) model of the same architecture, one
    tensor at a time."""
    reader = model_layout_reader(SafetensorsReader.from_dir(ckpt), model)
    tied = tied_aliases(model)
    state = model.state_dict(keep_vars=True)
    wanted = [n for n in state if n not in tied and not is_learned_scale(n) and not lora.is_adapter(n)]
    missing = [n for n in wanted if n not in reader.keys()]
    if missing or reader.layout.unexpected:
        raise InputError(f"{ckpt} does not match the model: missing {sorted(missing)[:5]}, "
                         f"unexpected {sorted(reader.layout.unexpected)[:5]}")
    with torch.no_grad():
        for name in wanted:
            target = state[name]
            if list(target.shape) != reader.shape(name):
                raise InputError(f"{ckpt}: {name} has shape {reader.shape(name)}, the model's is "
                                 f"{list(target.shape)}")
            value = torch.empty(target.numel(), dtype=target.dtype)
            reader.read_flat(name, 0, value)
            target.copy_(value.view(target.shape))
    scales = read_learned_scales(ckpt) or {}
    expected = {n for n in state if is_learned_scale(n)}
    if set(scales) != expected:
        raise InputError(f"{ckpt}: its learned scales do not match the model's: missing "
                         f"{sorted(expected - set(scales))[:3]}, unexpected {sorted(set(scales) - expected)[:3]}")
    with torch.no_grad():
        for name, value in scales.items():
            state[name].copy_(value)
    lora.load(model, read_adapters(ckpt) or {}, ckpt)


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
