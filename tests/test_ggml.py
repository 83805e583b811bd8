"""llama.cpp's Q4_K_M types in torch (forge_qat/qat/ggml.py) and their GGUF bytes (forge_qat/export/ggml_blocks.py):
dequantized values equal gguf's reader bit for bit, the quantizers reproduce llama.cpp's own output on real weights,
and the type rule reproduces llama-quantize's Q4_K_M choices."""

from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from gguf.quants import dequantize, quantize  # noqa: E402

from forge_qat.export import ggml_blocks  # noqa: E402
from forge_qat.qat import ggml  # noqa: E402

TYPES = {"Q4_K": ggml_blocks.q4_k_bytes, "Q6_K": ggml_blocks.q6_k_bytes, "Q5_0": ggml_blocks.q5_0_bytes,
         "Q8_0": ggml_blocks.q8_0_bytes}


def _awkward(rows: int = 12, cols: int = 768) -> torch.Tensor:
    """Gaussian weights with the blocks that take special paths: all zero, constant, one sign only, an outlier,
    values far below and above the rest, one element set."""
    torch.manual_seed(0)
    x = torch.randn(rows, cols) * 0.05
    x[0] = 0  # whole super-blocks of zeros
    x[1, :32] = 0
    x[2, :32] = -0.3  # a constant negative sub-block: Q4_K's flat case
    x[3, :64] = x[3, :64].abs()  # positive only: Q4_K's min is 0
    x[4, :64] = -x[4, :64].abs()
    x[5, 7] = 4.0  # an outlier
    x[6, :256] *= 1e-6  # a super-block of tiny values
    x[7, 100] = 1.0
    x[7, :96] = 0
    x[8] *= 40
    return x


@pytest.mark.parametrize("name", TYPES)
@pytest.mark.parametrize("shape", [(12, 768), (64, 1536)])
def test_dequantize_equals_gguf_reader(name, shape):
    x = _awkward(*shape) if shape == (12, 768) else torch.randn(shape) * 0.02
    blocks = ggml.QUANTIZERS[name](x)
    data = TYPES[name](blocks)
    qtype = gguf.GGMLQuantizationType[name]
    assert data.shape == (shape[0], shape[1] // gguf.GGML_QUANT_SIZES[qtype][0] * gguf.GGML_QUANT_SIZES[qtype][1])
    theirs = torch.from_numpy(dequantize(data, qtype))
    ours = blocks.dequantize()
    assert ours.dtype == torch.float32
    assert torch.equal(ours, theirs)
    assert torch.equal(ggml.quantize_dequantize(x, name), ours)
    # and the grid fits: on the awkward tensor, relative squared error as a 4-6-8 bit grid would have it
    bound = {"Q4_K": 0.02, "Q5_0": 0.005, "Q6_K": 0.0015, "Q8_0": 1e-4}[name]
    assert ((ours - x).square().sum() / x.square().sum()).item() < bound


@pytest.mark.parametrize("name", ["Q5_0", "Q8_0"])
def test_block32_bytes_equal_gguf_quantizer(name):
    """gguf's numpy port of llama.cpp's reference quantizer, byte for byte."""
    x = _awkward()
    assert np.array_equal(TYPES[name](ggml.QUANTIZERS[name](x)), quantize(x.numpy(), gguf.GGMLQuantizationType[name]))


@pytest.mark.parametrize("name", ["Q4_K", "Q6_K"])
def test_k_quants_reproduce_llama_cpp(name):
    """Rows of SmolLM2-135M-Instruct's fine-tuned ffn_down (fp16, as llama-quantize read them) and the blocks
    llama-quantize Q4_K_M wrote for them (llama.cpp 0c1e570, no importance matrix): blocks whose candidates
    do not tie to the last bit come out byte-identical (sums run in a different order than llama.cpp's loops,
    so a few may not), and the rest are as close to the weights."""
    stored = np.load(Path(__file__).parent / "data" / "llama_cpp_k_quants.npz")
    source = torch.from_numpy(stored[f"{name.lower()}_source"].astype(np.float32))
    theirs = stored[f"{name.lower()}_bytes"]
    ours = TYPES[name](ggml.QUANTIZERS[name](source))
    size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[name]][1]
    same = (ours.reshape(-1, size) == theirs.reshape(-1, size)).all(-1)
    assert same.mean() >= 0.9, f"{same.sum()}/{same.size} blocks identical"
    qtype = gguf.GGMLQuantizationType[name]
    err = [float(((dequantize(b, qtype) - source.numpy()) ** 2).sum()) for b in (ours, theirs)]
    assert err[0] <= err[1] * 1.001


def test_q4_k_scale_packing_round_trips_every_six_bit_value():
    """Every 6-bit scale and min, in every sub-block position, decodes to itself through gguf's reader."""
    torch.manual_seed(1)
    sc = torch.arange(64, dtype=torch.uint8).reshape(8, 8)
    m = torch.arange(63, -1, -1, dtype=torch.uint8).reshape(8, 8)
    q = torch.randint(0, 16, (8, 256), dtype=torch.uint8)
    d = torch.full((8, 1), 0.5, dtype=torch.float16)
    blocks = ggml.Q4K(q=q, sc=sc, m=m, d=d, dmin=torch.full((8, 1), 0.25, dtype=torch.float16))
    raw = ggml_blocks.q4_k_bytes(blocks).reshape(8, 144)
    got_sc, got_m = gguf.quants.Q4_K.get_scale_min(raw[:, 4:16].copy())
    assert np.array_equal(got_sc, sc.numpy()) and np.array_equal(got_m, m.numpy())
    assert torch.equal(torch.from_numpy(dequantize(raw, gguf.GGMLQuantizationType.Q4_K)), blocks.dequantize())


def test_q4_k_m_types_are_llama_quantizes():
    """SmolLM2-135M (30 layers, hidden 576, intermediate 1536, tied embedding) as llama-quantize Q4_K_M typed it
    (read from its file, llama.cpp 0c1e570)."""
    more = {0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 26, 27, 28, 29}
    for layer in range(30):
        assert ggml.q4_k_m_type("attn_v", layer, 30, 576, tied=True) == ("Q8_0" if layer in more else "Q5_0")
        assert ggml.q4_k_m_type("ffn_down", layer, 30, 1536, tied=True) == ("Q6_K" if layer in more else "Q4_K")
        for role in ("attn_q", "attn_k", "attn_output", "ffn_gate", "ffn_up"):
            assert ggml.q4_k_m_type(role, layer, 30, 576, tied=True) == "Q5_0"
    assert ggml.q4_k_m_type("token_embd", None, 30, 576, tied=True) == "Q8_0"
    # rows of 256s: K-quants; an untied embedding is Q4_K, the output Q6_K; Mixtral's 8 experts
    assert ggml.q4_k_m_type("token_embd", None, 32, 4096, tied=False) == "Q4_K"
    assert ggml.q4_k_m_type("output", None, 32, 4096, tied=False) == "Q6_K"
    assert ggml.q4_k_m_type("token_embd", None, 32, 4096, tied=True) == "Q6_K"
    assert ggml.q4_k_m_type("attn_q", 10, 32, 4096, tied=False) == "Q4_K"
    assert ggml.q4_k_m_type("attn_v", 10, 32, 4096, tied=False, n_expert=8) == "Q8_0"
    assert ggml.q4_k_m_type("attn_output", 10, 32, 4096, tied=False, n_expert=8) == "Q5_K"
    with pytest.raises(ValueError, match="unknown tensor role"):
        ggml.q4_k_m_type("attn_qkv", 0, 32, 4096, tied=False)


def test_q8_k_activations_are_llama_cpps():
    """The K-quant matmuls' activation fake quantizer against llama.cpp's `quantize_row_q8_K_ref`, written out
    element by element in float32 (`nearest_int` rounds half to even)."""
    torch.manual_seed(2)
    x = torch.randn(3, 512)
    x[0, :256] = 0  # an all-zero block
    x[1, 5] = -7.0  # a negative extreme: -127 on it, +127 clamps the other side
    x[2, 300] = 7.0
    got = ggml.Q8KFakeQuantizer()(x)
    want = torch.empty_like(x)
    for r in range(3):
        for b in range(2):
            block = x[r, b * 256:(b + 1) * 256]
            amax, top = 0.0, 0.0
            for v in block.tolist():
                if abs(v) > amax:
                    amax, top = abs(v), v
            if amax == 0:
                want[r, b * 256:(b + 1) * 256] = 0
                continue
            iscale = np.float32(-127.0) / np.float32(top)
            q = np.minimum(127, np.rint(iscale * block.numpy().astype(np.float32)))
            want[r, b * 256:(b + 1) * 256] = torch.from_numpy((q * (np.float32(1) / iscale)).astype(np.float32))
    assert torch.equal(got, want)
