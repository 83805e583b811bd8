"""Streaming finalize: convert a float checkpoint block by block, never holding the whole model.

Called by `forge_qat.finalize` for `--streaming` (and for large checkpoints by default). The model
skeleton is built on the meta device; then one block at a time (each decoder layer; embeddings,
final norm and head on their own) is materialised from the checkpoint, prepared and converted
through the registry exactly as the in-memory finalize does, handed to the shard writer (which
writes a shard whenever one is full), and freed. Blocks go in state-dict order, so the output is
byte-identical to the in-memory finalize's.
"""

import gc
import json
import logging
import math
import re
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from forge_qat.allocator import release_large_frees_to_os
from forge_qat.artifact import ShardWriter, tensor_bytes
from forge_qat.coverage import plan
from forge_qat.errors import ConversionError, InputError
from forge_qat.prepare import LearnScales, convert_qat, prepare_qat
from forge_qat.recipes import Recipe
from forge_qat.weights import TensorReader, tied_aliases, true_shape

log = logging.getLogger(__name__)


@dataclass
class Block:
    """Consecutive state-dict entries owned by one module (a decoder layer, the embedding, ...)."""

    prefix: str  # "model.layers.3." ; the owning module's qualified name plus "."
    names: list[str] = field(default_factory=list)

    @property
    def module_name(self) -> str:
        return self.prefix[:-1]


def _decoder_layers_prefix(model: torch.nn.Module) -> str | None:
    """The ModuleList holding most parameters: the stack of decoder layers."""
    best, best_count = None, 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList):
            count = sum(math.prod(true_shape(p)) for p in module.parameters())  # not a ZeRO-3 partition's size
            if count > best_count:
                best, best_count = name, count
    return best


def split_blocks(model: torch.nn.Module) -> list[Block]:
    """Blocks covering the (de-duplicated) state dict, in state-dict order."""
    layers = _decoder_layers_prefix(model)
    layer_re = re.compile(rf"^{re.escape(layers)}\.(\d+)\.") if layers else None
    tied = tied_aliases(model)
    blocks: list[Block] = []
    for name in model.state_dict():
        if name in tied:
            continue
        m = layer_re.match(name) if layer_re else None
        prefix = m.group(0) if m else name.rsplit(".", 1)[0] + "."
        if not blocks or blocks[-1].prefix != prefix:
            blocks.append(Block(prefix))
        blocks[-1].names.append(name)
    return blocks


@dataclass
class StreamStats:
    converted: list[str] = field(default_factory=list)
    float_bytes: int = 0
    quantized_bytes: int = 0
    quantized_numel: int = 0


def _materialise(model: torch.nn.Module, block: Block, reader: TensorReader,
                 device: torch.device) -> torch.nn.Module:
    module = model.get_submodule(block.module_name)
    module.to_empty(device=device, recurse=True)
    for local, p in module.named_parameters():
        full = block.prefix + local
        if full in block.names:
            reader.read_flat(full, 0, p.data.view(-1))
    for local, b in module.named_buffers():
        if block.prefix + local in block.names:
            reader.read_flat(block.prefix + local, 0, b.view(-1))
    return module


def _block_scales(learned: Mapping[str, torch.Tensor] | None, block: Block, parent_name: str) -> LearnScales | None:
    """The learned scales of one block, named as inside its holder (`<last>.self_attn.q_proj...`)."""
    if learned is None:
        return None
    strip = len(parent_name) + 1 if parent_name else 0
    return LearnScales(initial={k[strip:]: v for k, v in learned.items() if k.startswith(block.prefix)})


def convert_blocks(model: torch.nn.Module, blocks: list[Block], reader: TensorReader, recipe: Recipe,
                   stats: StreamStats, after_block=lambda: None, device: torch.device = torch.device("cpu"),
                   learned: Mapping[str, torch.Tensor] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (state-dict name, tensor) in state-dict order, one converted block at a time, converted on
    `device` (the recipe's convert device). `learned`: the checkpoint's learned weight scales, if any."""
    missing = sorted({n for b in blocks for n in b.names} - reader.keys())
    if missing:
        raise InputError(f"the checkpoint lacks {len(missing)} tensor(s) the model needs, e.g. {missing[:5]}")
    for block in blocks:
        module = _materialise(model, block, reader, device)
        float_params = list(module.parameters())
        # A holder gives the block its own last name, so the registry's layer rules (skip lm_head)
        # see the same names as in a whole-model prepare.
        parent_name, _, last = block.module_name.rpartition(".")
        holder = torch.nn.Module()
        holder.add_module(last, module)
        stats.float_bytes += sum(tensor_bytes(t) for k, t in module.state_dict().items()
                                 if block.prefix + k in block.names)
        block_converted: list[str] = []
        with torch.no_grad():
            block_plan = plan(holder, recipe)
            if block_plan.quantized:
                prepare_qat(holder, recipe, block_plan, learn=_block_scales(learned, block, parent_name))
                names = convert_qat(holder, recipe)
                block_converted = [f"{parent_name}.{n}" if parent_name else n for n in names]
        stats.converted += block_converted
        quantized = set(block_converted)
        converted = getattr(holder, last)
        state = converted.state_dict(prefix=block.prefix)
        for name in block.names:
            tensor = state.pop(name)
            if name in quantized:
                stats.quantized_numel += tensor.numel()
                stats.quantized_bytes += tensor_bytes(tensor)
            yield name, tensor
        # Free the block. Its float Parameters release their storage explicitly, since another
        # module may share one (a tied lm_head shares the embedding's); the converted module leaves
        # the skeleton, whose plan was made up front.
        for p in float_params:
            p.data = p.data.new_empty(0)
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, last, torch.nn.Module())
        # torchao's quantize handlers give each converted module an `extra_repr` bound to itself: a
        # reference cycle that keeps the block's tensors alive until the cyclic GC happens to reach it,
        # which a young-generation collection misses once the cycle has been promoted (peak memory then
        # grows with depth). Dropping the bound method frees the block by reference counting.
        for m in holder.modules():
            m.__dict__.pop("extra_repr", None)
        del holder, converted, state, module, float_params
        gc.collect(1)  # any other young cycles, at a fraction of a full collection's cost
        after_block()


def verify_shards(directory: Path, fmt: str, expected: list[str]) -> None:
    """Structural check of a written artifact without loading it: every tensor is there, every
    shard names the full tensor list, every quantized tensor has torchao metadata."""
    if fmt != "safetensors":
        return
    from forge_qat.weights import SafetensorsReader

    stored = SafetensorsReader.from_dir(directory).keys()
    for shard in sorted(directory.glob("*.safetensors")):
        with open(shard, "rb") as f:
            header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
        meta = header.get("__metadata__", {})
        if json.loads(meta.get("tensor_names", "[]")) != expected:
            raise ConversionError(f"{shard.name}: metadata does not list the artifact's tensors")
        for name in expected:
            if name in meta:
                entry = json.loads(meta[name])
                prefix = name.rsplit(".", 1)
                parts = [f"{prefix[0]}._{prefix[1]}_{d}" for d in entry.get("_tensor_data_names", [])]
                if parts and not all(p in stored for p in parts):
                    raise ConversionError(f"{name}: flattened tensors missing from the shards")
    unaccounted = [n for n in expected if n not in stored and not any(k.startswith(n.rsplit(".", 1)[0] + "._")
                                                                      for k in stored)]
    if unaccounted:
        raise ConversionError(f"tensors missing from the written shards: {unaccounted[:5]}")


def write_streamed(model: torch.nn.Module, reader: TensorReader, recipe: Recipe, directory: Path, fmt: str,
                   max_shard_bytes: int, device: torch.device = torch.device("cpu"),
                   learned: Mapping[str, torch.Tensor] | None = None) -> tuple[StreamStats, list[Path], int]:
    """Convert and write every block; returns the statistics, the shards and the bytes written."""
    trim = release_large_frees_to_os()
    stats = StreamStats()
    blocks = split_blocks(model)  # made once, on the intact skeleton
    names = [n for b in blocks for n in b.names]
    writer = ShardWriter(directory, fmt, names, max_shard_bytes)
    for name, tensor in convert_blocks(model, blocks, reader, recipe, stats, after_block=trim, device=device,
                                       learned=learned):
        writer.add(name, tensor)
    if not stats.converted:
        raise ConversionError("no weight was converted")
    shards = writer.close()
    verify_shards(directory, fmt, names)
    return stats, shards, writer.total_bytes


FullTensor = Callable[[torch.nn.Parameter], AbstractContextManager[torch.Tensor]]
"""Makes a parameter whole inside its context (an engine's `full_tensor`; under ZeRO-3 a collective)."""


class LiveModelReader:
    """A `TensorReader` over a live model being trained (`forge train --finalize` under ZeRO): the first read
    from a block makes that whole block whole through `full_tensor` (a collective the other ranks join in
    `follow_live_reads`), later reads are served from it. Only one block is held at a time.

    The other ranks gather every block in order, so this reader does too: blocks the conversion does not read
    (e.g. one holding only learned scales, which finalize takes from the checkpoint) are gathered and dropped
    on the way to the next one it reads, and by `finish` after the last. Reading an earlier block again would
    need a gather the others never join: that is an error, not a hang."""

    def __init__(self, model: torch.nn.Module, full_tensor: FullTensor):
        self.full_tensor = full_tensor
        self.params = dict(model.named_parameters())
        self.buffers = dict(model.named_buffers())
        self.blocks = split_blocks(model)
        self.block_of = {n: i for i, b in enumerate(self.blocks) for n in b.names}
        self._stash: dict[str, torch.Tensor] = {}
        self._next = 0  # the next block the collectives reach

    def _gather_until(self, index: int, keep_last: bool) -> None:
        for i in range(self._next, index + 1):
            kept = _gather_block(self.params, self.buffers, self.blocks[i].names, self.full_tensor,
                                 keep=keep_last and i == index)
        self._stash = kept if keep_last else {}
        self._next = index + 1

    def finish(self) -> None:
        """Join the gathers of the blocks after the last one read, as the other ranks do."""
        self._gather_until(len(self.blocks) - 1, keep_last=False)

    def keys(self) -> set[str]:
        return set(self.block_of)

    def shape(self, name: str) -> list[int]:
        p = self.params.get(name)
        return list(true_shape(p)) if p is not None else list(self.buffers[name].shape)

    def read_flat(self, name: str, start: int, out: torch.Tensor) -> None:
        if name not in self._stash:
            index = self.block_of[name]
            if index < self._next:
                raise ConversionError(f"internal: {name} was read after later blocks were gathered; the other ranks "
                                      f"gather each block once, in order")
            self._gather_until(index, keep_last=True)
        out.copy_(self._stash[name].reshape(-1)[start:start + out.numel()])


def _gather_block(params: dict, buffers: dict, names: list[str], full_tensor: FullTensor,
                  keep: bool) -> dict[str, torch.Tensor]:
    kept = {n: buffers[n] for n in names if n in buffers}
    for n in names:
        if n in params:
            with full_tensor(params[n]) as value:  # a collective: every rank enters it, keeping or not
                if keep:
                    kept[n] = value.to("cpu", torch.float32, copy=True)
    return kept


def follow_live_reads(model: torch.nn.Module, full_tensor: FullTensor) -> None:
    """What ranks other than 0 do while rank 0 reads a `LiveModelReader`: join each block's gather, in order."""
    params = dict(model.named_parameters())
    for block in split_blocks(model):
        _gather_block(params, {}, block.names, full_tensor, keep=False)
