"""Quantized input embedding and output head (`Recipe.embeddings`): trained on the grid the artifact stores,
tied tables on one grid, counted by parameters, refused where forge cannot quantize them."""

import json

import pytest
import torch
from conftest import micro_train_args
from safetensors.torch import load_file

from forge_qat.config import TrainConfig
from forge_qat.errors import ConfigError
from forge_qat.eval.models import prepare_as_trained
from forge_qat.finalize.convert import finalize
from forge_qat.finalize.job import FinalizeRequest
from forge_qat.formats.run_dir import resolve_checkpoint
from forge_qat.models import load_model, preset_model
from forge_qat.qat.convert import convert_qat
from forge_qat.qat.coverage import plan
from forge_qat.qat.embeddings import FakeQuantizedEmbedding, FakeQuantizedHead
from forge_qat.qat.prepare import prepare_qat, set_fake_quant_enabled
from forge_qat.qat.registry import get_recipe
from forge_qat.train.trainer import run_training

TABLES = get_recipe("int8-dynamic-act-int4-weight-int8-embeddings")


def _untied(seed=0):
    from transformers import AutoConfig, AutoModelForCausalLM

    from forge_qat.models import byte_tokenizer

    tok = byte_tokenizer()
    cfg = AutoConfig.for_model("qwen3", vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                               tie_word_embeddings=False)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg).eval(), tok


def test_looked_up_rows_are_the_rows_of_the_converted_table():
    """The embedding fake-quantizes only the rows it looks up; with one scale per row that is the converted
    table's lookup exactly. The tied head uses the same grid."""
    model, tok = preset_model("micro-llama", seed=0)
    model.eval()
    ids = torch.randint(0, len(tok), (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        float_rows = model.model.embed_tokens(ids)
        prepare_qat(model, TABLES)
        assert isinstance(model.model.embed_tokens, FakeQuantizedEmbedding)
        assert isinstance(model.lm_head, FakeQuantizedHead)
        assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied
        fake_rows = model.model.embed_tokens(ids)
        set_fake_quant_enabled(model, False)
        assert torch.equal(model.model.embed_tokens(ids), float_rows)
        set_fake_quant_enabled(model, True)
        converted = convert_qat(model, TABLES)
        real_rows = model.model.embed_tokens(ids)
    assert "model.embed_tokens.weight" in converted and "lm_head.weight" not in converted  # a tied pair once
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert type(model.model.embed_tokens.weight).__name__ == "IntxUnpackedToInt8Tensor"
    assert not torch.equal(fake_rows, float_rows)
    assert torch.equal(fake_rows, real_rows)


def test_rows_train_straight_through():
    model, tok = preset_model("micro-llama", seed=0)
    prepare_qat(model, TABLES)
    ids = torch.tensor([[3, 4, 4, 9]])
    model.model.embed_tokens(ids).sum().backward()
    grad = model.model.embed_tokens.weight.grad
    assert grad[4].abs().sum() > grad[3].abs().sum() > 0  # looked-up rows get gradient, twice for a repeat
    assert grad[5].abs().sum() == 0


def test_coverage_counts_tied_tables_once_and_untied_ones_each():
    tied, _ = preset_model("micro-llama", seed=0)
    coverage = plan(tied, TABLES)
    rows = tied.model.embed_tokens.weight.numel()
    assert set(coverage.tables) == {"model.embed_tokens", "lm_head"} and coverage.table_numel() == rows
    assert "input embedding and output head (tied)" in coverage.describe() and not coverage.kept
    untied, _ = _untied()
    coverage = plan(untied, TABLES)
    assert coverage.table_numel() == 2 * untied.model.embed_tokens.weight.numel()
    assert "(tied)" not in coverage.describe()
    # recipes without the option keep the head in float and say so, as before
    assert plan(untied, get_recipe("int8-dynamic-act-int4-weight")).kept["lm_head.weight"][0] == "output head"


def test_an_embedding_forge_cannot_quantize_is_refused_before_training():
    class ScaledEmbedding(torch.nn.Embedding):
        def forward(self, ids):
            return super().forward(ids) * 8.0

    model, _ = preset_model("micro-llama", seed=0)
    old = model.model.embed_tokens
    model.model.embed_tokens = ScaledEmbedding(old.num_embeddings, old.embedding_dim)
    with pytest.raises(ConfigError, match="not plain nn.Embedding"):
        prepare_qat(model, TABLES)
    assert type(model.lm_head) is torch.nn.Linear  # nothing was changed


@pytest.mark.parametrize("streaming", [False, True])
def test_trained_tables_finalize_to_a_tied_artifact_stock_transformers_runs(tmp_path, text_file, streaming):
    """Train, finalize (in memory and block by block): the artifact stores the tied table once, stock
    transformers ties it back, and its logits are the fake-quant model's."""
    from transformers import AutoModelForCausalLM

    run_training(TrainConfig.from_flat(**micro_train_args(tmp_path / "run", text_file, qat_recipe=TABLES.name)))
    report = finalize(FinalizeRequest(source=tmp_path / "run", dest=tmp_path / "art", streaming=streaming))
    assert report.mode == "qat" and report.coverage["tables"] == ["lm_head", "model.embed_tokens"]
    stored = load_file(tmp_path / "art" / "model.safetensors")
    assert "model.embed_tokens._weight_qdata" in stored and not [k for k in stored if k.startswith("lm_head")]
    assert stored["model.embed_tokens._weight_scale"].dtype == torch.bfloat16
    quant = json.loads((tmp_path / "art" / "config.json").read_text())["quantization_config"]
    assert quant["include_input_output_embeddings"] is True
    artifact = AutoModelForCausalLM.from_pretrained(tmp_path / "art").eval()
    assert artifact.lm_head.weight is artifact.model.embed_tokens.weight

    ckpt = resolve_checkpoint(tmp_path / "run")
    fake, _ = load_model(str(ckpt))
    prepare_as_trained(fake.eval(), ckpt, TABLES)  # with the scales it learned
    ids = torch.randint(0, 200, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(artifact(ids).logits, fake(ids).logits, rtol=0, atol=1e-5)
