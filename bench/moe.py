"""Mixture-of-experts: ZeRO-3 loading memory per rank, and QAT vs float train-step time.

Model: Qwen3-MoE shaped (16 experts, top-2), float32, saved per expert as published checkpoints are
(`mlp.experts.3.gate_proj.weight`, ...), in 100 MB shards.

  load   2 ranks under ZeRO-3: forge's streamed loader (fused stacks assembled per partition slice
         from the per-expert tensors) vs transformers' from_pretrained under HfDeepSpeedConfig; peak
         RSS increase per rank during the load (bench/memory.py), target <= model/2 + largest tensor
         (+10%), the bound of dense models.
  step   one process, the same MoE model and batch, float vs QAT (int8-dynamic-act-int4-weight) vs QAT
         int8-int8, interleaved round by round; target QAT <= 1.3x float. Float runs transformers'
         default experts implementation (grouped_mm); QAT runs the eager per-expert loop whose
         numerics match the converted model.

    python bench/moe.py                 # both parts, the model of docs/benchmarks.md
    python bench/moe.py --part step --layers 2 --rounds 2   # quick look
"""

import argparse
import copy
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from forge_qat.logs import quiet_libraries  # noqa: E402

quiet_libraries("DeepSpeed")


def moe_config(layers: int):
    from transformers import AutoConfig

    return AutoConfig.for_model("qwen3_moe", vocab_size=259, hidden_size=512, intermediate_size=1024,
                                moe_intermediate_size=512, num_experts=16, num_experts_per_tok=2,
                                num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=4,
                                head_dim=64, max_position_embeddings=1024, tie_word_embeddings=False)


def build(layers: int):
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(moe_config(layers), dtype=torch.float32)


def bench_load(args, results: dict) -> None:
    from zero_load import measure_loads, print_loads

    from forge_qat.models import byte_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = build(args.layers)
        model.save_pretrained(tmp / "model", max_shard_size="100MB")  # per-expert keys, as published
        byte_tokenizer().save_pretrained(tmp / "model")
        sizes = {n: p.numel() * 4 for n, p in model.named_parameters()}
        results["model_mb"] = sum(sizes.values()) / 1e6
        results["largest_tensor_mb"] = max(sizes.values()) / 1e6
        results["largest_tensor"] = max(sizes, key=sizes.get)
        results["expert_share"] = sum(v for k, v in sizes.items() if ".experts." in k) / sum(sizes.values())
        del model
        results.update(measure_loads(tmp / "model", tmp))
    print_loads(results, f"({results['expert_share']:.0%} experts) in 100 MB per-expert shards, largest tensor "
                         f"{results['largest_tensor']}")


def bench_step(args, results: dict) -> None:
    import torch

    from forge_qat.qat.prepare import prepare_qat
    from forge_qat.qat.registry import get_recipe

    base = build(args.layers)
    variants = {"float": None, "qat-int8-int4": "int8-dynamic-act-int4-weight",
                "qat-int8-int8": "int8-dynamic-act-int8-weight"}
    models, optims = {}, {}
    for name, recipe in variants.items():
        models[name] = copy.deepcopy(base)
        if recipe:
            prepare_qat(models[name], get_recipe(recipe))
        optims[name] = torch.optim.AdamW(models[name].parameters(), lr=1e-5)
    ids = torch.randint(0, 259, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))

    def step(name: str) -> float:
        model, opt = models[name], optims[name]
        t0 = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    for name in variants:
        step(name)  # warm-up
    times = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name in variants:
            times[name].append(step(name))
    med = {n: statistics.median(t) for n, t in times.items()}
    results["step"] = {"config": {"layers": args.layers, "batch": args.batch, "seq": args.seq, "rounds": args.rounds,
                                  "threads": torch.get_num_threads(),
                                  "float_experts_implementation": base.config._experts_implementation},
                       "step_s": med, "ratio_vs_float": {n: med[n] / med["float"] for n in med}}
    print(f"train step, {args.layers} layers, batch {args.batch}x{args.seq}, fp32, {torch.get_num_threads()} threads, "
          f"median of {args.rounds} interleaved rounds (float experts: {base.config._experts_implementation})")
    for n in variants:
        print(f"  {n:14s} {med[n]:7.3f} s/step  {med[n] / med['float']:.2f}x float")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=["load", "step", "both"], default="both")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    results = {"config": vars(args)}
    if args.part in ("load", "both"):
        bench_load(args, results)
    if args.part in ("step", "both"):
        bench_step(args, results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
