"""What LoRA-QAT costs a training step against full QAT: time and memory, one fresh process per variant.

The SmolLM2-135M shape (hidden 576, intermediate 1536, --layers deep; or with --shape moe a Qwen3-MoE of its
width, 16 experts of intermediate 256, top-4, adapters on the expert stacks too), int8-dynamic-act-int4-weight
with the shipped defaults (learned scales on), fp32, batch --batch x --seq. A training step is forward, backward and
the AdamW step. Variants:

  qat        full QAT: every weight trains (gradients and Adam state for all of them)
  merged     --lora-rank R, --lora-qat merged: q(W + s*BA) in every forward, W frozen
  separate   --lora-rank R, --lora-qat separate: fq(W) x + s*B(A x)
  float      --lora-rank R without fake quantization (--qat-recipe none): float LoRA (dense shape only)

Each variant runs in its own process (rounds interleave the variants, so machine noise hits all alike):
memory is that process's peak resident memory while training (VmHWM) above its resident memory once the
model is built, i.e. what training adds to the weights: gradients, optimizer state, activations and
temporaries. Time: the median step after one warm-up step.

    python bench/lora.py                      # 4 layers, batch 4x256, rank 16, 3 rounds
    python bench/lora.py --rounds 1 --steps 2 # quick look
"""

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

VARIANTS = ("qat", "merged", "separate", "float")


def run_variant(variant: str, args: argparse.Namespace) -> dict:
    """One variant in this process (the child): build, prepare, train --steps steps."""
    sys.path.insert(0, str(Path(__file__).parent))
    from forge_qat.logs import quiet_libraries

    quiet_libraries()
    import torch
    from learned_scales import build
    from memory import peak_rss_bytes, reset_peak, rss_bytes

    from forge_qat.lora import adapters as lora
    from forge_qat.qat.coverage import plan
    from forge_qat.qat.prepare import LearnScales, prepare_qat
    from forge_qat.qat.registry import DEFAULT_RECIPE, get_recipe

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    model = build(args.shape, args.layers).train()
    recipe = get_recipe(DEFAULT_RECIPE)
    if variant == "float":
        coverage = plan(model, recipe)
    else:
        coverage = prepare_qat(model, recipe, learn=LearnScales())
    if variant != "qat":
        cfg = lora.LoraConfig(lora_rank=args.rank, lora_qat="separate" if variant == "separate" else "merged")
        lora.install(model, cfg, list(coverage.linears), coverage.experts)
    trainable = [p for p in model.parameters() if p.requires_grad]
    x = torch.randint(0, model.config.vocab_size, (args.batch, args.seq), generator=torch.Generator().manual_seed(1))
    before = rss_bytes()
    reset_peak()
    optimizer = torch.optim.AdamW(trainable, lr=1e-5)
    times = []
    for _ in range(args.steps + 1):
        t0 = time.perf_counter()
        model(input_ids=x, labels=x, use_cache=False).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    return {"step_s": statistics.median(times[1:]), "train_peak_bytes": peak_rss_bytes() - before,
            "trainable": sum(p.numel() for p in trainable), "parameters": sum(p.numel() for p in model.parameters())}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=("dense", "moe"), default="dense",
                   help="dense: SmolLM2-135M; moe: a Qwen3-MoE of its width (bench/learned_scales.py)")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--steps", type=int, default=3, help="timed steps per process, after one warm-up step")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)  # the child
    args = p.parse_args()
    if args.variant:
        print(json.dumps(run_variant(args.variant, args)))
        return
    forwarded = [f"--{k}={v}" for k, v in vars(args).items() if k != "variant"]
    # Float LoRA has no MoE variant: adapters on expert stacks run through the fake-quantized experts forward.
    variants = VARIANTS if args.shape == "dense" else tuple(v for v in VARIANTS if v != "float")
    results = {v: [] for v in variants}
    for _ in range(args.rounds):
        for variant in variants:
            out = subprocess.run([sys.executable, __file__, *forwarded, f"--variant={variant}"], check=True,
                                 capture_output=True, text=True).stdout
            results[variant].append(json.loads(out.strip().splitlines()[-1]))
    summary = {v: {"step_s": statistics.median(r["step_s"] for r in rs),
                   "train_peak_bytes": statistics.median(r["train_peak_bytes"] for r in rs),
                   "trainable": rs[0]["trainable"], "parameters": rs[0]["parameters"]} for v, rs in results.items()}
    base = summary["qat"]
    shape = "SmolLM2-135M" if args.shape == "dense" else "Qwen3-MoE (16 experts, top-4)"
    print(f"{shape} shape, {args.layers} layers, batch {args.batch}x{args.seq}, rank {args.rank}, fp32, "
          f"{args.threads} threads; median of {args.rounds} processes per variant")
    for v, s in summary.items():
        print(f"  {v:9s} trainable {s['trainable'] / 1e6:7.2f}M  step {s['step_s']:.3f} s "
              f"({s['step_s'] / base['step_s']:.2f}x)  training memory {s['train_peak_bytes'] / 1e6:6.0f} MB "
              f"({s['train_peak_bytes'] / base['train_peak_bytes']:.2f}x)")
    print(json.dumps({"summary": summary, "args": vars(args)}))


if __name__ == "__main__":
    main()
