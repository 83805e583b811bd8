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
