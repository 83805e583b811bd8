"""compressed-tensors export (issue 32, first part): an int8-dynamic-act-int8-weight artifact written as
compressed-tensors W8A8, its codes and scales copied. Checked with compressed-tensors' own decompressor and with
stock transformers, in a process that never imports forge_qat."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

compressed_tensors = pytest.importorskip("compressed_tensors")

from forge_qat.cli import app  # noqa: E402
from forge_qat.errors import ConfigError  # noqa: E402
from forge_qat.export.compressed_tensors import export_compressed_tensors  # noqa: E402
from forge_qat.finalize.convert import finalize  # noqa: E402
from forge_qat.finalize.job import FinalizeRequest  # noqa: E402
from forge_qat.formats.artifact import ArtifactReader  # noqa: E402
from forge_qat.qat.registry import get_recipe  # noqa: E402

W8A8 = "int8-dynamic-act-int8-weight"
runner = CliRunner()


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A tiny Llama (untied head: one linear layer kept in float), its W8A8 and int4 artifacts."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from forge_qat.models import byte_tokenizer

    root = tmp_path_factory.mktemp("ct")
    tok = byte_tokenizer()
    cfg = AutoConfig.for_model("llama", vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                               max_position_embeddings=256, tie_word_embeddings=False)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(root / "src")
    tok.save_pretrained(root / "src")
    arts = {r: finalize(FinalizeRequest(source=root / "src", dest=root / r, ptq=get_recipe(r))).dest
            for r in (W8A8, "int8-dynamic-act-int4-weight")}
    return root, arts


def test_w8a8_decompresses_to_the_artifacts_codes_times_scales(made, tmp_path):
    """compressed-tensors' int8 decompressor, on the scheme read from the written config, gives back every
    quantized weight as the artifact's codes x scales, element for element; float tensors are the artifact's."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationConfig

    _, arts = made
    report = export_compressed_tensors(arts[W8A8], tmp_path / "ct")
    assert report.scheme == "W8A8" and report.inexact == 0 and report.ignored == ["lm_head"]
    assert report.quantized_linears == 14
    config = QuantizationConfig.model_validate(json.loads((tmp_path / "ct" / "config.json").read_text())
                                               ["quantization_config"])
    compressor = BaseCompressor.load_from_registry(config.format)
    scheme = config.config_groups["group_0"]
    written = load_file(tmp_path / "ct" / "model.safetensors")
    reader = ArtifactReader(arts[W8A8])
    for entry in reader.entries:
        if entry.kind == "Tensor":
            assert torch.equal(written[entry.name], reader.read(entry.name)), entry.name
            continue
        module = entry.name.rpartition(".")[0]
        got = compressor.decompress({"weight": written[entry.name], "weight_scale": written[module + ".weight_scale"]},
                                    scheme)["weight"]
        codes, scale = reader.part(entry, "qdata"), reader.part(entry, "scale")
        assert torch.equal(got, codes.to(scale.dtype) * scale), entry.name


STOCK = """
import json, sys, torch
from transformers import AutoModelForCausalLM
assert "forge_qat" not in sys.modules
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32)
x = (torch.arange(48).view(2, 24) * 7) % 250
with torch.no_grad():
    torch.save(model(x).logits, sys.argv[2])
assert "forge_qat" not in sys.modules
"""


def test_stock_transformers_runs_the_trained_grid_with_its_own_activation_rounding(made, tmp_path):
    """transformers (through compressed-tensors, in a process without forge_qat) loads the directory, decompresses
    the weights and quantizes each linear's input per token, symmetric, scale absmax/127.5, as training did; but
    it rounds x / scale where torchao (and forge's fake quantization) rounds x * (1 / scale), and the two differ
    in the last bit now and then. So: its logits equal forge's model with the exported weight grid and that
    division, within float tolerance; forge's own fake quantization is a few 1e-3 away (the report says so)."""
    from forge_qat.models import load_model
    from forge_qat.qat.prepare import prepare_qat, set_activation_fake_quant_enabled

    root, arts = made
    result = runner.invoke(app, ["export", str(arts[W8A8]), "--to", "compressed-tensors", "--output",
                                 str(tmp_path / "ct"), "--json"])
    assert result.exit_code == 0 and json.loads(result.output)["scheme"] == "W8A8"
    subprocess.run([sys.executable, "-c", STOCK, str(tmp_path / "ct"), str(tmp_path / "logits.pt")], check=True,
                   capture_output=True)
    stock = torch.load(tmp_path / "logits.pt", weights_only=True)
    model, _ = load_model(str(root / "src"))
    prepare_qat(model, get_recipe(W8A8))
    x = (torch.arange(48).view(2, 24) * 7) % 250
    with torch.no_grad():
        trained = model(x).logits
    set_activation_fake_quant_enabled(model, False)

    def divided(module, args):  # compressed-tensors' dynamic per-token int8, rounding x / scale
        scale = args[0].abs().amax(-1, keepdim=True) / 127.5
        return (torch.clamp(torch.round(args[0] / scale), -128, 127) * scale,)

    for module in model.modules():
        if getattr(module, "activation_fake_quantizer", None) is not None:
            module.register_forward_pre_hook(divided)
    with torch.no_grad():
        reference = model(x).logits
    torch.testing.assert_close(stock, reference, rtol=0, atol=1e-5)
    assert 1e-5 < (trained - stock).abs().max() < 5e-2


def test_what_compressed_tensors_cannot_hold_exactly_is_refused_in_one_line(made, tmp_path):
    root, arts = made
    with pytest.raises(ConfigError, match="finalize the checkpoint with --qat-convert int8-dynamic-act-int8-weight"):
        export_compressed_tensors(arts["int8-dynamic-act-int4-weight"], tmp_path / "x")
    result = runner.invoke(app, ["export", str(arts["int8-dynamic-act-int4-weight"]), "--to", "compressed-tensors",
                                 "--output", str(tmp_path / "x")])
    assert result.exit_code == 2 and "Traceback" not in result.output and not (tmp_path / "x").exists()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    result = runner.invoke(app, ["export", str(arts[W8A8]), "--to", "compressed-tensors", "--output",
                                 str(tmp_path / "mine"), "--overwrite"])  # not forge's: never replaced
    assert result.exit_code != 0 and (tmp_path / "mine" / "notes.txt").read_text() == "mine"
