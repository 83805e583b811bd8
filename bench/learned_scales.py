"""What learned scales cost a QAT training step: time and memory against plain QAT, as ratios in one run.

Two models of each shape, the same weights and batch: `qat` (int8-dynamic-act-int4-weight, scales chosen from
the weights at every forward) and `learned` (the same with --qat-learn-scales: one trainable scale per output
row and group; for MoE stacks per expert too), interleaved round by round so machine noise hits both alike.
Step = forward and backward of the language-model loss, fp32. Memory: the peak resident memory of one step
above the resident memory before it (VmHWM after a reset, bench/memory.py).

  dense  the SmolLM2-135M shape (hidden 576, intermediate 1536), --layers deep
  moe    a Qwen3-MoE of the same width: 16 experts of intermediate 256, top-4, --layers deep; training runs
         transformers' grouped_mm kernel on whole fake-quantized stacks (forge_qat/qat/experts.py)

    python bench/learned_scales.py                          # both shapes, 4 layers, batch 4x256, 5 rounds
    python bench/learned_scales.py --shapes moe --rounds 2  # quick look
"""

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from forge_qat.logs import quiet_libraries  # noqa: E402

quiet_libraries()

from memory import peak_rss_bytes, reset_peak, rss_bytes  # noqa: E402
from train_step import smollm_shape  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402

from forge_qat.qat.prepare import LearnScales, learned_scales, prepare_qat  # noqa: E402
from forge_qat.qat.registry import DEFAULT_RECIPE, get_recipe  # noqa: E402

VARIANTS = ("qat", "learned")


def build(shape: str, layers: int) -> torch.nn.Module:
    if shape == "dense":
        config = smollm_shape(layers)
    else:
        config = AutoConfig.for_model("qwen3_moe", vocab_size=49152, hidden_size=576, intermediate_size=1536,
                                      moe_intermediate_size=256, num_experts=16, num_experts_per_tok=4,
                                      num_hidden_layers=layers, num_attention_heads=9, num_key_value_heads=3,
                                      head_dim=64, norm_topk_prob=True, tie_word_embeddings=True)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def measure(shape: str, args: argparse.Namespace) -> dict:
    torch.manual_seed(0)
    models = {"qat": build(shape, args.layers)}
    models["learned"] = copy.deepcopy(models["qat"])
    prepare_qat(models["qat"], get_recipe(DEFAULT_RECIPE))
    prepare_qat(models["learned"], get_recipe(DEFAULT_RECIPE), learn=LearnScales())
    scale_elements = sum(p.numel() for p in learned_scales(models["learned"]).values())
    weights = sum(p.numel() for p in models["qat"].parameters())
    x = torch.randint(0, 49152, (args.batch, args.seq), generator=torch.Generator().manual_seed(1))

    def step(name: str) -> tuple[float, int]:
        model = models[name].train()
        before = rss_bytes()
        reset_peak()
        t0 = time.perf_counter()
        model(input_ids=x, labels=x, use_cache=False).loss.backward()
        elapsed = time.perf_counter() - t0
        model.zero_grad(set_to_none=True)
        return elapsed, peak_rss_bytes() - before

    for name in VARIANTS:  # warm-up
        step(name)
    times, peaks = {n: [] for n in VARIANTS}, {n: [] for n in VARIANTS}
    for _ in range(args.rounds):
        for name in VARIANTS:
            t, m = step(name)
            times[name].append(t)
            peaks[name].append(m)
    med = {n: statistics.median(v) for n, v in times.items()}
    return {"median_s": med, "ratio": med["learned"] / med["qat"],
            "step_peak_bytes": {n: max(v) for n, v in peaks.items()},
            "parameters": weights, "scale_elements": scale_elements}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="dense,moe", help="comma-separated: dense, moe")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()
    results = {}
    for shape in args.shapes.split(","):
        r = results[shape] = measure(shape, args)
        peak = r["step_peak_bytes"]
        print(f"{shape}: {r['parameters'] / 1e6:.0f}M parameters, {r['scale_elements'] / 1e6:.2f}M learned scale "
              f"elements; {args.layers} layers, batch {args.batch}x{args.seq}, fp32, median of {args.rounds} "
              f"interleaved rounds")
        for name in VARIANTS:
            print(f"  {name:8s} {r['median_s'][name]:.3f} s ({r['median_s'][name] / r['median_s']['qat']:.2f}x)  "
                  f"step peak above start {peak[name] / 1e6:6.0f} MB ({peak[name] / peak['qat']:.2f}x)")
    print(json.dumps({"results": results, "args": vars(args)}))


if __name__ == "__main__":
    main()
