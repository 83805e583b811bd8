"""The process group and the few collectives forge's engines issue themselves, without DeepSpeed: used by the ZeRO
engine (`forge_qat.distributed.zero`, which joins through DeepSpeed) and the data-parallel one
(`forge_qat.train.data_parallel`, which joins here).
"""

import os
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from forge_qat import hardware


def process_group_backend(cuda: bool) -> str:
    """One process group, a backend per device type: NCCL for CUDA tensors (the training collectives
    DeepSpeed or DistributedDataParallel issue), gloo for CPU tensors. NCCL alone has no CPU path ("no backend for
    device type cpu"), and forge's own collectives (the streamed load's sends, the loss mean, object broadcasts)
    must work whichever device a tensor is on. On CPU-only machines the mapping names gloo alone."""
    return "cpu:gloo,cuda:nccl" if cuda else "cpu:gloo"


def bind_device() -> torch.device:
    """This rank's device: under CUDA the GPU of its local rank, made current before the process group (NCCL binds
    each rank to its device); else the CPU."""
    if hardware.cuda_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def join(timeout_s: int) -> tuple[int, int]:
    """Join the job the launcher's environment describes (RANK, WORLD_SIZE, MASTER_ADDR, ...) with torch's own
    process group; returns (rank, world size)."""
    if not dist.is_initialized():
        dist.init_process_group(backend=process_group_backend(hardware.cuda_available()),
                                timeout=timedelta(seconds=timeout_s))
    return dist.get_rank(), dist.get_world_size()


def local_world_size() -> int:
    """Ranks on this machine (the launcher's LOCAL_WORLD_SIZE; torchrun and forge's launcher set it)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", dist.get_world_size() if dist.is_initialized() else 1))


def close() -> None:
    """Leave the job together and tear the process group down: exiting with gloo's communication threads still
    running aborts the process at interpreter shutdown ("terminate called without an active exception")."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def broadcast(obj: Any) -> Any:
    """Rank 0's `obj` on every rank."""
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather(obj: Any) -> list[Any]:
    seen = [None] * dist.get_world_size()
    dist.all_gather_object(seen, obj)
    return seen


def mean(values: torch.Tensor) -> list[float]:
    """The means over ranks of a per-rank vector, on the values' own device (NCCL for a CUDA tensor, gloo for a CPU
    one: `process_group_backend`)."""
    total = values.detach().to(torch.float64 if values.device.type == "cpu" else torch.float32)
    dist.all_reduce(total)
    return (total / dist.get_world_size()).tolist()


def barrier() -> None:
    dist.barrier()



class RankCollectives:
    """The engine protocol's collectives over torch's process group: a base of both multi-rank engines."""

    def barrier(self) -> None:
        barrier()

    def broadcast(self, obj: Any) -> Any:
        return broadcast(obj)

    def all_gather(self, obj: Any) -> list[Any]:
        return all_gather(obj)

    def mean(self, values: torch.Tensor) -> list[float]:
        return mean(values)
