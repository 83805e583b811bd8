"""What finalize and export tell the user about sizes and what stayed float, through the real CLI: the source's
own dtype and size (a bf16 checkpoint is not "float32"), a tied embedding table named as such and counted once."""

import json
import re

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig
from typer.testing import CliRunner

from forge_qat.cli import app
from forge_qat.models import byte_tokenizer

runner = CliRunner()
TIED = "embedding table (tied with the output head)"


@pytest.fixture(scope="module")
def bf16_model(tmp_path_factory):
    """A tiny Llama saved in bfloat16, its output head tied to the input embedding; 128 wide so that every
    recipe's groups (w4a16: 128) fit."""
    tok = byte_tokenizer()
    config = LlamaConfig(vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    path = tmp_path_factory.mktemp("bf16") / "model"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    params = sum(p.numel() for p in model.parameters())  # a tied Parameter once
    return path, params, model.model.embed_tokens.weight.numel()


def _finalize(*args: str) -> str:
    result = runner.invoke(app, ["finalize", *args])
    assert result.exit_code == 0, result.output
    return result.stdout


def test_a_bf16_source_is_named_and_sized_as_bf16(bf16_model, tmp_path):
    path, params, _ = bf16_model
    runs = {}
    for route in ("--in-memory", "--streaming", "--dry-run"):
        runs[route] = json.loads(_finalize("--source", str(path), "--dest", str(tmp_path / route.strip("-")),
                                           "--ptq", "int8-dynamic-act-int4-weight", route, "--json"))
    for route, report in runs.items():
        assert (report["source_dtype"], report["source_bytes"]) == ("bfloat16", 2 * params), route
    assert runs["--in-memory"]["artifact_bytes"] == runs["--streaming"]["artifact_bytes"]
    # the dry run's estimate keeps the float tensors in the source's dtype, as the written artifact does
    assert runs["--dry-run"]["artifact_bytes"] == pytest.approx(runs["--in-memory"]["artifact_bytes"], rel=0.05)

    shown = " ".join(_finalize("--source", str(path), "--dest", str(tmp_path / "shown"), "--ptq",
                               "int8-dynamic-act-int4-weight").split())
    report = runs["--in-memory"]
    ratio = report["artifact_bytes"] / report["source_bytes"]
    assert f"vs the bfloat16 source {report['source_bytes'] / 1e6:.2f} MB ({ratio:.2f}x)" in shown
    assert "float32" not in shown


def test_an_export_is_compared_with_the_same_source(bf16_model, tmp_path):
    path, params, _ = bf16_model
    artifact = tmp_path / "artifact"
    _finalize("--source", str(path), "--dest", str(artifact), "--ptq", "w4a16")
    assert json.loads((artifact / "forge_artifact.json").read_text())["source_dtype"] == "bfloat16"
    result = runner.invoke(app, ["export", str(artifact), "--to", "compressed-tensors",
                                 "--output", str(tmp_path / "ct"), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert (report["source_dtype"], report["source_bytes"]) == ("bfloat16", 2 * params)
    shown = " ".join(runner.invoke(app, ["export", str(artifact), "--to", "compressed-tensors",
                                         "--output", str(tmp_path / "ct"), "--overwrite"]).stdout.split())
    assert f"vs the bfloat16 source {2 * params / 1e6:.2f} MB ({report['bytes'] / (2 * params):.2f}x)" in shown


def test_a_tied_table_is_named_once(bf16_model, tmp_path):
    path, _, table = bf16_model
    report = json.loads(_finalize("--source", str(path), "--dest", str(tmp_path / "a"), "--ptq",
                                  "int8-dynamic-act-int4-weight", "--dry-run", "--json"))
    coverage = report["coverage"]
    assert coverage["kept_float"] == {TIED: table}
    assert coverage["matmul_params"] == coverage["quantized_params"] + table  # the head is not counted again
    assert coverage["kept_float_examples"] == {TIED: ["lm_head.weight"]}
    shown = " ".join(_finalize("--source", str(path), "--dest", str(tmp_path / "b"), "--ptq",
                               "int8-dynamic-act-int4-weight", "--dry-run").split())
    assert re.search(rf"kept in float: {re.escape(TIED)} {table:,}(\s|$)", shown), shown
    assert "output head " not in shown.replace(TIED, "")
    # train's coverage line (`Coverage.describe`, logged as training starts) names it the same way
    from forge_qat.qat.coverage import plan
    from forge_qat.qat.registry import get_recipe

    model = AutoModelForCausalLM.from_pretrained(path)
    line = plan(model, get_recipe("int8-dynamic-act-int4-weight")).describe()
    assert f"kept in float: {TIED} {table / 1e3:.2f}K" in line
