"""The LoRA base grid on CUDA: skipped without a GPU (this repository's CI has none); run where one is lent:
`python -m pytest tests/gpu`."""

import pytest
import torch
from conftest import tiny_moe

from forge_qat.lora import adapters as lora
from forge_qat.lora import grid_base
from forge_qat.qat.prepare import prepare_qat
from forge_qat.qat.registry import get_recipe

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
RECIPE = "int8-dynamic-act-int4-weight"


def _separate(grid: bool, device: str):
    model, _ = tiny_moe("qwen3_moe")
    coverage = prepare_qat(model, get_recipe(RECIPE))
    lora.install(model, lora.LoraConfig(lora_rank=4, lora_qat="separate"), list(coverage.linears),
                 coverage.experts)
    with torch.no_grad():
        gen = torch.Generator().manual_seed(5)
        for name, p in lora.adapter_parameters(model).items():
            if name.endswith("lora_B"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    if grid:
        grid_base.install(model, list(coverage.linears), coverage.experts)
        grid_base.to_device(model, torch.device(device))
    else:
        model.to(device)
    return model.train()


def test_separate_mode_on_the_grid_is_the_float_base_on_cuda_in_bf16_autocast():
    ids = torch.randint(0, 259, (2, 32), generator=torch.Generator().manual_seed(3)).cuda()
    out = []
    for grid in (False, True):
        model = _separate(grid, "cuda")
        with torch.autocast("cuda", dtype=torch.bfloat16):
            result = model(ids, labels=ids)
        result.loss.backward()
        out.append((result.logits.detach(), {n: p.grad for n, p in lora.adapter_parameters(model).items()}))
    # the placeholders were made again on the GPU (one element each), not moved (a full-size write)
    gridded = grid_base.gridded_weights(model)
    params = dict(model.named_parameters())
    assert gridded and all(params[n].device.type == "cuda" and params[n].untyped_storage().nbytes() <= 4
                           for n in gridded)
    torch.testing.assert_close(out[1][0], out[0][0], rtol=0, atol=0)
    for name, grad in out[0][1].items():
        torch.testing.assert_close(out[1][1][name], grad, rtol=1e-3, atol=1e-5, msg=name)


def test_offloaded_experts_on_the_host_train_as_the_experts_on_the_gpu():
    """`--experts-offload host` with the rest on CUDA under bf16 autocast: the experts run on the CPU (oneDNN, CPU
    autocast in bf16) and the loss and the adapters' gradients match the experts on the GPU to bf16 precision;
    the GPU holds no expert grid, with and without gradient checkpointing."""
    from forge_qat.qat.grid import FrozenGrid

    ids = torch.randint(0, 259, (2, 32), generator=torch.Generator().manual_seed(3)).cuda()
    for checkpointing in (False, True):
        out = []
        for offload in (False, True):
            model, _ = tiny_moe("qwen3_moe")
            coverage = prepare_qat(model, get_recipe(RECIPE))
            lora.install(model, lora.LoraConfig(lora_rank=4, lora_qat="separate"), list(coverage.linears),
                         coverage.experts)
            grid_base.install(model, list(coverage.linears), coverage.experts)
            if offload:
                grid_base.offload_experts(model)
            grid_base.to_device(model, torch.device("cuda"))
            if checkpointing:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.train()
            with torch.autocast("cuda", dtype=torch.bfloat16):
                result = model(ids, labels=ids)
            result.loss.backward()
            out.append((result.loss.detach().float(), {n: p.grad for n, p in lora.adapter_parameters(model).items()}))
            grids = [m for n, m in model.named_modules() if isinstance(m, FrozenGrid) and ".experts." in n]
            assert all(g.codes.device.type == ("cpu" if offload else "cuda") for g in grids)
        torch.testing.assert_close(out[1][0], out[0][0], rtol=2e-2, atol=0)
        for name, grad in out[0][1].items():
            assert out[1][1][name].device.type == "cuda"
            torch.testing.assert_close(out[1][1][name], grad, rtol=5e-2, atol=5e-4, msg=name)
