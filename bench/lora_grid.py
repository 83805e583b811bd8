"""LoRA-QAT with the frozen base held in its grid (`--lora-base-grid`) against today's float base: the base's
memory, the process's memory through loading and a training step, and the step time.

The model is a Qwen3-MoE at Qwen3-30B-A3B's width (hidden 2048, 32 query / 4 key-value heads of 128, experts of
intermediate 768, top-8), cut to fit this machine: --layers layers (of 48), --experts experts per layer (of 128),
a vocabulary of 32768 (of 151936). It is saved once in bf16 (as published checkpoints are) and each variant
loads it in its own process, as `forge train` does on one process: today's path reads the whole model into float32
(`load_model`), the grid path allocates it unwritten and reads each frozen weight straight into its grid
(`forge_qat.lora.grid_base`). Recipe int8-dynamic-act-int4-weight without learned scales (the grid fixes the
base's codes), LoRA rank --rank on attention and experts, fp32, batch --batch x --seq, AdamW.

`separate-offload` is `separate-grid` with `--experts-offload host` (`forge_qat.qat.host_experts`): the expert
stacks' grids pinned to the host and computed there through one autograd node. Here the host is the device too, so
its memory is the grid run's; what it changes is `device_bytes`, the model's tensors an accelerator would hold
(every parameter and buffer except the pinned grids, the grids' placeholders counted at one element), and the step
time shows the node's cost (copies of the tokens and adapters, the host graph).

Per variant: `base_bytes` (the quantized frozen weights as held: float32 Parameters, or codes + scales),
`load_peak` / `held` (resident memory above the process's before loading: at the peak of loading, and once the
model is ready), `step_peak` (the peak through --steps training steps, same origin), `step_s` (median step after
one warm-up step).

    python bench/lora_grid.py                    # 2 layers, 32 experts, batch 1x128, rank 16, 2 steps
    python bench/lora_grid.py --kernels          # the host's per-expert product: oneDNN on values vs int4 kernel

`--kernels` times (median of 15, the two alternating) one expert's product at Qwen3-30B-A3B's expert shapes
(gate_up 1536 x 2048, down 2048 x 768) for 8, 64 and 256 tokens, in bf16 and fp32: what the offloaded experts run
(the grid's values made from the codes, then oneDNN's GEMM: `FrozenGrid.values` + `F.linear`) against torch's int4
CPU kernel on the packed codes (`torch._weight_int4pack_mm_for_cpu`, groups of 32), with the int4 kernel's largest
difference from the exact product relative to its largest value.
"""

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VARIANTS = ("merged-float", "merged-grid", "separate-float", "separate-grid", "separate-offload")
RECIPE = "int8-dynamic-act-int4-weight"


def config(args: argparse.Namespace):
    from transformers import AutoConfig

    return AutoConfig.for_model("qwen3_moe", vocab_size=32768, hidden_size=2048, intermediate_size=6144,
                                moe_intermediate_size=768, num_experts=args.experts, num_experts_per_tok=8,
                                num_hidden_layers=args.layers, num_attention_heads=32, num_key_value_heads=4,
                                head_dim=128, norm_topk_prob=True, tie_word_embeddings=False,
                                max_position_embeddings=4096)


def save_model(directory: Path, args: argparse.Namespace) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config(args), dtype=torch.bfloat16)
    with torch.no_grad():
        for p in model.parameters():  # the default init's std of 0.02 everywhere: weights of a trained model's scale
            p.normal_(0, 0.02) if p.dim() > 1 else p.fill_(1.0)
    model.save_pretrained(directory)


def run_variant(variant: str, model_dir: Path, args: argparse.Namespace) -> dict:
    """One variant in this process (the child)."""
    sys.path.insert(0, str(Path(__file__).parent))
    from forge_qat.logs import quiet_libraries

    quiet_libraries()
    import torch
    from memory import peak_rss_bytes, reset_peak, rss_bytes

    from forge_qat import heap
    from forge_qat.formats.layouts import model_layout_reader
    from forge_qat.formats.weights import SafetensorsReader
    from forge_qat.lora import adapters as lora
    from forge_qat.lora import grid_base
    from forge_qat.models import load_model
    from forge_qat.qat.prepare import prepare_qat
    from forge_qat.qat.registry import get_recipe

    heap.map_large_allocations()  # as the `forge` entry point does
    torch.set_num_threads(args.threads)
    mode, base = variant.split("-")
    offload = base == "offload"
    base = "grid" if offload else base
    before = rss_bytes()
    reset_peak()
    if base == "grid":
        model = grid_base.allocated(config(args), torch.float32)
    else:
        model = load_model(str(model_dir))[0]
    coverage = prepare_qat(model, get_recipe(RECIPE))
    cfg = lora.LoraConfig(lora_rank=args.rank, lora_qat=mode, lora_targets="attention,experts")
    lora.install(model, cfg, list(coverage.linears), coverage.experts)
    quantized = set(coverage.quantized)
    if base == "grid":
        reader = model_layout_reader(SafetensorsReader.from_dir(model_dir), model)
        held = grid_base.install(model, list(coverage.linears), coverage.experts, source=reader)
        if offload:
            grid_base.offload_experts(model)
        grid_base.read_rest(model, reader)
        base_bytes = held.grid_bytes
    else:
        base_bytes = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if n in quantized)
    quantized_params = sum(coverage.quantized.values())
    load_peak, held_bytes = peak_rss_bytes() - before, rss_bytes() - before
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-5)
    x = torch.randint(0, 32768, (args.batch, args.seq), generator=torch.Generator().manual_seed(1))
    reset_peak()
    times, losses = [], []
    for _ in range(args.steps + 1):
        t0 = time.perf_counter()
        loss = model(input_ids=x, labels=x, use_cache=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
        losses.append(loss.item())
    return {"base_bytes": base_bytes, "quantized_params": quantized_params, "load_peak": load_peak,
            "device_bytes": device_bytes(model),
            "held": held_bytes, "step_peak": peak_rss_bytes() - before, "step_s": statistics.median(times[1:]),
            "losses": losses, "trainable": sum(p.numel() for p in trainable)}


def device_bytes(model) -> int:
    """The model's tensors an accelerator holds: all but the grids pinned to the host, a grid's placeholder
    Parameter (one element, broadcast) at its one element."""
    from forge_qat.qat.grid import FrozenGrid

    total = 0
    for module in model.modules():
        if isinstance(module, FrozenGrid) and module.on_host:
            continue
        for t in (*module._parameters.values(), *module._buffers.values()):
            if t is not None:
                stored = t.untyped_storage().nbytes() if t.numel() else 0
                total += min(stored, t.numel() * t.element_size())
    return total


def kernels() -> None:
    """The host's per-expert product: values + oneDNN (what runs) vs torch's int4 CPU kernel."""
    import torch

    from forge_qat.qat.fake_quant import AffineSpec
    from forge_qat.qat.grid import FrozenGrid

    def timed(a, b, n=15):
        """Median seconds of `a` and of `b`, run alternately (the machine's load changes under both alike)."""
        a(), b()
        times = ([], [])
        for _ in range(n):
            for fn, out in zip((a, b), times, strict=True):
                t0 = time.perf_counter()
                fn()
                out.append(time.perf_counter() - t0)
        return tuple(statistics.median(t) for t in times)

    spec = AffineSpec(bits=4, granularity="per_group", symmetric=True, group_size=32)
    print("| shape (out x in) | dtype | tokens | values + oneDNN | int4 kernel on the codes | int4 / values | "
          "int4 kernel's difference |")
    print("|---|---|---|---|---|---|---|")
    gen = torch.Generator().manual_seed(0)
    for out_f, in_f in ((1536, 2048), (2048, 768)):
        w = torch.randn(out_f, in_f, generator=gen) * 0.02
        grid = FrozenGrid.of(w, spec)
        codes = grid.int_codes().to(torch.int32) + 8  # the kernel's unsigned codes, zero point 8
        packed = torch._convert_weight_to_int4pack_for_cpu(codes, 1)
        for dtype in (torch.bfloat16, torch.float32):
            scales = grid.scale.view(out_f, -1).t().to(dtype)
            scale_zeros = torch.stack([scales, torch.zeros_like(scales)], -1).contiguous()  # (groups, out, 2)
            for tokens in (8, 64, 256):
                x = torch.randn(tokens, in_f, generator=gen).to(dtype)
                exact = torch.nn.functional.linear(x, grid.values(dtype))
                kernel = torch._weight_int4pack_mm_for_cpu(x, packed, 32, scale_zeros)
                diff = ((kernel.float() - exact.float()).abs().max() / exact.float().abs().max()).item()
                a, b = timed(lambda x=x, g=grid, d=dtype: torch.nn.functional.linear(x, g.values(d)),
                             lambda x=x, p=packed, s=scale_zeros: torch._weight_int4pack_mm_for_cpu(x, p, 32, s))
                print(f"| {out_f} x {in_f} | {str(dtype).removeprefix('torch.')} | {tokens} | {a * 1e3:.2f} ms | "
                      f"{b * 1e3:.2f} ms | {b / a:.2f}x | {diff:.1e} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--experts", type=int, default=32)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--steps", type=int, default=2, help="timed steps per process, after one warm-up step")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--kernels", action="store_true", help="time the host's per-expert product kernels instead")
    p.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)  # the child
    p.add_argument("--model-dir", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.kernels:
        import torch

        torch.set_num_threads(args.threads)
        kernels()
        return
    if args.variant:
        print(json.dumps(run_variant(args.variant, args.model_dir, args)))
        return
    forwarded = [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
                 if k not in ("variant", "model_dir", "kernels")]
    with tempfile.TemporaryDirectory() as tmp:
        save_model(Path(tmp), args)
        results = {}
        for variant in VARIANTS:
            out = subprocess.run([sys.executable, __file__, *forwarded, f"--variant={variant}",
                                  f"--model-dir={tmp}"], check=True, capture_output=True, text=True).stdout
            results[variant] = json.loads(out.strip().splitlines()[-1])
    print(f"Qwen3-MoE at 30B-A3B width, {args.layers} layers x {args.experts} experts (top-8), vocab 32768, "
          f"batch {args.batch}x{args.seq}, rank {args.rank}, fp32, {args.threads} threads")
    for v, r in results.items():
        float_ref = results[f"{v.split('-')[0]}-float"]
        device = f"; device tensors {r['device_bytes'] / 1e6:.0f} MB"
        bf16 = 2 * r["quantized_params"]
        print(f"  {v:15s} base {r['base_bytes'] / 1e6:7.0f} MB ({r['base_bytes'] / bf16:.2f}x bf16); load peak "
              f"{r['load_peak'] / 1e6:6.0f} MB, ready {r['held'] / 1e6:6.0f} MB, step peak "
              f"{r['step_peak'] / 1e6:6.0f} MB ({r['step_peak'] / float_ref['step_peak']:.2f}x float base); step "
              f"{r['step_s']:.2f} s ({r['step_s'] / float_ref['step_s']:.2f}x); losses "
              f"{', '.join(f'{x:.4f}' for x in r['losses'])}{device}")
    print(json.dumps({"results": results, "args": {k: v for k, v in vars(args).items() if k != "model_dir"}},
                     default=str))


if __name__ == "__main__":
    main()
