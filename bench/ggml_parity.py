"""forge's llama.cpp quantizers (forge_qat/qat/ggml.py) against llama-quantize's own blocks, on a real model.

For every Q4_K / Q6_K / Q5_0 / Q8_0 tensor of a file llama-quantize wrote, quantizes the same tensor of the F16 file
it read with forge's quantizer and counts the blocks that come out byte-identical, and the squared error of each to
the F16 weights:

    python bench/ggml_parity.py RUN/f16.gguf RUN/lcpp-q4_k_m.gguf     # RUN: a bench/quality_vs_llamacpp.py run dir
"""

import argparse
import collections

import gguf
import numpy as np
import torch

from forge_qat.export import ggml_blocks
from forge_qat.qat import ggml

PACK = {"Q4_K": ggml_blocks.q4_k_bytes, "Q6_K": ggml_blocks.q6_k_bytes, "Q5_0": ggml_blocks.q5_0_bytes,
        "Q8_0": ggml_blocks.q8_0_bytes}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("f16", help="the F16 GGUF file llama-quantize read")
    ap.add_argument("quantized", help="the GGUF file llama-quantize wrote from it")
    args = ap.parse_args()
    source = {t.name: t for t in gguf.GGUFReader(args.f16).tensors}
    stats = collections.defaultdict(lambda: [0, 0, 0.0, 0.0])
    for t in gguf.GGUFReader(args.quantized).tensors:
        name = t.tensor_type.name
        if name not in PACK:
            continue
        weights = torch.from_numpy(np.array(source[t.name].data, dtype=np.float32))
        weights = weights.reshape(-1, weights.shape[-1])
        ours = PACK[name](ggml.QUANTIZERS[name](weights))
        theirs = np.array(t.data).reshape(ours.shape)
        size = gguf.GGML_QUANT_SIZES[t.tensor_type][1]
        same = (ours.reshape(-1, size) == theirs.reshape(-1, size)).all(-1)
        s = stats[name]
        s[0] += int(same.sum())
        s[1] += same.size
        s[2] += float(((gguf.quants.dequantize(ours, t.tensor_type) - weights.numpy()) ** 2).sum())
        s[3] += float(((gguf.quants.dequantize(theirs, t.tensor_type) - weights.numpy()) ** 2).sum())
    print("| type | blocks byte-identical to llama-quantize's | squared error, forge / llama.cpp |")
    print("|---|---|---|")
    for name, (same, total, ours, theirs) in sorted(stats.items()):
        print(f"| {name} | {same}/{total} ({same / total:.2%}) | {ours / theirs:.6f} |")


if __name__ == "__main__":
    main()
