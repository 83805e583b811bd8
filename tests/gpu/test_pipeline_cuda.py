"""The pipeline on CUDA: for every recipe this GPU can convert, QAT training in bf16, `--finalize`, the
artifact reloaded by stock transformers with the fake-quant model's logits; on 2 GPUs, ZeRO-3 (NCCL)
against one process, and the three finalize routes giving one artifact. Skipped without CUDA (this
repository's CI has none). Run with `python tests/gpu/report.py` (writes a report) or
`python -m pytest tests/gpu`."""

import json

import pytest
import torch
from conftest import micro_train_args

from forge_qat.config import TrainConfig
from forge_qat.formats import checkpoint as ckpt_io
from forge_qat.formats.run_dir import METRICS, checkpoint_dirs
from forge_qat.qat.registry import get_recipe, recipe_names
from forge_qat.train.trainer import run_training

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _run_args(tmp_path, text_file, **extra):
    # tiny-llama: hidden 256, intermediate 768, multiples of every recipe's group size (32, 128)
    return micro_train_args(tmp_path / "run", text_file, model="tiny-llama", seq_len=128, batch_size=4,
                            max_steps=4, save_every=0, precision="bf16", **extra)


@pytest.mark.parametrize("recipe", recipe_names())
def test_train_finalize_reload_on_cuda(tmp_path, text_file, recipe):
    from transformers import AutoModelForCausalLM

    import forge_qat.torchao_compat  # noqa: F401  (int4 MoE artifacts; harmless here)
    from forge_qat.finalize.convert import sample_batch
    from forge_qat.formats.artifact_meta import ARTIFACT_META
    from forge_qat.models import load_model
    from forge_qat.qat.prepare import prepare_qat

    r = get_recipe(recipe)
    if missing := r.missing_for_convert():
        pytest.skip(f"this GPU lacks {', '.join(missing)}")
    result = run_training(TrainConfig.from_flat(**_run_args(tmp_path, text_file, qat_recipe=recipe, finalize=recipe)))
    artifact = tmp_path / "run" / f"final-{recipe}"
    meta = json.loads((artifact / ARTIFACT_META).read_text())
    assert meta["recipe"] == recipe and meta["converted"] > 0 and meta["reload_max_diff"] <= 1e-5

    device, dtype = r.convert_device, r.convert_dtype or torch.float32
    float_model, tok = load_model(str(result.checkpoint), dtype=dtype, device=device)
    sample = sample_batch(tok, float_model.config.vocab_size).to(device)
    with torch.no_grad():
        float_logits = float_model(sample).logits.float()
        prepare_qat(float_model, r)
        fake_logits = float_model(sample).logits.float()
        real = AutoModelForCausalLM.from_pretrained(artifact, dtype=dtype).to(device)
        real_logits = real(sample).logits.float()
    float_gap = (float_logits - real_logits).abs().max().item()
    fake_gap = (fake_logits - real_logits).abs().max().item()
    assert float_gap > 0 and fake_gap <= 0.1 * float_gap, (fake_gap, float_gap)


def test_learned_scales_train_on_cuda_and_convert_exactly(tmp_path, text_file):
    """--qat-learn-scales with the model and its scales on the GPU (bf16 autocast): the scales train, and
    the artifact (converted on the CPU, the recipe's convert device) equals the fake-quant model built from
    the checkpoint's weights and learned scales."""
    from transformers import AutoModelForCausalLM

    from forge_qat.finalize.convert import sample_batch
    from forge_qat.models import load_model
    from forge_qat.qat.prepare import LearnScales, prepare_qat
    from forge_qat.qat.registry import DEFAULT_RECIPE

    result = run_training(TrainConfig.from_flat(**_run_args(tmp_path, text_file, qat_recipe=DEFAULT_RECIPE,
                                                  qat_learn_scales=True, finalize=DEFAULT_RECIPE)))
    scales = ckpt_io.read_learned_scales(result.checkpoint)
    assert scales and all(torch.isfinite(s).all() and (s > 0).all() for s in scales.values())
    fake, tok = load_model(str(result.checkpoint))
    prepare_qat(fake, get_recipe(DEFAULT_RECIPE), learn=LearnScales(initial=scales))
    real = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / f"final-{DEFAULT_RECIPE}")
    x = sample_batch(tok, fake.config.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(real(x).logits, fake.eval()(x).logits, rtol=0, atol=0)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
def test_zero3_on_two_gpus_matches_one_process_and_finalizes_three_ways(tmp_path, text_file):
    from test_streaming import assert_same_artifact

    from forge_qat.finalize.convert import finalize
    from forge_qat.finalize.job import FinalizeRequest
    from forge_qat.train.entry import launch_training

    recipe = "int8-dynamic-act-int4-weight"
    one = run_training(TrainConfig.from_flat(**_run_args(tmp_path / "one", text_file, batch_size=8)))
    launch_training(TrainConfig.from_flat(**_run_args(tmp_path / "two", text_file, nproc=2, zero_stage=3,
                                                       dist_timeout_s=120, finalize=recipe)))
    losses, reference = ([json.loads(line)["loss"] for line in (tmp_path / run / "run" / METRICS).read_text()
                          .splitlines()] for run in ("two", "one"))
    assert losses == pytest.approx(reference, rel=2e-2)
    assert one.steps == len(losses)
    ckpt = checkpoint_dirs(tmp_path / "two" / "run")[-1][1]
    finalize(FinalizeRequest(source=ckpt, dest=tmp_path / "hf", streaming=True))
    finalize(FinalizeRequest(source=ckpt / "deepspeed", dest=tmp_path / "zero"))
    assert_same_artifact(tmp_path / "hf", tmp_path / "zero")
    assert_same_artifact(tmp_path / "hf", tmp_path / "two" / "run" / f"final-{recipe}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mse_scale_start_on_cuda_is_as_near_as_on_cpu(dtype):
    """The learned scales' default start computed on the GPU, from a bf16 weight as DeepSpeed holds it too:
    on the GPU, on the recipe's bf16 scale grid, and as near the weights as the CPU's choice (a sum may
    round differently and break a near tie the other way; the error may not be worse)."""
    from forge_qat.qat.fake_quant import LearnedScaleFakeQuantizer, initial_scale

    spec = get_recipe("int8-dynamic-act-int4-weight-bf16-scales").fake_quant.weight
    torch.manual_seed(0)
    w = (torch.randn(512, 1024) * 0.05).to(dtype)
    cuda, cpu = initial_scale(w.cuda(), spec), initial_scale(w, spec)
    assert cuda.device.type == "cuda" and cuda.dtype == torch.float32
    assert torch.equal(cuda, cuda.bfloat16().float())

    def error(scale):
        q = LearnedScaleFakeQuantizer(spec, scale.cpu())(w.float()).detach()
        return float((q - w.float()).square().sum())

    assert (cuda.cpu() == cpu).float().mean() > 0.99
    assert error(cuda) <= error(cpu) * (1 + 1e-5)
