"""Fused fake quantizers reproduce torchao's IntxFakeQuantizer exactly: forward values and gradients."""

import pytest
import torch
from torchao.quantization.qat import IntxFakeQuantizeConfig
from torchao.quantization.qat.fake_quantizer import IntxFakeQuantizer

from forge_qat.fake_quant import AffineFakeQuantizer
from forge_qat.prepare import _fused_spec

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
