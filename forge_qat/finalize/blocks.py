"""Block-by-block conversion: a model's tensors split into blocks, each materialised from a reader, prepared,
converted and handed to the shard writer, then freed; never the whole model at once.

Called by the streaming finalize (`forge_qat.finalize.streaming`) and the live one (`forge_qat.finalize.live`).
The model skeleton is built on the meta device; then one block at a time (each decoder layer; embeddings,
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
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from forge_qat.errors import ConversionError, InputError
from forge_qat.finalize.allocator import release_large_frees_to_os
from forge_qat.formats.artifact import ShardWriter, tensor_bytes
from forge_qat.formats.weights import TensorReader, tied_aliases, true_shape
from forge_qat.qat.convert import convert_qat
from forge_qat.qat.coverage import plan
from forge_qat.qat.prepare import LearnScales, prepare_qat
from forge_qat.qat.registry import Recipe

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


def _block_scales(learn: LearnScales | None, block: Block, parent_name: str) -> LearnScales | None:
    """One block's share of `learn`: its learned scales, named as inside its holder (`<last>.self_attn.q_proj...`),
    or the rule that chooses them from the block's weights."""
    if learn is None or learn.initial is None:
        return learn
    strip = len(parent_name) + 1 if parent_name else 0
    return replace(learn, initial={k[strip:]: v for k, v in learn.initial.items() if k.startswith(block.prefix)})


def convert_blocks(model: torch.nn.Module, blocks: list[Block], reader: TensorReader, recipe: Recipe,
                   stats: StreamStats, after_block=lambda: None, device: torch.device = torch.device("cpu"),
                   learn: LearnScales | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (state-dict name, tensor) in state-dict order, one converted block at a time, converted on
    `device` (the recipe's convert device). `learn`: the weight scales to convert with (the checkpoint's learned
    ones, or the rule choosing them; `forge_qat.finalize.job.ConvertJob.learn_scales`); None: the recipe's."""
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
        block_converted: list[str] = []
        with torch.no_grad():
            block_plan = plan(holder, recipe)
            if block_plan.quantized:
                prepare_qat(holder, recipe, block_plan, learn=_block_scales(learn, block, parent_name))
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
    from forge_qat.formats.weights import SafetensorsReader

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
                   learn: LearnScales | None = None) -> tuple[StreamStats, list[Path], int]:
    """Convert and write every block; returns the statistics, the shards and the bytes written."""
    trim = release_large_frees_to_os()
    stats = StreamStats()
    blocks = split_blocks(model)  # made once, on the intact skeleton
    names = [n for b in blocks for n in b.names]
    writer = ShardWriter(directory, fmt, names, max_shard_bytes)
    for name, tensor in convert_blocks(model, blocks, reader, recipe, stats, after_block=trim, device=device,
                                       learn=learn):
        check_finite(name, tensor)
        writer.add(name, tensor)
    if not stats.converted:
        raise ConversionError("no weight was converted")
    shards = writer.close()
    verify_shards(directory, fmt, names)
    return stats, shards, writer.total_bytes


def check_finite(name: str, tensor: torch.Tensor) -> None:
    """Refuse to write a tensor holding NaN or inf (for a torchao tensor, in any of its float components: scales,
    zero points): an artifact is renamed into place only when every value in it is a number."""
    if hasattr(tensor, "__tensor_flatten__"):
        parts = [getattr(tensor, attr) for attr in tensor.__tensor_flatten__()[0]]
    else:
        parts = [tensor]
    for part in parts:
        if isinstance(part, torch.Tensor) and part.is_floating_point() and not bool(part.isfinite().all()):
            raise ConversionError(f"{name} converted to non-finite values (NaN or inf): the checkpoint's weights, "
                                  f"learned scales or adapters hold them; nothing was written")
