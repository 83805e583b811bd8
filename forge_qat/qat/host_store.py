"""One host copy of the offloaded experts' grids per machine, shared by the machine's ranks (`--experts-offload host`
under `--nproc N`).

The machine's first rank makes the grids as one process does, then `publish` moves their codes and scales into one
file in shared memory (`/dev/shm`, RAM that counts once however many processes map it) and rebinds each grid's
tensors to views of that mapping; the machine's other ranks `attach` views of the same bytes and never read the
experts from the model directory. Once every rank has mapped the file its publisher unlinks it: the mappings live
until each process exits, so nothing is left behind, whatever way the job ends. A publisher killed between
creating and unlinking leaves its file, named after its process; the next publisher on the machine removes the
files of processes that are gone (`remove_stale`).

Reading only: every rank computes its own tokens against the shared codes (`forge_qat.qat.host_experts`), so the
file's pages are written once, by the publisher, before anyone maps them.

Called by `forge_qat.lora.grid_base.share_experts`, which binds the views to the experts modules.
"""

import math
import os
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch

from forge_qat import heap

DIRECTORY = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())
PREFIX = "forge-experts-"
ALIGN = 64
"""Each tensor starts at a multiple of this many bytes (every dtype's alignment, a cache line)."""


@dataclass(frozen=True, slots=True)
class Slot:
    """Where one tensor lies in the file: `key` names it (a grid's `<experts module>.<stack>.codes` or `.scale`)."""

    key: str
    offset: int
    shape: tuple[int, ...]
    dtype: str

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * getattr(torch, self.dtype).itemsize

    def view(self, mapping: torch.Tensor) -> torch.Tensor:
        return mapping[self.offset:self.offset + self.nbytes].view(getattr(torch, self.dtype)).view(self.shape)


def new_path() -> Path:
    """A file name no other job on the machine uses, carrying this process's id for `remove_stale`."""
    return DIRECTORY / f"{PREFIX}{os.getpid()}-{uuid.uuid4().hex[:12]}"


def remove_stale() -> list[Path]:
    """Remove the files of publishers that are gone (killed before they unlinked theirs); returns them."""
    removed = []
    for path in DIRECTORY.glob(f"{PREFIX}*"):
        pid = path.name[len(PREFIX):].split("-")[0]
        if pid.isdigit() and not _alive(int(pid)):
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _layout(tensors: dict[str, torch.Tensor]) -> list[Slot]:
    slots, offset = [], 0
    for key, t in tensors.items():
        slots.append(Slot(key, offset, tuple(t.shape), str(t.dtype).removeprefix("torch.")))
        offset += -(-t.numel() * t.element_size() // ALIGN) * ALIGN
    return slots


def _map(path: Path, slots: list[Slot]) -> torch.Tensor:
    size = max((s.offset + s.nbytes for s in slots), default=0)
    return torch.from_file(str(path), shared=True, size=size, dtype=torch.uint8)


def publish(tensors: dict[str, torch.Tensor], path: Path) -> tuple[list[Slot], dict[str, torch.Tensor]]:
    """Copy `tensors` (host tensors by key) into a new shared file at `path`; returns the layout and each tensor's
    view of the mapping, which replaces it (the caller drops the originals: their memory goes back)."""
    slots = _layout(tensors)
    mapping = _map(path, slots)
    views = {}
    for slot in slots:
        view = slot.view(mapping)
        view.copy_(tensors[slot.key])
        views[slot.key] = view
    return slots, views


def attach(path: Path, slots: list[Slot]) -> dict[str, torch.Tensor]:
    """Views of the tensors another process `publish`ed at `path`, by key."""
    mapping = _map(path, slots)
    views = {slot.key: slot.view(mapping) for slot in slots}
    heap.release_free_memory()
    return views

