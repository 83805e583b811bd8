"""Peak memory of `forge export --to gguf` (or `--to compressed-tensors`) on a Qwen3-30B-A3B-width MoE artifact at
two depths: flat in depth, and small against the largest tensor.

    pip install -e '.[export]'
    python bench/export_memory.py [--depths 2 6] [--experts 128] [--to compressed-tensors]

The artifacts are synthetic (random int4 codes, bf16 scales, zero zero points; int8 activations for GGUF, as the default
recipe's, none for compressed-tensors, as the `w4a16-g32` recipe's; written in the artifact format
forge's finalize writes: torchao's flattened `IntxUnpackedToInt8Tensor` entries with their metadata): making
real ones would need the float model first, and the export reads only the files. Qwen3-30B-A3B's shapes:
hidden 2048, 128 experts of width 768, 32 query / 4 key-value heads of 128, vocabulary 151,936 (bf16
embedding and untied head). Each export runs in a fresh process; peak RSS is its VmHWM.
"""

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

HIDDEN, INNER, HEADS, KV, HEAD_DIM, VOCAB = 2048, 768, 32, 4, 128, 151936


def _intx(name: str, shape: tuple[int, ...], tensors: dict, meta: dict, activations: str | None) -> None:
    module, _, param = name.rpartition(".")
    groups = shape[-1] // 32
    tensors[f"{module}._{param}_qdata"] = torch.randint(-8, 8, shape, dtype=torch.int8)
    tensors[f"{module}._{param}_scale"] = (torch.rand(*shape[:-1], groups) * 0.01 + 1e-3).to(torch.bfloat16)
    tensors[f"{module}._{param}_zero_point"] = torch.zeros(*shape[:-1], groups, dtype=torch.int8)
    meta[name] = json.dumps({"_type": "IntxUnpackedToInt8Tensor", "_data": {
        "target_dtype": {"_type": "torch.dtype", "_data": "int4"}, "block_size": [1] * (len(shape) - 1) + [32],
        "dtype": {"_type": "torch.dtype", "_data": "bfloat16"}, "activation_quantization": activations},
        "_tensor_data_names": ["qdata", "scale", "zero_point"]})


def make_artifact(directory: Path, layers: int, experts: int, activations: str | None = "int8_asym_per_token") -> int:
    """Write the synthetic artifact, one shard per layer; returns the largest tensor's bytes."""
    from safetensors.torch import save_file
    from transformers import AutoConfig

    from forge_qat.models import byte_tokenizer

    directory.mkdir(parents=True)
    config = AutoConfig.for_model("qwen3_moe", vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=6144,
                                  moe_intermediate_size=INNER, num_experts=experts, num_experts_per_tok=8,
                                  num_hidden_layers=layers, num_attention_heads=HEADS, num_key_value_heads=KV,
                                  head_dim=HEAD_DIM, max_position_embeddings=4096, tie_word_embeddings=False,
                                  norm_topk_prob=True)  # as Qwen3-30B-A3B (llama.cpp renormalizes always)
    config.save_pretrained(directory)
    byte_tokenizer().save_pretrained(directory)
    names = ["model.embed_tokens.weight"]
    for i in range(layers):
        p = f"model.layers.{i}."
        names += [p + n for n in ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
                                  "self_attn.o_proj.weight", "self_attn.q_norm.weight", "self_attn.k_norm.weight",
                                  "mlp.experts.gate_up_proj", "mlp.experts.down_proj", "mlp.gate.weight",
                                  "input_layernorm.weight", "post_attention_layernorm.weight")]
    names += ["model.norm.weight", "lm_head.weight"]
    shards = [{"model.embed_tokens.weight": torch.randn(VOCAB, HIDDEN, dtype=torch.bfloat16),
               "model.norm.weight": torch.ones(HIDDEN, dtype=torch.bfloat16),
               "lm_head.weight": torch.randn(VOCAB, HIDDEN, dtype=torch.bfloat16)}]
    meta = {n: json.dumps({"_type": "Tensor"}) for n in names}
    for i in range(layers):
        p, t = f"model.layers.{i}.", {}
        for n, shape in (("self_attn.q_proj.weight", (HEADS * HEAD_DIM, HIDDEN)),
                         ("self_attn.k_proj.weight", (KV * HEAD_DIM, HIDDEN)),
                         ("self_attn.v_proj.weight", (KV * HEAD_DIM, HIDDEN)),
                         ("self_attn.o_proj.weight", (HIDDEN, HEADS * HEAD_DIM)),
                         ("mlp.experts.gate_up_proj", (experts, 2 * INNER, HIDDEN)),
                         ("mlp.experts.down_proj", (experts, HIDDEN, INNER))):
            _intx(p + n, shape, t, meta, activations)
        for n, size in (("self_attn.q_norm.weight", HEAD_DIM), ("self_attn.k_norm.weight", HEAD_DIM),
                        ("input_layernorm.weight", HIDDEN), ("post_attention_layernorm.weight", HIDDEN)):
            t[p + n] = torch.ones(size, dtype=torch.bfloat16)
        t[p + "mlp.gate.weight"] = torch.randn(experts, HIDDEN, dtype=torch.bfloat16)
        shards.append(t)
    meta.update({"tensor_names": json.dumps(names), "format": "pt"})
    for k, shard in enumerate(shards):
        save_file(shard, directory / f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors", metadata=meta)
        del shard
    return experts * 2 * INNER * HIDDEN  # the int8 codes of one gate_up stack


CHILD = """
import json, sys
from pathlib import Path
sys.path.insert(0, sys.argv[3])
from memory import peak_rss_bytes, reset_peak, rss_bytes
from forge_qat.logs import quiet_libraries
quiet_libraries("gguf")
from forge_qat.export.compressed_tensors import export_compressed_tensors
from forge_qat.export.gguf import export_gguf
from forge_qat.heap import map_large_allocations
map_large_allocations()  # as the forge command does
reset_peak(); before = rss_bytes()
if sys.argv[4] == "gguf":
    report = export_gguf(Path(sys.argv[1]), Path(sys.argv[2]), pre_tokenizer="qwen2")
else:
    report = export_compressed_tensors(Path(sys.argv[1]), Path(sys.argv[2]))
print(json.dumps({"peak_increase_mb": (peak_rss_bytes() - before) / 1e6, "baseline_mb": before / 1e6,
                  "out_mb": report.bytes / 1e6}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--depths", type=int, nargs="+", default=[2, 6])
    ap.add_argument("--experts", type=int, default=128)
    ap.add_argument("--to", choices=["gguf", "compressed-tensors"], default="gguf")
    args = ap.parse_args()
    activations = "int8_asym_per_token" if args.to == "gguf" else None
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for depth in args.depths:
            art = Path(tmp) / f"art-{depth}"
            largest = make_artifact(art, depth, args.experts, activations)
            out = Path(tmp) / f"{depth}.out"
            done = subprocess.run([sys.executable, "-c", CHILD, str(art), str(out), str(Path(__file__).parent),
                                   args.to], capture_output=True, text=True)
            if done.returncode:
                raise SystemExit(done.stderr[-3000:])
            results[depth] = json.loads(done.stdout.strip().splitlines()[-1])
            results[depth]["artifact_mb"] = sum(f.stat().st_size for f in art.glob("*.safetensors")) / 1e6
            results[depth]["largest_tensor_mb"] = largest / 1e6
            print(f"{depth} layers: artifact {results[depth]['artifact_mb']:.0f} MB -> {args.to} "
                  f"{results[depth]['out_mb']:.0f} MB; export peak RSS +{results[depth]['peak_increase_mb']:.0f} MB "
                  f"(largest tensor {largest / 1e6:.0f} MB)", flush=True)
            for f in art.glob("*.safetensors"):
                f.unlink()
            shutil.rmtree(out) if out.is_dir() else out.unlink()
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
