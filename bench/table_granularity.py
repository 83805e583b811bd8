"""Does the int8 tables' per-row scale cost quality next to llama.cpp's Q8_0 scale per block of 32? (issue 33)

The recipes with int8 tables (`llama-cpp-q4-0`, `int8-dynamic-act-int4-weight-int8-embeddings`) quantize the input
embedding and output head int8 per row, with a bf16 scale: exported to GGUF as Q8_0 blocks that all carry their
row's scale. llama.cpp's own Q8_0 gives each block of 32 its own fp16 scale. This scores a float checkpoint with
only its tables quantized each way (everything else float), so the difference is the tables' alone: held-out
perplexity with forge's eval loop, and the tables' squared weight error.

    python bench/table_granularity.py --checkpoint ~/.cache/forge_qat/bench-llamacpp/runs/<hash>/float-ft
"""

import argparse
import math
from pathlib import Path

import torch
from quality import wide_split

from forge_qat.data.store import open_token_store
from forge_qat.eval.loop import mean_loss
from forge_qat.formats.run_dir import resolve_checkpoint
from forge_qat.models import load_model
from forge_qat.qat.fake_quant import AffineSpec, fake_quantize
from forge_qat.qat.numerics import INT8_TABLES

GRIDS = {
    "float": None,
    "int8 per row, bf16 scale (forge)": INT8_TABLES.weight,
    "int8 per block of 32, fp16 scale (llama.cpp Q8_0)": AffineSpec(bits=8, granularity="per_group", group_size=32,
                                                                    symmetric=True, scale_dtype=torch.float16,
                                                                    convention="ggml"),
}


def tables(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The input embedding and, when it is its own tensor, the output head."""
    found = [model.get_input_embeddings().weight, model.get_output_embeddings().weight]
    return found[:1] if found[0] is found[1] else found


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", type=Path, required=True)
    ap.add_argument("--workdir", type=Path, default=Path.home() / ".cache" / "forge_qat" / "bench-llamacpp")
    ap.add_argument("--seq-len", type=int, default=512)
    args = ap.parse_args()
    data = wide_split(args.workdir)[1]
    path = str(resolve_checkpoint(args.checkpoint))
    print(f"{path}; held-out {data}, windows of {args.seq_len}")
    print("| tables | perplexity | squared weight error |")
    print("|---|---|---|")
    for label, spec in GRIDS.items():
        model, tokenizer = load_model(path)
        error = 0.0
        with torch.no_grad():
            for weight in tables(model):
                if spec is not None:
                    quantized = fake_quantize(weight, spec)
                    error += float((quantized - weight).square().sum())
                    weight.copy_(quantized)
            loss, _ = mean_loss(model.eval(), open_token_store(data, tokenizer, args.seq_len), batch_size=4,
                                device=torch.device("cpu"))
        print(f"| {label} | {math.exp(loss):.3f} | {error:.4g} |", flush=True)


if __name__ == "__main__":
    main()
