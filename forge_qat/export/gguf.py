"""GGUF for llama.cpp, written from a forge artifact's integer codes and scales, never re-quantized.

Called by `forge export --to gguf`. The trained grid is what llama.cpp runs: an int4 per-group(32)
symmetric weight becomes `Q4_0` (block scale `d` = the group's scale as fp16, code = q + 8), an int8
per-channel weight (`int8-dynamic-act-int8-weight`'s linears, the int8 embedding tables of
`*-int8-embeddings`) `Q8_0` (the row's scale repeated for each block of 32). Exact wherever the scale is
fp16-representable, which every scale of the `*-bf16-scales` recipes is (a bf16 value in fp16's normal
range); any block whose scale fp16 rounds is counted and reported. Float tensors keep their dtype (1-D ones
become F32, as llama.cpp wants). The header is written from the shards' headers alone; then each tensor is
read from the safetensors shards, packed and written a chunk of rows at a time, so memory stays at one
chunk whatever the model's size.

The architecture mapping is ours (`ARCHITECTURES`: which llama.cpp architecture, its hyperparameter keys,
llama's rotary row order); tensor names come from the `gguf` package's own `TensorNameMap`.
"""

from dataclasses import dataclass, field
from hashlib import sha256
from pathlib import Path

import gguf
import numpy as np
import torch

from forge_qat import __version__
from forge_qat.errors import ConfigError, InputError
from forge_qat.export import ggml_blocks
from forge_qat.export.source import artifact_source_size
from forge_qat.formats import q4_k_blocks
from forge_qat.formats.artifact import ArtifactReader, Entry
from forge_qat.formats.atomic import atomic_file, check_output
from forge_qat.models import load_config, load_tokenizer
from forge_qat.qat.ggml import Q4K, Q6K, Blocks32


@dataclass(frozen=True, slots=True)
class Architecture:
    gguf_arch: str
    """llama.cpp's architecture name (`gguf.MODEL_ARCH_NAMES`)."""
    permute_qk: bool
    """llama.cpp's LLaMA rope pairs adjacent dimensions where transformers rotates halves: q and k rows are
    reordered head by head (the same reorder llama.cpp's own converter applies)."""
    default_pre_tokenizer: str
    """llama.cpp's pre-tokenizer for the family, when the tokenizer is not recognised (`PRE_TOKENIZER_HASHES`)."""


ARCHITECTURES: dict[str, Architecture] = {
    "llama": Architecture("llama", permute_qk=True, default_pre_tokenizer="llama-bpe"),
    "mistral": Architecture("llama", permute_qk=True, default_pre_tokenizer="llama-bpe"),
    # llama.cpp runs Mixtral as llama with experts
    "mixtral": Architecture("llama", permute_qk=True, default_pre_tokenizer="llama-bpe"),
    "qwen2": Architecture("qwen2", permute_qk=False, default_pre_tokenizer="qwen2"),
    "qwen3": Architecture("qwen3", permute_qk=False, default_pre_tokenizer="qwen2"),
    "qwen3_moe": Architecture("qwen3moe", permute_qk=False, default_pre_tokenizer="qwen2"),
}

PRE_TOKENIZER_TEXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n\U0001f680 (normal) \U0001f636\u200d\U0001f32b\ufe0f (multiple "
    "emojis concatenated) \u2705 \U0001f999\U0001f999 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 "
    "\u1780\u17b6\u1793\u17cb\u178f\u17c2\u1796\u17b7\u179f\u17c1\u179f\u17a2\u17b6\u1785\U0001f601 "
    "?\u6211\u60f3\u5728apple\u5de5\u4f5c1314151\u5929\uff5e ------======= "
    "\u043d\u0435\u0449\u043e \u043d\u0430 \u0411\u044a\u043b\u0433\u0430\u0440\u0441\u043a\u0438 "
    "''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you sure? 'M not sure I'll "
    "make it, 'D you like some tea? We'Ve a'lL")
"""The text llama.cpp's converter encodes to recognise a BPE pre-tokenizer: the sha256 of `str(ids)` names it."""

PRE_TOKENIZER_HASHES = {
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # Llama 3
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",  # Qwen1.5 and later
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",  # SmolLM, SmolLM2
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",
    "63b97e4253352e6f357cc59ea5b583e3a680eaeaf2632188c2b952de2588485e": "tekken",  # Mistral Nemo
    "b3f499bb4255f8ca19fccd664443283318f2fd2414d5e0b040fbdd0cc195d6c5": "deepseek-r1-qwen",
}
"""llama.cpp's names for the tokenizers of the families this export covers (from its converter's table)."""

def detect_pre_tokenizer(tokenizer) -> str | None:
    """llama.cpp's name for `tokenizer`, recognised as llama.cpp's converter does."""
    ids = tokenizer.encode(PRE_TOKENIZER_TEXT)
    return PRE_TOKENIZER_HASHES.get(sha256(str(ids).encode()).hexdigest())


@dataclass
class GgufReport:
    path: Path
    architecture: str
    tensors: int = 0
    by_type: dict[str, int] = field(default_factory=dict)
    """Tensors per GGUF type (Q4_0, Q8_0, F32, ...)."""
    quantized_params: int = 0
    float_params: int = 0
    rounded_blocks: int = 0
    """Quantized blocks whose scale is not fp16-representable (stored rounded: not the trained grid)."""
    total_blocks: int = 0
    widened: dict[str, int] = field(default_factory=dict)
    """Parameters by grid (int2, int3) stored in Q4_0, whose codes hold them exactly at 4.5 bits per weight."""
    bytes: int = 0
    source_bytes: int = 0
    source_dtype: str = ""
    """The checkpoint the artifact was finalized from, as stored (0 and "": not recorded)."""
    pre_tokenizer: str = ""
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {**self.__dict__, "path": str(self.path)}


def _permute_rows(t: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's LLaMA q/k row order: within each head, the two rotary halves interleaved."""
    return t.reshape(n_head, 2, t.shape[0] // n_head // 2, *t.shape[1:]).swapaxes(1, 2).reshape(t.shape)


def _fp16_scales(scale: torch.Tensor, codes: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The block scales as fp16, and how many of them fp16 had to round in blocks whose `codes` (the block's
    values, one block per row of `scale`'s shape) are not all zero: an all-zero block (a padding token's
    embedding, scale = eps) decodes to zeros whatever its scale."""
    half = scale.to(torch.float16)
    used = codes.reshape(*scale.shape, -1).ne(0).any(-1)
    return half, int(((half.to(torch.float32) != scale.to(torch.float32)) & used).sum())


# ---- what each tensor becomes ---------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Planned:
    entry: Entry
    gguf_name: str
    ggml_type: gguf.GGMLQuantizationType
    shape: tuple[int, ...]
    """As numpy holds the data written: logical shape for float tensors, byte shape for block types."""
    nbytes: int
    permute_heads: int | None
    params: int
    rows: tuple[int, int] | None = None
    """A slice of the second-to-last dim (a fused expert stack's gate or up half)."""


def _float_type(dtype: torch.dtype, ndim: int):
    if ndim == 1 or dtype == torch.float32:
        return gguf.GGMLQuantizationType.F32, 4
    if dtype == torch.float16:
        return gguf.GGMLQuantizationType.F16, 2
    if dtype == torch.bfloat16:
        return gguf.GGMLQuantizationType.BF16, 2
    raise InputError(f"cannot store a {dtype} tensor in GGUF")


def _block_type(entry: Entry, shape: list[int]):
    """The GGUF block type holding this torchao tensor's grid exactly, or a clear refusal."""
    data = entry.info.get("_data", {})
    cols, rows = shape[-1], int(np.prod(shape[:-1]))
    if entry.kind == "IntxUnpackedToInt8Tensor":
        bits = data.get("target_dtype", {}).get("_data")
        block = data.get("block_size")
        lead = [1] * (len(shape) - 1)
        if bits in ("int2", "int3", "int4") and block == lead + [32]:
            # int2/int3 codes lie inside Q4_0's [-8, 7]: stored exactly, at Q4_0's size (`GgufReport.widened`)
            return gguf.GGMLQuantizationType.Q4_0, rows * cols // 32 * 18
        if bits == "int8" and block in (lead + [cols], lead + [32]) and cols % 32 == 0:  # per row: tables
            return gguf.GGMLQuantizationType.Q8_0, rows * cols // 32 * 34
        if bits == "int5" and block == lead + [32]:
            return gguf.GGMLQuantizationType.Q5_0, rows * cols // 32 * 22
        if bits == "int6" and block == lead + [16] and cols % 256 == 0:
            return gguf.GGMLQuantizationType.Q6_K, rows * cols // 256 * 210
        raise ConfigError(f"{entry.name}: {bits} weights in groups of {(block or ['?'])[-1]} have no exact GGUF "
                          f"type (Q4_0 holds int2-int4 in groups of 32; Q5_0 int5 in groups of 32; Q8_0 int8 per "
                          f"channel or in groups of 32; Q6_K int6 in groups of 16, rows of 256s)")
    if entry.kind == "Int8Tensor" and cols % 32 == 0:
        return gguf.GGMLQuantizationType.Q8_0, rows * cols // 32 * 34
    raise ConfigError(f"{entry.name}: {entry.kind} has no exact GGUF type")


def _parts(entry: Entry, shape: list[int]) -> list[tuple[str, tuple[int, int] | None]]:
    """The llama.cpp tensors one artifact tensor becomes, by transformers-style name: a fused expert stack
    (experts, 2 * inner, hidden) splits into its gate and up halves (transformers' experts chunk the
    projection's output gate-first); a stack's parameter gets the `.weight` the per-expert names had."""
    if entry.name.endswith(".experts.gate_up_proj"):
        half = shape[-2] // 2
        stem = entry.name[: -len("gate_up_proj")]
        return [(f"{stem}gate_proj.weight", (0, half)), (f"{stem}up_proj.weight", (half, shape[-2]))]
    if entry.name.endswith(".experts.down_proj"):
        return [(entry.name + ".weight", None)]
    return [(entry.name, None)]


def plan_tensors(reader: ArtifactReader, config, arch: Architecture,
                 q4_k: set[str] = frozenset()) -> list[Planned]:
    """`q4_k`: the weights the artifact stores as values with their Q4_K blocks beside them."""
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.gguf_arch.upper()], config.num_hidden_layers)
    heads = {"attn_q": config.num_attention_heads, "attn_k": config.num_key_value_heads}
    planned = []
    for entry in reader.entries:
        full = reader.shape(entry)
        for name, rows in _parts(entry, full):
            gguf_name = names.get_name(name, try_suffixes=(".weight", ".bias"))
            if gguf_name is None:
                raise InputError(f"{entry.name} has no place in llama.cpp's {arch.gguf_arch} architecture")
            shape = full if rows is None else [*full[:-2], rows[1] - rows[0], full[-1]]
            role = gguf_name.split(".")[-2] if gguf_name.startswith("blk.") else ""
            permute = heads.get(role) if arch.permute_qk else None  # weights and biases alike
            if entry.name in q4_k:
                ggml_type, nbytes = gguf.GGMLQuantizationType.Q4_K, int(np.prod(shape)) // 256 * 144
                byte_shape = (*shape[:-1], nbytes // int(np.prod(shape[:-1])))
            elif entry.kind == "Tensor":
                ggml_type, size = _float_type(reader.reader.dtype(entry.name), len(shape))
                byte_shape, nbytes = tuple(shape), int(np.prod(shape)) * size
            else:
                ggml_type, nbytes = _block_type(entry, shape)
                byte_shape = (*shape[:-1], nbytes // int(np.prod(shape[:-1])))
            planned.append(Planned(entry, gguf_name, ggml_type, byte_shape, nbytes, permute,
                                   int(np.prod(shape)), rows))
    return planned


CHUNK_BYTES = 32 * 1024**2
"""Rows of a tensor read, packed and written together: export memory is this, not the largest tensor."""


class _Stream:
    """Duck-types the numpy array `GGUFWriter.write_tensor_data` writes (`nbytes`, `tofile`), producing the
    tensor's bytes one row chunk at a time, so no tensor (a 30B MoE's expert stack is hundreds of MB) is ever
    whole in memory. Counts the blocks written and those whose scale fp16 rounded."""

    def __init__(self, nbytes: int, pieces):
        self.nbytes, self._pieces = nbytes, pieces
        self.blocks = self.rounded = 0

    def tofile(self, f) -> None:
        for data, blocks, rounded in self._pieces:
            data.tofile(f)
            self.blocks += blocks
            self.rounded += rounded


def _row_chunks(full: list[int], rows: tuple[int, int] | None, row_bytes: int):
    """(first row of the flattened tensor, row count) for every chunk of the rows written, leading dims
    (experts) outermost; `rows` selects a range of the second-to-last dim."""
    height = full[-2] if len(full) >= 2 else 1
    lead = int(np.prod(full[:-2])) if len(full) > 2 else 1
    a, b = rows or (0, height)
    step = max(1, CHUNK_BYTES // max(row_bytes, 1))
    for outer in range(lead):
        for r in range(a, b, step):
            yield outer * height + r, min(step, b - r)


def _read_rows(reader: ArtifactReader, key: str, first: int, count: int, width: int) -> torch.Tensor:
    out = torch.empty(count * width, dtype=reader.reader.dtype(key))
    reader.reader.read_flat(key, first * width, out)
    return out.view(count, width)


def _float_piece(t: torch.Tensor, ggml_type) -> np.ndarray:
    if ggml_type == gguf.GGMLQuantizationType.F32:
        return t.to(torch.float32).numpy()
    if ggml_type == gguf.GGMLQuantizationType.F16:
        return t.numpy()
    return t.contiguous().view(torch.uint8).numpy()


def _pack(p: Planned, qdata: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None):
    if zero_point is not None and zero_point.any():
        raise InputError(f"{p.entry.name}: non-zero zero points (an asymmetric grid) have no exact "
                         f"{p.ggml_type.name} form")
    t = gguf.GGMLQuantizationType
    rows = qdata.shape[0]
    if p.ggml_type == t.Q6_K:
        blocks, rounded = _q6_k_blocks(qdata, scale.reshape(rows, -1))
        return ggml_blocks.q6_k_bytes(blocks), qdata.numel() // 256, rounded
    scale = scale.reshape(rows, -1)
    if scale.shape[1] == 1:  # int8 per row (the tables): the row's scale for each block of 32
        scale = scale.expand(rows, qdata.shape[1] // 32)
    d, rounded = _fp16_scales(scale, qdata)
    pack = {t.Q4_0: ggml_blocks.q4_0_bytes, t.Q5_0: ggml_blocks.q5_0_bytes, t.Q8_0: ggml_blocks.q8_0_bytes}
    return pack[p.ggml_type](Blocks32(q=qdata, d=d)), qdata.numel() // 32, rounded


def _q6_k_blocks(qdata: torch.Tensor, scale: torch.Tensor) -> tuple[Q6K, int]:
    """Q6_K's super-block `d` and int8 sub-block scales from the artifact's per-16 scales (d * sc, as convert made
    them): llama.cpp's quantizer gives the super-block's largest scale sc = -128, so d = that scale / -128; and
    the number of super-blocks (with a non-zero code) whose scales that `d` and int8 `sc` do not reproduce."""
    rows = qdata.shape[0]
    s = scale.to(torch.float32).reshape(rows, -1, 16)
    extreme = s.gather(-1, s.abs().argmax(-1, keepdim=True))
    d = (extreme / -128).to(torch.float16)
    dd = d.float()
    sc = torch.where(dd != 0, s / torch.where(dd != 0, dd, torch.ones_like(dd)), torch.zeros_like(s))
    sc_int = sc.round().clamp(-128, 127)
    exact = (dd * sc_int == s).all(-1)
    used = qdata.reshape(rows, -1, 256).ne(0).any(-1)
    blocks = Q6K(q=qdata.to(torch.int8), sc=sc_int.to(torch.int8).reshape(rows, -1), d=d.squeeze(-1))
    return blocks, int((~exact & used).sum())


def _q4_k_piece(values: torch.Tensor, parts: dict[str, torch.Tensor], name: str):
    """Q4_K bytes of rows whose artifact values are `values` and whose blocks are `parts`: the blocks must decode
    to those values (in the artifact's dtype), else the two files are not one model."""
    blocks = Q4K(**parts)
    if not torch.equal(blocks.dequantize().to(values.dtype), values):
        raise InputError(f"{name}: its Q4_K blocks ({q4_k_blocks.PATH}) do not decode to the artifact's weights; "
                         f"the artifact was changed after finalize")
    return ggml_blocks.q4_k_bytes(blocks), values.numel() // 256, 0


def _whole(reader: ArtifactReader, p: Planned):
    """The one piece of a tensor whose rows are reordered (llama's q/k: small, read whole)."""
    entry = p.entry
    if p.ggml_type == gguf.GGMLQuantizationType.Q4_K:
        parts = {k: _permute_rows(v, p.permute_heads) for k, v in reader.q4_k(entry.name).items()}
        yield _q4_k_piece(_permute_rows(reader.read(entry.name), p.permute_heads), parts, entry.name)
        return
    if entry.kind == "Tensor":
        t = _permute_rows(reader.read(entry.name), p.permute_heads)
        yield _float_piece(t, p.ggml_type), 0, 0
        return
    qdata = _permute_rows(reader.part(entry, "qdata"), p.permute_heads)
    scale = _permute_rows(reader.part(entry, "scale").reshape(qdata.shape[0], -1), p.permute_heads)
    zero = reader.part(entry, "zero_point") if entry.kind == "IntxUnpackedToInt8Tensor" else None
    yield _pack(p, qdata, scale, zero)


def _by_rows(reader: ArtifactReader, p: Planned, full: list[int]):
    entry = p.entry
    width = full[-1]
    if p.ggml_type == gguf.GGMLQuantizationType.Q4_K:
        parts = reader.q4_k(entry.name)  # a quarter of the weight's values in bytes, read whole
        for first, count in _row_chunks(full, p.rows, width * reader.reader.dtype(entry.name).itemsize):
            rows = {k: v.reshape(-1, v.shape[-1])[first:first + count] for k, v in parts.items()}
            yield _q4_k_piece(_read_rows(reader, entry.name, first, count, width), rows, entry.name)
        return
    if entry.kind == "Tensor":
        for first, count in _row_chunks(full, p.rows, width * reader.reader.dtype(entry.name).itemsize):
            yield _float_piece(_read_rows(reader, entry.name, first, count, width), p.ggml_type), 0, 0
        return
    intx = entry.kind == "IntxUnpackedToInt8Tensor"
    groups = reader.reader.shape(reader.key(entry, "scale"))[-1] if intx else 1  # Int8Tensor: a scale per row
    for first, count in _row_chunks(full, p.rows, width):
        qdata = _read_rows(reader, reader.key(entry, "qdata"), first, count, width)
        scale = _read_rows(reader, reader.key(entry, "scale"), first, count, groups)
        zero = _read_rows(reader, reader.key(entry, "zero_point"), first, count, groups) if intx else None
        yield _pack(p, qdata, scale, zero)


def tensor_data(reader: ArtifactReader, p: Planned) -> _Stream:
    """What to write for `p`, produced as it is written."""
    pieces = _whole(reader, p) if p.permute_heads else _by_rows(reader, p, reader.shape(p.entry))
    return _Stream(p.nbytes, pieces)


# ---- metadata and tokenizer -----------------------------------------------------------------------

def _rope_theta(config) -> float:
    params = getattr(config, "rope_parameters", None) or {}
    theta = params.get("rope_theta", getattr(config, "rope_theta", None))
    if params.get("rope_type", "default") != "default":
        raise ConfigError(f"rope type {params['rope_type']!r} is not exported yet; GGUF export covers plain "
                          f"rotary embeddings")
    if theta is None:
        raise InputError("the model config names no rope_theta")
    return float(theta)


def write_hyperparameters(writer, config, arch: Architecture) -> None:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(_rope_theta(config))
    writer.add_rope_dimension_count(head_dim)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    # llama.cpp's converter writes these whenever config.json names head_dim (transformers 5 always saves it)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    experts = getattr(config, "num_experts", None) or getattr(config, "num_local_experts", None)
    if experts:
        if getattr(config, "mlp_only_layers", None) or getattr(config, "decoder_sparse_step", 1) != 1:
            raise ConfigError("GGUF export covers MoE models whose every layer has experts (mlp_only_layers empty, "
                              "decoder_sparse_step 1)")
        writer.add_expert_count(experts)
        writer.add_expert_used_count(config.num_experts_per_tok)
        if getattr(config, "moe_intermediate_size", None):
            writer.add_expert_feed_forward_length(config.moe_intermediate_size)
        if hasattr(config, "norm_topk_prob"):
            writer.add_expert_weights_norm(bool(config.norm_topk_prob))


def write_general(writer, directory: Path) -> None:
    """The `general.*` fields as llama.cpp's converter (`convert_hf_to_gguf.py`, `prepare_metadata`) writes them,
    through the same `gguf.Metadata`: name, size label and the rest from the model card and the directory's name,
    and the file type `model`. Call after every tensor record is added (the size label counts them)."""
    total, shared, expert, experts = writer.get_total_parameter_count()
    meta = gguf.Metadata.load(None, directory, None, total)
    if meta.name is None:
        meta.name = directory.name
    if meta.size_label is None and total > 0:
        meta.size_label = gguf.size_label(total, shared, expert, experts)
    meta.set_gguf_meta_model(writer)
    writer.add_type(gguf.GGUFType.MODEL)


def looks_like_a_control_token(text: str) -> bool:
    """Added tokens llama.cpp's converter makes control tokens even when the tokenizer does not mark them special
    (`does_token_look_special`): `<|...|>`, `<｜...｜>`, `<unused...>` and a few others."""
    return (text in ("<pad>", "<mask>", "<2mass>", "[@BOS@]") or (text.startswith("<|") and text.endswith("|>"))
            or (text.startswith("<｜") and text.endswith("｜>")) or (text.startswith("<unused") and text.endswith(">")))


def _added_token_types(tokenizer, tokens: list[str], types: list) -> None:
    """Each added token's type as llama.cpp's converter decides it (`get_vocab_base`), in place: CONTROL if the
    tokenizer marks it special or it looks like a control token, else USER_DEFINED; llama.cpp takes both as
    pre-normalized, so a token the tokenizer does not normalize is written as it encodes and decodes back.
    Written NORMAL, llama.cpp splits `<|im_start|>` into text and breaks chat templates."""
    for i, added in tokenizer.added_tokens_decoder.items():
        if i >= len(tokens):
            continue
        text = added.content
        if not added.normalized:
            text = tokenizer.decode(tokenizer.encode(text, add_special_tokens=False))
        if added.special or looks_like_a_control_token(text):
            types[i] = gguf.TokenType.CONTROL
        else:
            text = text.replace("\u2581", " ")  # SentencePiece's space, pre-normalized as the converter does
            types[i] = gguf.TokenType.USER_DEFINED
        tokens[i] = text


def _adds_special_tokens(tokenizer) -> dict[str, bool]:
    """Whether transformers' tokenizer puts BOS first and EOS last when it encodes text: what llama.cpp must do
    to tokenize as it does (`tokenizer.ggml.add_bos_token` / `add_eos_token`, written always)."""
    ids = tokenizer("a")["input_ids"]
    return {"bos": tokenizer.bos_token_id is not None and ids[:1] == [tokenizer.bos_token_id],
            "eos": tokenizer.eos_token_id is not None and ids[-1:] == [tokenizer.eos_token_id]}


def write_tokenizer(writer, directory: Path, tokenizer, vocab_size: int, pre: str) -> int:
    """A GPT-2-style byte-level BPE vocabulary (what transformers' fast tokenizers of these families are), as
    llama.cpp's converter writes it: tokens and merges read by the `gguf` package's own vocabulary classes, added
    tokens typed as the converter types them, padded to the embedding's rows as llama.cpp requires; special token
    ids, whether BOS/EOS are added, and the chat template. `tokenizer`: transformers' for `directory`. Returns the
    number of merges."""
    try:
        vocab = gguf.vocab.BpeVocab(directory)
    except FileNotFoundError:
        raise InputError(f"{directory} has no byte-level BPE tokenizer.json; GGUF export supports those "
                         f"(GPT-2 style, as Llama 3, Qwen and SmolLM use)") from None
    tokens, types = [], []
    for text, _, kind in vocab.all_tokens():
        tokens.append(text)
        types.append(kind)
    if len(tokens) > vocab_size:
        raise InputError(f"the tokenizer has {len(tokens)} tokens, more than the model's {vocab_size} embeddings")
    _added_token_types(tokenizer, tokens, types)
    for i in range(len(tokens), vocab_size):
        tokens.append(f"[PAD{i}]")
        types.append(gguf.TokenType.UNUSED)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(directory, load_merges=True, n_vocab=vocab_size)
    special.add_special_token.update(_adds_special_tokens(tokenizer))
    special.add_to_gguf(writer, quiet=True)
    return len(special.merges)


# ---- the export ------------------------------------------------------------------------------------

FORGE_KEY = "forge_qat.version"
"""Written into every GGUF forge makes: `--overwrite` replaces only files that carry it."""


def _made_by_forge(path: Path) -> bool:
    try:
        return path.is_file() and FORGE_KEY in gguf.GGUFReader(path).fields
    except (ValueError, OSError, IndexError, KeyError):
        return False


def check_destination(out: Path, overwrite: bool) -> None:
    """Before any work: `out` may be written (forge replaces only a GGUF file it wrote, with `--overwrite`)."""
    check_output(out, overwrite=overwrite, ours=_made_by_forge, kind="a GGUF file")


def export_gguf(artifact: Path, out: Path, *, pre_tokenizer: str | None = None,
                overwrite: bool = False) -> GgufReport:
    """Write `artifact` (a forge safetensors artifact of one of `ARCHITECTURES`' model types) as GGUF."""
    config = load_config(artifact)
    arch = ARCHITECTURES.get(config.model_type)
    if arch is None:
        raise ConfigError(f"GGUF export of model type {config.model_type!r} is not supported; supported: "
                          f"{', '.join(ARCHITECTURES)}")
    if arch.gguf_arch == "qwen3moe" and not getattr(config, "norm_topk_prob", True):
        # llama.cpp's qwen3moe graph always renormalizes the top-k routing weights (measured: a model with
        # norm_topk_prob false runs differently, one with true matches forge's fake quant to 1e-7)
        raise ConfigError("this Qwen3-MoE config has norm_topk_prob false; llama.cpp's qwen3moe always renormalizes "
                          "the top-k routing weights (Qwen3-30B-A3B and its family set it true), so it would not run "
                          "this model as trained")
    check_destination(out, overwrite)
    reader = ArtifactReader(artifact)
    planned = plan_tensors(reader, config, arch, reader.q4_k_names())
    report = GgufReport(out, arch.gguf_arch)
    with atomic_file(out) as tmp:
        writer = gguf.GGUFWriter(tmp, arch.gguf_arch)
        try:
            _write(writer, artifact, config, arch, reader, planned, report, pre_tokenizer)
        finally:
            writer.close()
    report.bytes = out.stat().st_size
    report.source_bytes, report.source_dtype = artifact_source_size(artifact)
    for bits, params in report.widened.items():
        report.notes.append(f"{params:,} {bits} weights are stored as Q4_0 (GGUF has no {bits} type llama.cpp runs; "
                            f"Q4_0 holds their codes exactly, at 4.5 bits per weight)")
    if report.rounded_blocks:
        report.notes.append(f"{report.rounded_blocks} of {report.total_blocks} blocks have a scale fp16 cannot "
                            f"hold exactly and were stored rounded: those weights are not the trained grid (train "
                            f"with a *-bf16-scales recipe for an exact export)")
    return report


def _write(writer: gguf.GGUFWriter, artifact: Path, config, arch: Architecture, reader: ArtifactReader,
           planned: list[Planned], report: GgufReport, pre_tokenizer: str | None) -> None:
    """Metadata, tokenizer and tensor records first (GGUF's header), then each tensor's data in order."""
    write_hyperparameters(writer, config, arch)
    types = {p.ggml_type for p in planned}
    k_quants = {gguf.GGMLQuantizationType.Q4_K, gguf.GGMLQuantizationType.Q6_K}
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_K_M if types & k_quants else
                         gguf.LlamaFileType.MOSTLY_Q4_0 if gguf.GGMLQuantizationType.Q4_0 in types else
                         gguf.LlamaFileType.MOSTLY_Q8_0 if gguf.GGMLQuantizationType.Q8_0 in types else
                         gguf.LlamaFileType.ALL_F32)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_string(FORGE_KEY, __version__)
    tokenizer = load_tokenizer(artifact)
    pre = pre_tokenizer or detect_pre_tokenizer(tokenizer)
    if pre is None:
        pre = arch.default_pre_tokenizer
        report.notes.append(f"llama.cpp's pre-tokenizer for this tokenizer was not recognised; wrote {pre!r} "
                            f"(the {config.model_type} default): pass --pre-tokenizer if llama.cpp's converter "
                            f"names it otherwise")
    report.pre_tokenizer = pre
    if not write_tokenizer(writer, artifact, tokenizer, config.vocab_size, pre):
        report.notes.append("the tokenizer has no BPE merges (a bytes-only vocabulary): llama.cpp refuses a BPE "
                            "vocabulary without merges, so llama.cpp cannot load this file as written")
    for p in planned:
        raw = p.ggml_type not in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16)
        writer.add_tensor_info(p.gguf_name, p.shape, np.dtype(np.uint8) if raw else
                               np.dtype(np.float32 if p.ggml_type == gguf.GGMLQuantizationType.F32 else
                                        np.float16), p.nbytes, raw_dtype=p.ggml_type if raw else None)
    write_general(writer, artifact)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for p in planned:
        data = tensor_data(reader, p)
        writer.write_tensor_data(data)
        _count(report, p, data.blocks, data.rounded)


def _count(report: GgufReport, p: Planned, blocks: int, rounded: int) -> None:
    name = p.ggml_type.name
    report.tensors += 1
    report.by_type[name] = report.by_type.get(name, 0) + 1
    if blocks:
        report.quantized_params += p.params
        report.total_blocks += blocks
        report.rounded_blocks += rounded
        bits = p.entry.info.get("_data", {}).get("target_dtype", {}).get("_data")
        if bits in ("int2", "int3"):
            report.widened[bits] = report.widened.get(bits, 0) + p.params
    else:
        report.float_params += p.params
