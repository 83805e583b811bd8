"""Data: every input format, the token cache (reuse, sharing, interrupted builds), document-aware packing
checked against separate forwards, chat masks, and errors that name the file and line."""

import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest
import torch

from forge_qat.data.build import DataOptions, ensure_cache
from forge_qat.data.encode import IGNORE_INDEX, ChatOptions
from forge_qat.data.store import as_one_row, batch_indices, model_inputs, open_token_store
from forge_qat.errors import InputError
from forge_qat.models import byte_tokenizer, preset_model

tok = byte_tokenizer()
CHAT = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "four"}]


@pytest.fixture
def options(tmp_path):
    return DataOptions(cache_dir=tmp_path / "cache", workers=1)


def documents(spec, tokenizer=tok, options=None, seq_len=8, **chat):
    """Each document of `spec` as (ids, mask) lists, through a fresh cache."""
    opts = DataOptions(cache_dir=options.cache_dir, workers=options.workers, chat=ChatOptions(**chat))
    store = open_token_store(str(spec), tokenizer, seq_len, opts)
    return [tuple(a.tolist() for a in store.document(j)) for j in range(store.documents)]


def learned_text(doc, tokenizer=tok):
    ids, mask = doc
    return tokenizer.decode([t for t, m in zip(ids, mask, strict=True) if m])


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


RECORDS = [{"text": "first document"}, {"messages": CHAT}, {"text": "third"}]


# ---- formats -----------------------------------------------------------------------------------------


def test_text_file_is_one_learned_document_ending_in_eos(text_file, options):
    (ids, mask), = documents(text_file, options=options)
    assert ids[-1] == tok.eos_token_id and all(mask)
    assert tok.decode(ids[:-1]) == text_file.read_text()


def test_every_format_gives_the_same_documents(tmp_path, options):
    import pyarrow as pa
    import pyarrow.parquet as pq
    from datasets import Dataset

    reference = documents(write_jsonl(tmp_path / "d.jsonl", RECORDS), options=options)
    assert len(reference) == 3
    (tmp_path / "a.json").write_text(json.dumps(RECORDS))
    rows = [{"text": r.get("text"), "messages": r.get("messages")} for r in RECORDS]  # columns: None elsewhere
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "p.parquet", row_group_size=1)
    Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    for spec in ("a.json", "p.parquet", "saved"):
        assert documents(tmp_path / spec, options=options) == reference, spec
    directory = tmp_path / "dir"
    directory.mkdir()
    write_jsonl(directory / "1.jsonl", RECORDS[:2])
    (directory / "2.txt").write_text("third")
    (directory / "ignored.md").write_text("not data")
    assert documents(directory, options=options) == reference


def test_builtin_corpus_has_a_disjoint_eval_split(options):
    train = documents("builtin:python-docs", options=options)
    held_out = documents("builtin:python-docs-eval", options=options)
    assert len(train) > 5 * len(held_out) > 0
    assert not {tuple(d[0]) for d in train} & {tuple(d[0]) for d in held_out}


def test_worker_processes_match_one_process(tmp_path, monkeypatch, options):
    import forge_qat.data.sources as sources

    monkeypatch.setattr(sources, "SHARD_BYTES", 300)  # several shards from a small file
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": f"document number {i} " * (i % 5 + 1)} for i in range(60)])
    one = open_token_store(str(path), tok, 16, options)
    two = open_token_store(str(path), tok, 16, DataOptions(cache_dir=tmp_path / "other", workers=2))
    assert len(one.meta["files"]) > 2 and two.built
    assert one.meta["documents"] == two.meta["documents"] == 60
    indices = torch.arange(len(one))
    assert all(torch.equal(a, b) for a, b in zip(one.batch(indices).values(), two.batch(indices).values(),
                                                  strict=True))


# ---- the cache -------------------------------------------------------------------------------------------


def test_second_open_reuses_the_cache_and_a_changed_file_is_tokenized_again(text_file, options, caplog):
    caplog.set_level(logging.INFO, logger="forge_qat")
    first = open_token_store(str(text_file), tok, 16, options)
    second = open_token_store(str(text_file), tok, 16, options)
    assert first.built and not second.built and second.directory == first.directory
    assert "reusing tokenized" in caplog.text
    idx = torch.arange(len(first))
    assert all(torch.equal(a, b) for a, b in zip(first.batch(idx).values(), second.batch(idx).values(), strict=True))
    with_all_turns = open_token_store(str(text_file), tok, 16, DataOptions(cache_dir=options.cache_dir,
                                                                           chat=ChatOptions(loss="all")))
    assert with_all_turns.key != first.key  # chat options are part of the key
    text_file.write_text(text_file.read_text() + " more")
    changed = open_token_store(str(text_file), tok, 16, options)
    assert changed.built and changed.key != first.key
    assert not list(options.cache_dir.glob(".*tmp*")) and not list(text_file.parent.glob(".*"))


def test_an_interrupted_build_is_never_used_and_is_rebuilt(tmp_path, options):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": f"document {i}"} for i in range(3000)])
    # A process that dies (SIGKILL, no cleanup) after writing the first batch of the cache.
    script = textwrap.dedent(f"""
        import os, signal
        from pathlib import Path
        from forge_qat.data import build
        from forge_qat.data.encode import Encoder
        from forge_qat.models import byte_tokenizer
        real, calls = Encoder.encode, []
        def encode(self, records):
            calls.append(1)
            if len(calls) == 2:
                os.kill(os.getpid(), signal.SIGKILL)
            return real(self, records)
        Encoder.encode = encode
        build.ensure_cache({str(path)!r}, byte_tokenizer(),
                           build.DataOptions(cache_dir=Path({str(options.cache_dir)!r}), workers=1))
    """)
    killed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    partial = list(options.cache_dir.glob(".*.tmp-*"))
    assert len(partial) == 1 and list(partial[0].glob("tokens-*.arrow"))
    store = open_token_store(str(path), tok, 16, options)
    assert store.built and store.documents == 3000 and not partial[0].exists()
    reference = open_token_store(str(path), tok, 16, DataOptions(cache_dir=tmp_path / "ref", workers=1))
    idx = torch.arange(len(store))
    assert all(torch.equal(a, b) for a, b in zip(store.batch(idx).values(), reference.batch(idx).values(),
                                                  strict=True))


def test_two_processes_share_one_cache(tmp_path):
    """Two ranks start together: one tokenizes, the other waits on the lock and reuses its cache."""
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": f"document {i} " * 30} for i in range(4000)])
    script = textwrap.dedent(f"""
        import json, logging, sys
        from pathlib import Path
        from forge_qat.data.build import DataOptions, ensure_cache
        from forge_qat.models import byte_tokenizer
        logging.basicConfig(level=logging.INFO)
        directory, built = ensure_cache({str(path)!r}, byte_tokenizer(),
                                   DataOptions(cache_dir=Path({str(tmp_path / "cache")!r}), workers=1,
                                               defer=sys.argv[1] == "1"))
        print(json.dumps({{"dir": str(directory), "built": built}}))
    """)
    ranks = [subprocess.Popen([sys.executable, "-c", script, str(rank)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for rank in (0, 1)]
    outputs = [r.communicate(timeout=300) for r in ranks]
    results = [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]
    assert [r["built"] for r in results] == [True, False], [err[-2000:] for _, err in outputs]
    assert results[0]["dir"] == results[1]["dir"]
    assert "waiting for another process" in outputs[1][1] and "process(es) into" not in outputs[1][1]


def test_a_waiting_process_builds_once_the_holder_leaves_without_building(tmp_path, text_file, caplog):
    from filelock import FileLock

    from forge_qat.data.build import cache_key
    from forge_qat.data.sources import resolve_source

    caplog.set_level(logging.INFO, logger="forge_qat")
    options = DataOptions(cache_dir=tmp_path / "cache", workers=1)
    options.cache_dir.mkdir()
    key = cache_key(resolve_source(str(text_file)), tok, options.chat)
    held = threading.Event()

    def hold_for_a_second():  # another thread: filelock refuses to wait on a lock its own thread holds
        with FileLock(str(options.cache_dir / f"train-{key[:16]}.lock")):
            held.set()
            time.sleep(1.0)

    threading.Thread(target=hold_for_a_second).start()
    held.wait()
    t0 = time.monotonic()
    directory, built = ensure_cache(str(text_file), tok, options)
    assert built and time.monotonic() - t0 >= 0.9
    assert "waiting for another process" in caplog.text


# ---- packing --------------------------------------------------------------------------------------------


def test_position_ids_restart_at_documents_and_no_label_crosses_them(tmp_path, options):
    texts = ["abcde", "xy", "0123456789"]  # byte tokenizer: one token per byte, plus eos
    store = open_token_store(str(write_jsonl(tmp_path / "d.jsonl", [{"text": t} for t in texts])), tok, 8, options)
    batch = store.batch(torch.arange(len(store)))
    positions = batch["position_ids"].flatten().tolist()
    assert positions == [0, 1, 2, 3, 4, 5, 0, 1,  # "abcde</s>" "xy
                         0, 0, 1, 2, 3, 4, 5, 6]  # </s>" (new sequence) "0123456"...
    labels = batch["labels"].flatten()
    starts = [i for i, p in enumerate(positions) if p == 0]
    assert all(labels[i] == IGNORE_INDEX for i in starts)
    assert all(labels[i] == batch["input_ids"].flatten()[i] for i in range(len(labels)) if i not in starts)


def test_packed_loss_equals_each_document_alone(tmp_path, options):
    """The numerics of document masking: a packed batch trains exactly what separate documents would."""
    model, _ = preset_model("micro-llama")
    model.eval()
    texts = ["The first document is here.", "A second, shorter one.", "And a third document that runs on."]
    store = open_token_store(str(write_jsonl(tmp_path / "d.jsonl", [{"text": t} for t in texts])), tok, 32, options)
    idx = torch.arange(len(store))
    packed = model(**model_inputs(store, idx, model, torch.device("cpu")))
    n_packed = int((store.batch(idx)["labels"][:, 1:] != IGNORE_INDEX).sum())

    total, count = 0.0, 0
    tokens = store.batch(idx)
    for row in range(len(idx)):  # each document piece of each row, alone
        pos = tokens["position_ids"][row]
        starts = [*(pos == 0).nonzero().flatten().tolist(), len(pos)]
        for a, b in zip(starts, starts[1:], strict=False):
            if b - a < 2:
                continue
            piece = {k: v[row:row + 1, a:b] for k, v in tokens.items() if k != "position_ids"}
            n = int((piece["labels"][:, 1:] != IGNORE_INDEX).sum())
            total += model(**piece, use_cache=False).loss.item() * n
            count += n
    assert count == n_packed
    assert packed.loss.item() == pytest.approx(total / count, abs=1e-5)
    # without position_ids, attention crosses documents and the loss differs
    plain = model(input_ids=tokens["input_ids"], labels=tokens["labels"], use_cache=False).loss.item()
    assert abs(plain - total / count) > 1e-3
    # flash-attention implementations get one packed row: the same loss
    one_row = as_one_row(tokens)
    assert model(**one_row, use_cache=False).loss.item() == pytest.approx(total / count, abs=1e-5)


def test_causal_packing_is_plain_causal_attention_over_the_sequence(tmp_path, options):
    from forge_qat.data.store import TokenStore

    model, _ = preset_model("micro-llama")
    texts = ["The first document is here.", "A second, shorter one.", "And a third document that runs on."]
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": t} for t in texts])
    documents = open_token_store(str(path), tok, 32, options)
    causal = TokenStore(documents.directory, 32, packing="causal")
    idx = torch.arange(len(causal))
    batch = causal.batch(idx)
    assert set(batch) == {"input_ids", "labels"} and (batch["labels"] == IGNORE_INDEX).sum() == len(idx)
    assert torch.equal(batch["input_ids"], documents.batch(idx)["input_ids"])
    inputs = model_inputs(causal, idx, model, torch.device("cpu"))
    plain = model(input_ids=batch["input_ids"], labels=batch["input_ids"], use_cache=False).loss
    torch.testing.assert_close(model(**inputs).loss, plain)


def test_too_little_data_is_an_error(tmp_path, options):
    (tmp_path / "tiny.txt").write_text("hi")
    with pytest.raises(InputError, match="fewer than one sequence"):
        open_token_store(str(tmp_path / "tiny.txt"), tok, 64, options)


def test_batch_order_depends_only_on_seed_and_position():
    a = [batch_indices(10, 3, seed=1, batch_number=i) for i in range(7)]
    b = [batch_indices(10, 3, seed=1, batch_number=i) for i in range(7)]
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    epoch0 = torch.cat(a[:3])
    assert len(set(epoch0.tolist())) == 9  # no repeats within an epoch
    assert not torch.equal(batch_indices(10, 3, seed=2, batch_number=0), a[0])


# ---- chat ---------------------------------------------------------------------------------------------


def test_chat_learns_the_last_turn_or_every_assistant_turn(tmp_path, options):
    path = write_jsonl(tmp_path / "c.jsonl", [{"messages": CHAT}])
    (last,) = documents(path, options=options)
    (every,) = documents(path, options=options, loss="all")
    assert last[0] == every[0]  # same tokens, different masks
    assert learned_text(last) == "four</s>\n"
    assert learned_text(every) == "hello</s>\nfour</s>\n"
    assert not last[1][0]


def test_sharegpt_pairs_and_a_named_column(tmp_path, options):
    sharegpt = [{"from": {"user": "human", "assistant": "gpt"}[m["role"]], "value": m["content"]} for m in CHAT]
    reference = documents(write_jsonl(tmp_path / "m.jsonl", [{"messages": CHAT}]), options=options)
    assert documents(write_jsonl(tmp_path / "s.jsonl", [{"conversations": sharegpt}]), options=options) == reference
    assert documents(write_jsonl(tmp_path / "n.jsonl", [{"dialog": CHAT, "text": "ignored"}]), options=options,
                     column="dialog") == reference


def _merging_tokenizer(template):
    """The byte tokenizer plus a merge of '\\n' + 'f': tokenizing a whole conversation joins the generation
    prompt's final newline with the answer's first letter into one token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(alphabet)}
    vocab["Ċf"] = len(vocab)  # byte-level spelling of "\nf"
    core = Tokenizer(models.BPE(vocab=vocab, merges=[("Ċ", "f")]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    t = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    t.chat_template = template
    return t


MARKED_TEMPLATE = (
    "{% for m in messages %}{{ '<|' + m['role'] + '|>\n' }}{% if m['role'] == 'assistant' %}{% generation %}"
    "{{ m['content'] + eos_token + '\n' }}{% endgeneration %}{% else %}{{ m['content'] + eos_token + '\n' }}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


@pytest.mark.parametrize("template", ["prefix", "generation-marks"])
def test_answer_boundary_stays_exact_when_the_tokenizer_merges_across_it(tmp_path, options, template):
    from forge_qat.models import CHAT_TEMPLATE

    merging = _merging_tokenizer(CHAT_TEMPLATE if template == "prefix" else MARKED_TEMPLATE)
    rendered = merging.apply_chat_template(CHAT, tokenize=False)
    assert "\nfour" in rendered and merging.convert_tokens_to_ids("Ċf") in merging(rendered)["input_ids"]
    for loss, answers in (("last", "four</s>\n"), ("all", "hello</s>\nfour</s>\n")):
        (doc,) = documents(write_jsonl(tmp_path / "c.jsonl", [{"messages": CHAT}]), merging, options, loss=loss)
        assert learned_text(doc, merging) == answers
        assert merging.convert_tokens_to_ids("Ċf") not in doc[0]
        assert merging.decode(doc[0]) == rendered


# ---- errors --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("line, message", [
    ("{not json", "not valid JSON"),
    ('{"prompt": "x"}', "needs a string 'text' field or a conversation list"),
    ('{"messages": [{"role": "user", "content": "q"}]}', "last message must be the assistant"),
    ('{"messages": [{"from": "robot", "value": "q"}]}', "ShareGPT roles"),
    ('[1, 2]', "must be an object"),
])
def test_malformed_jsonl_names_file_and_line(tmp_path, options, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n\n' + line + "\n")
    with pytest.raises(InputError, match=message) as e:
        open_token_store(str(path), tok, 8, options)
    assert f"{path}:3" in str(e.value)
    assert not list(options.cache_dir.glob(".*tmp*")) and not list(options.cache_dir.glob("bad-*[!k]"))


def test_errors_in_later_shards_and_worker_processes_name_the_line(tmp_path, monkeypatch):
    import forge_qat.data.sources as sources

    monkeypatch.setattr(sources, "SHARD_BYTES", 200)
    lines = [json.dumps({"text": f"line {i}"}) for i in range(100)]
    lines[77] = '{"txt": "typo"}'
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(InputError, match=f"{path}:78: each record needs"):
        open_token_store(str(path), tok, 8, DataOptions(cache_dir=tmp_path / "cache", workers=2))


def test_parquet_errors_name_the_row_and_bad_inputs_are_one_line(tmp_path, options):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([{"text": "ok"}, {"text": None}]), tmp_path / "p.parquet")
    with pytest.raises(InputError, match=r"p.parquet row 2: each record needs"):
        open_token_store(str(tmp_path / "p.parquet"), tok, 8, options)
    (tmp_path / "notes.csv").write_text("a,b")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    (tmp_path / "fake.parquet").write_text("not parquet")
    for spec, message in (("nope.txt", "does not exist"), ("notes.csv", "has suffix '.csv'"),
                          ("latin1.txt", "not UTF-8"), ("fake.parquet", "not a readable Parquet")):
        with pytest.raises(InputError, match=message):
            open_token_store(str(tmp_path / spec), tok, 8, options)
    with pytest.raises(InputError, match="python-docs"):
        open_token_store("builtin:shakespeare", tok, 8, options)


def test_the_cache_directory_must_be_writable(tmp_path, text_file):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(InputError, match="cannot create the data cache directory"):
        open_token_store(str(text_file), tok, 8, DataOptions(cache_dir=blocker / "cache"))


def test_forge_data_command_prepares_then_reuses(tmp_path, text_file):
    env = {**os.environ, "FORGE_DATA_CACHE": str(tmp_path / "cache")}
    command = ["forge", "data", "--model", "micro-llama", "--data", str(text_file), "--seq-len", "32", "--json"]
    first, second = (subprocess.run(command, capture_output=True, text=True, env=env) for _ in range(2))
    assert first.returncode == 0, first.stderr
    a, b = json.loads(first.stdout), json.loads(second.stdout)
    assert a["built"] and not b["built"] and a["cache"] == b["cache"]
    assert a["tokens"] == len(text_file.read_bytes()) + 1 and a["sequences"] == a["tokens"] // 32
    bad = subprocess.run([*command[:5], str(tmp_path / "missing.jsonl")], capture_output=True, text=True, env=env)
    assert bad.returncode == 1 and "does not exist" in bad.stderr and "Traceback" not in bad.stderr
