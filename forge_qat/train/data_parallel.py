"""`DataParallelEngine`: the `forge_qat.train.engine.Engine` of a LoRA run on N ranks without DeepSpeed
(`forge train --nproc N --lora-rank R`): every rank holds the whole frozen model, in its grid where the run holds
it there (`--lora-base-grid`), and trains the same adapters on its slice of each batch; torch's
DistributedDataParallel averages the adapters' gradients.

For LoRA that is what ZeRO would mostly be overhead for: the trained parameters and their optimizer state are a few
percent of the model, and the frozen base in its grid is 0.28x of bf16 (the grid does not run under ZeRO-3, whose
partitions are float Parameters). With `--experts-offload host` the ranks of a machine share one host copy of the
experts (`forge_qat.lora.grid_base.share_experts`). Full training of every weight keeps ZeRO (`--zero-stage`).

DDP is told to synchronise only the adapters (every other parameter and buffer is on its ignore list, so neither
its start nor a forward broadcasts them): the frozen weights, the grids (buffers) and their placeholders are the
same on every rank by construction (each rank reads the same model directory; the adapters are drawn from
per-layer seeds), and broadcasting them would write the grids' placeholders out at full size. Gradient
accumulation skips the all-reduce on all but the last micro-batch of a step (`require_backward_grad_sync`, what
DDP's `no_sync` sets, read by DDP's forward).

Chosen by `forge_qat.train.trainer` for `--nproc N` without DeepSpeed.
"""

import os
from pathlib import Path
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel

from forge_qat.distributed import collectives
from forge_qat.train.local import LocalEngine


class DataParallelEngine(collectives.RankCollectives, LocalEngine):
    """LocalEngine on every rank, the adapters' gradients averaged by DDP."""

    def __init__(self, timeout_s: int, precision: str, grad_accum: int, max_grad_norm: float):
        device = collectives.bind_device()
        super().__init__(device, precision, grad_accum, max_grad_norm)
        self.rank, self.world_size = collectives.join(timeout_s)
        self.local_rank = int(os.environ.get("LOCAL_RANK", self.rank))
        self.ranks_on_machine = collectives.local_world_size()

    def wrap(self, model, optimizer, scheduler) -> torch.nn.Module:
        super().wrap(model, optimizer, scheduler)
        fixed = [name for name, p in model.named_parameters() if not p.requires_grad]
        fixed += [name for name, _ in model.named_buffers()]
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, fixed)
        devices = [self.device.index] if self.device.type == "cuda" else None
        self.ddp = DistributedDataParallel(model, device_ids=devices, forward_sync_buffers=False)
        self._sync_on_last_micro_batch()
        return self.ddp

    def _sync_on_last_micro_batch(self) -> None:
        self.ddp.require_backward_grad_sync = (self._micro + 1) % self.grad_accum == 0

    def step(self) -> None:
        super().step()
        self._sync_on_last_micro_batch()

    def save_state(self, directory: Path, client_state: dict[str, Any]) -> None:
        if self.rank == 0:  # the optimizer and schedule are the same on every rank
            super().save_state(directory, client_state)

    def close(self) -> None:
        collectives.close()

