"""Finalize cost and the converted model's CPU speed, per CPU-convertible recipe, in one run.

For a SmolLM2-135M-shaped model (540 MB of float32 weights, random init, saved as an HF checkpoint):
  - finalize wall time and peak RSS (each finalize in its own subprocess; VmHWM, see bench/memory.py)
  - artifact size / float32 checkpoint size
  - forward latency of the finalized artifact vs the float32 model (both loaded with stock
    transformers), interleaved, for a prefill-shaped batch (1 x 256 tokens) and a decode-shaped
    batch (8 sequences x 1 token, no KV cache)

    python bench/finalize.py                 # full size
    python bench/finalize.py --layers 4      # quick look
"""

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from forge_qat.logs import quiet_libraries  # noqa: E402

quiet_libraries()

sys.path.insert(0, str(Path(__file__).parent))
from train_step import smollm_shape  # noqa: E402

_CHILD = """
import logging, sys, time, json
sys.path.insert(0, sys.argv[4])
from memory import peak_rss_bytes
from transformers.utils import logging as hf_logging
hf_logging.disable_progress_bar()
for n in ("torchao", "torch.utils._pytree", "torchao.kernel.intmm"):
    logging.getLogger(n).setLevel(logging.ERROR)
from pathlib import Path
from forge_qat.finalize.job import FinalizeRequest
from forge_qat.finalize.convert import finalize
from forge_qat.qat.registry import get_recipe
t = time.perf_counter()
r = finalize(FinalizeRequest(source=Path(sys.argv[1]), dest=Path(sys.argv[2]), ptq=get_recipe(sys.argv[3])))
rss_mb = peak_rss_bytes() / 1e6
print(json.dumps({"wall_s": time.perf_counter() - t, "peak_rss_mb": rss_mb,
                  "artifact_bytes": r.artifact_bytes, "source_bytes": r.source_bytes,
                  "source_dtype": r.source_dtype, "converted": r.converted}))
"""


def make_checkpoint(root: Path, layers: int) -> Path:
    from transformers import LlamaForCausalLM

    from forge_qat.models import byte_tokenizer

    torch.manual_seed(0)
    model = LlamaForCausalLM(smollm_shape(layers))
    path = root / "float"
    model.save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return path


def latency_ms(model, ids: torch.Tensor, rounds: int) -> list[float]:
    out = []
    with torch.no_grad():
        for _ in range(rounds):
            t = time.perf_counter()
            model(ids)
            out.append((time.perf_counter() - t) * 1e3)
    return out


def linear_2048(recipes: list[str], rounds: int) -> dict[str, float]:
    """Median ms of one 2048x2048 linear on a batch of 8, float32 and converted (interleaved)."""
    import copy

    from torchao.quantization import quantize_

    from forge_qat.qat.registry import get_recipe

    torch.manual_seed(0)
    base = torch.nn.Linear(2048, 2048, bias=False)
    layers = {"float32": base}
    for n in recipes:
        layers[n] = copy.deepcopy(base)
        quantize_(layers[n], get_recipe(n).base_config())
    x = torch.randn(8, 2048)
    times = {n: [] for n in layers}
    calls = 50  # per timing: a layer called back to back, as in a decode loop
    with torch.no_grad():
        for _ in range(3):
            for m in layers.values():
                m(x)
        for _ in range(rounds):
            for n, m in layers.items():
                t = time.perf_counter()
                for _ in range(calls):
                    m(x)
                times[n].append((time.perf_counter() - t) * 1e3 / calls)
    return {n: statistics.median(t) for n, t in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()

    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from forge_qat.qat.registry import RECIPES

    hf_logging.disable_progress_bar()

    recipes = [n for n, r in RECIPES.items() if not r.missing_for_convert()]
    results = {"config": vars(args) | {"threads": torch.get_num_threads()}, "recipes": {}}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        ckpt = make_checkpoint(root, args.layers)
        for name in recipes:
            done = subprocess.run([sys.executable, "-c", _CHILD, str(ckpt), str(root / name), name,
                                   str(Path(__file__).parent)],
                                  capture_output=True, text=True, check=True)
            results["recipes"][name] = json.loads(done.stdout.strip().splitlines()[-1])

        models = {"float32": AutoModelForCausalLM.from_pretrained(ckpt).eval()}
        models |= {n: AutoModelForCausalLM.from_pretrained(root / n).eval() for n in recipes}
        shapes = {"prefill_1x256": torch.randint(0, 259, (1, 256)), "decode_8x1": torch.randint(0, 259, (8, 1))}
        for shape, ids in shapes.items():
            for m in models.values():  # warm-up
                latency_ms(m, ids, 2)
            times = {n: [] for n in models}
            for _ in range(args.rounds):
                for n, m in models.items():
                    times[n] += latency_ms(m, ids, 1)
            med = {n: statistics.median(t) for n, t in times.items()}
            for n in recipes:
                results["recipes"][n][f"{shape}_ms"] = med[n]
                results["recipes"][n][f"{shape}_vs_float32"] = med[n] / med["float32"]
            results[f"float32_{shape}_ms"] = med["float32"]
    results["linear_2048_batch8_ms"] = linear_2048(recipes, args.rounds)

    first = next(iter(results["recipes"].values()))
    print(f"SmolLM2-135M shape, {args.layers} layers, {first['source_dtype']} weights "
          f"{first['source_bytes'] / 1e6:.0f} MB, "
          f"{torch.get_num_threads()} threads, latency median of {args.rounds} interleaved rounds")
    print(f"  float32: prefill 1x256 {results['float32_prefill_1x256_ms']:.1f} ms, "
          f"decode 8x1 {results['float32_decode_8x1_ms']:.1f} ms")
    for n, r in results["recipes"].items():
        print(f"  {n}: finalize {r['wall_s']:.1f} s, peak RSS {r['peak_rss_mb']:.0f} MB, "
              f"artifact {r['artifact_bytes'] / r['source_bytes']:.2f}x the {r['source_dtype']} source; "
              f"prefill {r['prefill_1x256_ms']:.1f} ms ({r['prefill_1x256_vs_float32']:.2f}x), "
              f"decode {r['decode_8x1_ms']:.1f} ms ({r['decode_8x1_vs_float32']:.2f}x)")
    lin = results["linear_2048_batch8_ms"]
    print("  2048x2048 linear, batch 8: " + ", ".join(
        f"{n} {ms:.3f} ms ({ms / lin['float32']:.2f}x)" for n, ms in lin.items()))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
