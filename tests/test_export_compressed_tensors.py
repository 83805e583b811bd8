"""compressed-tensors export (issue 32, first part): int8-dynamic-act-int8-weight artifacts written as
compressed-tensors W8A8, w4a16 artifacts as W4A16 (int4 packed), their codes and scales copied. Checked with
compressed-tensors' own decompressors and with stock transformers, in a process that never imports forge_qat."""

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
W4A16 = "w4a16-g32"  # the tiny model's rows are 64 wide: groups of 32
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
            for r in (W8A8, W4A16, "int8-dynamic-act-int4-weight")}
    return root, arts


def _decompressed(directory):
    """Every quantized weight of an exported directory, decompressed by compressed-tensors' own compressor for
    the format and scheme parsed from its config.json."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationConfig

    config = QuantizationConfig.model_validate(json.loads((directory / "config.json").read_text())
                                               ["quantization_config"])
    compressor = BaseCompressor.load_from_registry(config.format)
    scheme = config.config_groups["group_0"]
    written = load_file(directory / "model.safetensors")
    parts = compressor.compression_param_names(scheme)
    modules = {k.rpartition(".")[0] for k in written if k.endswith(".weight_scale")}
    return written, {m: compressor.decompress({p: written[f"{m}.{p}"] for p in parts}, scheme)["weight"]
                     for m in modules}


def _grid(reader, entry):
    """codes x scales of a quantized weight (a linear's, or a stack's), per group along the rows."""
    codes, scale = reader.part(entry, "qdata"), reader.part(entry, "scale")
    group = codes.shape[-1] // scale.shape[-1]
    return (codes.to(scale.dtype).view(*codes.shape[:-1], -1, group) * scale[..., None]).view(codes.shape)


@pytest.mark.parametrize("recipe,scheme", [(W8A8, "W8A8"), (W4A16, "W4A16")])
def test_decompresses_to_the_artifacts_codes_times_scales(made, recipe, scheme, tmp_path):
    """compressed-tensors' decompressor gives back every quantized weight as the artifact's codes x scales,
    element for element; float tensors are the artifact's."""
    _, arts = made
    report = export_compressed_tensors(arts[recipe], tmp_path / "ct")
    assert report.scheme == scheme and report.inexact == 0 and report.ignored == ["lm_head"]
    assert report.quantized_linears == 14 and report.source_dtype == "float32"
    source = json.loads((arts[recipe] / "forge_artifact.json").read_text())["source_bytes"]
    assert report.source_bytes == source > report.bytes
    written, weights = _decompressed(tmp_path / "ct")
    reader = ArtifactReader(arts[recipe])
    for entry in reader.entries:
        if entry.kind == "Tensor":
            assert torch.equal(written[entry.name], reader.read(entry.name)), entry.name
        else:
            assert torch.equal(weights[entry.name.rpartition(".")[0]], _grid(reader, entry)), entry.name


@pytest.mark.parametrize("mutation", ["nibble order", "offset"])
def test_a_wrong_packing_fails_the_decompressor_check(made, mutation, tmp_path, monkeypatch):
    """The check above can fail: packing the nibbles most-significant first, or offsetting the codes by 7."""
    from forge_qat.export import compressed_tensors as exporter

    def wrong(codes):
        out, columns = codes.shape
        nibbles = (codes.to(torch.int64) + (7 if mutation == "offset" else 8)).clamp(0, 15).view(out, columns // 8, 8)
        shifts = torch.arange(8, dtype=torch.int64) * 4
        words = (nibbles << (shifts.flip(0) if mutation == "nibble order" else shifts)).sum(-1)
        return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)

    monkeypatch.setattr(exporter, "pack_int4", wrong)
    _, arts = made
    export_compressed_tensors(arts[W4A16], tmp_path / "ct")
    _, weights = _decompressed(tmp_path / "ct")
    reader = ArtifactReader(arts[W4A16])
    assert not all(torch.equal(weights[e.name.rpartition(".")[0]], _grid(reader, e))
                   for e in reader.entries if e.kind != "Tensor")


PROMPT = (torch.arange(48).view(2, 24) * 7) % 250
"""Two rows of token ids, given to the stock process and to forge's model alike."""
STOCK = """
import json, sys, torch
from transformers import AutoModelForCausalLM
assert "forge_qat" not in sys.modules
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32)
with torch.no_grad():
    torch.save(model(torch.load(sys.argv[2], weights_only=True)).logits, sys.argv[3])
assert "forge_qat" not in sys.modules
"""


def _stock_logits(directory, tmp_path):
    """`directory` run on `PROMPT` by stock transformers, in a process that never imports forge_qat."""
    torch.save(PROMPT, tmp_path / "prompt.pt")
    subprocess.run([sys.executable, "-c", STOCK, str(directory), str(tmp_path / "prompt.pt"),
                    str(tmp_path / "logits.pt")], check=True, capture_output=True)
    return torch.load(tmp_path / "logits.pt", weights_only=True)


def _fake_quant(src, recipe):
    """forge's fake-quant model of the float checkpoint `src` with the weight scales `finalize --ptq` chose (the
    recipe's `ptq_scales` rule), and the prompt's token ids."""
    from forge_qat.models import load_model
    from forge_qat.qat.prepare import LearnScales, prepare_qat

    model, _ = load_model(str(src))
    rule = get_recipe(recipe).ptq_scales
    prepare_qat(model, get_recipe(recipe), learn=None if rule == "absmax" else LearnScales(init=rule))
    return model, PROMPT


def test_stock_transformers_runs_the_trained_grid_with_its_own_activation_rounding(made, tmp_path):
    """transformers (through compressed-tensors, in a process without forge_qat) loads the directory, decompresses
    the weights and quantizes each linear's input per token, symmetric, scale absmax/127.5, as training did; but
    it rounds x / scale where torchao (and forge's fake quantization) rounds x * (1 / scale), and the two differ
    in the last bit now and then. So: its logits equal forge's model with the exported weight grid and that
    division, within float tolerance; forge's own fake quantization is a few 1e-3 away (the report says so)."""
    from forge_qat.qat.prepare import set_activation_fake_quant_enabled

    root, arts = made
    result = runner.invoke(app, ["export", str(arts[W8A8]), "--to", "compressed-tensors", "--output",
                                 str(tmp_path / "ct"), "--json"])
    assert result.exit_code == 0 and json.loads(result.output)["scheme"] == "W8A8"
    stock = _stock_logits(tmp_path / "ct", tmp_path)
    model, x = _fake_quant(root / "src", W8A8)
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


def test_stock_transformers_runs_w4a16_as_forges_fake_quant_exactly(made, tmp_path):
    """W4A16 leaves activations in float, in training and in compressed-tensors: stock transformers' logits of the
    export are forge's fake-quant model's, bit for bit here (the same weights, the same float matmuls)."""
    root, arts = made
    export_compressed_tensors(arts[W4A16], tmp_path / "ct")
    model, x = _fake_quant(root / "src", W4A16)
    with torch.no_grad():
        torch.testing.assert_close(_stock_logits(tmp_path / "ct", tmp_path), model(x).logits, rtol=0, atol=1e-6)


def test_a_tied_output_head_stays_the_embedding(tmp_path):
    """A model whose output head is its input embedding (the micro preset, SmolLM2): the head, not stored apart,
    is still listed in `ignore`, so transformers ties it to the float embedding instead of looking for a
    compressed head; the logits are forge's fake-quant model's."""
    from forge_qat.models import preset_model

    model, tok = preset_model("micro-llama")
    model.save_pretrained(tmp_path / "src")
    tok.save_pretrained(tmp_path / "src")
    art = finalize(FinalizeRequest(source=tmp_path / "src", dest=tmp_path / "art", ptq=get_recipe(W4A16))).dest
    assert export_compressed_tensors(art, tmp_path / "ct").ignored == ["lm_head"]
    fake, x = _fake_quant(tmp_path / "src", W4A16)
    with torch.no_grad():
        torch.testing.assert_close(_stock_logits(tmp_path / "ct", tmp_path), fake(x).logits, rtol=0, atol=1e-6)


@pytest.fixture(scope="module")
def moe(tmp_path_factory):
    """Tiny Qwen3-MoE and Mixtral checkpoints and their W4A16 and W8A8 artifacts (fused expert stacks)."""
    from conftest import tiny_moe

    root = tmp_path_factory.mktemp("ct-moe")
    arts = {}
    for arch in ("qwen3_moe", "mixtral"):
        model, tok = tiny_moe(arch)
        model.save_pretrained(root / arch)
        tok.save_pretrained(root / arch)
        for recipe in (W4A16, W8A8):
            arts[arch, recipe] = finalize(FinalizeRequest(source=root / arch, dest=root / f"{arch}-{recipe}",
                                                          ptq=get_recipe(recipe))).dest
    return root, arts


PUBLISHED = {  # per arch: the MoE block's name on disk, and the per-expert linears of each fused stack
    "qwen3_moe": ("mlp", {"gate_up_proj": ("gate_proj", "up_proj"), "down_proj": ("down_proj",)}),
    "mixtral": ("block_sparse_moe", {"gate_up_proj": ("w1", "w3"), "down_proj": ("w2",)}),  # renamed .mlp. on load
}


@pytest.mark.parametrize("arch", PUBLISHED)
@pytest.mark.parametrize("recipe", [W4A16, W8A8])
def test_moe_experts_are_written_per_expert_as_published(moe, arch, recipe, tmp_path):
    """A fused expert stack (experts, 2I, H) is written as the per-expert linears published checkpoints have
    (Qwen3-MoE `mlp.experts.<j>.gate_proj`, `.up_proj`, `.down_proj`; Mixtral `block_sparse_moe.experts.<j>.w1`,
    `.w3`, `.w2`), each decompressing to its rows of the artifact's codes x scales; routers stay float in
    `ignore`, under the model's and the published names."""
    root, arts = moe
    block, parts_of = PUBLISHED[arch]
    report = export_compressed_tensors(arts[arch, recipe], tmp_path / "ct")
    routers = {f"model.layers.{i}.{b}.gate" for i in range(2) for b in ("mlp", block)}
    assert report.ignored == sorted({"lm_head"} | routers)
    _, weights = _decompressed(tmp_path / "ct")
    reader = ArtifactReader(arts[arch, recipe])
    checked = 0
    for entry in reader.entries:
        if entry.kind == "Tensor" or ".experts." not in entry.name:
            continue
        grid = _grid(reader, entry)
        parts = parts_of[entry.name.rpartition(".")[2]]
        rows = grid.shape[1] // len(parts)
        prefix = entry.name.rpartition(".")[0].replace(".mlp.", f".{block}.")
        for j in range(grid.shape[0]):
            for i, part in enumerate(parts):
                got = weights[f"{prefix}.{j}.{part}"]
                assert torch.equal(got, grid[j, i * rows:(i + 1) * rows]), (entry.name, j, part)
                checked += 1
    assert checked == 2 * 4 * 3
    from safetensors import safe_open

    on_disk = {k.rpartition(".")[0] for f in (root / arch).glob("*.safetensors") for k in safe_open(f, "pt").keys()}
    written = {k.rpartition(".")[0] for f in (tmp_path / "ct").glob("*.safetensors")
               for k in safe_open(f, "pt").keys()}
    assert written == on_disk  # the module names transformers' own save_pretrained writes


@pytest.mark.parametrize("arch", PUBLISHED)
def test_stock_transformers_runs_a_w4a16_moe_export_as_forges_fake_quant(moe, arch, tmp_path):
    """transformers decompresses the per-expert int4 weights (renaming Mixtral's back) and fuses them into its
    stacks: the logits are forge's fake-quant model's. (A W8A8 MoE export it does not load: transformers 5.25 finds
    no tensors to fuse into gate_up_proj from compressed-tensors' int8 experts; docs/export.md.)"""
    root, arts = moe
    export_compressed_tensors(arts[arch, W4A16], tmp_path / "ct")
    model, x = _fake_quant(root / arch, W4A16)
    with torch.no_grad():
        torch.testing.assert_close(_stock_logits(tmp_path / "ct", tmp_path), model(x).logits, rtol=0, atol=1e-6)


def test_what_compressed_tensors_cannot_hold_exactly_is_refused_in_one_line(made, tmp_path):
    root, arts = made
    with pytest.raises(ConfigError, match="compressed-tensors' W4A8 quantizes them symmetric.*Recipes that export"):
        export_compressed_tensors(arts["int8-dynamic-act-int4-weight"], tmp_path / "x")
    result = runner.invoke(app, ["export", str(arts["int8-dynamic-act-int4-weight"]), "--to", "compressed-tensors",
                                 "--output", str(tmp_path / "x")])
    assert result.exit_code == 2 and "Traceback" not in result.output and not (tmp_path / "x").exists()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    result = runner.invoke(app, ["export", str(arts[W8A8]), "--to", "compressed-tensors", "--output",
                                 str(tmp_path / "mine"), "--overwrite"])  # not forge's: never replaced
    assert result.exit_code != 0 and (tmp_path / "mine" / "notes.txt").read_text() == "mine"
