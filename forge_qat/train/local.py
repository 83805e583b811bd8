"""`LocalEngine`: the `forge_qat.train.engine.Engine` of one process on one device (CPU or one GPU).

Chosen by `forge_qat.train.trainer` when the run does not use DeepSpeed.
"""

import contextlib
from collections.abc import Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import torch

from forge_qat.formats import checkpoint as ckpt_io
from forge_qat.models import ModelSource, load_model


class LocalEngine:
    """Plain PyTorch on one device; autocast for mixed precision."""

    rank, local_rank, world_size, ranks_on_machine = 0, 0, 1, 1
    param_dtype = torch.float32
    state_includes_weights = False
    replicated = True

    def __init__(self, device: torch.device, precision: str, grad_accum: int, max_grad_norm: float):
        self.device, self.precision = device, precision
        self.grad_accum, self.max_grad_norm = grad_accum, max_grad_norm
        self._micro = 0

    def materialize(self, source: ModelSource) -> torch.nn.Module:
        return load_model(source.spec, seed=source.seed)[0].to(self.device)

    def gather(self, p: torch.nn.Parameter) -> AbstractContextManager:
        return contextlib.nullcontext()

    def unread_scales(self, p: torch.nn.Parameter, spec, init) -> None:
        return None  # every weight is read by `materialize`

    def wrap(self, model, optimizer, scheduler) -> torch.nn.Module:
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        return model

    def wrap_frozen(self, model: torch.nn.Module) -> torch.nn.Module:
        return model.to(self.device)

    def autocast(self) -> AbstractContextManager:
        if self.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.grad_accum).backward()

    def step(self) -> None:
        self._micro += 1
        if self._micro % self.grad_accum:
            return
        if self.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def mean(self, values: torch.Tensor) -> list[float]:
        return values.tolist()

    @contextlib.contextmanager
    def full_tensor(self, p: torch.nn.Parameter) -> Iterator[torch.Tensor]:
        yield p.detach()

    def checkpoint_names(self, model: torch.nn.Module, names: list[str]) -> list[str]:
        return names  # one process keeps the transformers modules as they are

    def checkpoint_tensors(self, model: torch.nn.Module, names: list[str], only=None) -> None:
        return None

    def set_full_tensor(self, p: torch.nn.Parameter, value: torch.Tensor) -> None:
        with torch.no_grad():
            p.copy_(value)

    def save_state(self, directory: Path, client_state: dict[str, Any]) -> None:
        state = {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(), **client_state}
        ckpt_io.save_trainer_state(directory, state)

    def load_state(self, directory: Path) -> dict[str, Any]:
        state = ckpt_io.load_trainer_state(directory)
        self.optimizer.load_state_dict(state.pop("optimizer"))
        self.scheduler.load_state_dict(state.pop("scheduler"))
        return state

    def barrier(self) -> None:
        pass

    def broadcast(self, obj: Any) -> Any:
        return obj

    def all_gather(self, obj: Any) -> list[Any]:
        return [obj]

    def close(self) -> None:
        pass
