"""GGUF export: the artifact's integer codes and scales written byte for byte (never re-quantized), with the
metadata and tokenizer llama.cpp needs, for the dense architectures llama.cpp runs."""

import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_moe
from safetensors.torch import load_file
from typer.testing import CliRunner

gguf = pytest.importorskip("gguf")

from forge_qat.cli import app  # noqa: E402
from forge_qat.errors import ConfigError, OutputExistsError  # noqa: E402
from forge_qat.export.gguf import export_gguf  # noqa: E402
from forge_qat.finalize.convert import finalize  # noqa: E402
from forge_qat.finalize.job import FinalizeRequest  # noqa: E402
from forge_qat.qat.registry import get_recipe  # noqa: E402

EXACT = "int8-dynamic-act-int4-weight-bf16-scales"
TABLES = "int8-dynamic-act-int4-weight-int8-embeddings"
Q4_0 = "llama-cpp-q4-0"
DENSE = {"llama": {}, "qwen2": {}, "qwen3": {"head_dim": 16}, "mistral": {"head_dim": 16}}
MOE = ("qwen3_moe", "mixtral")
REQUIRED = ["block_count", "context_length", "embedding_length", "feed_forward_length", "attention.head_count",
            "attention.head_count_kv", "rope.freq_base", "attention.layer_norm_rms_epsilon"]
runner = CliRunner()
LLAMA_CPP_KEYS = Path(__file__).parent / "data" / "llama_cpp_gguf_keys.json"


def _float_model(path, model_type, layers=2):
    from transformers import AutoConfig, AutoModelForCausalLM

    from forge_qat.models import byte_tokenizer

    tok = byte_tokenizer()
    cfg = AutoConfig.for_model(model_type, vocab_size=len(tok) + 5, hidden_size=64, intermediate_size=128,
                               num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                               max_position_embeddings=256, tie_word_embeddings=model_type == "llama",
                               bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                               pad_token_id=tok.pad_token_id, **DENSE[model_type])
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    made = {}
    for model_type in MOE:
        model, tok = tiny_moe(model_type)
        model.save_pretrained(root / model_type)
        tok.save_pretrained(root / model_type)
        made[model_type, EXACT] = finalize(FinalizeRequest(source=root / model_type, dest=root / f"{model_type}-a",
                                                           ptq=get_recipe(EXACT))).dest
    made["qwen3_moe", Q4_0] = finalize(FinalizeRequest(source=root / "qwen3_moe", dest=root / "qwen3_moe-q4-0",
                                                       ptq=get_recipe(Q4_0))).dest
    for model_type in DENSE:
        src = _float_model(root / model_type, model_type)
        for recipe in (EXACT, TABLES, "int8-dynamic-act-int4-weight", "int8-dynamic-act-int8-weight",
                       "int8-dynamic-act-int2-weight", Q4_0):
            if model_type != "llama" and recipe != EXACT and not (model_type == "qwen3" and recipe == TABLES):
                continue
            made[model_type, recipe] = finalize(FinalizeRequest(source=src, dest=root / f"{model_type}-{recipe}",
                                                                ptq=get_recipe(recipe))).dest
    # One layer for the ExecuTorch tests of how a recipe's kernels map onto XNNPACK: an ExecuTorch lowering
    # costs ~20 s per layer here, and the multi-layer program (KV caches per layer) has a test of its own.
    src = _float_model(root / "llama-1", "llama", layers=1)
    for recipe in ("int8-dynamic-act-int8-weight", "int8-dynamic-act-int2-weight"):
        made["llama-1", recipe] = finalize(FinalizeRequest(source=src, dest=root / f"llama-1-{recipe}",
                                                           ptq=get_recipe(recipe))).dest
    return made


def _artifact_tensors(directory):
    return {k: v for f in sorted(directory.glob("*.safetensors")) for k, v in load_file(f).items()}


def _llama_rows(n_rows, n_head):
    """llama.cpp's LLaMA rotary row order, written out index by index: within each head, row 2i holds the
    transformers row i and row 2i+1 the row half + i."""
    head = n_rows // n_head
    order = []
    for h in range(n_head):
        for i in range(head // 2):
            order += [h * head + i, h * head + head // 2 + i]
    return torch.tensor(order)


def _expected(tensors, name, config, permute):
    """The artifact's weight as the trained grid gives it: codes times their group's scale."""
    module, _, param = name.rpartition(".")
    if f"{module}._{param}_qdata" in tensors:
        q, s = tensors[f"{module}._{param}_qdata"].float(), tensors[f"{module}._{param}_scale"].float()
        value = q * s.repeat_interleave(q.shape[-1] // s.shape[-1], -1)
    else:
        value = tensors[name].float()
    if permute and name.endswith(("q_proj.weight", "k_proj.weight", "q_proj.bias", "k_proj.bias")):
        heads = config["num_attention_heads"] if "q_proj" in name else config["num_key_value_heads"]
        value = value[_llama_rows(value.shape[0], heads)]
    return value


def _gguf_names(name, value):
    """(GGUF-side transformers name, expected value) pairs of one artifact tensor: a fused expert stack is
    llama.cpp's separate gate and up stacks (gate first, as transformers chunks it)."""
    if name.endswith("experts.gate_up_proj"):
        half = value.shape[-2] // 2
        stem = name[: -len("gate_up_proj")]
        return [(stem + "gate_proj.weight", value[..., :half, :]), (stem + "up_proj.weight", value[..., half:, :])]
    return [(name + ".weight" if name.endswith("experts.down_proj") else name, value)]


@pytest.mark.parametrize("model_type", [*DENSE, *MOE])
def test_every_weight_decodes_to_the_artifact_exactly(artifacts, model_type, tmp_path):
    art = artifacts[model_type, EXACT]
    report = export_gguf(art, tmp_path / "m.gguf")
    assert report.rounded_blocks == 0 and not [n for n in report.notes if "blocks" in n]
    assert report.by_type["Q4_0"] == 14 and report.total_blocks > 0
    # the test models' byte tokenizer is none llama.cpp knows: the model type's default, and a note saying so
    default = {"qwen2": "qwen2", "qwen3": "qwen2", "qwen3_moe": "qwen2"}.get(model_type, "llama-bpe")
    assert report.pre_tokenizer == default and "not recognised" in report.notes[0]
    reader = gguf.GGUFReader(tmp_path / "m.gguf")
    arch = {"mistral": "llama", "mixtral": "llama", "qwen3_moe": "qwen3moe"}.get(model_type, model_type)
    fields = reader.fields
    assert bytes(fields["general.architecture"].parts[-1]).decode() == arch
    for key in REQUIRED:
        assert f"{arch}.{key}" in fields, key
    for key in ("tokenizer.ggml.model", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type",
                "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id", "tokenizer.chat_template"):
        assert key in fields, key
    config = json.loads((art / "config.json").read_text())
    assert len(fields["tokenizer.ggml.tokens"].data) == config["vocab_size"]  # padded to the embedding rows
    # every key llama.cpp's own converter writes for this model type (tools/llama_cpp_reference.py), but what the
    # byte tokenizer has none of: an unknown token, merges
    reference = set(json.loads(LLAMA_CPP_KEYS.read_text())["keys"].get(model_type, []))
    assert reference - {"tokenizer.ggml.unknown_token_id", "tokenizer.ggml.merges"} <= set(fields), \
        reference - set(fields)
    # the tokenizer's special added tokens (<s>, </s>, <pad>, and what transformers' class for the model type
    # adds) are control tokens, as the converter types them; the embedding rows past the vocabulary unused
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(art)
    special = {i for i, t in tok.added_tokens_decoder.items() if t.special}
    assert special >= {tok.bos_token_id, tok.eos_token_id}
    expected = [gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL if i < len(tok) else
                gguf.TokenType.UNUSED for i in range(config["vocab_size"])]
    assert fields["tokenizer.ggml.token_type"].contents() == expected
    assert fields["tokenizer.ggml.add_bos_token"].contents() is False  # as transformers encodes: no BOS

    written = _assert_decodes_exactly(art, reader, arch)
    assert all(t.tensor_type == gguf.GGMLQuantizationType.Q4_0 for n, t in written.items()
               if n.startswith("blk.") and n.endswith(("_q.weight", "_k.weight", "_v.weight", "output.weight",
                                                       "_gate.weight", "_up.weight", "_down.weight", "exps.weight")))
    if model_type in MOE:
        assert f"{arch}.expert_count" in fields and f"{arch}.expert_used_count" in fields


def _assert_decodes_exactly(art, reader, arch):
    """Every tensor of the GGUF, decoded by gguf's own `dequantize`, is the artifact's trained grid (codes times
    scales) or float tensor, bit for bit, and nothing else is in the file. Returns the GGUF's tensors by name."""
    config = json.loads((art / "config.json").read_text())
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], 2)
    tensors = _artifact_tensors(art)
    hf_names = json.loads(_metadata(art)["tensor_names"])
    written = {t.name: t for t in reader.tensors}
    expected = [pair for name in hf_names for pair in _gguf_names(name, _expected(tensors, name, config,
                                                                                 permute=arch == "llama"))]
    assert len(written) == len(expected)
    for name, want in expected:
        t = written[names.get_name(name, try_suffixes=(".weight", ".bias"))]
        got = torch.from_numpy(gguf.dequantize(t.data, t.tensor_type).copy()).float()
        assert torch.equal(got.reshape(want.shape), want), name
    return written


@pytest.mark.parametrize("model_type", ["llama", "qwen3"])
def test_int8_embedding_and_head_are_q8_0_exactly(artifacts, model_type, tmp_path):
    """The int8 per-row tables become Q8_0 (the row's bf16 scale per block of 32): llama's tied table once, as
    `token_embd` (llama.cpp reuses it as the output), qwen3's untied head as `output` too."""
    art = artifacts[model_type, TABLES]
    report = export_gguf(art, tmp_path / "m.gguf")
    assert report.rounded_blocks == 0 and report.by_type["Q4_0"] == 14
    written = _assert_decodes_exactly(art, gguf.GGUFReader(tmp_path / "m.gguf"), model_type)
    tables = ["token_embd.weight"] + (["output.weight"] if model_type == "qwen3" else [])
    assert report.by_type["Q8_0"] == len(tables) and ("output.weight" in written) == (model_type == "qwen3")
    for name in tables:
        assert written[name].tensor_type == gguf.GGMLQuantizationType.Q8_0
    assert report.float_params < report.quantized_params / 50  # norms only: small end to end


@pytest.mark.parametrize("model_type", ["llama", "qwen3_moe"])
def test_signed_q4_0_scales_decode_exactly(artifacts, model_type, tmp_path):
    """llama-cpp-q4-0's PTQ puts each group's largest weight on -8 as llama.cpp does, so about half its scales are
    negative: Q4_0's signed `d` holds them, and every weight decodes to the artifact's, experts too."""
    art = artifacts[model_type, Q4_0]
    assert json.loads((art / "forge_artifact.json").read_text())["weight_scales"] == "extreme"
    scales = [t for k, t in _artifact_tensors(art).items() if k.endswith("scale") and "embed" not in k]
    assert scales and any(bool((s < 0).any()) for s in scales)
    report = export_gguf(art, tmp_path / "m.gguf")
    assert report.rounded_blocks == 0
    arch = {"qwen3_moe": "qwen3moe"}.get(model_type, model_type)
    _assert_decodes_exactly(art, gguf.GGUFReader(tmp_path / "m.gguf"), arch)


def _metadata(directory):
    with open(next(directory.glob("*.safetensors")), "rb") as f:
        return json.loads(f.read(int.from_bytes(f.read(8), "little")))["__metadata__"]


def test_scales_fp16_cannot_hold_are_reported_and_int8_writes_q8_0(artifacts, tmp_path):
    fp32_scales = export_gguf(artifacts["llama", "int8-dynamic-act-int4-weight"], tmp_path / "a.gguf")
    assert fp32_scales.rounded_blocks > 0 and "not the trained grid" in fp32_scales.notes[-1]
    int8 = export_gguf(artifacts["llama", "int8-dynamic-act-int8-weight"], tmp_path / "b.gguf")
    assert int8.by_type["Q8_0"] == 14
    reader = gguf.GGUFReader(tmp_path / "b.gguf")
    t = next(t for t in reader.tensors if t.name == "blk.0.ffn_down.weight")
    tensors = _artifact_tensors(artifacts["llama", "int8-dynamic-act-int8-weight"])
    q = tensors["model.layers.0.mlp.down_proj._weight_qdata"].float()
    s = tensors["model.layers.0.mlp.down_proj._weight_scale"].reshape(-1, 1)
    got = torch.from_numpy(gguf.dequantize(t.data, t.tensor_type).copy()).reshape(q.shape)
    assert torch.equal(got, q * s.half().float())  # the codes exactly; the scale as fp16 holds it


def test_int2_codes_are_stored_exactly_in_q4_0_and_the_report_says_so(artifacts, tmp_path):
    art = artifacts["llama", "int8-dynamic-act-int2-weight"]
    report = export_gguf(art, tmp_path / "m.gguf")
    assert report.by_type["Q4_0"] == 14
    assert report.widened == {"int2": report.quantized_params}
    assert any("int2 weights are stored as Q4_0" in n for n in report.notes)
    t = next(t for t in gguf.GGUFReader(tmp_path / "m.gguf").tensors if t.name == "blk.0.ffn_down.weight")
    tensors = _artifact_tensors(art)
    q = tensors["model.layers.0.mlp.down_proj._weight_qdata"].float()
    s = tensors["model.layers.0.mlp.down_proj._weight_scale"].repeat_interleave(32, -1)
    assert q.abs().max() == 2  # an int2 grid: codes in [-2, 1]
    got = torch.from_numpy(gguf.dequantize(t.data, t.tensor_type).copy()).reshape(q.shape)
    assert torch.equal(got, q * s.half().float())  # the codes exactly (this recipe's float32 scales as fp16)


def test_grids_gguf_cannot_hold_are_refused():
    from forge_qat.export.gguf import Entry, _block_type

    int4_by_64 = {"_data": {"target_dtype": {"_data": "int4"}, "block_size": [1, 64]}}
    with pytest.raises(ConfigError, match="no exact GGUF type"):
        _block_type(Entry("w", "IntxUnpackedToInt8Tensor", int4_by_64), [128, 128])
    with pytest.raises(ConfigError, match="no exact GGUF type"):
        _block_type(Entry("w", "Float8Tensor", {}), [128, 128])


def test_cli_exports_a_checkpoint_with_a_recipe_and_replaces_only_its_own_files(artifacts, tmp_path):
    src = _float_model(tmp_path / "float", "qwen2")
    out = tmp_path / "m.gguf"
    done = runner.invoke(app, ["export", str(src), "--to", "gguf", "--output", str(out), "--recipe", EXACT])
    assert done.exit_code == 0, done.output
    assert "exactly" in done.output and out.is_file()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # the temporary artifact is gone
    again = runner.invoke(app, ["export", str(src), "--to", "gguf", "--output", str(out), "--recipe", EXACT])
    assert again.exit_code == 1 and "--overwrite" in again.output
    assert runner.invoke(app, ["export", str(src), "--to", "gguf", "--output", str(out), "--recipe", EXACT,
                               "--overwrite"]).exit_code == 0
    foreign = tmp_path / "other.gguf"
    foreign.write_bytes(b"not forge's")
    with pytest.raises(OutputExistsError, match="not a GGUF file forge wrote"):
        export_gguf(artifacts["qwen2", EXACT], foreign, overwrite=True)
    assert foreign.read_bytes() == b"not forge's"
    bad = runner.invoke(app, ["export", str(src), "--to", "gguf", "--output", str(tmp_path / "n.gguf")])
    assert bad.exit_code == 1 and "--recipe" in bad.output
    wrong = runner.invoke(app, ["export", str(src), "--to", "onnx", "--output", str(tmp_path / "n.gguf")])
    assert wrong.exit_code == 2 and "gguf" in wrong.output


def test_executorch_program_runs_prefill_and_decode_as_the_artifact(artifacts, tmp_path):
    """The .pte (XNNPACK-delegated int8 x int4 linears and int8 head, the int8 embedding as ExecuTorch's
    quantized lookup, static KV cache) gives the artifact's logits for a prompt and then for one decoded token,
    within float rounding: its bf16 scales are stored as they are."""
    pytest.importorskip("executorch")
    from executorch.runtime import Runtime
    from transformers import AutoModelForCausalLM

    import forge_qat.torchao_compat  # noqa: F401
    from forge_qat.export.executorch import export_executorch

    art = artifacts["llama", TABLES]
    report = export_executorch(art, tmp_path / "m.pte", max_seq_len=32)
    # 14 int4 linears and the int8 head (tied to the embedding, which runs as ExecuTorch's quantized lookup)
    assert report.quantized_linears == 15 and report.delegated_linears >= 15 and report.rounded_scales == 0
    assert report.tokenizer.is_file()
    program = Runtime.get().load_program(str(tmp_path / "m.pte"))
    assert {"forward", "get_max_seq_len", "get_eos_ids", "use_kv_cache"} <= set(program.method_names)
    assert program.load_method("get_max_seq_len").execute([]) == [32]
    forward = program.load_method("forward")
    prompt = forward.execute([torch.tensor([[5, 6, 7, 8]]), torch.arange(4)])[0]
    step = forward.execute([torch.tensor([[9]]), torch.tensor([4])])[0]
    model = AutoModelForCausalLM.from_pretrained(art).eval()
    with torch.no_grad():
        want = model(torch.tensor([[5, 6, 7, 8, 9]])).logits
    torch.testing.assert_close(prompt, want[:, :4], rtol=0, atol=1e-5)
    torch.testing.assert_close(step, want[:, 4:], rtol=0, atol=1e-5)
    llama_cpp = tmp_path / "llama-cpp-artifact"
    llama_cpp.mkdir()
    (llama_cpp / "forge_artifact.json").write_text(json.dumps({"recipe": "llama-cpp-q4-0"}))
    with pytest.raises(ConfigError, match="int8-dynamic-act-int4-weight"):
        export_executorch(llama_cpp, tmp_path / "x.pte")
    with pytest.raises(OutputExistsError, match="--overwrite"):
        export_executorch(art, tmp_path / "m.pte", max_seq_len=32)


@pytest.mark.parametrize("model_type", ["qwen3_moe", "llama"])
def test_writing_row_by_row_gives_the_same_file(artifacts, model_type, tmp_path, monkeypatch):
    """The export holds a few rows at a time (`CHUNK_BYTES`): with chunks of one row, expert stacks split
    into halves included, the file is byte for byte the one written in one piece."""
    import forge_qat.export.gguf as export

    art = artifacts[model_type, EXACT]
    whole = export_gguf(art, tmp_path / "whole.gguf")
    monkeypatch.setattr(export, "CHUNK_BYTES", 1)
    rows = export_gguf(art, tmp_path / "rows.gguf")
    assert (tmp_path / "whole.gguf").read_bytes() == (tmp_path / "rows.gguf").read_bytes()
    assert rows.total_blocks == whole.total_blocks and rows.rounded_blocks == whole.rounded_blocks == 0


def test_executorch_runs_int8_x_int8_as_xnnpack_per_channel_int8(artifacts, tmp_path):
    """The int8 x int8 recipe's linears run as XNNPACK's int8 per-channel linears: the same codes and scales,
    with XNNPACK's asymmetric per-token activations where the recipe trained symmetric ones. The program equals
    that model in eager torchao, and differs from the artifact by less than quantization moves the float model;
    the report says so."""
    pytest.importorskip("executorch")
    from executorch.runtime import Runtime
    from transformers import AutoModelForCausalLM

    from forge_qat.export.executorch import _load, export_executorch

    art = artifacts["llama-1", "int8-dynamic-act-int8-weight"]
    report = export_executorch(art, tmp_path / "m.pte", max_seq_len=16)
    assert report.quantized_linears == 7 and report.delegated_linears >= 7 and "asymmetrically" in report.notes[0]
    ids = torch.tensor([[5, 6, 7, 8]])
    got = Runtime.get().load_program(str(tmp_path / "m.pte")).load_method("forward").execute([ids, torch.arange(4)])[0]
    as_run, *_ = _load(art, 16)
    with torch.no_grad():
        want = as_run(ids).logits
        artifact = AutoModelForCausalLM.from_pretrained(art).eval()(ids).logits
        float_logits = AutoModelForCausalLM.from_pretrained(art.parent / "llama-1").eval()(ids).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert (got - artifact).abs().max() < (artifact - float_logits).abs().max()


def test_executorch_runs_int2_codes_on_xnnpack_int4_kernels(artifacts, tmp_path):
    """XNNPACK has no 2-bit linear: the int2 codes run on its int4 kernels, exactly, with the float32 group
    scales rounded to bf16 as XNNPACK stores them (counted in the report)."""
    pytest.importorskip("executorch")
    from executorch.runtime import Runtime

    from forge_qat.export.executorch import _load, export_executorch

    art = artifacts["llama-1", "int8-dynamic-act-int2-weight"]
    report = export_executorch(art, tmp_path / "m.pte", max_seq_len=16)
    assert report.delegated_linears >= 7 and report.rounded_scales > 0
    assert any("int2/int3 weights run on XNNPACK's int4 kernels" in n for n in report.notes)
    ids = torch.tensor([[5, 6, 7, 8]])
    got = Runtime.get().load_program(str(tmp_path / "m.pte")).load_method("forward").execute([ids, torch.arange(4)])[0]
    as_run, *_ = _load(art, 16)
    for module in as_run.modules():
        if isinstance(module, torch.nn.Linear) and hasattr(module.weight, "scale"):
            module.weight.scale = module.weight.scale.to(torch.bfloat16).float()
    with torch.no_grad():
        torch.testing.assert_close(got, as_run(ids).logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize("model_type", ["qwen3_moe"])  # one lowering; both architectures' forward below
def test_executorch_runs_moe_experts_as_the_artifact(artifacts, model_type, tmp_path):
    """Mixture-of-experts: each token's routed experts are gathered from the int4 codes and multiplied, the
    dense layers run on XNNPACK; prompt and decoded token equal the artifact's logits (transformers' eager
    expert loop) within float rounding. (Each ExecuTorch lowering costs ~40 s here, so one architecture.)"""
    pytest.importorskip("executorch")
    from executorch.runtime import Runtime
    from transformers import AutoModelForCausalLM

    import forge_qat.torchao_compat  # noqa: F401
    from forge_qat.export.executorch import export_executorch

    art = artifacts[model_type, EXACT]
    report = export_executorch(art, tmp_path / "m.pte", max_seq_len=16)
    assert report.expert_stacks == 4 and "routed experts" in report.notes[0]
    forward = Runtime.get().load_program(str(tmp_path / "m.pte")).load_method("forward")
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    prompt = forward.execute([ids[:, :5], torch.arange(5)])[0]
    step = forward.execute([ids[:, 5:], torch.tensor([5])])[0]
    with torch.no_grad():
        want = AutoModelForCausalLM.from_pretrained(art).eval()(ids).logits
    torch.testing.assert_close(prompt, want[:, :5], rtol=0, atol=1e-5)
    torch.testing.assert_close(step, want[:, 5:], rtol=0, atol=1e-5)


@pytest.mark.parametrize("model_type", MOE)
def test_exportable_experts_compute_the_artifacts_values(artifacts, model_type):
    """The export's experts forward (gathered codes, batched matmul), run eagerly, equals the artifact's eager
    expert loop for both architectures, prompt length not a multiple of anything."""
    from transformers import AutoModelForCausalLM

    import forge_qat.torchao_compat  # noqa: F401
    from forge_qat.export.executorch import _load

    art = artifacts[model_type, EXACT]
    exportable, *_, stacks = _load(art, 16)
    assert stacks == 4
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11]])
    with torch.no_grad():
        torch.testing.assert_close(exportable(ids).logits,
                                   AutoModelForCausalLM.from_pretrained(art).eval()(ids).logits, rtol=0, atol=1e-5)


def test_a_qwen3_moe_llama_cpp_would_route_differently_is_refused(artifacts, tmp_path):
    """llama.cpp's qwen3moe always renormalizes the top-k routing weights: a config with norm_topk_prob false
    would run as another model, so the export refuses it, writing nothing."""
    import shutil

    art = tmp_path / "art"
    shutil.copytree(artifacts["qwen3_moe", EXACT], art)
    config = json.loads((art / "config.json").read_text())
    (art / "config.json").write_text(json.dumps({**config, "norm_topk_prob": False}))
    with pytest.raises(ConfigError, match="norm_topk_prob"):
        export_gguf(art, tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()


def test_added_tokens_are_typed_as_llama_cpps_converter_types_them(tmp_path):
    """Added tokens that the BPE vocabulary also holds (SmolLM2's `<|im_start|>` and the other specials are ids
    0-16 of its vocabulary) are typed as llama.cpp's converter types them: special ones and ones that look like
    control tokens CONTROL, other added tokens USER_DEFINED. gguf's own `BpeVocab` writes them NORMAL, and
    llama.cpp then splits `<|im_start|>` into text (issue 33)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from forge_qat.export.gguf import write_tokenizer
    from forge_qat.models import load_tokenizer

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    words = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "hello"]
    core = Tokenizer(models.BPE(vocab={w: i for i, w in enumerate(words + alphabet)}, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|endoftext|>")
    tok.add_tokens([AddedToken("<|im_start|>", special=False, normalized=False),  # looks like a control token
                    AddedToken("<|im_end|>", special=True, normalized=False),
                    AddedToken("hello", special=False, normalized=False)])
    tok.save_pretrained(tmp_path)

    class Recorder:
        def __getattr__(self, name):
            return lambda *args, **kwargs: setattr(self, name.removeprefix("add_"), args[0] if args else None)

    written = Recorder()
    write_tokenizer(written, tmp_path, load_tokenizer(tmp_path), len(tok) + 2, "default")
    assert written.token_types[:4] == [gguf.TokenType.CONTROL] * 3 + [gguf.TokenType.USER_DEFINED]
    assert set(written.token_types[4:len(tok)]) == {gguf.TokenType.NORMAL}
    assert written.token_types[len(tok):] == [gguf.TokenType.UNUSED] * 2
    assert written.token_list[:4] == words
    assert written.add_bos_token is False and written.add_eos_token is False
