"""What a LoRA-QAT run holds, by part, computed from the model's config: the frozen base in bf16 or in its grid
(`--lora-base-grid`), the adapters and their AdamW state; and where it holds them, on the accelerator or in host
memory (`--experts-offload host`: the experts' grid). Activations are not counted (they depend on batch and
sequence length and on gradient checkpointing; with the offload the experts' activations are host memory too).

Parameter counts come from transformers' own model built on the meta device (no memory), so they are the
model's, not a formula's. The configs are Qwen3-30B-A3B's and Qwen3-235B-A22B's published ones (their
config.json: hidden size, layers, heads, experts, vocabulary), and --check compares the arithmetic with what
bench/lora_grid.py measured on its cut model.

    python bench/lora_memory_plan.py                 # the two Qwen3 MoE models
    python bench/lora_memory_plan.py --check 212336640 --check-host 188743680
                                # bench/lora_grid.py's cut model (2 layers, 32 experts): its grid, and what the
                                # offload took off the device (separate-grid minus separate-offload device_bytes)
"""

import argparse

import torch
from transformers import AutoConfig, AutoModelForCausalLM

QWEN3 = {
    # config.json of Qwen/Qwen3-30B-A3B and Qwen/Qwen3-235B-A22B
    "Qwen3-30B-A3B": dict(vocab_size=151936, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
                          num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
                          num_experts=128, num_experts_per_tok=8, tie_word_embeddings=False),
    "Qwen3-235B-A22B": dict(vocab_size=151936, hidden_size=4096, intermediate_size=12288, moe_intermediate_size=1536,
                            num_hidden_layers=94, num_attention_heads=64, num_key_value_heads=4, head_dim=128,
                            num_experts=128, num_experts_per_tok=8, tie_word_embeddings=False),
    # bench/lora_grid.py's cut: Qwen3-30B-A3B's width, 2 layers of 32 experts, a 32768-token vocabulary
    "bench/lora_grid.py cut": dict(vocab_size=32768, hidden_size=2048, intermediate_size=6144,
                                   moe_intermediate_size=768, num_hidden_layers=2, num_attention_heads=32,
                                   num_key_value_heads=4, head_dim=128, num_experts=32, num_experts_per_tok=8,
                                   tie_word_embeddings=False),
}
GROUP = 32
"""int8-dynamic-act-int4-weight's group: one scale per 32 weights."""


def parts(name: str, rank: int) -> dict[str, int]:
    """Parameters by part: experts, attention (the quantized linears), other (embeddings, head, norms, routers),
    and the LoRA adapters on attention and experts at `rank`."""
    config = AutoConfig.for_model("qwen3_moe", **QWEN3[name])
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    counts = {"experts": 0, "attention": 0, "other": 0, "adapters": 0}
    for pname, p in model.named_parameters():
        if ".experts." in pname:
            counts["experts"] += p.numel()
            e, out_f, in_f = p.shape
            counts["adapters"] += e * rank * (in_f + out_f)
        elif ".self_attn." in pname and pname.endswith("proj.weight"):
            counts["attention"] += p.numel()
            out_f, in_f = p.shape
            counts["adapters"] += rank * (in_f + out_f)
        else:
            counts["other"] += p.numel()
    return counts


def grid_bytes(params: int, scale_bytes: int) -> int:
    """int4 codes two to a byte and one scale per group."""
    return params // 2 + params // GROUP * scale_bytes


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--check", type=int, help="bench/lora_grid.py's measured base_bytes of its cut model (fp32 "
                                             "scales: its weights are float32)")
    p.add_argument("--check-host", type=int, help="bench/lora_grid.py's measured device_bytes of separate-grid minus "
                                                  "separate-offload: the experts' grid (fp32 scales)")
    args = p.parse_args()
    gb = 1e9
    print("| model | frozen quantized weights | base in bf16 | base in its grid (bf16 scales) | of which experts "
          "| embeddings, head, norms, routers (bf16) | adapters + grads + AdamW (fp32) |")
    print("|---|---|---|---|---|---|---|")
    for name in QWEN3:
        c = parts(name, args.rank)
        quantized = c["experts"] + c["attention"]
        print(f"| {name} | {quantized / 1e9:.2f}B | {2 * quantized / gb:.1f} GB | "
              f"{grid_bytes(quantized, 2) / gb:.1f} GB ({grid_bytes(quantized, 2) / (2 * quantized):.2f}x) | "
              f"{grid_bytes(c['experts'], 2) / gb:.1f} GB | {2 * c['other'] / gb:.2f} GB | "
              f"{16 * c['adapters'] / gb:.2f} GB ({c['adapters'] / 1e6:.0f}M) |")
    print()
    print("| model | run | per accelerator | host memory |")
    print("|---|---|---|---|")
    for name in list(QWEN3)[:2]:
        c = parts(name, args.rank)
        quantized = c["experts"] + c["attention"]
        rest = 2 * c["other"] + 16 * c["adapters"]  # bf16 embeddings/head/norms/routers; adapters, grads, AdamW
        runs = [("float base (bf16), one process", 2 * quantized + rest, 0),
                ("float base (bf16), ZeRO-3 over 8", (2 * quantized + rest) // 8, 0),
                ("grid base, one process", grid_bytes(quantized, 2) + rest, 0),
                ("grid base + --experts-offload host", grid_bytes(c["attention"], 2) + rest,
                 grid_bytes(c["experts"], 2))]
        for run, device, host in runs:
            print(f"| {name} | {run} | {device / gb:.1f} GB | {host / gb:.1f} GB |" if host else
                  f"| {name} | {run} | {device / gb:.1f} GB | - |")
    if args.check is not None:
        c = parts("bench/lora_grid.py cut", args.rank)
        want = grid_bytes(c["experts"] + c["attention"], 4)
        print(f"bench/lora_grid.py cut model, fp32 scales: computed {want:,} bytes, measured {args.check:,} "
              f"({'equal' if want == args.check else 'DIFFERENT'})")
    if args.check_host is not None:
        want = grid_bytes(parts("bench/lora_grid.py cut", args.rank)["experts"], 4)
        print(f"bench/lora_grid.py cut model, experts' grid moved to the host: computed {want:,} bytes, measured "
              f"{args.check_host:,} ({'equal' if want == args.check_host else 'DIFFERENT'})")


if __name__ == "__main__":
    main()
