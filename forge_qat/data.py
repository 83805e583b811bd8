"""Training and eval data: read text/JSONL, tokenize, pack into fixed-length sequences, batch.

Called by training and eval. Labels are the input ids themselves (HF causal LMs shift internally);
tokens that must not be learned (chat prompts) are -100. Batch order is a pure function of
(seed, step), so a resumed run sees exactly the batches an uninterrupted run would.
"""

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from forge_qat.errors import InputError, choices_message

IGNORE_INDEX = -100
BUILTIN_PREFIX = "builtin:"
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

Example = tuple[list[int], list[int]]  # (input ids, labels)


def _chat_example(messages: object, tok: PreTrainedTokenizerBase, where: str) -> Example:
    if not isinstance(messages, list) or not messages or not all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
        for m in messages
    ):
        raise InputError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects")
    if messages[-1]["role"] != "assistant":
        raise InputError(f"{where}: the last message must be the assistant turn to learn, "
                         f"got role {messages[-1]['role']!r}")
    if not tok.chat_template:
        raise InputError(f"{where}: chat data needs a tokenizer with a chat template; this one has none")
    prompt = tok.apply_chat_template(messages[:-1], add_generation_prompt=True, tokenize=False)
    full = tok.apply_chat_template(messages, tokenize=False)
    if not full.startswith(prompt):
        raise InputError(f"{where}: the chat template does not render the prompt as a prefix of the conversation")
    # Tokenized separately so the boundary between prompt and answer is exact.
    prompt_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    answer_ids = tok(full[len(prompt):], add_special_tokens=False)["input_ids"]
    return prompt_ids + answer_ids, [IGNORE_INDEX] * len(prompt_ids) + answer_ids


def _text_example(text: str, tok: PreTrainedTokenizerBase) -> Example:
    ids = tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    return ids, list(ids)


def _jsonl_examples(path: Path, tok: PreTrainedTokenizerBase) -> list[Example]:
    examples = []
    for lineno, raw in enumerate(path.read_bytes().splitlines(), 1):
        where = f"{path}:{lineno}"
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise InputError(f"{where}: not UTF-8 text; JSONL files must be UTF-8") from None
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{where}: not valid JSON ({e.msg})") from None
        if isinstance(record, dict) and isinstance(record.get("text"), str):
            examples.append(_text_example(record["text"], tok))
        elif isinstance(record, dict) and "messages" in record:
            examples.append(_chat_example(record["messages"], tok, where))
        else:
            raise InputError(f"{where}: each line needs a string 'text' field or a 'messages' list")
    return examples


def _file_examples(path: Path, tok: PreTrainedTokenizerBase) -> list[Example]:
    if path.suffix == ".jsonl":
        return _jsonl_examples(path, tok)
    try:
        return [_text_example(path.read_text(encoding="utf-8"), tok)]
    except UnicodeDecodeError:
        raise InputError(f"{path} is not UTF-8 text") from None


def load_examples(source: str, tok: PreTrainedTokenizerBase) -> list[Example]:
    """Tokenized examples from a builtin corpus, a .txt/.jsonl file, or a directory of them."""
    if source.startswith(BUILTIN_PREFIX):
        name = source.removeprefix(BUILTIN_PREFIX)
        if name not in BUILTIN_CORPORA:
            raise InputError(choices_message("builtin corpus", name, list(BUILTIN_CORPORA)))
        return [_text_example(text, tok) for text in BUILTIN_CORPORA[name]()]
    path = Path(source)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in (".txt", ".jsonl"))
        if not files:
            raise InputError(f"data directory {path} has no .txt or .jsonl files")
        return [ex for f in files for ex in _file_examples(f, tok)]
    if not path.is_file():
        raise InputError(f"data {path} does not exist (give a .txt/.jsonl file, a directory, or "
                         f"{', '.join(BUILTIN_PREFIX + n for n in BUILTIN_CORPORA)})")
    return _file_examples(path, tok)


@dataclass(frozen=True, slots=True)
class PackedData:
    """Fixed-length training sequences: input_ids and labels, both (num_sequences, seq_len)."""

    input_ids: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def num_tokens(self) -> int:
        return self.input_ids.numel()

    def batch(self, indices: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids[indices], "labels": self.labels[indices]}


def pack(examples: list[Example], seq_len: int, source: str) -> PackedData:
    """Concatenate examples and cut into `seq_len` blocks; the incomplete tail is dropped."""
    ids = [t for ex in examples for t in ex[0]]
    labels = [t for ex in examples for t in ex[1]]
    n = len(ids) // seq_len
    if n == 0:
        raise InputError(f"data {source} has {len(ids)} tokens, fewer than one sequence of {seq_len}")
    as_blocks = lambda xs: torch.tensor(xs[: n * seq_len], dtype=torch.long).view(n, seq_len)  # noqa: E731
    return PackedData(as_blocks(ids), as_blocks(labels))


def load_packed(source: str, tok: PreTrainedTokenizerBase, seq_len: int) -> PackedData:
    return pack(load_examples(source, tok), seq_len, source)


def batch_indices(num_sequences: int, batch_size: int, seed: int, batch_number: int) -> torch.Tensor:
    """Indices of the `batch_number`-th micro-batch: epochs are seeded permutations, so order depends
    only on (seed, batch_number), never on process history. Batches never straddle epochs."""
    per_epoch = max(num_sequences // batch_size, 1)
    epoch, offset = divmod(batch_number, per_epoch)
    order = torch.randperm(num_sequences, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    if num_sequences < batch_size:  # tiny data: repeat the permutation to fill one batch
        order = order.repeat(-(-batch_size // num_sequences))
    return order[offset * batch_size: (offset + 1) * batch_size]
