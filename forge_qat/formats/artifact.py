"""Write a quantized model as a Hugging Face artifact, shard by shard, as tensors arrive.

Called by finalize. Safetensors where torchao can flatten every tensor subclass, `.bin` otherwise;
shards are written when full (so a streaming caller never holds more than one shard) and named and
indexed the way `transformers` loads them. Stock `from_pretrained` reads the result through its
torchao quantizer, which needs two things we reproduce from `save_pretrained`: every shard's
metadata carries the full `tensor_names` list (transformers merges shard metadata with dict.update),
and `config.json` carries a `TorchAoConfig` as `quantization_config`.
"""

import errno
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from torchao.utils import TorchAOBaseTensor

from forge_qat.errors import ConfigError, InputError
from forge_qat.formats import q4_k_blocks
from forge_qat.formats.weights import SafetensorsReader
from forge_qat.heap import release_free_memory
from forge_qat.torchao_compat import ALLOWED_TENSORS_SUBCLASSES, flatten_tensor_state_dict

Format = Literal["auto", "safetensors", "bin"]
FORMATS = ("auto", "safetensors", "bin")
DEFAULT_MAX_SHARD_BYTES = 2 * 1024**3


def unflattenable(tensors: dict[str, torch.Tensor]) -> list[str]:
    """Names of tensors whose subclass torchao's safetensors support cannot flatten."""
    return [name for name, t in tensors.items()
            if isinstance(t, TorchAOBaseTensor) and type(t).__name__ not in ALLOWED_TENSORS_SUBCLASSES]


def choose_format(requested: Format, recipe_safetensors: bool, blockers: list[str]) -> tuple[str, str]:
    """(format, reason). An explicit safetensors request that cannot be honoured is an error."""
    if requested not in FORMATS:
        raise ConfigError(f"unknown format {requested!r}; valid formats: {', '.join(FORMATS)}")
    why_not = ""
    if not recipe_safetensors:
        why_not = "the recipe's converted tensors are not among torchao's safetensors-flattenable subclasses"
    elif blockers:
        why_not = f"torchao cannot flatten {len(blockers)} tensor(s) for safetensors, e.g. {blockers[0]}"
    if requested == "safetensors" and why_not:
        raise ConfigError(f"--format safetensors is not possible: {why_not}; use --format bin or auto")
    if requested == "bin":
        return "bin", "requested with --format bin"
    if why_not:
        return "bin", why_not
    return "safetensors", "torchao flattens every quantized tensor"


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes a tensor occupies, counting the inner tensors of torchao subclasses."""
    if isinstance(t, TorchAOBaseTensor):
        names = list(t.tensor_data_names) + list(getattr(t, "optional_tensor_data_names", None) or [])
        return sum(tensor_bytes(getattr(t, n)) for n in names if getattr(t, n, None) is not None)
    return t.numel() * t.element_size()


@dataclass
class ShardWriter:
    """Accumulates tensors and writes a shard whenever `max_shard_bytes` would be exceeded."""

    directory: Path
    fmt: Literal["safetensors", "bin"]
    tensor_names: list[str]
    """Every tensor name the artifact will hold, known up front (the loader needs it in each shard)."""
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES
    _pending: dict[str, torch.Tensor] = field(default_factory=dict)
    _pending_bytes: int = 0
    _shards: list[tuple[Path, list[str]]] = field(default_factory=list)
    total_bytes: int = 0

    def __post_init__(self) -> None:
        self._announced = set(self.tensor_names)

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name not in self._announced:
            raise ValueError(f"{name} was not announced to the writer")
        size = tensor_bytes(tensor)
        if self._pending and self._pending_bytes + size > self.max_shard_bytes:
            self.flush()
        self._pending[name] = tensor.detach().contiguous() if not isinstance(tensor, TorchAOBaseTensor) else tensor
        self._pending_bytes += size

    def flush(self) -> None:
        if not self._pending:
            return
        path = self.directory / f".shard-{len(self._shards):05d}.{self.fmt}"
        if self.fmt == "safetensors":
            tensors, metadata = flatten_tensor_state_dict(self._pending)
            tensors = {k: v.to("cpu") for k, v in tensors.items()}  # flattened: plain tensors, any device
            metadata["tensor_names"] = json.dumps(self.tensor_names)
            metadata["format"] = "pt"
            _save_safetensors(tensors, path, metadata)
            keys = list(tensors)
        else:
            torch.save(self._pending, path)
            keys = list(self._pending)
        self._shards.append((path, keys))
        self.total_bytes += path.stat().st_size
        self._pending, self._pending_bytes = {}, 0
        release_free_memory()

    def close(self) -> list[Path]:
        """Write the last shard, give shards their final names and write the index if sharded."""
        self.flush()
        stem, ext = ("model", "safetensors") if self.fmt == "safetensors" else ("pytorch_model", "bin")
        n = len(self._shards)
        final = [self.directory / (f"{stem}.{ext}" if n == 1 else f"{stem}-{i + 1:05d}-of-{n:05d}.{ext}")
                 for i in range(n)]
        for (tmp, _), dst in zip(self._shards, final, strict=True):
            os.replace(tmp, dst)
        if n > 1:
            index = {"metadata": {"total_size": self.total_bytes},
                     "weight_map": {k: dst.name for (_, keys), dst in zip(self._shards, final, strict=True)
                                    for k in keys}}
            (self.directory / f"{stem}.{ext}.index.json").write_text(json.dumps(index, indent=2))
        return final


def _save_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """safetensors' writer reports a failed write (a full disk) as its own SafetensorError; raised here as the
    OSError it is, naming the file, so every writer of an output turns it into one line the same way."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    try:
        save_file(tensors, path, metadata=metadata)
    except SafetensorError as e:
        code = re.search(r"code: (\d+)", str(e))
        number = int(code.group(1)) if code else errno.EIO
        raise OSError(number, os.strerror(number), str(path)) from None


# ---- reading an artifact's tensors ------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Entry:
    """One weight of the artifact: plain, or a torchao tensor flattened into `<module>._weight_<part>`."""

    name: str
    kind: str
    """`Tensor`, or the torchao class name (`IntxUnpackedToInt8Tensor`, `Int8Tensor`)."""
    info: dict


class ArtifactReader:
    """A forge artifact's tensors, one at a time, from its safetensors shards (plain file I/O): each weight as
    torchao flattened it (`Entry`), read by the exporters (GGUF, compressed-tensors)."""

    def __init__(self, directory: Path):
        self.directory = directory
        files = sorted(directory.glob("*.safetensors"))
        if not files:
            raise InputError(f"{directory} has no safetensors shards; export reads safetensors artifacts "
                             f"(finalize with --format safetensors)")
        self.reader = SafetensorsReader(files)  # checks every shard's header
        with open(files[0], "rb") as f:
            meta = json.loads(f.read(int.from_bytes(f.read(8), "little"))).get("__metadata__", {})
        try:
            names = json.loads(meta["tensor_names"])
            self.entries = [Entry(n, *self._kind(meta.get(n))) for n in names]
        except (KeyError, ValueError, TypeError, AttributeError, RecursionError):
            raise InputError(f"{files[0]} lacks forge's tensor list (or it is damaged); is {directory} a forge "
                             f"artifact?") from None

    def q4_k_names(self) -> set[str]:
        """The weights stored as values with their Q4_K blocks beside them (`forge_qat.formats.q4_k_blocks`)."""
        return q4_k_blocks.names(self.directory)

    def q4_k(self, name: str) -> dict[str, torch.Tensor]:
        """One weight's Q4_K block parts (`forge_qat.formats.q4_k_blocks.read`)."""
        return q4_k_blocks.read(self.directory, name)

    @staticmethod
    def _kind(text: str | None) -> tuple[str, dict]:
        info = json.loads(text) if text else {"_type": "Tensor"}
        return info.get("_type", "Tensor"), info

    @staticmethod
    def key(entry: Entry, part: str) -> str:
        """Where torchao's flattening stores one part (`qdata`, `scale`, `zero_point`) of a quantized tensor."""
        module, _, param = entry.name.rpartition(".")
        return f"{module}._{param}_{part}"

    def part(self, entry: Entry, part: str) -> torch.Tensor:
        return self.read(self.key(entry, part))

    def part_of(self, entry: Entry, part: str, index: int) -> torch.Tensor:
        """`part` of one slice along the first dimension (one expert of a stack), read alone."""
        key = self.key(entry, part)
        shape = self.reader.shape(key)
        out = torch.empty(shape[1:], dtype=self.reader.dtype(key))
        self.reader.read_flat(key, index * out.numel(), out.view(-1))
        return out

    def read(self, key: str) -> torch.Tensor:
        out = torch.empty(self.reader.shape(key), dtype=self.reader.dtype(key))
        self.reader.read_flat(key, 0, out.view(-1))
        return out

    def shape(self, entry: Entry) -> list[int]:
        return self.reader.shape(entry.name if entry.kind == "Tensor" else self.key(entry, "qdata"))
