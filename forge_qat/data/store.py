"""The token store: a tokenized data set, memory-mapped, read as packed fixed-length sequences with
per-document position ids; and the deterministic order in which training draws them.

Called by training and eval through `open_token_store`, which has `forge_qat.data.build` tokenize the data
into the cache first unless a complete cache is already there.
"""

import json
import logging
from pathlib import Path

import numpy as np
import torch

from forge_qat.data.build import STORE_META, DataOptions, ensure_cache
from forge_qat.data.encode import IGNORE_INDEX
from forge_qat.errors import ConfigError, InputError, choices_message

log = logging.getLogger(__name__)

PACKINGS = ("documents", "causal")


class TokenStore:
    """Fixed-length sequences cut from the concatenated documents of a token cache (the tail is dropped).

    Sequence i is tokens [i*seq_len, (i+1)*seq_len). With `packing="documents"` its position ids restart
    at 0 at the sequence start and at every document start, so attention that reads position_ids keeps
    documents apart, and the label at every position 0 is IGNORE_INDEX, so no loss crosses from one
    document (or sequence) to the next. With `packing="causal"` batches carry no position ids: plain
    causal attention over the whole sequence, and each document's first token is predicted from the
    previous document's end.
    """

    def __init__(self, directory: Path, seq_len: int, *, packing: str = "documents", built: bool = False) -> None:
        from datasets import Dataset

        if packing not in PACKINGS:
            raise ConfigError(choices_message("packing", packing, list(PACKINGS)))
        self.packing = packing
        self.directory, self.seq_len, self.built = directory, seq_len, built
        self.meta = json.loads((directory / STORE_META).read_text())
        self.key: str = self.meta["key"]
        ids, masks, starts, at = [], [], [], 0
        for name in self.meta["files"]:
            table = Dataset.from_file(str(directory / name)).data  # memory-mapped
            for id_chunk, mask_chunk in zip(table.column("input_ids").chunks, table.column("loss_mask").chunks,
                                            strict=True):
                offsets = id_chunk.offsets.to_numpy().astype(np.int64)
                starts.append(offsets[:-1] - offsets[0] + at)
                ids.append(id_chunk.flatten().to_numpy())
                masks.append(mask_chunk.flatten().to_numpy())
                at += len(ids[-1])
        self._ids, self._masks = ids, masks
        self._chunk_starts = np.cumsum([0] + [len(c) for c in ids])
        self._doc_starts = np.concatenate(starts) if starts else np.zeros(0, np.int64)
        self.total_tokens = at
        self.documents = len(self._doc_starts)

    def document(self, j: int) -> tuple[np.ndarray, np.ndarray]:
        """(token ids, loss mask) of document j, as tokenized."""
        start = self._doc_starts[j]
        stop = self._doc_starts[j + 1] if j + 1 < self.documents else self.total_tokens
        return self._gather(self._ids, start, stop), self._gather(self._masks, start, stop)

    def __len__(self) -> int:
        return self.total_tokens // self.seq_len

    @property
    def num_tokens(self) -> int:
        return len(self) * self.seq_len

    def _gather(self, chunks: list[np.ndarray], start: int, stop: int) -> np.ndarray:
        out = np.empty(stop - start, dtype=chunks[0].dtype)
        c = int(np.searchsorted(self._chunk_starts, start, side="right")) - 1
        at = start
        while at < stop:
            lo = at - self._chunk_starts[c]
            take = min(stop - at, len(chunks[c]) - lo)
            out[at - start:at - start + take] = chunks[c][lo:lo + take]
            at += take
            c += 1
        return out

    def sequence(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(input ids, labels, position ids) of sequence i."""
        start, stop = i * self.seq_len, (i + 1) * self.seq_len
        ids = self._gather(self._ids, start, stop)
        mask = self._gather(self._masks, start, stop)
        t = np.arange(start, stop)
        doc_start = self._doc_starts[np.searchsorted(self._doc_starts, t, side="right") - 1]
        positions = t - np.maximum(doc_start, start)
        starts = positions == 0 if self.packing == "documents" else t == start
        labels = np.where((mask == 1) & ~starts, ids, IGNORE_INDEX)
        return ids, labels, positions

    def batch(self, indices: torch.Tensor) -> dict[str, torch.Tensor]:
        """input_ids, labels and (packing "documents") position_ids of the sequences at `indices`, each
        (len(indices), seq_len)."""
        rows = [self.sequence(int(i)) for i in indices]
        names = ("input_ids", "labels", "position_ids")[:3 if self.packing == "documents" else 2]
        return {name: torch.from_numpy(np.stack([r[k] for r in rows]).astype(np.int64))
                for k, name in enumerate(names)}


def as_one_row(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The batch as one packed row (1, B*seq_len), for flash-attention implementations, which find
    documents from position_ids only in a batch of one row. Every sequence starts at position 0 with an
    ignored label, so the row trains exactly the B sequences."""
    return {k: v.reshape(1, -1) for k, v in batch.items()}


def model_inputs(data: TokenStore, indices: torch.Tensor, model: torch.nn.Module, device: torch.device) -> dict:
    """The forward arguments for the sequences at `indices`. use_cache=False: with a cache (the config
    default, even in training) transformers builds a plain causal mask and ignores the document
    boundaries in position_ids."""
    from transformers.utils.generic import is_flash_attention_requested

    batch = data.batch(indices)
    if "position_ids" in batch and is_flash_attention_requested(model.config):
        batch = as_one_row(batch)
    return {**{k: v.to(device) for k, v in batch.items()}, "use_cache": False}


def open_token_store(spec: str, tok, seq_len: int, options: DataOptions | None = None, *,
                     packing: str = "documents") -> TokenStore:
    """The packed sequences of a data spec, tokenizing it into the cache first unless already there."""
    options = options or DataOptions()
    directory, built = ensure_cache(spec, tok, options)
    store = TokenStore(directory, seq_len, packing=packing, built=built)
    if len(store) == 0:
        raise InputError(f"data {spec} has {store.total_tokens} tokens, fewer than one sequence of {seq_len}")
    if store.meta["learned_tokens"] == 0:
        raise InputError(f"data {spec} has no tokens to learn (every token is prompt)")
    if not built and directory not in _ANNOUNCED:  # once per process: `forge compare` opens it per model
        _ANNOUNCED.add(directory)
        log.info("reusing tokenized %s from %s (%d documents, %d tokens)", spec, directory, store.documents,
                 store.total_tokens)
    return store


_ANNOUNCED: set[Path] = set()
"""Cache directories this process has said it reuses."""


def batch_indices(num_sequences: int, batch_size: int, seed: int, batch_number: int) -> torch.Tensor:
    """Indices of the `batch_number`-th micro-batch: epochs are seeded permutations, so order depends
    only on (seed, batch_number), never on process history. Batches never straddle epochs."""
    per_epoch = max(num_sequences // batch_size, 1)
    epoch, offset = divmod(batch_number, per_epoch)
    order = torch.randperm(num_sequences, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    if num_sequences < batch_size:  # tiny data: repeat the permutation to fill one batch
        order = order.repeat(-(-batch_size // num_sequences))
    return order[offset * batch_size: (offset + 1) * batch_size]

