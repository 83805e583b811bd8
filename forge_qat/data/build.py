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
import multiprocessing
import os
import shutil
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import pyarrow as pa

from forge_qat.data.encode import ChatOptions, Encoder
from forge_qat.data.sources import Shard, Source, describe, read_records, resolve_source
from forge_qat.errors import ForgeError, InputError

log = logging.getLogger(__name__)

STORE_VERSION = 1
"""Part of every cache key: bump it when the encoding of records changes."""
STORE_META = "store.json"
RECORDS_PER_BATCH = 1000
DEFER_S = 30.0
"""How long a process that is not its machine's first rank waits for that rank to start tokenizing."""
SCHEMA = pa.schema([("input_ids", pa.list_(pa.int32())), ("loss_mask", pa.list_(pa.uint8()))])

Progress = Callable[[str, int, int], None]
"""progress(label, bytes done, bytes in all), called as shards finish tokenizing."""


def default_cache_dir() -> Path:
    if env := os.environ.get("FORGE_DATA_CACHE"):
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "forge_qat" / "tokens"


def default_workers() -> int:
    return max(1, min(len(os.sched_getaffinity(0)), 32))


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

_worker_encoder: Encoder | None = None


def _init_worker(tok, chat: ChatOptions) -> None:
    global _worker_encoder
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the workers are the parallelism
    _worker_encoder = Encoder(tok, chat)


@dataclass(frozen=True, slots=True)
class ShardResult:
    file: str | None
    documents: int
    tokens: int
    learned: int
    bytes: int


def _encode_shard(index: int, shard: Shard, out_dir: Path, encoder: Encoder | None = None) -> ShardResult:
    """Tokenize one shard into `tokens-INDEX.arrow` (an Arrow IPC stream, one record batch per
    RECORDS_PER_BATCH documents)."""
    encoder = encoder or _worker_encoder
    name = f"tokens-{index:05d}.arrow"
    documents = tokens = learned = 0
    with pa.OSFile(str(out_dir / name), "wb") as sink, pa.ipc.new_stream(sink, SCHEMA) as writer:
        def flush(batch):
            nonlocal documents, tokens, learned
            ids, masks = encoder.encode(batch)
            writer.write_batch(pa.record_batch([pa.array(ids, SCHEMA.field(0).type),
                                                pa.array(masks, SCHEMA.field(1).type)], schema=SCHEMA))
            documents += len(ids)
            tokens += sum(map(len, ids))
            learned += sum(map(sum, masks))

        batch = []
        for ref, record in read_records(shard):
            batch.append((partial(describe, shard, ref), record))
            if len(batch) == RECORDS_PER_BATCH:
                flush(batch)
                batch = []
        if batch:
            flush(batch)
    if documents == 0:
        (out_dir / name).unlink()
        return ShardResult(None, 0, 0, 0, shard.size)
    return ShardResult(name, documents, tokens, learned, shard.size)


def _tokenize(source: Source, tok, options: DataOptions, out_dir: Path) -> list[ShardResult]:
    shards = list(enumerate(source.shards))
    total, done = sum(s.size for _, s in shards), 0
    report = options.progress if options.progress and total else lambda *_: None
    workers = min(options.workers, len(shards))
    if workers <= 1:
        encoder = Encoder(tok, options.chat)
        results = []
        for i, shard in shards:
            results.append(_encode_shard(i, shard, out_dir, encoder))
            done += results[-1].bytes
            report(source.label, done, total)
        return results
    # Spawned, not forked: the parent may hold CUDA contexts and communication threads.
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_init_worker, initargs=(tok, options.chat))
    try:
        futures = [pool.submit(_encode_shard, i, shard, out_dir) for i, shard in shards]
        results = []
        for f in futures:  # in shard order, so the store's document order is the files' order
            results.append(f.result())
            done += results[-1].bytes
            report(source.label, done, total)
        return results
    except BrokenProcessPool:
        raise ForgeError("a tokenizing worker process died (killed, or out of memory: lower --data-workers)") from None
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _build(source: Source, tok, options: DataOptions, key: str, final: Path) -> None:
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    tmp.mkdir(parents=True)
    try:
        t0 = time.perf_counter()
        log.info("tokenizing %s (%d shard(s), %.1f MB) with %d process(es) into %s", source.spec,
                 len(source.shards), source.num_bytes / 1e6, min(options.workers, len(source.shards)), final)
        results = _tokenize(source, tok, options, tmp)
        meta = {"version": STORE_VERSION, "key": key, "spec": source.spec, "source": source.fingerprint,
                "chat": {"column": options.chat.column, "loss": options.chat.loss},
                "files": [r.file for r in results if r.file],
                "documents": sum(r.documents for r in results), "tokens": sum(r.tokens for r in results),
                "learned_tokens": sum(r.learned for r in results), "seconds": round(time.perf_counter() - t0, 2)}
        (tmp / STORE_META).write_text(json.dumps(meta, indent=1))
        os.replace(tmp, final)  # the cache appears complete or not at all
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("tokenized %s: %d documents, %d tokens in %.1f s", source.spec, meta["documents"], meta["tokens"],
             meta["seconds"])


def _remove_temporaries(final: Path) -> None:
    """Called holding the cache's lock: any temporary of this cache belongs to a builder that died."""
    for stale in final.parent.glob(f".{final.name}.tmp-*"):
        log.info("removing %s, left by an interrupted tokenization", stale)
        shutil.rmtree(stale, ignore_errors=True)


def prepare(spec: str, tok, options: DataOptions) -> tuple[Path, bool]:
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
                return final, False
            if time.monotonic() >= deadline:
                _remove_temporaries(final)
                _build(source, tok, options, key, final)
                return final, True
        finally:
            lock.release()
        time.sleep(0.2)  # give this machine's first rank the chance to take the lock and build



