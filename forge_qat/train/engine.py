"""The engine a trainer runs on: the low-level operations that differ between one process and DeepSpeed
ZeRO, and nothing of the product (no checkpoint format, no teacher, no finalize).

`Engine` is the protocol; `forge_qat.train.local.LocalEngine` runs one process on one device and
`forge_qat.distributed.zero.ZeroEngine` runs DeepSpeed. Chosen by `forge_qat.train.trainer`; model setup
(`model_setup`) and the checkpoint writer (`forge_qat.formats.checkpoint`) use them through the protocol only.
"""

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, Protocol

import torch

from forge_qat.formats.weights import tied_aliases
from forge_qat.models import ModelSource


class Engine(Protocol):
    rank: int
    local_rank: int
    """The rank's index on its machine: local rank 0 tokenizes the data for the machine."""
    world_size: int
    ranks_on_machine: int
    """The ranks on this rank's machine (what `--experts-offload host` shares one copy of the experts among)."""
    device: torch.device
    param_dtype: torch.dtype
    """The dtype `materialize` gives weights (under DeepSpeed mixed precision, bf16/fp16; autocast runs keep
    fp32 weights)."""
    state_includes_weights: bool
    replicated: bool
    """Whether every rank holds (and reads) the whole model, as one process does; else ranks hold partitions that
    rank 0 reads for them."""
    """Whether `save_state` / `load_state` carry the model weights too (else the checkpoint's HF files do)."""

    def materialize(self, source: ModelSource) -> torch.nn.Module:
        """A model holding `source`'s starting weights, placed as this engine trains it (collective)."""
    def gather(self, p: torch.nn.Parameter) -> AbstractContextManager:
        """Makes a partitioned parameter whole on every rank inside the context (collective)."""
    def unread_scales(self, p: torch.nn.Parameter, spec: Any, init: str) -> torch.Tensor | None:
        """The starting learned scales of a weight `materialize` left unread (expert parallelism reads a rank's
        experts after the wrap), chosen from the checkpoint as from the weight (collective); None for the
        others (`forge_qat.qat.prepare.LearnScales.unread`)."""
    def wrap(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any) -> torch.nn.Module:
        """Take over training of `model`; returns the module to run training forwards through."""
    def wrap_frozen(self, model: torch.nn.Module) -> torch.nn.Module:
        """A frozen model (a teacher) made ready for forwards only."""
    def autocast(self) -> AbstractContextManager: ...
    def backward(self, loss: torch.Tensor) -> None:
        """Back-propagate one micro-batch's loss (scaled by 1/grad_accum)."""
    def step(self) -> None:
        """End a micro-batch: the optimizer and the LR schedule step (after gradient clipping) once every
        grad_accum micro-batches, as DeepSpeed's engine does."""
    def mean(self, values: torch.Tensor) -> list[float]:
        """The means over ranks of a per-rank vector, read once on the host (collective)."""
    def full_tensor(self, p: torch.nn.Parameter) -> AbstractContextManager[torch.Tensor]:
        """The whole of `p` on every rank, as the optimizer holds it (fp32 masters where there are some;
        collective: every rank enters it for the same parameters in the same order)."""
    def checkpoint_names(self, model: torch.nn.Module, names: list[str]) -> list[str]:
        """What a checkpoint calls the model's state-dict `names`: the same, except where the engine rebuilt
        modules the checkpoint keeps in the transformers layout (expert parallelism)."""
    def checkpoint_tensors(self, model: torch.nn.Module, names: list[str],
                           only: Callable[[str], bool] | None) -> Iterator[tuple[str, torch.Tensor]] | None:
        """Whole tensors under `checkpoint_names` where the engine rebuilt modules (collective); None: the
        model's own serve, through `full_tensor`."""
    def set_full_tensor(self, p: torch.nn.Parameter, value: torch.Tensor) -> None:
        """Give a trained parameter a new whole value, in the model and in the optimizer's masters (collective:
        every rank passes the same `value`)."""
    def save_state(self, directory: Path, client_state: dict[str, Any]) -> None:
        """Write what `load_state` needs to continue (optimizer, schedule, `client_state`) into `directory`."""
    def load_state(self, directory: Path) -> dict[str, Any]:
        """Restore what `save_state` wrote; returns its `client_state`."""
    def barrier(self) -> None: ...
    def broadcast(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank."""
    def all_gather(self, obj: Any) -> list[Any]:
        """Every rank's `obj`, by rank."""
    def close(self) -> None: ...


def full_tensors(engine: Engine, model: torch.nn.Module,
                 only: Callable[[str], bool] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of `model`'s state dict (tied aliases once; `only`: those whose name it accepts, the
    same on every rank), one whole tensor at a time, as float32 on the CPU (collective: every rank iterates
    to the end; only what rank 0 receives is meant to be kept), under the engine's `checkpoint_names`."""
    params = dict(model.named_parameters())
    tied = tied_aliases(model)
    buffers = dict(model.named_buffers())
    names = [n for n in model.state_dict() if n not in tied]
    translated = engine.checkpoint_tensors(model, names, only)
    if translated is not None:
        yield from translated
        return
    for name in names:
        if only is not None and not only(name):
            continue
        if name in params:
            with engine.full_tensor(params[name]) as value:
                yield name, value.to("cpu", torch.float32, copy=True)
        else:
            yield name, buffers[name].detach().to("cpu", copy=True)
