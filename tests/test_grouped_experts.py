"""Expert-parallel experts (DeepSpeed AutoEP's `GroupedExperts`: one rank's local experts) fake-quantized with
exactly the numerics forge gives the same experts in a transformers stack (issue 31, part 2): one rank's slice
of a Qwen3-MoE layer's experts, run on the tokens routed to them, equals the one-process fake-quant model's
experts on the same tokens, element for element, for every recipe that quantizes expert stacks."""

import pytest
import torch
from conftest import fits_tiny_moe, tiny_moe

from forge_qat.errors import ConfigError
from forge_qat.qat import grouped_experts
from forge_qat.qat.experts import FAKE_QUANT_ATTR
from forge_qat.qat.prepare import prepare_qat
from forge_qat.qat.registry import RECIPES, get_recipe

ep_experts = pytest.importorskip("deepspeed.moe.ep_experts")
CPU_RECIPES = [r.name for r in RECIPES.values()
               if r.expert_stacks is not None and not r.convert_requires and fits_tiny_moe(r)]


def _rank_slice(stack_module, first: int, count: int) -> torch.nn.Module:
    """What AutoEP gives rank r of an EP group: experts [first, first + count) as w1 (gate rows), w3 (up rows)
    and w2 (down), in AutoEP's own `GroupedExperts` (its reference for-loop path: this runs on the CPU)."""
    _, two_ffn, hidden = stack_module.gate_up_proj.shape
    ffn = two_ffn // 2
    grouped = ep_experts.GroupedExperts(hidden, ffn, count, use_grouped_mm=False)
    with torch.no_grad():
        grouped.w1.copy_(stack_module.gate_up_proj[first:first + count, :ffn])
        grouped.w3.copy_(stack_module.gate_up_proj[first:first + count, ffn:])
        grouped.w2.copy_(stack_module.down_proj[first:first + count])
    return grouped


@pytest.mark.parametrize("recipe", CPU_RECIPES)
def test_local_experts_fake_quantized_equal_the_one_process_fake_quant(recipe):
    model, _ = tiny_moe("qwen3_moe")
    model.eval()
    stacks = model.model.layers[0].mlp.experts
    experts = stacks.gate_up_proj.shape[0]
    local = _rank_slice(stacks, experts // 2, experts // 2)  # rank 1 of 2
    prepare_qat(model, get_recipe(recipe))
    quantizers = getattr(stacks, FAKE_QUANT_ATTR)  # the stack's own, as the engine hands them over
    grouped_experts.install_fake_quant(local, quantizers[grouped_experts.GATE_UP], quantizers[grouped_experts.DOWN])
    setattr(local, grouped_experts.FIRST_EXPERT_ATTR, experts // 2)

    torch.manual_seed(0)
    counts = torch.tensor([5, 0, 7, 3][:experts // 2])
    x = torch.randn(int(counts.sum()) + 3, stacks.gate_up_proj.shape[-1])  # 3 padding rows after the tokens
    owner = torch.repeat_interleave(torch.arange(experts // 2), counts) + experts // 2
    with torch.no_grad():
        got = local(x, counts)
        want = stacks(x[:len(owner)], owner[:, None], torch.ones(len(owner), 1))
    assert torch.equal(got[:len(owner)], want)
    assert torch.equal(got[len(owner):], torch.zeros(3, x.shape[-1]))

    with torch.no_grad():  # the quantizers are on: the float experts differ
        plain = _rank_slice(stacks, experts // 2, experts // 2)(x, counts)
    assert not torch.equal(plain[:len(owner)], want)


def test_an_activation_forge_does_not_fake_quantize_is_refused():
    model, _ = tiny_moe("qwen3_moe")
    local = _rank_slice(model.model.layers[0].mlp.experts, 0, 2)
    local.activation = "geglu_tanh"
    prepare_qat(model, get_recipe("int8-dynamic-act-int4-weight"))
    quantizers = getattr(model.model.layers[0].mlp.experts, FAKE_QUANT_ATTR)
    with pytest.raises(ConfigError, match="geglu_tanh"):
        grouped_experts.install_fake_quant(local, quantizers[grouped_experts.GATE_UP], quantizers[grouped_experts.DOWN])
