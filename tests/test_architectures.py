"""The dense architectures forge supported before MoE keep working: a tiny model of each trains with
QAT and finalizes, and its artifact reloads in stock transformers with the converted model's logits."""

import pytest
import torch
from conftest import micro_train_args

from forge_qat.config import TrainConfig
from forge_qat.finalize.convert import finalize
from forge_qat.finalize.job import FinalizeRequest
from forge_qat.train.trainer import run_training

DENSE = ["llama", "qwen2", "qwen3", "mistral", "gemma2", "phi3"]


@pytest.mark.parametrize("model_type", DENSE)
def test_dense_architecture_trains_and_finalizes(model_type, tmp_path, text_file):
    from transformers import AutoConfig, AutoModelForCausalLM

    from forge_qat.models import byte_tokenizer

    tok = byte_tokenizer()
    cfg = AutoConfig.for_model(model_type, vocab_size=len(tok), hidden_size=64, intermediate_size=64,
                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                               max_position_embeddings=256, bos_token_id=tok.bos_token_id,
                               eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    src = tmp_path / "model"
    AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).save_pretrained(src)
    tok.save_pretrained(src)
    run = tmp_path / "run"
    run_training(TrainConfig.from_flat(**micro_train_args(run, text_file, model=str(src), max_steps=2, save_every=0)))
    report = finalize(FinalizeRequest(source=run, dest=tmp_path / "artifact"))
    assert report.mode == "qat" and report.reload_max_diff == 0.0
    cov = report.coverage
    assert cov["linear_layers"] >= 2 * 4 and cov["expert_stacks"] == 0
    assert set(cov["kept_float"]) <= {"output head", "embedding table (tied with the output head)"}
