"""Saving and restoring a training run's checkpoints: the one checkpoint writer (fed by the engine's full
tensors, one at a time), the random state, and loading a checkpoint's weights back for `--resume`.

Called by the trainer. The files it writes are owned by `forge_qat.formats` (run directory, checkpoint
metadata, learned scales, PEFT adapters, safetensors shards).
"""

import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from forge_qat.errors import InputError, OutputWriteError
from forge_qat.formats import adapters as adapter_files
from forge_qat.formats.artifact import DEFAULT_MAX_SHARD_BYTES, ShardWriter
from forge_qat.formats.atomic import remove_stale_temporaries, replace_dir, temporary_sibling
from forge_qat.formats.checkpoint import (
    CheckpointMeta,
    read_checkpoint_meta,
    read_learned_scales,
    weight_files,
    write_learned_scales,
)
from forge_qat.formats.layouts import Layout, model_layout_reader
from forge_qat.formats.run_dir import checkpoint_dirs, checkpoint_path, prune_checkpoints
from forge_qat.formats.weights import SafetensorsReader, check_shapes, tied_aliases, true_shape
from forge_qat.lora import adapters as lora
from forge_qat.lora import grid_base
from forge_qat.qat.fake_quant import is_learned_scale
from forge_qat.train.engine import Engine, full_tensors

log = logging.getLogger(__name__)


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
    torch.set_rng_state(state["torch_rng"])
    cuda = state.get("cuda_rng")
    if cuda is None:
        return
    if torch.cuda.is_available() and torch.cuda.device_count() >= len(cuda):
        torch.cuda.set_rng_state_all(cuda)
    else:
        log.warning("the checkpoint holds the random state of %d CUDA device(s), which this machine lacks; random "
                    "ops on the GPU (dropout) will not continue the original sequence", len(cuda))


def save_checkpoint(engine: Engine, model: torch.nn.Module, output_dir: Path, tokenizer, meta: CheckpointMeta,
                    keep: int, layout: Layout | None = None,
                    trainer_state: dict[str, Any] | None = None) -> Path | None:
    """Write checkpoint-{step} (collective): the engine's state for --resume, the float weights gathered one
    tensor at a time and written by rank 0 under the checkpoint names of `layout` (the input model's, e.g.
    per-expert tensors for fused MoE stacks, so stock `from_pretrained` reads it as it read the input),
    learned scales apart, config, tokenizer and metadata. `trainer_state`: more that `--resume` gets back (plain
    data and tensors). Written under `.checkpoint-N.tmp-PID` (rank 0's PID,
    shared with every rank) and renamed when complete; then pruned to the newest `keep` checkpoints.
    Returns the checkpoint on rank 0, None elsewhere."""
    main = engine.rank == 0
    final = checkpoint_path(output_dir, meta.step)
    tmp = temporary_sibling(final, engine.broadcast(os.getpid()))
    try:
        if main:
            remove_stale_temporaries(output_dir, final.name)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        engine.barrier()
        engine.save_state(tmp, {"step": meta.step, **rng_state(), **(trainer_state or {})})
        shared = engine.broadcast(str(frozen_base_source(output_dir, model, meta) or "") if main else None)
        write_weights(tmp if main else None, engine, model, layout or Layout(),  # every rank skips alike
                      base_from=Path(shared) if shared else None,
                      model_dir=Path(str(meta.train_config.get("model", ""))))
        if main:
            model.config.save_pretrained(tmp)
            if model.generation_config is not None:
                model.generation_config.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            if adapter_files.has_adapters(tmp):
                adapter_files.write_adapter_config(tmp, meta.lora, str(meta.train_config.get("model", "")))
            meta.write(tmp)  # last: its presence marks the checkpoint complete
            replace_dir(tmp, final)
            prune_checkpoints(output_dir, keep)
    except OSError as e:
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise OutputWriteError(f"cannot write checkpoint {final} (disk full or not writable?): "
                               f"{str(e).splitlines()[0][:200]}; the previous checkpoints are intact") from None
    engine.barrier()
    return final if main else None


def write_weights(directory: Path | None, engine: Engine, model: torch.nn.Module, layout: Layout,
                  max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, base_from: Path | None = None,
                  model_dir: Path | None = None) -> None:
    """Gather every tensor (all ranks, in the same order); rank 0 (`directory` given) appends each to the
    current shard, learned scales to their own file. Rank 0 never holds more than one tensor plus one shard.
    `base_from`: a checkpoint of this run with the same frozen base (`frozen_base_source`; the same on every
    rank): its weight files are linked instead, and only the trained tensors are gathered. Weights the model holds
    in a grid (`--lora-base-grid`) are read from `model_dir`, the model the run started from, one at a time."""
    tied = tied_aliases(model)
    names = [n for n in model.state_dict() if n not in tied and not is_learned_scale(n) and not lora.is_adapter(n)]
    names = engine.checkpoint_names(model, names)
    writer = None
    if directory is not None and base_from is None:
        writer = ShardWriter(directory, "safetensors", layout.checkpoint_keys(names), max_shard_bytes)
    elif directory is not None:
        _link_weight_files(base_from, directory)
    scales, adapters = {}, {}
    trained = None if base_from is None else (lambda n: is_learned_scale(n) or lora.is_adapter(n))
    gridded = grid_base.gridded_weights(model)
    stream = full_tensors(engine, model, only=lambda n: n not in gridded and (trained is None or trained(n)))
    if gridded and base_from is None:
        stream = _with_base_from(stream, model, gridded, model_dir)
    for name, tensor in stream:
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
    if gridded and any(isinstance(m, lora.LoraPair) and m.mode == "merged" for m in model.modules()):
        scales.update(grid_base.grid_scales(model))  # what merged mode quantized against: finalize converts with them
    if scales:
        write_learned_scales(directory, scales)
    if adapters:
        adapter_files.write_adapters(directory, adapters)


def _with_base_from(stream, model: torch.nn.Module, gridded: set[str], model_dir: Path | None):
    """`stream` (full_tensors without the gridded weights) with each gridded weight put back in its place, read
    as float32 from the model directory the run started from: the weights its grid was made from."""
    if model_dir is None or not model_dir.is_dir():
        raise InputError(f"the LoRA base grid's float weights are read from the run's model directory, and "
                         f"{model_dir} is not one any more")
    reader = model_layout_reader(SafetensorsReader.from_dir(model_dir), model)
    params = dict(model.named_parameters())
    tied = tied_aliases(model)
    for name in model.state_dict():
        if name in tied:
            continue
        if name in gridded:
            value = torch.empty(params[name].shape, dtype=torch.float32)
            reader.read_flat(name, 0, value.view(-1))
            yield name, value
        else:
            item = next(stream)
            if item[0] != name:  # full_tensors yields the state dict's order (the local engine's; no DeepSpeed)
                raise RuntimeError(f"checkpoint writer out of order: {item[0]} where {name} was expected")
            yield item


def frozen_base_source(output_dir: Path, model: torch.nn.Module, meta: CheckpointMeta) -> Path | None:
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
    before_meta = read_checkpoint_meta(previous)
    before, now = before_meta.train_config if before_meta else {}, meta.train_config
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


def model_dir_of(ckpt: Path) -> str:
    """The model a checkpoint's run started from, as its metadata records it."""
    meta = read_checkpoint_meta(ckpt)
    return str(meta.train_config.get("model", "its model")) if meta else "its model"


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
    gridded = grid_base.gridded_weights(model)  # the grid was made from the same base weights (the run's model)
    with torch.no_grad():
        for name in wanted:
            if name in gridded:
                continue
            target = state[name]
            if list(target.shape) != reader.shape(name):
                raise InputError(f"{ckpt}: {name} has shape {reader.shape(name)}, the model's is "
                                 f"{list(target.shape)}")
            value = torch.empty(target.numel(), dtype=target.dtype)
            reader.read_flat(name, 0, value)
            target.copy_(value.view(target.shape))
    scales = read_learned_scales(ckpt) or {}
    for name, value in grid_base.grid_scales(model).items():  # a merged grid run's: its grids' own, made again
        kept = scales.pop(name, None)
        if kept is not None and not torch.equal(kept, value):
            raise InputError(f"{ckpt}: the base's grid made from {model_dir_of(ckpt)} differs from the one the run "
                             f"trained on ({name}): the model directory changed since; resume needs the same base")
    check_shapes(ckpt, "learned scales", scales, {n: true_shape(p) for n, p in state.items() if is_learned_scale(n)})
    with torch.no_grad():
        for name, value in scales.items():
            state[name].copy_(value)
    lora.load(model, adapter_files.read_adapters(ckpt) or {}, ckpt)
