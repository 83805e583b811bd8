"""Finalize of a model still partitioned across ranks (`forge train --finalize` under ZeRO-3): the live model is
gathered to rank 0 one block at a time and converted by the streaming finalize; the other ranks join the gathers.

Called by the trainer at the end of a DeepSpeed run.
"""

from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path

import torch

from forge_qat.errors import ConversionError
from forge_qat.finalize.blocks import split_blocks
from forge_qat.finalize.job import FinalizeRequest, choose_job
from forge_qat.finalize.streaming import finalize_streaming
from forge_qat.formats.weights import true_shape
from forge_qat.qat.registry import Recipe

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


def finalize_live(model: torch.nn.Module, checkpoint: Path, recipe: Recipe, dest: Path, full_tensor: FullTensor, *,
                  main: bool) -> Path | None:
    """Collective: the artifact equals a streaming finalize of the saved `checkpoint`, whose config, tokenizer and
    metadata it uses. Returns the artifact on rank 0."""
    if not main:
        follow_live_reads(model, full_tensor)
        return None
    req = FinalizeRequest(source=checkpoint, dest=dest, qat_convert=recipe, overwrite=True)
    reader = LiveModelReader(model, full_tensor)
    artifact = finalize_streaming(choose_job(req), req, reader).dest
    reader.finish()
    return artifact
