"""The llama-cpp-q4-k-m recipe end to end: each linear trains in the type llama.cpp's Q4_K_M gives it, the torchao
artifact holds the same weights, and `forge export --to gguf` writes blocks gguf's reader decodes to exactly the
values the fake quantizers multiplied by."""

import json

import pytest
import torch
from typer.testing import CliRunner

gguf = pytest.importorskip("gguf")

from forge_qat.cli import app  # noqa: E402
from forge_qat.errors import ConfigError  # noqa: E402
from forge_qat.export.gguf import export_gguf  # noqa: E402
from forge_qat.finalize.convert import finalize  # noqa: E402
from forge_qat.finalize.job import FinalizeRequest  # noqa: E402
from forge_qat.formats import q4_k_blocks  # noqa: E402
from forge_qat.qat import ggml  # noqa: E402
from forge_qat.qat.prepare import prepare_qat  # noqa: E402
from forge_qat.qat.registry import get_recipe  # noqa: E402

RECIPE = "llama-cpp-q4-k-m"
runner = CliRunner()


def _model(path, hidden: int, intermediate: int, layers: int = 8, tied: bool = True):
    """A llama whose rows are multiples of 256 where `hidden`/`intermediate` are (K-quants) and not where not
    (the Q5_0 / Q8_0 fallbacks); 8 layers, so llama.cpp's more-bits layers are some, not all."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from forge_qat.models import byte_tokenizer

    tok = byte_tokenizer()
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=tied, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _llama_rows(n_rows, n_head):
    head = n_rows // n_head
    return torch.tensor([h * head + j for h in range(n_head) for i in range(head // 2) for j in (i, head // 2 + i)])


def _trained_values(source):
    """Every quantized linear's weight as the prepared model's fake quantizer gives it, with its llama.cpp type."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    prepare_qat(model, get_recipe(RECIPE))
    with torch.no_grad():
        return {f"{n}.weight": (m.weight_fake_quantizer(m.weight), m.weight_fake_quantizer.ggml_type)
                for n, m in model.named_modules() if isinstance(m.weight_fake_quantizer if hasattr(
                    m, "weight_fake_quantizer") else None, ggml.GgmlWeightFakeQuantizer)}


@pytest.mark.parametrize("hidden,intermediate", [(256, 512), (96, 256)])
def test_gguf_decodes_to_the_trained_values_in_llama_cpps_types(tmp_path, hidden, intermediate):
    src = _model(tmp_path / "float", hidden, intermediate)
    art = finalize(FinalizeRequest(source=src, dest=tmp_path / "art", ptq=get_recipe(RECIPE))).dest
    assert art is not None
    report = export_gguf(art, tmp_path / "m.gguf")
    assert report.rounded_blocks == 0
    config = json.loads((art / "config.json").read_text())
    expected = _trained_values(src)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 8)
    written = {t.name: t for t in gguf.GGUFReader(tmp_path / "m.gguf").tensors}
    seen = set()
    for name, (value, ggml_type) in expected.items():
        layer = int(name.split(".")[2])
        role = ggml.role_of(name.rpartition(".")[0])
        assert ggml_type == ggml.q4_k_m_type(role, layer, 8, value.shape[1], tied=True)
        t = written[names.get_name(name, try_suffixes=(".weight",))]
        assert t.tensor_type.name == ggml_type, name
        if name.endswith(("q_proj.weight", "k_proj.weight")):  # llama.cpp's rotary row order
            heads = config["num_attention_heads"] if "q_proj" in name else config["num_key_value_heads"]
            value = value[_llama_rows(value.shape[0], heads)]
        got = torch.from_numpy(gguf.dequantize(t.data, t.tensor_type).copy()).reshape(value.shape)
        assert torch.equal(got, value), name
        seen.add(ggml_type)
    assert written["token_embd.weight"].tensor_type.name == "Q8_0"  # the tied table, as llama.cpp's Q4_K_M
    # both models together cover every type; each covers the more-bits layers' Q6_K (or its Q8_0 fallback)
    assert seen == ({"Q4_K", "Q6_K"} if hidden == 256 else {"Q5_0", "Q8_0", "Q4_K", "Q6_K"})
    # Q4_K weights are stored as their values beside their blocks; stock transformers loaded the artifact and
    # reproduced the converted model (finalize verifies it)
    assert q4_k_blocks.names(art) == {n for n, (_, t) in expected.items() if t == "Q4_K"}
    assert json.loads((art / "forge_artifact.json").read_text())["reload_max_diff"] == 0.0


def test_export_refuses_blocks_that_do_not_decode_to_the_artifact(tmp_path):
    src = _model(tmp_path / "float", 256, 512, layers=2)
    art = finalize(FinalizeRequest(source=src, dest=tmp_path / "art", ptq=get_recipe(RECIPE))).dest
    name = sorted(q4_k_blocks.names(art))[0]
    blocks = {n: q4_k_blocks.read(art, n) for n in q4_k_blocks.names(art)}
    blocks[name]["sc"] = blocks[name]["sc"].flip(-1).contiguous()  # a sub-scale packed in the wrong place
    (art / q4_k_blocks.PATH).unlink()
    q4_k_blocks.write(art, blocks)
    with pytest.raises(Exception, match="do not decode to the artifact's weights"):
        export_gguf(art, tmp_path / "m.gguf")


def test_train_finalize_export_through_the_cli(tmp_path, text_file):
    src = _model(tmp_path / "float", 96, 256, layers=2)
    run = tmp_path / "run"
    result = runner.invoke(app, ["train", "--model", str(src), "--data", str(text_file), "--eval-data", "none",
                                 "--output-dir", str(run), "--qat-recipe", RECIPE, "--max-steps", "2",
                                 "--batch-size", "2", "--seq-len", "32", "--precision", "fp32"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["finalize", "--source", str(run), "--dest", str(tmp_path / "art"), "--streaming"])
    assert result.exit_code != 0 and "not supported for it yet" in result.output
    assert "Traceback" not in result.output
    result = runner.invoke(app, ["finalize", "--source", str(run), "--dest", str(tmp_path / "art")])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["export", str(tmp_path / "art"), "--to", "gguf", "--output", str(tmp_path / "m.gguf")])
    assert result.exit_code == 0, result.output
    types = {t.tensor_type.name for t in gguf.GGUFReader(tmp_path / "m.gguf").tensors}
    assert {"Q4_K", "Q5_0", "Q8_0"} <= types


def test_a_layer_llama_cpp_has_no_role_for_is_refused():
    with pytest.raises(ConfigError, match="no llama.cpp tensor role"):
        ggml.role_of("model.layers.0.self_attn.qkv_proj")


def test_moe_expert_stacks_are_llama_cpps_types_exactly(tmp_path):
    """Qwen3-MoE (llama.cpp's qwen3moe): gate and up stacks Q4_K, down Q6_K in the more-bits layers, every expert's
    blocks decoding to what its fake quantizer multiplied by; the artifact reloads to the converted model."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from forge_qat.models import byte_tokenizer
    from forge_qat.qat.experts import FAKE_QUANT_ATTR

    tok = byte_tokenizer()
    cfg = AutoConfig.for_model("qwen3_moe", vocab_size=len(tok), num_hidden_layers=8, num_attention_heads=4,
                               num_key_value_heads=2, hidden_size=256, intermediate_size=512, head_dim=64,
                               moe_intermediate_size=256, num_experts=4, num_experts_per_tok=2, norm_topk_prob=True,
                               max_position_embeddings=128, tie_word_embeddings=False, bos_token_id=tok.bos_token_id,
                               eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.save_pretrained(tmp_path / "float")
    tok.save_pretrained(tmp_path / "float")
    report = finalize(FinalizeRequest(source=tmp_path / "float", dest=tmp_path / "art", ptq=get_recipe(RECIPE)))
    assert report.reload_max_diff == 0.0 and set(report.llama_cpp_types) == {"Q4_K", "Q6_K"}
    assert export_gguf(tmp_path / "art", tmp_path / "m.gguf").rounded_blocks == 0
    written = {t.name: t for t in gguf.GGUFReader(tmp_path / "m.gguf").tensors}
    prepare_qat(model, get_recipe(RECIPE))
    checked = 0
    for layer in range(8):
        module = model.model.layers[layer].mlp.experts
        with torch.no_grad():
            values = {name: q.weight_fake_quantizer(getattr(module, name))
                      for name, q in getattr(module, FAKE_QUANT_ATTR).items()}
        half = values["gate_up_proj"].shape[1] // 2
        for gguf_name, value in (("ffn_gate_exps", values["gate_up_proj"][:, :half]),
                                 ("ffn_up_exps", values["gate_up_proj"][:, half:]),
                                 ("ffn_down_exps", values["down_proj"])):
            t = written[f"blk.{layer}.{gguf_name}.weight"]
            more = layer in (0, 3, 6, 7)  # llama.cpp's use_more_bits(layer, 8)
            assert t.tensor_type.name == ("Q6_K" if more and gguf_name == "ffn_down_exps" else "Q4_K")
            got = torch.from_numpy(gguf.dequantize(t.data, t.tensor_type).copy()).reshape(value.shape)
            assert torch.equal(got, value), t.name
            checked += 1
    assert checked == 24


@pytest.mark.parametrize("ggml_type", ["Q4_K", "Q6_K", "Q5_0", "Q8_0"])
def test_a_converted_stack_is_each_experts_conversion(ggml_type):
    """Each expert of a converted stack selects to what converting that expert as a linear gives, bit for bit, and
    multiplies the same; Q4_K stacks hold their values and each expert's blocks."""
    import forge_qat.torchao_compat  # noqa: F401  (select on 3-D IntxUnpackedToInt8Tensor)
    from forge_qat.qat.convert import q4_k_blocks as converted_blocks
    from forge_qat.qat.experts import FAKE_QUANT_ATTR, ProjectionFakeQuant

    stack = torch.randn(3, 64, 256, generator=torch.Generator().manual_seed(0)) * 0.05
    holder = torch.nn.Module()
    holder.w = torch.nn.Parameter(stack.clone())
    setattr(holder, FAKE_QUANT_ATTR, {"w": ProjectionFakeQuant(None, ggml.GgmlWeightFakeQuantizer(ggml_type), False)})
    get_recipe(RECIPE).convert_expert_stack(None, holder, "w")
    x = torch.randn(5, 256)
    for e in range(3):
        linear = torch.nn.Linear(256, 64, bias=False)
        linear.weight.data = stack[e].clone()
        ggml.convert_weight(linear, "weight", ggml_type)
        picked = holder.w[e]
        assert type(picked) is (torch.Tensor if ggml_type == "Q4_K" else type(linear.weight))
        assert torch.equal(picked.dequantize() if ggml_type != "Q4_K" else picked,
                           linear.weight.dequantize() if ggml_type != "Q4_K" else linear.weight)
        for part in getattr(linear.weight, "tensor_data_names", []):
            assert torch.equal(getattr(picked, part), getattr(linear.weight, part)), part
        assert torch.equal(torch.nn.functional.linear(x, picked), torch.nn.functional.linear(x, linear.weight))
        if ggml_type == "Q4_K":
            mine, its = converted_blocks(holder)["w"], converted_blocks(linear)["weight"]
            assert all(torch.equal(getattr(mine, p)[e], getattr(its, p)) for p in ("q", "sc", "m", "d", "dmin"))
