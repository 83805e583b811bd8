"""Scale rules that are not `--ptq-scales` choices, tried on llama-cpp-q4-0's PTQ and scored by llama.cpp (issue 33):
what the extreme rule and the mse search were measured against in docs/benchmarks.md.

    python bench/q4_0_scale_rules.py --llama-cpp llama_cpp_python-0.3.36/vendor/llama.cpp \\
        --checkpoint ~/.cache/forge_qat/bench-llamacpp/runs/<hash>/float-ft

Each rule replaces forge's scale search (`forge_qat.qat.fake_quant._searched_scale`, which `--ptq-scales mse` runs)
for one PTQ of the checkpoint, exported to GGUF and scored with `llama-perplexity -c 512` on the held-out split of
bench/quality_vs_llamacpp.py:
  llama-rule        llama.cpp's `d = max / -8` for every group (what `--ptq-scales extreme` computes)
  nearest-of-two    per group the nearer (squared error) of absmax / 7.5 and llama.cpp's signed scale
  mse-0.95          the mse search over 0.95-1.00 x both (the shipped search goes down to 0.80)
  positive-extreme  the smallest positive scale that clips nothing, max(largest / 7, -smallest / 8): the extreme
                    rule of a grid whose scale cannot be negative
"""

import argparse
import sys
from pathlib import Path

import torch
from quality_vs_llamacpp import LlamaCpp, forge_gguf, text_file

import forge_qat.qat.fake_quant as fq
from forge_qat.formats.run_dir import resolve_checkpoint
from forge_qat.qat.registry import get_recipe


def _positive_extreme(grouped: torch.Tensor, absmax: torch.Tensor, spec) -> torch.Tensor:
    g = grouped.float()
    top = g.amax(-1, keepdim=True).clamp(min=0) / spec.qmax
    bottom = (-g.amin(-1, keepdim=True)).clamp(min=0) / -spec.qmin
    return torch.maximum(top, bottom).clamp(min=1e-12).to(spec.scale_dtype).float()


RULES = {
    "llama-rule": lambda: setattr(fq, "_searched_scale", lambda g, a, spec: fq._signed_extreme_scale(
        g.float(), spec).to(spec.scale_dtype).float()),
    "nearest-of-two": lambda: setattr(fq, "SCALE_SEARCH_FACTORS", (1.0,)),
    "mse-0.95": lambda: setattr(fq, "SCALE_SEARCH_FACTORS", tuple(round(1.0 - 0.01 * i, 2) for i in range(6))),
    "positive-extreme": lambda: setattr(fq, "_searched_scale", _positive_extreme),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--llama-cpp", type=Path, required=True)
    ap.add_argument("--checkpoint", type=Path, required=True)
    ap.add_argument("--workdir", type=Path, default=Path.home() / ".cache" / "forge_qat" / "bench-llamacpp")
    ap.add_argument("--rule", choices=RULES, required=True, help="one rule per process (each patches forge)")
    args = ap.parse_args()
    held_out = args.workdir / "data" / "python-docs-wide-eval.txt"
    if not held_out.is_file():
        sys.exit(f"{held_out} is missing: run bench/quality_vs_llamacpp.py first")
    RULES[args.rule]()
    out = args.workdir / "scale-rules"
    out.mkdir(parents=True, exist_ok=True)
    gguf_file = forge_gguf(resolve_checkpoint(args.checkpoint), out, args.rule, ptq=get_recipe("llama-cpp-q4-0"),
                           ptq_scales="mse")
    ppl, err = LlamaCpp(args.llama_cpp, 2).perplexity(gguf_file, text_file(
        str(args.workdir / "data" / "python-docs-wide-eval.jsonl"), held_out))
    print(f"{args.rule}: llama.cpp perplexity {ppl:.3f} +/- {err:.3f}")


if __name__ == "__main__":
    main()
