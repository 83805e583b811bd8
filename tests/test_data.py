"""Data loading: text and chat JSONL, label masking, packing, deterministic batch order."""

import json

import pytest
import torch

from forge_qat.data import IGNORE_INDEX, batch_indices, load_examples, load_packed
from forge_qat.errors import InputError
from forge_qat.models import byte_tokenizer

tok = byte_tokenizer()


def test_text_labels_are_the_input_ids(text_file):
    (ids, labels), = load_examples(str(text_file), tok)
    assert ids == labels and ids[-1] == tok.eos_token_id
    assert tok.decode(ids[:-1]) == text_file.read_text()


def test_chat_supervises_only_the_last_assistant_turn(tmp_path):
    path = tmp_path / "c.jsonl"
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
            {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "four"}]
    path.write_text(json.dumps({"messages": msgs}) + "\n")
    (ids, labels), = load_examples(str(path), tok)
    learned = [t for t, lab in zip(ids, labels, strict=True) if lab != IGNORE_INDEX]
    assert tok.decode(learned).startswith("four")
    assert "hello" not in tok.decode(learned)
    assert len(ids) == len(labels) and labels[0] == IGNORE_INDEX


@pytest.mark.parametrize("line, message", [
    ("{not json", "not valid JSON"),
    ('{"prompt": "x"}', "'text' field or a 'messages' list"),
    ('{"messages": [{"role": "user", "content": "q"}]}', "last message must be the assistant"),
])
def test_malformed_jsonl_names_file_and_line(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n' + line + "\n")
    with pytest.raises(InputError, match=message) as e:
        load_examples(str(path), tok)
    assert f"{path}:2" in str(e.value)


def test_missing_data_and_unknown_builtin_are_clear(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        load_examples(str(tmp_path / "nope.txt"), tok)
    with pytest.raises(InputError, match="python-docs"):
        load_examples("builtin:shakespeare", tok)


def test_builtin_corpus_has_disjoint_eval_split():
    train = load_examples("builtin:python-docs", tok)
    held_out = load_examples("builtin:python-docs-eval", tok)
    assert len(train) > 5 * len(held_out) > 0
    assert not {tuple(e[0]) for e in train} & {tuple(e[0]) for e in held_out}


def test_packing_and_too_little_data(text_file, tmp_path):
    packed = load_packed(str(text_file), tok, 64)
    assert packed.input_ids.shape[1] == 64 and torch.equal(packed.input_ids, packed.labels)
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("hi")
    with pytest.raises(InputError, match="fewer than one sequence"):
        load_packed(str(tiny), tok, 64)


def test_batch_order_depends_only_on_seed_and_position():
    a = [batch_indices(10, 3, seed=1, batch_number=i) for i in range(7)]
    b = [batch_indices(10, 3, seed=1, batch_number=i) for i in range(7)]
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    epoch0 = torch.cat(a[:3])
    assert len(set(epoch0.tolist())) == 9  # no repeats within an epoch
    assert not torch.equal(batch_indices(10, 3, seed=2, batch_number=0), a[0])
