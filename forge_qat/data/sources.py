"""Where training text comes from: a data spec resolved to files, split into shards, read as records.

Called by `forge_qat.data.build`: `resolve_source` once per run (what to read, and the fingerprint the
token cache is keyed by), `read_records` in the tokenizing workers. Every record carries a reference that
`describe` turns into `file:line` (JSON Lines) or `file row N` for error messages.

JSON Lines are read line by line from byte ranges rather than through `datasets.load_dataset("json")`:
that loader first copies the whole file into an Arrow cache (a second copy of the data set on disk, which
the tokenizing map then reads through a memory map, so resident memory grows with the data) and its
parse errors name neither the line nor the file. Parquet is read by row groups with pyarrow; a
`Dataset.save_to_disk` directory through `datasets` itself.
"""

import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from forge_qat.errors import InputError, choices_message

BUILTIN_PREFIX = "builtin:"
FILE_SUFFIXES = (".jsonl", ".json", ".parquet", ".txt")
SHARD_BYTES = 64 << 20
"""Target size of one JSON Lines or Parquet shard: small enough to balance the workers, large enough that
per-shard start-up costs nothing."""
ARROW_SHARD_ROWS = 100_000
_EVAL_EVERY = 10  # every 10th builtin document is held out for eval


def _python_docs(held_out: bool) -> list[str]:
    """The language reference topics that ship with every CPython (pydoc_data): real English text."""
    from pydoc_data.topics import topics

    names = sorted(topics)
    return [topics[n] for i, n in enumerate(names) if (i % _EVAL_EVERY == _EVAL_EVERY - 1) == held_out]


BUILTIN_CORPORA = {
    "python-docs": lambda: _python_docs(held_out=False),
    "python-docs-eval": lambda: _python_docs(held_out=True),
}


@dataclass(frozen=True, slots=True)
class Shard:
    """A part of one input that one worker reads: a byte range of a JSON Lines file, a range of Parquet row
    groups or `save_to_disk` rows, or a whole file / builtin corpus (stop = -1)."""

    kind: str  # "jsonl", "json", "parquet", "txt", "arrow" or "builtin"
    path: str
    start: int = 0
    stop: int = -1
    size: int = 0
    """Bytes of input this shard covers (about, for Parquet and saved datasets): for progress reports."""


@dataclass(frozen=True, slots=True)
class Source:
    spec: str
    label: str
    """A short readable name for the cache directory."""
    shards: tuple[Shard, ...]
    fingerprint: tuple
    """What identifies the content: each file's path, size and modification time, or a builtin's text hash."""
    num_bytes: int


def _file_identity(path: Path) -> tuple:
    st = path.stat()
    return str(path.resolve()), st.st_size, st.st_mtime_ns


def _jsonl_shards(path: Path, size: int) -> list[Shard]:
    """Byte ranges of about SHARD_BYTES, each starting at the beginning of a line."""
    bounds = [0]
    with path.open("rb") as f:
        while bounds[-1] + SHARD_BYTES < size:
            f.seek(bounds[-1] + SHARD_BYTES)
            f.readline()
            if f.tell() >= size:
                break
            bounds.append(f.tell())
    bounds.append(size)
    return [Shard("jsonl", str(path), a, b, b - a) for a, b in zip(bounds, bounds[1:], strict=False) if b > a]


def _parquet_shards(path: Path) -> list[Shard]:
    import pyarrow.parquet as pq

    try:
        meta = pq.ParquetFile(path).metadata
    except Exception as e:  # pyarrow raises ArrowInvalid, OSError, ... for a file that is not Parquet
        raise InputError(f"{path} is not a readable Parquet file ({str(e).splitlines()[0][:200]})") from None
    shards, first, acc, rows = [], 0, 0, 0
    per_row = path.stat().st_size / max(meta.num_rows, 1)
    for g in range(meta.num_row_groups):
        acc += meta.row_group(g).total_byte_size
        rows += meta.row_group(g).num_rows
        if acc >= SHARD_BYTES or g == meta.num_row_groups - 1:
            shards.append(Shard("parquet", str(path), first, g + 1, int(rows * per_row)))
            first, acc, rows = g + 1, 0, 0
    return shards


def _is_saved_dataset(path: Path) -> bool:
    return (path / "state.json").is_file() and (path / "dataset_info.json").is_file()


def _saved_dataset_shards(path: Path) -> tuple[list[Shard], tuple]:
    from datasets import Dataset

    try:
        rows = len(Dataset.load_from_disk(str(path)))
    except Exception as e:  # datasets raises FileNotFoundError, ArrowInvalid, ... for a broken directory
        raise InputError(f"{path} is not a readable Dataset.save_to_disk directory "
                         f"({str(e).splitlines()[0][:200]})") from None
    files = tuple(_file_identity(f) for f in sorted(path.iterdir()) if f.is_file())
    per_row = sum(f[1] for f in files) / max(rows, 1)
    shards = [Shard("arrow", str(path), a, b, int((b - a) * per_row))
              for a in range(0, rows, ARROW_SHARD_ROWS) for b in [min(a + ARROW_SHARD_ROWS, rows)]]
    return shards, files


def _file_shards(path: Path) -> list[Shard]:
    size = path.stat().st_size
    if path.suffix == ".jsonl":
        return _jsonl_shards(path, size)
    if path.suffix == ".parquet":
        return _parquet_shards(path)
    return [Shard(path.suffix[1:], str(path), size=size)]


def resolve_source(spec: str) -> Source:
    """The shards and fingerprint of a data spec: a builtin corpus, a file, a directory of files, or a
    `Dataset.save_to_disk` directory. Checks that everything exists; reads no records."""
    if spec.startswith(BUILTIN_PREFIX):
        name = spec.removeprefix(BUILTIN_PREFIX)
        if name not in BUILTIN_CORPORA:
            raise InputError(choices_message("builtin corpus", name, list(BUILTIN_CORPORA)))
        digest = hashlib.sha256("\0".join(BUILTIN_CORPORA[name]()).encode()).hexdigest()
        return Source(spec, name, (Shard("builtin", name),), ("builtin", name, digest), 0)
    path = Path(spec)
    if not path.exists():
        raise InputError(f"data {path} does not exist (give a {'/'.join(FILE_SUFFIXES)} file, a directory of them, "
                         f"a Dataset.save_to_disk directory, or "
                         f"{', '.join(BUILTIN_PREFIX + n for n in BUILTIN_CORPORA)})")
    if path.is_dir() and _is_saved_dataset(path):
        shards, identity = _saved_dataset_shards(path)
        return Source(spec, path.name, tuple(shards), identity, sum(i[1] for i in identity))
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in FILE_SUFFIXES)
        if not files:
            raise InputError(f"data directory {path} has no {', '.join(FILE_SUFFIXES)} files")
    elif path.suffix in FILE_SUFFIXES:
        files = [path]
    else:
        raise InputError(f"data file {path} has suffix {path.suffix!r}; forge reads {', '.join(FILE_SUFFIXES)} "
                         f"files, directories of them and Dataset.save_to_disk directories")
    identity = tuple(_file_identity(f) for f in files)
    shards = tuple(s for f in files for s in _file_shards(f))
    return Source(spec, path.stem or path.name, shards, identity, sum(i[1] for i in identity))


# ---- reading records (in the tokenizing workers) ---------------------------------------------------------


def describe(shard: Shard, ref: int) -> str:
    """Where a record is, for an error message: `file:line` for JSON Lines (`ref` is its byte offset),
    `file row N` (1-based) for Parquet, JSON arrays and saved datasets."""
    if shard.kind == "jsonl":
        with open(shard.path, "rb") as f:
            line = 1 + sum(chunk.count(b"\n") for chunk in _read_upto(f, ref))
        return f"{shard.path}:{line}"
    if shard.kind in ("txt", "builtin"):
        return shard.path
    return f"{shard.path} row {ref + 1}"


def _read_upto(f, end: int, block: int = 1 << 20) -> Iterator[bytes]:
    while end > 0:
        chunk = f.read(min(block, end))
        if not chunk:
            return
        end -= len(chunk)
        yield chunk


def read_records(shard: Shard) -> Iterator[tuple[int, object]]:
    """The records of one shard in file order, as (ref, record); `record` is what the file holds (a dict
    for well-formed data) and is validated by the encoder."""
    if shard.kind == "jsonl":
        yield from _jsonl_records(shard)
    elif shard.kind == "json":
        yield from _json_records(shard)
    elif shard.kind == "parquet":
        yield from _parquet_records(shard)
    elif shard.kind == "arrow":
        yield from _saved_dataset_records(shard)
    elif shard.kind == "txt":
        try:
            yield 0, {"text": Path(shard.path).read_text(encoding="utf-8")}
        except UnicodeDecodeError:
            raise InputError(f"{shard.path} is not UTF-8 text") from None
    else:
        yield from enumerate({"text": t} for t in BUILTIN_CORPORA[shard.path]())


def _jsonl_records(shard: Shard) -> Iterator[tuple[int, object]]:
    with open(shard.path, "rb") as f:
        f.seek(shard.start)
        pos = shard.start
        while pos < shard.stop:
            raw = f.readline()
            if not raw:
                break
            ref, pos = pos, pos + len(raw)
            if not raw.strip():
                continue
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise InputError(f"{describe(shard, ref)}: not UTF-8 text; JSON Lines files must be UTF-8") from None
            try:
                yield ref, json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(f"{describe(shard, ref)}: not valid JSON ({e.msg})") from None


def _json_records(shard: Shard) -> Iterator[tuple[int, object]]:
    """A .json file: one JSON array of records, read whole (use JSON Lines for large data), or JSON Lines."""
    with open(shard.path, "rb") as f:
        head = f.read(4096).lstrip()
    if not head.startswith(b"["):
        size = os.path.getsize(shard.path)
        yield from _jsonl_records(Shard("jsonl", shard.path, 0, size))
        return
    try:
        records = json.loads(Path(shard.path).read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{shard.path}: not a valid UTF-8 JSON array ({getattr(e, 'msg', e)})") from None
    yield from enumerate(records)


def _parquet_records(shard: Shard) -> Iterator[tuple[int, object]]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(shard.path)
    row = sum(pf.metadata.row_group(g).num_rows for g in range(shard.start))
    for batch in pf.iter_batches(batch_size=1024, row_groups=range(shard.start, shard.stop)):
        for record in batch.to_pylist():
            yield row, record
            row += 1


def _saved_dataset_records(shard: Shard) -> Iterator[tuple[int, object]]:
    from datasets import Dataset

    ds = Dataset.load_from_disk(shard.path)
    for start in range(shard.start, shard.stop, 1024):
        columns = ds[start:min(start + 1024, shard.stop)]  # {column: [values]}
        names = list(columns)
        for i, values in enumerate(zip(*columns.values(), strict=True)):
            yield start + i, dict(zip(names, values, strict=True))
