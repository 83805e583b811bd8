"""GGUF's block layouts (ggml's `block_q4_0`, `block_q8_0`, `block_q5_0`, `block_q4_K`, `block_q6_K`): the bytes
`forge export --to gguf` writes for codes and block parameters, packed as llama.cpp's `quantize_row_*_ref` packs
them. Every function takes a (rows, cols) layout and returns (rows, bytes per row) uint8; gguf's reader
dequantizes the result to the values `forge_qat.qat.ggml` computes (tests/test_ggml.py)."""

import numpy as np
import torch

from forge_qat.errors import InputError
from forge_qat.qat.ggml import Q4K, Q6K, Blocks32


def _half_bytes(d: torch.Tensor) -> torch.Tensor:
    """fp16 values (…, n) as their little-endian bytes (…, n, 2)."""
    return d.to(torch.float16).contiguous().view(torch.uint8).reshape(*d.shape, 2)


def _rows(blocks: torch.Tensor) -> np.ndarray:
    return blocks.reshape(blocks.shape[0], -1).numpy()


def q4_0_bytes(b: Blocks32) -> np.ndarray:
    """18 bytes per 32 values: d, then 16 bytes holding codes + 8, element j in the low nibble of byte j and
    element j + 16 in its high nibble. int2/int3 codes lie inside [-8, 7] and are held exactly."""
    rows, n = b.d.shape
    if b.q.min() < -8 or b.q.max() > 7:
        raise InputError("int4 codes outside [-8, 7]: not a symmetric int4 grid")
    codes = (b.q.to(torch.int16) + 8).to(torch.uint8).reshape(rows, n, 32)
    return _rows(torch.cat([_half_bytes(b.d), codes[..., :16] | (codes[..., 16:] << 4)], -1))


def q8_0_bytes(b: Blocks32) -> np.ndarray:
    """34 bytes per 32 values: d, then the int8 codes."""
    rows, n = b.d.shape
    return _rows(torch.cat([_half_bytes(b.d), b.q.contiguous().view(torch.uint8).reshape(rows, n, 32)], -1))


def q5_0_bytes(b: Blocks32) -> np.ndarray:
    """22 bytes per 32 values: d; qh, the fifth bits of the codes + 16 as a little-endian uint32 (bit j for
    element j); qs, their low nibbles (element j low, j + 16 high)."""
    rows, n = b.d.shape
    if b.q.min() < -16 or b.q.max() > 15:
        raise ValueError("Q5_0 codes outside [-16, 15]")
    u = (b.q.to(torch.int16) + 16).to(torch.int64).reshape(rows, n, 32)
    qs = (u[..., :16] & 0xF) | ((u[..., 16:] & 0xF) << 4)
    qh = ((u >> 4) << torch.arange(32)).sum(-1, keepdim=True)  # distinct bits: the sum is the bitwise or
    qh_bytes = (qh >> torch.arange(0, 32, 8)) & 0xFF
    return _rows(torch.cat([_half_bytes(b.d), qh_bytes.to(torch.uint8), qs.to(torch.uint8)], -1))


def q4_k_bytes(b: Q4K) -> np.ndarray:
    """144 bytes per 256 values: d, dmin, the 8 six-bit scales and mins in 12 bytes (`get_scale_min_k4`'s layout),
    then the codes of each 64 values as 32 bytes (element l low nibble, l + 32 high)."""
    rows, n = b.d.shape
    sc = b.sc.to(torch.int64).reshape(rows, n, 8)
    m = b.m.to(torch.int64).reshape(rows, n, 8)
    if sc.max() > 63 or m.max() > 63:
        raise ValueError("Q4_K sub-block scales and mins are 6-bit")
    low = torch.cat([sc[..., :4] | ((sc[..., 4:] >> 4) << 6), m[..., :4] | ((m[..., 4:] >> 4) << 6),
                     (sc[..., 4:] & 0xF) | ((m[..., 4:] & 0xF) << 4)], -1)
    q = b.q.to(torch.int64).reshape(rows, n, 4, 2, 32)
    qs = (q[..., 0, :] | (q[..., 1, :] << 4)).reshape(rows, n, 128)
    return _rows(torch.cat([_half_bytes(b.d), _half_bytes(b.dmin), low.to(torch.uint8), qs.to(torch.uint8)], -1))


def q6_k_bytes(b: Q6K) -> np.ndarray:
    """210 bytes per 256 values: ql (128, low nibbles), qh (64, high two bits), the 16 int8 scales, d. Per half of
    128 values, ql byte l holds elements l and l + 64, byte l + 32 elements l + 32 and l + 96; qh byte l the high
    bits of elements l, l + 32, l + 64, l + 96 (codes stored + 32)."""
    rows, n = b.d.shape
    if b.q.min() < -32 or b.q.max() > 31:
        raise ValueError("Q6_K codes outside [-32, 31]")
    u = (b.q.to(torch.int64) + 32).reshape(rows, n, 2, 4, 32)
    ql = torch.cat([(u[..., 0, :] & 0xF) | ((u[..., 2, :] & 0xF) << 4),
                    (u[..., 1, :] & 0xF) | ((u[..., 3, :] & 0xF) << 4)], -1).reshape(rows, n, 128)
    qh = ((u >> 4) << torch.tensor([0, 2, 4, 6]).reshape(4, 1)).sum(-2).reshape(rows, n, 64)
    return _rows(torch.cat([ql.to(torch.uint8), qh.to(torch.uint8),
                            b.sc.contiguous().view(torch.uint8).reshape(rows, n, 16), _half_bytes(b.d)], -1))
