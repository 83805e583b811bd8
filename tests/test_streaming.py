"""Streaming finalize: block by block, identical to the in-memory finalize, memory flat in depth."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import micro_train_args
from safetensors import safe_open

from forge_qat.config import TrainConfig
from forge_qat.errors import InputError, OutputWriteError
from forge_qat.finalize.blocks import split_blocks
from forge_qat.finalize.convert import finalize
from forge_qat.finalize.job import FinalizeRequest
from forge_qat.qat.registry import get_recipe
from forge_qat.train.trainer import run_training


@pytest.fixture(scope="module")
def qat_run(tmp_path_factory):
    from pydoc_data.topics import topics

    root = tmp_path_factory.mktemp("run")
    (root / "train.txt").write_text(topics["if"] + topics["while"])
    run_training(TrainConfig.from_flat(**micro_train_args(root / "qat", root / "train.txt", max_steps=2, save_every=0)))
    return root / "qat"


def assert_same_artifact(a, b):
    """Same shards, byte-identical tensor data and equal metadata in each. (Raw files may differ in
    the order of header keys: safetensors serialises metadata from a Rust HashMap.)"""
    files = sorted(p.name for p in a.glob("model*"))
    assert files == sorted(p.name for p in b.glob("model*"))
    for name in files:
        if name.endswith(".json"):
            assert json.loads((a / name).read_text()) == json.loads((b / name).read_text())
            continue
        fa, fb = safe_open(a / name, "pt"), safe_open(b / name, "pt")
        assert list(fa.keys()) == list(fb.keys())
        assert fa.metadata() == fb.metadata()
        for key in fa.keys():
            ta, tb = fa.get_tensor(key), fb.get_tensor(key)
            assert ta.dtype == tb.dtype and torch.equal(ta.view(torch.uint8), tb.view(torch.uint8)), key
    assert json.loads((a / "config.json").read_text()) == json.loads((b / "config.json").read_text())


@pytest.mark.parametrize("recipe", ["int8-dynamic-act-int4-weight", "int8-dynamic-act-int8-weight"])
@pytest.mark.parametrize("shard_bytes", [10**9, 30_000])
def test_streaming_equals_in_memory(qat_run, tmp_path, recipe, shard_bytes):
    common = dict(source=qat_run, ptq=get_recipe(recipe), max_shard_bytes=shard_bytes)
    in_memory = finalize(FinalizeRequest(dest=tmp_path / "mem", streaming=False, **common))
    streamed = finalize(FinalizeRequest(dest=tmp_path / "stream", streaming=True, **common))
    assert streamed.streaming and not in_memory.streaming
    fields = ("converted", "coverage", "artifact_bytes", "source_bytes", "source_dtype")
    assert [getattr(streamed, f) for f in fields] == [getattr(in_memory, f) for f in fields]
    assert_same_artifact(tmp_path / "mem", tmp_path / "stream")
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(tmp_path / "stream")
    assert type(m.model.layers[1].mlp.down_proj.weight).__name__ in ("IntxUnpackedToInt8Tensor", "Int8Tensor")


def test_blocks_cover_the_state_dict_once():
    from forge_qat.models import preset_model

    model, _ = preset_model("micro-llama")
    blocks = split_blocks(model)
    names = [n for b in blocks for n in b.names]
    assert names == [k for k in model.state_dict() if k != "lm_head.weight"]  # tied head stored once
    assert [b.prefix for b in blocks] == ["model.embed_tokens.", "model.layers.0.", "model.layers.1.",
                                         "model.norm."]


def test_live_reader_joins_every_gather_in_order_whatever_it_reads():
    """Under ZeRO-3 every rank but 0 gathers every block in order while rank 0 reads what conversion needs: the
    reader gathers (and drops) the blocks it skips, `finish` those after the last read, and reading back is an
    error (a gather the other ranks would never join: a hang). Blocks are found by true sizes: ZeRO-3 leaves each
    rank's parameters empty (here: every `p.numel()` reads 0), which once made every tensor its own block."""
    import contextlib

    from forge_qat.errors import ConversionError
    from forge_qat.finalize.live import LiveModelReader
    from forge_qat.models import preset_model

    model, _ = preset_model("micro-llama")
    params = dict(model.named_parameters())
    gathered = []

    @contextlib.contextmanager
    def full_tensor(p):
        gathered.append(next(n for n, q in params.items() if q is p))
        yield p.detach()

    class Partitioned(torch.nn.Parameter):  # what a partitioned parameter reports
        def numel(self):
            return 0

    for module in model.modules():
        for name, p in list(module.named_parameters(recurse=False)):
            setattr(module, name, Partitioned(p.data))
    model.tie_weights()
    params = dict(model.named_parameters())
    blocks = split_blocks(model)
    assert [b.prefix for b in blocks] == ["model.embed_tokens.", "model.layers.0.", "model.layers.1.", "model.norm."]
    reader = LiveModelReader(model, full_tensor)
    out = torch.empty(4)
    reader.read_flat("model.layers.1.mlp.up_proj.weight", 0, out)
    assert gathered == blocks[0].names + blocks[1].names + blocks[2].names
    with pytest.raises(ConversionError, match="in order"):
        reader.read_flat("model.layers.0.mlp.up_proj.weight", 0, out)
    reader.finish()
    assert gathered == [n for b in blocks for n in b.names]


def test_truncated_shard_is_an_error_and_writes_nothing(qat_run, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(qat_run, broken)
    ckpt = sorted(broken.glob("checkpoint-*"))[-1]
    weights = ckpt / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    with pytest.raises(InputError, match="truncated"):
        finalize(FinalizeRequest(source=ckpt, dest=tmp_path / "out", streaming=True))
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


PEAK_PROBE = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    def status(field):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    from forge_qat.finalize.job import FinalizeRequest
    from forge_qat.finalize.convert import finalize
    from forge_qat.qat.registry import get_recipe
    def run(src, dest):
        finalize(FinalizeRequest(source=Path(src), dest=Path(dest), ptq=get_recipe("int8-dynamic-act-int4-weight"),
                                 streaming=sys.argv[3] == "1", max_shard_bytes=4_000_000))
    run(sys.argv[4], sys.argv[2] + "-warmup")  # first-use imports and caches, not measured
    Path("/proc/self/clear_refs").write_text("5")
    before = status("VmRSS")
    run(sys.argv[1], sys.argv[2])
    print(json.dumps({"peak_increase": status("VmHWM") - before}))
""")


def _make_deep_model(path, layers, hidden=512):
    from transformers import LlamaConfig, LlamaForCausalLM

    from forge_qat.models import byte_tokenizer

    tok = byte_tokenizer()
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=3 * hidden,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return sum(p.numel() * 4 for p in LlamaForCausalLM(cfg).parameters())


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc/self/status")
def test_streaming_peak_memory_does_not_grow_with_depth(tmp_path):
    """A 'large' model of many layers: streaming peak RSS stays flat from 4 to 24 layers (13.6 MB of
    float32 each), while the in-memory finalize grows with the model (the control)."""
    peaks = {}
    warmup = tmp_path / "warmup"
    _make_deep_model(warmup, 1, hidden=64)
    for layers in (4, 24):
        src = tmp_path / f"m{layers}"
        size = _make_deep_model(src, layers)
        for streaming in ("1", "0"):
            out = subprocess.run([sys.executable, "-c", PEAK_PROBE, str(src), str(tmp_path / f"o{layers}{streaming}"),
                                  streaming, str(warmup)], capture_output=True, text=True, check=True)
            peaks[(layers, streaming)] = json.loads(out.stdout.strip().splitlines()[-1])["peak_increase"]
        peaks[layers] = size
    growth_model = peaks[24] - peaks[4]  # 272 MB more float32 weights
    streaming_growth = peaks[(24, "1")] - peaks[(4, "1")]
    in_memory_growth = peaks[(24, "0")] - peaks[(4, "0")]
    assert in_memory_growth > 0.8 * growth_model, peaks  # the control really grows
    assert streaming_growth < 0.1 * growth_model, peaks


def test_disk_full_while_streaming_removes_the_output(qat_run, tmp_path, monkeypatch):
    calls = []
    real = __import__("safetensors.torch", fromlist=["save_file"]).save_file

    def fills_up(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        return real(*args, **kwargs)

    monkeypatch.setattr("safetensors.torch.save_file", fills_up)
    before = {p: p.stat().st_mtime_ns for p in qat_run.rglob("*") if p.is_file()}
    with pytest.raises(OutputWriteError, match="the disk is full"):  # one line, not the OSError
        finalize(FinalizeRequest(source=qat_run, dest=tmp_path / "out", streaming=True, max_shard_bytes=30_000))
    assert list(tmp_path.iterdir()) == []
    assert {p: p.stat().st_mtime_ns for p in qat_run.rglob("*") if p.is_file()} == before  # source untouched
