"""What expert parallelism saves a MoE QAT step, computed from the model's shape: bytes each rank receives per
step, the transfer time at a given link speed, per-rank memory, and the share of the experts each rank
fake-quantizes, for ZeRO-3 alone and ZeRO-3 with AutoEP (issue 31). A model: bench/expert_parallel.py checks its
bytes against the bytes its 2 CPU ranks receive, counted at torch.distributed (docs/benchmarks.md).

    python bench/expert_parallel_plan.py                        # Qwen3-30B-A3B and -235B-A22B, N = 8, 32
    python bench/expert_parallel_plan.py --tokens 16384 --link-gbps 50

The accounting, per optimizer step, bf16 weights and gradients (2 bytes), Adam with fp32 masters (12 bytes per
parameter more), `T` tokens per rank, `k` experts per token, `h` hidden size:
- ZeRO-3 gathers every parameter for the forward and again for the backward, and reduce-scatters the
  gradients: each rank receives 3 * (N-1)/N of the model's bf16 bytes. The backward's gather is skipped for a
  model within DeepSpeed's `stage3_max_reuse_distance` (1e9 parameters by default): ZeRO-3 then keeps what the
  forward gathered until the backward uses it again, and a rank receives 2 * (N-1)/N (measured so on 2 CPU ranks
  with a 173M-parameter model, bench/expert_parallel.py).
- With AutoEP of size E (E divides N), the dense part moves as above; a rank gathers only its E-th of the
  experts, from the N/E ranks that share them: 3 * (N/E - 1)/(N/E) of the expert bytes / E. Tokens travel
  instead: each MoE layer sends every token's k copies out and back (dispatch, combine), in the forward and in
  the backward: 4 * T * k * h * 2 bytes, of which (E-1)/E leave the rank.
- Resident memory is the same either way (every parameter lives on one rank's share); what differs is the
  working set a rank gathers for one MoE layer: all its experts under ZeRO-3, its E-th under AutoEP.
- Fake quantization: under ZeRO-3 every rank quantizes every expert it gathers (all of them); under AutoEP its
  own, 1/E.
"""

import argparse
from dataclasses import dataclass

GB = 1e9
REUSE_DISTANCE = 1e9
"""DeepSpeed's default `stage3_max_reuse_distance`, in parameters."""


@dataclass(frozen=True)
class Shape:
    """A Qwen3-MoE-style model (every layer MoE), from its published config."""

    name: str
    hidden: int
    layers: int
    experts: int
    top_k: int
    expert_ffn: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int

    @property
    def expert_params(self) -> int:
        return self.layers * self.experts * 3 * self.hidden * self.expert_ffn

    @property
    def dense_params(self) -> int:
        attention = self.hidden * self.head_dim * (2 * self.heads + 2 * self.kv_heads)
        router = self.hidden * self.experts
        return self.layers * (attention + router) + 2 * self.vocab * self.hidden  # untied embedding and head


SHAPES = (
    Shape("Qwen3-30B-A3B", hidden=2048, layers=48, experts=128, top_k=8, expert_ffn=768, heads=32, kv_heads=4,
          head_dim=128, vocab=151936),
    Shape("Qwen3-235B-A22B", hidden=4096, layers=94, experts=128, top_k=8, expert_ffn=1536, heads=64, kv_heads=4,
          head_dim=128, vocab=151936),
)


def per_rank(shape: Shape, n: int, ep: int, tokens: int, width: int = 2) -> dict[str, float]:
    """Per optimizer step, per rank (see the module docstring for the accounting); `width`: bytes per weight,
    gradient and activation element (2 for bf16; bench/expert_parallel.py checks the model in float32, 4)."""
    dense, expert = shape.dense_params * width, shape.expert_params * width
    times = 3 if shape.dense_params + shape.expert_params > REUSE_DISTANCE else 2
    moved = times * (n - 1) / n * dense
    if ep == 1:
        moved += times * (n - 1) / n * expert
    else:
        group = n // ep
        moved += times * (group - 1) / group * expert / ep
        moved += token_bytes(shape, ep, tokens, width)
    layer_experts = shape.experts * 3 * shape.hidden * shape.expert_ffn * width
    return {"moved_gb": moved / GB,
            # bf16 parameter and gradient (2 + 2 bytes), fp32 master, Adam m and v (4 + 4 + 4)
            "resident_gb": 16 * (shape.dense_params + shape.expert_params) / n / GB,
            "gathered_layer_gb": layer_experts / ep / GB,
            "fake_quant_share": 1 / ep}


def token_bytes(shape: Shape, ep: int, tokens: int, width: int = 2) -> float:
    """What AutoEP's all-to-all brings a rank per step: every token's k copies out and back, forward and
    backward, the (E-1)/E of them that other ranks hold."""
    return shape.layers * 4 * tokens * shape.top_k * shape.hidden * width * (ep - 1) / ep


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=8192, help="tokens per rank per step (default 2 x 4096)")
    ap.add_argument("--link-gbps", type=float, default=50.0, help="GB/s a rank receives across nodes")
    ap.add_argument("--ranks", type=int, nargs="+", default=[8, 32])
    args = ap.parse_args()
    print(f"{args.tokens} tokens per rank per step; transfer time at {args.link_gbps:g} GB/s\n")
    print("| model | ranks N | EP | received per rank per step | transfer | resident per rank | one MoE layer's "
          "experts gathered | experts fake-quantized per rank |")
    print("|---|---|---|---|---|---|---|---|")
    for shape in SHAPES:
        for n in args.ranks:
            for ep in (1, n):
                r = per_rank(shape, n, ep, args.tokens)
                print(f"| {shape.name} ({(shape.dense_params + shape.expert_params) / 1e9:.1f}B) | {n} | "
                      f"{'ZeRO-3 alone' if ep == 1 else ep} | {r['moved_gb']:.1f} GB | "
                      f"{r['moved_gb'] / args.link_gbps:.2f} s | {r['resident_gb']:.1f} GB | "
                      f"{r['gathered_layer_gb']:.2f} GB | {r['fake_quant_share']:.1%} |")


if __name__ == "__main__":
    main()
