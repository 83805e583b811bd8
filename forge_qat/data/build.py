"""Building the token cache: each data set tokenized once, in worker processes, into Arrow files shared by
every process and run on the machine.

Called by `forge_qat.data.store.open_token_store` (for `forge train`, `forge eval`, `forge data`). The
cache directory of a data set is named by a hash of what determines its tokens: the data files with
their sizes and modification times, the tokenizer, the chat options. Sequence length is not part of it;
packing happens on read. The first process to take the cache's file lock tokenizes, in worker processes,
into a temporary directory renamed into place when complete; the others wait on the lock and
memory-map the result. A build killed halfway leaves only a temporary, which the next builder removes.
"""

import hashlib
import json
import logging
import os
import selectors
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from forge_qat.data.encode import ChatOptions, Encoder
from forge_qat.data.sources import Shard, Source, resolve_source
from forge_qat.data.worker import ShardResult, encode_shard, write_job
from forge_qat.errors import ForgeError, InputError

log = logging.getLogger(__name__)

STORE_VERSION = 1
"""Part of every cache key: bump it when the encoding of records changes."""
STORE_META = "store.json"
DEFER_S = 30.0
"""How long a process that is not its machine's first rank waits for that rank to start tokenizing."""

Progress = Callable[[str, int, int], None]
"""progress(label, bytes done, bytes in all), called as shards finish tokenizing."""


def default_cache_dir() -> Path:
    if env := os.environ.get("FORGE_DATA_CACHE"):
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "forge_qat" / "tokens"


def default_workers() -> int:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(cores, 32))


@dataclass(frozen=True, kw_only=True, slots=True)
class DataOptions:
    cache_dir: Path = field(default_factory=default_cache_dir)
    workers: int = field(default_factory=default_workers)
    """Tokenizing processes (at most one per shard; one shard is tokenized in-process)."""
    chat: ChatOptions = ChatOptions()
    defer: bool = False
    """Let another process of this machine build the cache first (ranks other than local rank 0)."""
    progress: Progress | None = None


def tokenizer_fingerprint(tok) -> str:
    """A hash of everything in a tokenizer that decides token ids: its serialized model, normalizer and
    added tokens (fast tokenizers), its chat template and special tokens."""
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is not None:
        core = backend.to_str()
    else:
        from datasets.fingerprint import Hasher

        core = Hasher.hash(tok)
    parts = [type(tok).__name__, core, tok.get_chat_template() if tok.chat_template else "",
             json.dumps(tok.special_tokens_map, sort_keys=True, default=str), str(tok.eos_token_id)]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()


def cache_key(source: Source, tok, chat: ChatOptions) -> str:
    described = [STORE_VERSION, source.fingerprint, tokenizer_fingerprint(tok), chat.column, chat.loss]
    return hashlib.sha256(json.dumps(described, default=str).encode()).hexdigest()


# ---- building the cache (tokenizing worker processes) ---------------------------------------------------


def _tokenize(source: Source, tok, options: DataOptions, out_dir: Path) -> list[ShardResult]:
    """Tokenize every shard into `out_dir`: in this process, or in `options.workers` worker processes
    (`forge_qat.data.worker`) when there are several shards.

    Not `datasets.Dataset.map(num_proc=...)`: map needs the raw records as an Arrow dataset first (for
    JSON Lines, a full second copy of the data on disk, then read through a memory map), and an
    exception in one of its workers comes back only as traceback text inside a DatasetGenerationError,
    so a bad record could not be reported in one line. Here each shard becomes one Arrow file, which
    `datasets` then memory-maps, and a worker's error arrives as its one-line message."""
    shards = list(enumerate(source.shards))
    total, done = sum(s.size for _, s in shards), 0
    report = options.progress if options.progress and total else lambda *_: None
    workers = min(options.workers, len(shards))
    if workers <= 1:
        encoder = Encoder(tok, options.chat)
        results = []
        for i, shard in shards:
            results.append(encode_shard(i, shard, out_dir, encoder))
            done += results[-1].bytes
            report(source.label, done, total)
        return results
    results = []
    for result in _run_workers([shards[k::workers] for k in range(workers)], tok, options, out_dir):
        results.append(result)
        done += result.bytes
        report(source.label, done, total)
    return sorted(results, key=lambda r: r.index)  # shard order: the store's documents in file order


def _run_workers(groups: list[list[tuple[int, Shard]]], tok, options: DataOptions, out_dir: Path):
    """Yield each shard's result as the worker processes finish them; stop them all at the first error."""
    with tempfile.TemporaryDirectory(prefix="forge-tokenize-") as jobs:
        procs = []
        env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}  # the worker processes are the parallelism
        try:
            tok.save_pretrained(Path(jobs) / "tokenizer")
            for k, group in enumerate(groups):
                job, errors = Path(jobs) / f"job-{k}.json", Path(jobs) / f"stderr-{k}.txt"
                write_job(job, tok, Path(jobs) / "tokenizer", options.chat, group, out_dir)
                with errors.open("w") as stderr:
                    procs.append(subprocess.Popen([sys.executable, "-m", "forge_qat.data.worker", str(job)],
                                                  stdout=subprocess.PIPE, stderr=stderr, text=True, env=env))
            with selectors.DefaultSelector() as selector:
                for k, p in enumerate(procs):
                    selector.register(p.stdout, selectors.EVENT_READ, k)
                while selector.get_map():
                    for key, _ in selector.select():
                        line = key.fileobj.readline()
                        if not line:
                            selector.unregister(key.fileobj)
                            continue
                        message = json.loads(line)
                        if "error" in message:
                            raise (InputError if message["type"] == "InputError" else ForgeError)(message["error"])
                        yield ShardResult(**message)
            for k, p in enumerate(procs):
                if p.wait() != 0:
                    tail = (Path(jobs) / f"stderr-{k}.txt").read_text(errors="replace").strip().splitlines()[-3:]
                    raise ForgeError(f"a tokenizing worker process failed (exit code {p.returncode}; killed, or out "
                                     f"of memory? lower --data-workers): {' | '.join(tail) or 'no output'}")
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                p.wait()
                p.stdout.close()


def _build(source: Source, tok, options: DataOptions, key: str, final: Path) -> None:
    from forge_qat.formats.atomic import atomic_dir

    with atomic_dir(final) as tmp:  # the cache appears complete or not at all
        t0 = time.perf_counter()
        log.info("tokenizing %s (%d shard(s), %.1f MB) with %d process(es) into %s", source.spec,
                 len(source.shards), source.num_bytes / 1e6, min(options.workers, len(source.shards)), final)
        results = _tokenize(source, tok, options, tmp)
        meta = {"version": STORE_VERSION, "key": key, "spec": source.spec, "source": source.fingerprint,
                "chat": {"column": options.chat.column, "loss": options.chat.loss},
                "files": [r.file for r in results if r.file],
                "sizes": {r.file: (tmp / r.file).stat().st_size for r in results if r.file},
                "documents": sum(r.documents for r in results), "tokens": sum(r.tokens for r in results),
                "learned_tokens": sum(r.learned for r in results), "seconds": round(time.perf_counter() - t0, 2)}
        (tmp / STORE_META).write_text(json.dumps(meta, indent=1))
    log.info("tokenized %s: %d documents, %d tokens in %.1f s", source.spec, meta["documents"], meta["tokens"],
             meta["seconds"])


def cache_damage(directory: Path) -> str | None:
    """What is wrong with a complete-looking token cache (its files deleted, truncated or edited after it was
    built), or None. Caches record each file's size; older ones are opened to find out."""
    from datasets import Dataset

    try:
        meta = json.loads((directory / STORE_META).read_text())
        files = meta["files"]
        assert isinstance(files, list) and isinstance(meta["key"], str)
    except (OSError, ValueError, KeyError, TypeError, AssertionError):
        return f"its {STORE_META} is missing or unreadable"
    sizes = meta.get("sizes") if isinstance(meta.get("sizes"), dict) else None
    for name in files:
        path = directory / str(name)
        if not path.is_file():
            return f"{name} is missing"
        if sizes is not None:
            if path.stat().st_size != sizes.get(name):
                return f"{name} has {path.stat().st_size} bytes where {sizes.get(name)} were written"
            continue
        try:
            Dataset.from_file(str(path))
        except Exception as e:  # Arrow's own errors for a file it cannot map (ArrowInvalid, OSError, ...)
            return f"{name} cannot be read ({type(e).__name__})"
    return None


def _remove_temporaries(final: Path) -> None:
    """Called holding the cache's lock: any temporary of this cache belongs to a builder that died."""
    for stale in final.parent.glob(f".{final.name}.tmp-*"):
        log.info("removing %s, left by an interrupted tokenization", stale)
        shutil.rmtree(stale, ignore_errors=True)


def ensure_cache(spec: str, tok, options: DataOptions) -> tuple[Path, bool]:
    """The cache directory of `spec`, built unless a complete one exists; and whether this call built it."""
    from filelock import FileLock, Timeout

    source = resolve_source(spec)
    key = cache_key(source, tok, options.chat)
    try:
        options.cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(f"cannot create the data cache directory {options.cache_dir}: {e.strerror}") from None
    final = options.cache_dir / f"{source.label[:40]}-{key[:16]}"
    lock = FileLock(str(final) + ".lock")
    deadline = time.monotonic() + (DEFER_S if options.defer else 0.0)
    announced = False
    while True:
        try:
            lock.acquire(timeout=0)
        except Timeout:
            if not announced:
                log.info("waiting for another process to finish tokenizing %s (%s)", spec, lock.lock_file)
                announced = True
            lock.acquire()  # blocks until that process is done (or dies, which releases the lock)
        try:
            if final.exists():
                damage = cache_damage(final)
                if damage is None:
                    return final, False
                log.warning("the token cache %s is damaged (%s): tokenizing %s again", final, damage, spec)
                shutil.rmtree(final, ignore_errors=True)
                deadline = time.monotonic()  # rebuilt now, by this process
            if time.monotonic() >= deadline:
                _remove_temporaries(final)
                _build(source, tok, options, key, final)
                return final, True
        finally:
            lock.release()
        time.sleep(0.2)  # give this machine's first rank the chance to take the lock and build



