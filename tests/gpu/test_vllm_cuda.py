"""vLLM on CUDA serving forge's compressed-tensors export (issue 32): its teacher-forced log-probabilities against
stock transformers running the same directory, held to the yardstick of vLLM's own arithmetic (vLLM against
transformers on the float model). Skipped without CUDA, and without a vLLM: vLLM pins transformers and
compressed-tensors below forge's, so it lives in a venv of its own, named by FORGE_VLLM_PYTHON (its python; see
bench/vllm_serve.py for how it is made)."""

import json
import os
import sys
from pathlib import Path

import pytest
import torch
from conftest import micro_train_args

from forge_qat.config import TrainConfig
from forge_qat.train.trainer import run_training

BENCH = Path(__file__).resolve().parents[2] / "bench"
VLLM_PYTHON = os.environ.get("FORGE_VLLM_PYTHON")

pytestmark = [pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
              pytest.mark.skipif(not VLLM_PYTHON or not Path(VLLM_PYTHON).is_file(),
                                 reason="needs vLLM: FORGE_VLLM_PYTHON=<the python of a venv with vllm>")]


@pytest.mark.parametrize("recipe", ["w4a16", "int8-dynamic-act-int8-weight"])
def test_vllm_serves_the_export_as_transformers_runs_it(tmp_path, text_file, recipe):
    from transformers import AutoModelForCausalLM

    from forge_qat.export.compressed_tensors import export_compressed_tensors

    sys.path.insert(0, str(BENCH))
    from stock_loss import scores
    from vllm_serve import compare, vllm_scores

    # tiny-llama: hidden 256, intermediate 768, head_dim 64: multiples of what vLLM's int4 and int8 kernels tile
    run = run_training(TrainConfig.from_flat(**micro_train_args(
        tmp_path / "run", text_file, model="tiny-llama", seq_len=128, batch_size=4, max_steps=4, save_every=0,
        precision="bf16", qat_recipe=recipe, finalize=recipe)))
    export_compressed_tensors(tmp_path / "run" / f"final-{recipe}", tmp_path / "ct")
    ids = torch.randint(3, 250, (4, 64), generator=torch.Generator().manual_seed(0))
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps(ids.tolist()))
    keep = torch.ones(ids.shape[0] * (ids.shape[1] - 1), dtype=torch.bool)
    served = {name: vllm_scores(Path(VLLM_PYTHON), directory, prompts, keep, {})
              for name, directory in (("export", tmp_path / "ct"), ("float", run.checkpoint))}
    assert not any(isinstance(s, str) for s in served.values()), served
    stock = {}
    for name, directory in (("export", tmp_path / "ct"), ("float", run.checkpoint)):
        model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.bfloat16).cuda().eval()
        stock[name] = {k: v.cpu() for k, v in scores(model, [(ids.cuda(), ids.cuda())]).items()}
        del model
    export, yardstick = (compare(served[n], stock[n]) for n in ("export", "float"))
    assert export["mean_abs_logprob_diff"] <= 2 * yardstick["mean_abs_logprob_diff"] + 0.01, (export, yardstick)
    assert export["top1_agreement"] >= yardstick["top1_agreement"] - 0.05, (export, yardstick)
