"""Fused fake quantizers reproduce torchao's IntxFakeQuantizer exactly: forward values and gradients."""

import pytest
import torch
from torchao.quantization.qat import IntxFakeQuantizeConfig
from torchao.quantization.qat.fake_quantizer import IntxFakeQuantizer

from forge_qat.qat.fake_quant import AffineFakeQuantizer, fake_quantize
from forge_qat.qat.prepare import _fused_spec

CASES = {
    "int8-per-token-asym": (IntxFakeQuantizeConfig(torch.int8, "per_token", is_symmetric=False,
                                                   scale_precision=None), (3, 7, 64)),
    "int4-per-group-sym": (IntxFakeQuantizeConfig(torch.int4, group_size=32, scale_precision=None), (48, 96)),
    "int4-per-channel-sym": (IntxFakeQuantizeConfig(torch.int4, "per_channel", scale_precision=None), (16, 64)),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", list(CASES))
def test_fused_matches_torchao_forward_and_backward(case, dtype):
    config, shape = CASES[case]
    torchao_fq = IntxFakeQuantizer(config)
    spec = _fused_spec(torchao_fq)
    assert spec is not None, "this config must have a fused equivalent"
    fused = AffineFakeQuantizer(spec)

    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(shape, generator=gen) * 3).to(dtype)
    x.view(-1)[5] = 40.0  # an outlier, so some groups clip and the mask matters
    grad = torch.randn(shape, generator=gen).to(dtype)

    a = x.clone().requires_grad_()
    b = x.clone().requires_grad_()
    out_ref = torchao_fq(a)
    out = fused(b)
    out_ref.backward(grad)
    out.backward(grad)

    assert out.dtype == out_ref.dtype == dtype
    torch.testing.assert_close(out, out_ref, rtol=0, atol=0)
    torch.testing.assert_close(b.grad, a.grad, rtol=0, atol=0)
    # the outputs really are on a quantization grid, not the input passed through
    assert not torch.equal(out, x)


def test_configs_without_fused_equivalent_are_left_to_torchao():
    asym_group = IntxFakeQuantizer(IntxFakeQuantizeConfig(torch.int4, group_size=32, is_symmetric=False))
    static = IntxFakeQuantizer(IntxFakeQuantizeConfig(torch.int8, "per_token", is_symmetric=False,
                                                      is_dynamic=False))
    assert _fused_spec(asym_group) is None
    assert _fused_spec(static) is None


def test_disabled_quantizer_is_identity():
    config, shape = CASES["int4-per-group-sym"]
    fq = AffineFakeQuantizer(_fused_spec(IntxFakeQuantizer(config)))
    fq.enabled = False
    x = torch.randn(shape)
    assert fq(x) is x


def test_prepared_linear_matches_torchao_under_autocast():
    """Emitting the autocast dtype from the fused quantizer is the same as autocast's own cast."""
    import copy

    from torchao.quantization import quantize_
    from torchao.quantization.qat import QATConfig

    from forge_qat.qat.prepare import prepare_qat
    from forge_qat.qat.registry import get_recipe

    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.Linear(96, 32))
    ours, theirs = copy.deepcopy(base), copy.deepcopy(base)
    prepare_qat(ours, get_recipe("int8-dynamic-act-int4-weight"))
    quantize_(theirs, QATConfig(get_recipe("int8-dynamic-act-int4-weight").base_config(), step="prepare"))
    x = torch.randn(4, 10, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out_ours, out_theirs = ours(x), theirs(x)
    assert out_ours.dtype == out_theirs.dtype == torch.bfloat16
    torch.testing.assert_close(out_ours, out_theirs, rtol=0, atol=0)
    out_ours.float().square().sum().backward()
    out_theirs.float().square().sum().backward()
    for a, b in zip(ours.parameters(), theirs.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=0)


def test_ggml_activation_grid_is_llama_cpps_q8_0():
    """The `llama-cpp-q4-0` recipe's activation fake quantization is llama.cpp's Q8_0 round trip, checked against
    the gguf package's bit-exact port of ggml's reference quantizer. The reference multiplies by 1/d and rounds
    half away from zero; llama.cpp's x86 path (and forge) multiply by 127/amax and round half to even, so a
    value can move by one code where x * scale lands on a tie: rare, and never more than one code."""
    gguf = pytest.importorskip("gguf")
    from forge_qat.qat.numerics import GGML_Q8_0

    torch.manual_seed(0)
    x = torch.randn(64, 256) * torch.logspace(-3, 2, 64).unsqueeze(1)
    x[0, :32] = 0  # an all-zero block decodes to zeros
    q8 = gguf.GGMLQuantizationType.Q8_0
    want = torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(x.numpy(), q8), q8).copy())
    got = fake_quantize(x, GGML_Q8_0)
    step = (x.reshape(-1, 32).abs().amax(-1, keepdim=True) / 127).half().float()
    diff = (got - want).reshape(-1, 32).abs()
    assert (diff <= step * 1.0001).all() and (diff > 0).float().mean() < 1e-3
    assert torch.equal(got[0, :32], torch.zeros(32))
    assert not torch.equal(got, x)
    x.requires_grad_(True)
    fake_quantize(x, GGML_Q8_0).sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))  # nothing clips: straight through
