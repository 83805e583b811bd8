"""Tokenizing shards into Arrow files: `encode_shard`, and the worker process `python -m
forge_qat.data.worker JOB.json` that runs it for `forge_qat.data.build`.

A worker is a fresh interpreter that imports only the data modules (no torch). A multiprocessing spawn
child would import the parent's main module first, which for `forge` is the whole CLI with torch: about
0.4 GB more per worker (bench/data.py measured the spawned pool at 1.61 GB peak for 2 workers, against
0.62 GB for one process). The job is plain data: a JSON file (chat options, shards, output directory)
and the tokenizer as the parent saved it with `save_pretrained`, loaded back with
`trust_remote_code=False`; nothing is unpickled. The worker reports each finished shard, or its first
error, as one JSON line on stdout.
"""

import json
import sys
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import pyarrow as pa

from forge_qat.data.encode import ChatOptions, Encoder
from forge_qat.data.sources import Shard, describe, read_records
from forge_qat.errors import ForgeError

RECORDS_PER_BATCH = 1000
SCHEMA = pa.schema([("input_ids", pa.list_(pa.int32())), ("loss_mask", pa.list_(pa.uint8()))])


@dataclass(frozen=True, slots=True)
class ShardResult:
    index: int
    file: str | None
    """The Arrow file written, None when the shard held no documents."""
    documents: int
    tokens: int
    learned: int
    bytes: int


def encode_shard(index: int, shard: Shard, out_dir: Path, encoder: Encoder) -> ShardResult:
    """Tokenize one shard into `tokens-INDEX.arrow` (an Arrow IPC stream, one record batch per
    RECORDS_PER_BATCH documents)."""
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
        return ShardResult(index, None, 0, 0, 0, shard.size)
    return ShardResult(index, name, documents, tokens, learned, shard.size)


def write_job(path: Path, tokenizer, tokenizer_dir: Path, chat: ChatOptions, shards: list[tuple[int, Shard]],
              out_dir: Path) -> None:
    """The job file `main` reads; `tokenizer` must already be saved in `tokenizer_dir`."""
    path.write_text(json.dumps({"tokenizer": str(tokenizer_dir), "tokenizer_class": type(tokenizer).__name__,
                                "chat": asdict(chat), "out_dir": str(out_dir),
                                "shards": [[index, asdict(shard)] for index, shard in shards]}))


def main(argv: list[str]) -> int:
    import transformers

    job = json.loads(Path(argv[0]).read_text())
    # The tokenizer's own class, not AutoTokenizer: importing the auto classes imports torch.
    tok = getattr(transformers, job["tokenizer_class"]).from_pretrained(job["tokenizer"], trust_remote_code=False)
    encoder = Encoder(tok, ChatOptions(**job["chat"]))
    try:
        for index, shard in job["shards"]:
            result = encode_shard(index, Shard(**shard), Path(job["out_dir"]), encoder)
            print(json.dumps(asdict(result)), flush=True)
    except ForgeError as e:
        print(json.dumps({"error": str(e), "type": type(e).__name__}), flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
