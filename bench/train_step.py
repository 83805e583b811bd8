"""Train-step time with QAT vs float on the same model and batch, measured as ratios in one run.

Variants, interleaved round by round so machine noise hits all of them alike:
  float              no fake quantization
  torchao-qat        QATConfig(base, step="prepare") with torchao's own fake quantizers
  forge-qat          forge_qat.qat.prepare.prepare_qat (fused quantizers; same numerics, see tests)
  forge-int8-int8    the int8-dynamic-act-int8-weight recipe (integer-grid matmul in fp32)

    python bench/train_step.py                      # SmolLM2-135M shape, 30 layers, batch 4x256, bf16
    python bench/train_step.py --layers 4 --rounds 2  # quick look
    python bench/train_step.py --recipes llama-cpp-q4-0,llama-cpp-q4-k-m   # more forge recipes as variants
"""

import argparse
import copy
import json
import statistics
import time

import torch

from forge_qat.logs import quiet_libraries  # noqa: E402

quiet_libraries()

from torchao.quantization import quantize_  # noqa: E402
from torchao.quantization.qat import QATConfig  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from forge_qat.qat.coverage import plan  # noqa: E402
from forge_qat.qat.prepare import prepare_qat  # noqa: E402
from forge_qat.qat.registry import DEFAULT_RECIPE, get_recipe  # noqa: E402


def smollm_shape(layers: int) -> LlamaConfig:
    """The SmolLM2-135M architecture (hidden 576, 9 heads / 3 kv heads, vocab 49152), depth adjustable."""
    return LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=layers,
                       num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048,
                       tie_word_embeddings=True)


def torchao_as_is(model: torch.nn.Module) -> None:
    recipe = get_recipe(DEFAULT_RECIPE)
    names = set(plan(model, recipe).linears)
    quantize_(model, QATConfig(recipe.base_config(), step="prepare"), filter_fn=lambda m, fqn: fqn in names)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--recipes", default="", help="more forge recipes to time, comma-separated (dynamic scales)")
    args = ap.parse_args()

    torch.manual_seed(0)
    base = LlamaForCausalLM(smollm_shape(args.layers))
    variants = {"float": lambda m: None, "torchao-qat": torchao_as_is,
                "forge-qat": lambda m: prepare_qat(m, get_recipe(DEFAULT_RECIPE)),
                "forge-int8-int8": lambda m: prepare_qat(m, get_recipe("int8-dynamic-act-int8-weight"))}
    for name in filter(None, args.recipes.split(",")):
        variants[name] = lambda m, recipe=get_recipe(name): prepare_qat(m, recipe)
    models, optims = {}, {}
    for name, prepare in variants.items():
        models[name] = copy.deepcopy(base)
        prepare(models[name])
        optims[name] = torch.optim.AdamW(models[name].parameters(), lr=1e-5)
    ids = torch.randint(0, base.config.vocab_size, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))

    def step(name: str) -> float:
        model, opt = models[name], optims[name]
        t0 = time.perf_counter()
        with (torch.autocast("cpu", dtype=torch.bfloat16) if args.precision == "bf16" else torch.enable_grad()):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    for name in variants:  # warm-up: allocator, oneDNN primitive caches
        step(name)
    times = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name in variants:
            times[name].append(step(name))
    tokens = args.batch * args.seq
    med = {n: statistics.median(t) for n, t in times.items()}
    result = {
        "config": vars(args) | {"params_M": round(sum(p.numel() for p in base.parameters()) / 1e6, 1),
                                "threads": torch.get_num_threads()},
        "step_s": med,
        "tokens_per_s": {n: tokens / t for n, t in med.items()},
        "ratio_vs_float": {n: med[n] / med["float"] for n in med},
    }
    print(f"{result['config']['params_M']}M params, batch {args.batch}x{args.seq}, {args.precision}, "
          f"{torch.get_num_threads()} threads, median of {args.rounds} interleaved rounds")
    for n in variants:
        print(f"  {n:16s} {med[n]:7.3f} s/step  {tokens / med[n]:8.0f} tok/s  {med[n] / med['float']:.2f}x float")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
