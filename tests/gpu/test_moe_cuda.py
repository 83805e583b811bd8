"""Mixture-of-experts on CUDA: skipped without a GPU (this repository's CI has none); run them where one is
lent: `python -m pytest tests/gpu`."""

import pytest
import torch
from conftest import tiny_moe

from forge_qat import hardware
from forge_qat.qat import experts
from forge_qat.qat.convert import convert_qat
from forge_qat.qat.prepare import prepare_qat
from forge_qat.qat.registry import get_recipe

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _parity(recipe_name: str, dtype: torch.dtype) -> tuple[float, float]:
    model, tok = tiny_moe("qwen3_moe")
    model = model.to(device="cuda", dtype=dtype).eval()
    x = torch.randint(0, len(tok), (2, 48), device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    with torch.no_grad():
        float_logits = model(x).logits.float()
        prepare_qat(model, get_recipe(recipe_name))
        fake_logits = model(x).logits.float()
        converted = convert_qat(model, get_recipe(recipe_name))
        real_logits = model(x).logits.float()
    assert sum(n.endswith(("gate_up_proj", "down_proj")) for n in converted) == 4
    return (float_logits - real_logits).abs().max().item(), (fake_logits - real_logits).abs().max().item()


def test_default_recipe_moe_parity_on_cuda():
    float_gap, fake_gap = _parity("int8-dynamic-act-int4-weight", torch.float32)
    assert float_gap > 1e-3 and fake_gap <= 0.05 * float_gap, (fake_gap, float_gap)


@pytest.mark.skipif(not hardware.has_cuda_capability(8, 9), reason="float8 needs compute capability 8.9+")
def test_float8_expert_stacks_convert_and_match_fake_quant():
    float_gap, fake_gap = _parity("float8-dynamic-act-float8-weight", torch.bfloat16)
    assert float_gap > 0 and fake_gap <= 0.05 * float_gap, (fake_gap, float_gap)


def test_training_takes_the_grouped_kernel_on_cuda_and_matches_eager():
    """The training path (transformers' grouped_mm on fake-quantized stacks) against the eager loop, on
    the same module and inputs: same quantized operands, other summation order."""
    model, _ = tiny_moe("qwen3_moe")
    model = model.to("cuda")
    prepare_qat(model, get_recipe("int8-dynamic-act-int4-weight"))
    block = model.model.layers[0].mlp
    x = torch.randn(64, 64, device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    _, weights, chosen = (t.detach() for t in block.gate(x))
    block.experts.train()
    assert experts._batched_kernel(block.experts) is not None
    batched = block.experts(x, chosen, weights)
    eager = block.experts._eager_forward(x, chosen, weights)
    torch.testing.assert_close(batched, eager, rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
@pytest.mark.parametrize("variant", ["qat", "partitioned", "lora", "scales"])
def test_expert_parallel_on_two_gpus_matches_one_process(tmp_path, variant):
    """`--expert-parallel 2` over NCCL (AutoEP's all-to-all on the GPUs, each rank fake-quantizing its experts and
    reading them itself, staged through the host into CUDA partitions) against one process on the same global
    batches; the checkpoint gathered back into the input's layout. `partitioned`: every parameter partitioned
    (ZeRO-3 keeps these tiny stacks whole by default); `lora`: LoRA-QAT, the expert stacks' pairs across AutoEP's
    replacement; `scales`: learned scales, the experts' chosen on the GPUs before the wrap."""
    import json
    from pydoc_data.topics import topics

    from conftest import micro_train_args, partition_everything, save_tiny_moe
    from safetensors.torch import load_file

    from forge_qat.config import TrainConfig
    from forge_qat.formats.run_dir import checkpoint_dirs
    from forge_qat.train.entry import launch_training
    from forge_qat.train.trainer import run_training

    data = tmp_path / "train.txt"
    data.write_text(topics["if"] + topics["while"] + topics["for"])
    save_tiny_moe(tmp_path / "src", "qwen3_moe", "per-expert")
    args = dict(model=str(tmp_path / "src"), max_steps=3, save_every=0, qat_learn_scales=variant == "scales",
                precision="fp32",
                **({"lora_rank": 4, "lora_targets": "attention,experts", "lr": 1e-3} if variant == "lora" else {}))
    held = {"deepspeed_config": partition_everything(tmp_path)} if variant == "partitioned" else {}
    launch_training(TrainConfig.from_flat(**micro_train_args(tmp_path / "ep", data, nproc=2, zero_stage=3,
                                                             expert_parallel=2, batch_size=1, dist_timeout_s=120,
                                                             **held, **args)))
    run_training(TrainConfig.from_flat(**micro_train_args(tmp_path / "one", data, batch_size=2, **args)))
    losses = [[json.loads(line)["loss"] for line in (tmp_path / r / "metrics.jsonl").read_text().splitlines()]
              for r in ("ep", "one")]
    assert losses[0] == pytest.approx(losses[1], abs=5e-3)
    ep, one = (load_file(checkpoint_dirs(tmp_path / r)[-1][1] / "model.safetensors") for r in ("ep", "one"))
    assert set(ep) == set(one)
    for k in one:
        torch.testing.assert_close(ep[k], one[k], rtol=0, atol=2e-3)
