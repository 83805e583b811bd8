"""llama.cpp's weight types in torch: how its quantizer chooses codes and block parameters, and how its runtime
dequantizes them, for the types of its Q4_K_M mix (Q4_K, Q6_K, and the Q5_0 / Q8_0 it falls back to).

Each `quantize_*` follows llama.cpp's reference quantizer (`ggml/src/ggml-quants.c`, `quantize_row_*_ref`, what
`llama-quantize` runs without an importance matrix), vectorized over blocks: the same candidates, rounding
(`nearest_int` is round-half-even, as `torch.round`) and clamps. Sums run in torch's order, not the C loop's, so
a block whose candidates tie to the last bit may choose differently from llama.cpp; any choice is a valid block.
Each `dequantize` computes what llama.cpp's `dequantize_row_*` and gguf's reader compute, in float32 and in the
same operation order, so values are equal bit for bit: that is the contract fake quantization, convert and
`forge export --to gguf` share (tests/test_ggml.py).

Rows are the last dim: a (…, cols) weight is quantized along cols, as GGUF stores a linear's in_features.
"""

import math
from dataclasses import dataclass

import torch

from forge_qat.errors import ConfigError
from forge_qat.formats.weights import true_shape
from forge_qat.qat.fake_quant import consumer_dtype

QK_K = 256
"""Elements per K-quant super-block."""
GROUP_MAX_EPS = 1e-15
"""llama.cpp's bound below which a Q6_K sub-block counts as all zero."""


@dataclass(frozen=True, slots=True)
class Q4K:
    """Q4_K blocks of a (rows, cols) tensor: value = d * sc * q - dmin * m, per sub-block of 32."""

    q: torch.Tensor
    """Codes 0..15, uint8 (rows, cols)."""
    sc: torch.Tensor
    """6-bit sub-block scales 0..63, uint8 (rows, cols / 32)."""
    m: torch.Tensor
    """6-bit sub-block mins 0..63, uint8 (rows, cols / 32)."""
    d: torch.Tensor
    """Super-block scale, float16 (rows, cols / 256)."""
    dmin: torch.Tensor
    """Super-block min scale, float16 (rows, cols / 256)."""

    def parts(self) -> dict[str, torch.Tensor]:
        return {"q": self.q, "sc": self.sc, "m": self.m, "d": self.d, "dmin": self.dmin}

    def dequantize(self) -> torch.Tensor:
        d1 = (self.d.float().repeat_interleave(8, -1) * self.sc.float()).unsqueeze(-1)
        m1 = (self.dmin.float().repeat_interleave(8, -1) * self.m.float()).unsqueeze(-1)
        q = self.q.float().reshape(*self.sc.shape, 32)
        return (d1 * q - m1).reshape(self.q.shape)


@dataclass(frozen=True, slots=True)
class Q6K:
    """Q6_K blocks: value = d * sc * q, q in -32..31, per sub-block of 16 with an int8 scale."""

    q: torch.Tensor
    """Codes -32..31, int8 (rows, cols)."""
    sc: torch.Tensor
    """Sub-block scales, int8 (rows, cols / 16)."""
    d: torch.Tensor
    """Super-block scale, float16 (rows, cols / 256)."""

    def dequantize(self) -> torch.Tensor:
        d1 = (self.d.float().repeat_interleave(16, -1) * self.sc.float()).unsqueeze(-1)
        return (d1 * self.q.float().reshape(*self.sc.shape, 16)).reshape(self.q.shape)


@dataclass(frozen=True, slots=True)
class Blocks32:
    """Q5_0 or Q8_0 blocks: value = d * q per block of 32 (q in -16..15 or -127..127)."""

    q: torch.Tensor
    """Codes, int8 (rows, cols)."""
    d: torch.Tensor
    """Block scale, float16 (rows, cols / 32)."""

    def dequantize(self) -> torch.Tensor:
        return (self.d.float().unsqueeze(-1) * self.q.float().reshape(*self.d.shape, 32)).reshape(self.q.shape)


def _f32(value) -> torch.Tensor:
    """A float32 scalar tensor: candidate factors computed in C's float arithmetic, not Python's double; and the
    numerator of every `c / x` here, which torch computes as `x.reciprocal() * c` (two roundings) when `c` is a
    Python number, where C divides once."""
    return torch.as_tensor(value, dtype=torch.float32)


def _blocks(x: torch.Tensor, size: int) -> torch.Tensor:
    if x.shape[-1] % size:
        raise ValueError(f"last dim {x.shape[-1]} is not a multiple of the block size {size}")
    return x.detach().to(torch.float32).reshape(*x.shape[:-1], x.shape[-1] // size, size)


def _signed_extreme(x: torch.Tensor) -> torch.Tensor:
    """Per block (last dim), the element of largest magnitude, the first one where several tie (llama.cpp's
    `if (amax < fabsf(v))` scan)."""
    return x.gather(-1, x.abs().argmax(-1, keepdim=True))


@torch.no_grad()
def quantize_q8_0(x: torch.Tensor) -> Blocks32:
    """`quantize_row_q8_0_ref`: d = amax / 127, codes roundf(x / d) (half away from zero)."""
    xb = _blocks(x, 32)
    amax = xb.abs().amax(-1, keepdim=True)
    d = amax / 127
    inv = torch.where(d > 0, _f32(1) / d, torch.zeros_like(d))
    v = xb * inv
    q = torch.trunc(v + torch.copysign(torch.full_like(v, 0.5), v))  # C's roundf
    return Blocks32(q=q.to(torch.int8).reshape(x.shape), d=d.squeeze(-1).to(torch.float16))


@torch.no_grad()
def quantize_q5_0(x: torch.Tensor) -> Blocks32:
    """`quantize_row_q5_0_ref`: d = the signed extreme / -16, codes min(31, trunc(x / d + 16.5)) - 16."""
    xb = _blocks(x, 32)
    d = _signed_extreme(xb) / -16
    inv = torch.where(d != 0, _f32(1) / d, torch.zeros_like(d))
    q = torch.trunc(xb * inv + 16.5).clamp_(max=31) - 16
    return Blocks32(q=q.to(torch.int8).reshape(x.shape), d=d.squeeze(-1).to(torch.float16))


def _make_qkx2_quants(x: torch.Tensor, weights: torch.Tensor, nmax: int = 15, rmin: float = -1.0,
                      rdelta: float = 0.1, nstep: int = 20) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """llama.cpp's `make_qkx2_quants` over the last dim of `x` (sub-blocks): the asymmetric grid's scale and min
    (returned as the positive `the_min`) with the least weighted squared error among its candidates, and codes."""
    lo = x.amin(-1, keepdim=True).clamp(max=0)
    hi = x.amax(-1, keepdim=True)
    span = hi - lo
    flat = span == 0
    span = torch.where(flat, torch.ones_like(span), span)
    sum_w = weights.sum(-1, keepdim=True)
    sum_x = (weights * x).sum(-1, keepdim=True)
    iscale = _f32(nmax) / span
    scale = _f32(1) / iscale
    codes = torch.round(iscale * (x - lo)).clamp_(0, nmax)
    best = (weights * (scale * codes + lo - x).square()).sum(-1, keepdim=True)
    the_min = lo.clone()
    for step in range(nstep + 1):
        iscale = _f32(_f32(_f32(rdelta) * step) + rmin) + nmax  # C's float arithmetic: -1.f + 0.1f*is + nmax
        iscale = iscale / span
        aux = torch.round(iscale * (x - lo)).clamp_(0, nmax)
        sum_l = (weights * aux).sum(-1, keepdim=True)
        sum_l2 = (weights * aux * aux).sum(-1, keepdim=True)
        sum_xl = (weights * aux * x).sum(-1, keepdim=True)
        det = sum_w * sum_l2 - sum_l * sum_l
        ok = det > 0
        det = torch.where(ok, det, torch.ones_like(det))
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / det
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det
        positive = this_min > 0
        this_scale = torch.where(positive, sum_xl / torch.where(sum_l2 > 0, sum_l2, torch.ones_like(sum_l2)),
                                 this_scale)
        this_min = torch.where(positive, torch.zeros_like(this_min), this_min)
        err = (weights * (this_scale * aux + this_min - x).square()).sum(-1, keepdim=True)
        better = ok & (err < best) & ~flat
        best = torch.where(better, err, best)
        scale = torch.where(better, this_scale, scale)
        the_min = torch.where(better, this_min, the_min)
        codes = torch.where(better, aux, codes)
    scale = torch.where(flat, torch.zeros_like(scale), scale)
    codes = torch.where(flat, torch.zeros_like(codes), codes)
    return scale.squeeze(-1), -the_min.squeeze(-1), codes


@torch.no_grad()
def quantize_q4_k(x: torch.Tensor) -> Q4K:
    """`quantize_row_q4_K_ref`: per sub-block of 32, `make_qkx2_quants` weighted by rms + |x|; the sub-block scales
    and mins rounded to 6 bits against the super-block's largest (d = max scale / 63, dmin = max min / 63, fp16);
    then every code chosen again against the stored d * sc and dmin * m."""
    xs = _blocks(x, 32)
    weights = xs.square().mean(-1, keepdim=True).sqrt() + xs.abs()
    scales, mins, codes = _make_qkx2_quants(xs, weights)
    sup = scales.reshape(*scales.shape[:-1], -1, 8)
    sup_min = mins.reshape(*mins.shape[:-1], -1, 8)
    max_scale = sup.amax(-1, keepdim=True).clamp(min=0)
    max_min = sup_min.amax(-1, keepdim=True).clamp(min=0)
    inv_scale = torch.where(max_scale > 0, _f32(63) / max_scale, torch.zeros_like(max_scale))
    inv_min = torch.where(max_min > 0, _f32(63) / max_min, torch.zeros_like(max_min))
    sc = torch.round(inv_scale * sup).clamp_(max=63)
    m = torch.round(inv_min * sup_min).clamp_(max=63)
    d = (max_scale / 63).to(torch.float16)
    dmin = (max_min / 63).to(torch.float16)
    d1 = (d.float() * sc).reshape(scales.shape).unsqueeze(-1)
    dm = (dmin.float() * m).reshape(mins.shape).unsqueeze(-1)
    again = torch.round((xs + dm) / torch.where(d1 != 0, d1, torch.ones_like(d1))).clamp_(0, 15)
    codes = torch.where(d1 != 0, again, codes)  # llama.cpp keeps the first codes where d * sc is 0
    return Q4K(q=codes.to(torch.uint8).reshape(x.shape), sc=sc.to(torch.uint8).reshape(scales.shape),
               m=m.to(torch.uint8).reshape(mins.shape), d=d.squeeze(-1), dmin=dmin.squeeze(-1))


def _make_qx_quants(x: torch.Tensor, nmax: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """llama.cpp's `make_qx_quants` with rmse_type 1 (weights x^2) over the last dim: the signed scale of the
    symmetric grid [-nmax, nmax - 1] that best fits, among 19 candidates around -nmax / the signed extreme, and
    its codes (signed)."""
    top = _signed_extreme(x)
    zero = top.abs() < GROUP_MAX_EPS
    top = torch.where(zero, torch.ones_like(top), top)
    w = x * x

    def fit(iscale):
        codes = torch.round(iscale * x).clamp_(-nmax, nmax - 1)
        return codes, (w * x * codes).sum(-1, keepdim=True), (w * codes * codes).sum(-1, keepdim=True)

    codes, sumlx, suml2 = fit(_f32(-nmax) / top)
    scale = sumlx / torch.where(suml2 > 0, suml2, torch.ones_like(suml2))
    best = scale * sumlx
    for step in [s for s in range(-9, 10) if s]:
        aux, sumlx, suml2 = fit(-(_f32(_f32(0.1) * step) + nmax) / top)  # C's -(nmax + 0.1f*is) / max
        better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        this = sumlx / torch.where(suml2 > 0, suml2, torch.ones_like(suml2))
        codes = torch.where(better, aux, codes)
        scale = torch.where(better, this, scale)
        best = torch.where(better, this * sumlx, best)
    # an all-zero sub-block keeps stored code 0, i.e. -nmax
    return torch.where(zero, torch.zeros_like(scale), scale).squeeze(-1), torch.where(zero, -nmax, codes)


@torch.no_grad()
def quantize_q6_k(x: torch.Tensor) -> Q6K:
    """`quantize_row_q6_K_ref`: per sub-block of 16 `make_qx_quants(16, 32, rmse_type 1)`; the signed sub-block
    scales rounded to int8 against the super-block's extreme (d = extreme / -128, fp16); codes chosen again
    against the stored d * sc. A super-block whose scales are all below 1e-15 is stored as zeros."""
    xs = _blocks(x, 16)
    scales, codes = _make_qx_quants(xs)
    sup = scales.reshape(*scales.shape[:-1], -1, 16)
    top = _signed_extreme(sup)
    zero = top.abs() < GROUP_MAX_EPS
    iscale = _f32(-128) / torch.where(zero, torch.ones_like(top), top)
    d = torch.where(zero, torch.zeros_like(top), _f32(1) / iscale).to(torch.float16)
    sc = torch.where(zero, torch.zeros_like(sup), torch.round(iscale * sup).clamp_(max=127))
    d1 = (d.float() * sc).reshape(scales.shape).unsqueeze(-1)
    again = torch.round(xs / torch.where(d1 != 0, d1, torch.ones_like(d1))).clamp_(-32, 31)
    codes = torch.where(d1 != 0, again, codes)
    codes = torch.where(zero.repeat_interleave(16, -2).reshape(*scales.shape, 1), -32, codes)  # memset: stored 0
    return Q6K(q=codes.to(torch.int8).reshape(x.shape), sc=sc.to(torch.int8).reshape(scales.shape),
               d=d.squeeze(-1))


QUANTIZERS = {"Q4_K": quantize_q4_k, "Q6_K": quantize_q6_k, "Q5_0": quantize_q5_0, "Q8_0": quantize_q8_0}
"""The quantizer of each llama.cpp type this module holds."""
BLOCK = {"Q4_K": QK_K, "Q6_K": QK_K, "Q5_0": 32, "Q8_0": 32}
"""Elements per block: a row's length must be a multiple."""


def quantize_dequantize(x: torch.Tensor, ggml_type: str) -> torch.Tensor:
    """The values llama.cpp runs for `x` stored as `ggml_type` (float32)."""
    return QUANTIZERS[ggml_type](x).dequantize()


# ---- llama.cpp's Q4_K_M mix ------------------------------------------------------------------------------------

FALLBACK = {"Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}
"""llama.cpp's type for a tensor whose rows are not a multiple of 256 (`tensor_type_fallback`)."""

ROLES = ("token_embd", "output", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
"""The tensor categories llama.cpp's type choice tells apart (`tensor_get_category`); experts' and shared experts'
projections count as their ffn role."""


def _more_bits(layer: int, n_layers: int) -> bool:
    """llama.cpp's `use_more_bits`: the first and last eighth of the layers and every third one between."""
    return layer < n_layers // 8 or layer >= 7 * n_layers // 8 or (layer - n_layers // 8) % 3 == 2


def q4_k_m_type(role: str, layer: int | None, n_layers: int, cols: int, *, tied: bool, n_expert: int = 0) -> str:
    """The type llama.cpp's `llama-quantize … Q4_K_M` gives a tensor (`llama_tensor_get_type_impl` at the pinned
    commit, without an importance matrix or overrides): `role` one of `ROLES`, `layer` its block index (None for
    the embedding and output), `cols` its row length (a linear's in_features), `tied`: the embedding is the output
    head. The output (or the tied embedding) is Q6_K, Q8_0 if its rows are not a multiple of 256; attn_v and
    ffn_down Q6_K in `_more_bits` layers; everything else Q4_K; 8-expert models (Mixtral) get Q8_0 attn_v / attn_k
    and Q5_K attn_output; then the fallback of rows that are not a multiple of 256 (`FALLBACK`)."""
    if role not in ROLES:
        raise ValueError(f"unknown tensor role {role!r}; valid: {', '.join(ROLES)}")
    if role == "output" or (role == "token_embd" and tied):
        return "Q8_0" if cols % QK_K else "Q6_K"
    chosen = "Q4_K"
    if role == "attn_v":
        chosen = "Q8_0" if n_expert == 8 else "Q6_K" if _more_bits(layer, n_layers) else "Q4_K"
    elif role == "attn_k" and n_expert == 8:
        chosen = "Q8_0"
    elif role == "attn_output" and n_expert == 8:
        chosen = "Q5_K"
    elif role == "ffn_down" and _more_bits(layer, n_layers):
        chosen = "Q6_K"
    if cols % BLOCK.get(chosen, QK_K):
        chosen = FALLBACK.get(chosen, chosen)
    return chosen


# ---- fake quantization ----------------------------------------------------------------------------------------

class _WeightFakeQuantize(torch.autograd.Function):
    """llama.cpp's quantize -> dequantize of a weight, straight through for the gradient: every type here fits
    its blocks' range (Q4_K and Q6_K search scales that may clip an element by a code; the gradient ignores
    that)."""

    @staticmethod
    def forward(ctx, w: torch.Tensor, ggml_type: str, out_dtype: torch.dtype) -> torch.Tensor:
        ctx.w_dtype = w.dtype
        flat = w.reshape(-1, w.shape[-1])
        return quantize_dequantize(flat, ggml_type).to(out_dtype).view(w.shape)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad.to(ctx.w_dtype), None, None


class _Q8KFakeQuantize(torch.autograd.Function):
    """llama.cpp's `quantize_row_q8_K` (the activations of its K-quant matmuls) then its dequantization: per block
    of 256, iscale = -127 / the signed extreme, codes min(127, round(x * iscale)), value = code * (1 / iscale)
    (d kept in float32); an all-zero block stays zero. Straight through."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        ctx.x_dtype = x.dtype
        xb = _blocks(x.reshape(-1, x.shape[-1]), QK_K)
        top = _signed_extreme(xb)
        zero = top == 0
        iscale = _f32(-127) / torch.where(zero, torch.ones_like(top), top)
        q = torch.round(iscale * xb).clamp_(max=127)
        d = torch.where(zero, torch.zeros_like(iscale), _f32(1) / iscale)
        return (q * d).to(out_dtype).view(x.shape)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad.to(ctx.x_dtype), None


class GgmlWeightFakeQuantizer(torch.nn.Module):
    """A `FakeQuantizedLinear`'s weight fake quantizer for one llama.cpp type (`QUANTIZERS`): the forward is what
    llama.cpp stores for the current weight (its reference quantizer, then its dequantization). Holds no tensors."""

    def __init__(self, ggml_type: str):
        super().__init__()
        if ggml_type not in QUANTIZERS:
            raise ValueError(f"no fake quantizer for {ggml_type}; these types have one: {', '.join(QUANTIZERS)}")
        self.ggml_type = ggml_type
        self.enabled = True

    @property
    def config(self) -> "GgmlWeightFakeQuantizer":
        """What torchao's convert step reads; forge converts these layers itself (`forge_qat.qat.convert`)."""
        return self

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return w
        return _WeightFakeQuantize.apply(w, self.ggml_type, consumer_dtype(w))

    def extra_repr(self) -> str:
        return self.ggml_type


class Q8KFakeQuantizer(torch.nn.Module):
    """The activation fake quantizer of a K-quant matmul (llama.cpp's Q8_K, see `_Q8KFakeQuantize`)."""

    def __init__(self):
        super().__init__()
        self.enabled = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        return _Q8KFakeQuantize.apply(x, consumer_dtype(x))

    def extra_repr(self) -> str:
        return "Q8_K"


def ggml_types(model: torch.nn.Module) -> dict[str, int]:
    """Parameters of a prepared model's linear layers and expert stacks by llama.cpp type (empty for other
    recipes)."""
    from forge_qat.qat.experts import FAKE_QUANT_ATTR

    counts: dict[str, int] = {}
    for module in model.modules():
        sites = [(getattr(module, "weight_fake_quantizer", None), "weight")] if "weight" in module._parameters else []
        sites += [(q.weight_fake_quantizer, name) for name, q in getattr(module, FAKE_QUANT_ATTR, {}).items()]
        for quantizer, name in sites:
            if isinstance(quantizer, GgmlWeightFakeQuantizer):
                numel = math.prod(true_shape(getattr(module, name)))  # a ZeRO-3 partition's full size
                counts[quantizer.ggml_type] = counts.get(quantizer.ggml_type, 0) + numel
    return dict(sorted(counts.items()))


ACTIVATIONS = {"Q4_K": "Q8_K", "Q5_K": "Q8_K", "Q6_K": "Q8_K", "Q5_0": "Q8_0", "Q8_0": "Q8_0"}
"""The type llama.cpp's CPU backend quantizes a matmul's activations to for each weight type (`vec_dot_type`)."""


ROLE_OF = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
           "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down", "lm_head": "output",
           "gate_up_proj": "ffn_up",  # an experts module's fused stack: ffn_gate_exps and ffn_up_exps, typed alike
           "embed_tokens": "token_embd"}
"""llama.cpp's tensor role of each transformers module name (the last part of the name)."""


def role_of(module_name: str) -> str:
    """The llama.cpp role (`ROLES`) of a transformers module, by the last part of its name."""
    last = module_name.rpartition(".")[2]
    if last not in ROLE_OF:
        raise ConfigError(f"{module_name}: no llama.cpp tensor role for a module named {last!r} (known: "
                         f"{', '.join(ROLE_OF)})")
    return ROLE_OF[last]


Q4K_ATTR = "forge_q4_k"
"""The attribute where a converted module keeps the Q4_K blocks of the weights it stores as values, by parameter
name (`weight` for a linear, the stack's name for experts), for the artifact's `forge_blocks/q4_k.safetensors`."""

INTX = {"Q5_0": (torch.int5, 32), "Q8_0": (torch.int8, 32), "Q6_K": (torch.int6, 16)}
"""The types torchao's `IntxUnpackedToInt8Tensor` holds exactly, as (target dtype, block): value = code * scale in
the model's dtype from a float32 scale (Q6_K: d * sc, exact in float32), as llama.cpp computes it."""


def intx_tensor(blocks: "Blocks32 | Q6K", ggml_type: str, dtype: torch.dtype):
    """The weight-only torchao tensor holding `blocks` exactly (`INTX`), of the codes' shape (2-D for a linear,
    3-D for an expert stack)."""
    from forge_qat.torchao_compat import IntxUnpackedToInt8Tensor

    target, block = INTX[ggml_type]
    if ggml_type == "Q6_K":
        scale = blocks.d.float().repeat_interleave(QK_K // 16, -1) * blocks.sc.float()
    else:
        scale = blocks.d.float()
    return IntxUnpackedToInt8Tensor(blocks.q.to(torch.int8), scale, torch.zeros_like(scale, dtype=torch.int8),
                                    target, (1,) * (blocks.q.dim() - 1) + (block,), dtype, None)


def convert_weight(module: torch.nn.Module, name: str, ggml_type: str) -> None:
    """Replace `module.<name>` (a linear's weight or an expert stack) by what convert stores for llama.cpp's
    `ggml_type`: the blocks llama.cpp's quantizer chooses for it (what the fake quantizer multiplied by), as a
    weight-only torchao tensor where one holds them (`INTX`), else (Q4_K) as the values they decode to, in the
    weight's dtype, with the blocks kept on the module (`Q4K_ATTR`)."""
    weight = getattr(module, name).detach()
    blocks = QUANTIZERS[ggml_type](weight)
    if ggml_type in INTX:
        value = intx_tensor(blocks, ggml_type, weight.dtype)
    else:
        value = blocks.dequantize().to(weight.dtype)
        module.__dict__.setdefault(Q4K_ATTR, {})[name] = blocks
    setattr(module, name, torch.nn.Parameter(value, requires_grad=False))
