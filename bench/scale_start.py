"""Where learned scales start (issue 19): held-out perplexity of a model fake-quantized with its learned
scales' start and no training, for the absmax start and the mse start over several search ranges; and
the time the search takes on the whole model, one thread.

The mse start (`forge_qat.qat.fake_quant.SCALE_SEARCH_FACTORS`) tries 1.00, 0.99, ... down to a lowest
multiple of the absmax scale; `--lows` sets that lowest multiple for each scored row (0.8 is the shipped
one). CHECKPOINT: a float checkpoint (e.g. a bench/quality.py float-ft run, kept under its workdir); the
default is SmolLM2-135M-Instruct as bench/quality.py prepares it. Scored on bench/quality.py's wide held-out
split, with `forge eval`'s loop (fake quant computes what the converted artifact computes).

    python bench/scale_start.py --lows 0.8,0.9,0.95
    python bench/scale_start.py --checkpoint ~/.cache/forge_qat/bench-quality/runs/<hash>/float-ft --lows 0.8
"""

import argparse
import math
import time
from pathlib import Path

import torch
from quality import smollm2_dir, wide_split

import forge_qat.qat.fake_quant as fq
from forge_qat.data.store import open_token_store
from forge_qat.eval.loop import mean_loss
from forge_qat.formats.run_dir import resolve_checkpoint
from forge_qat.models import load_model
from forge_qat.qat.prepare import LearnScales, prepare_qat
from forge_qat.qat.registry import DEFAULT_RECIPE, get_recipe


def prepared(path: str, recipe: str, init: str) -> tuple[torch.nn.Module, object, float]:
    model, tokenizer = load_model(path)
    t0 = time.perf_counter()
    prepare_qat(model, get_recipe(recipe), learn=LearnScales(init=init))
    return model, tokenizer, time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", type=Path, default=Path.home() / ".cache" / "forge_qat" / "bench-quality")
    p.add_argument("--checkpoint", type=Path, help="a float checkpoint (default: the pretrained SmolLM2)")
    p.add_argument("--recipe", default=DEFAULT_RECIPE)
    p.add_argument("--lows", default="0.8", help="comma-separated lowest search multiples of the mse rows")
    p.add_argument("--seq-len", type=int, default=128)
    args = p.parse_args()
    torch.set_num_threads(1)
    args.workdir.mkdir(parents=True, exist_ok=True)
    path = str(resolve_checkpoint(args.checkpoint) if args.checkpoint else smollm2_dir(args.workdir))
    data = wide_split(args.workdir)[1]
    shipped = fq.SCALE_SEARCH_FACTORS
    for init, low in [("absmax", None)] + [("mse", float(v)) for v in args.lows.split(",")]:
        if low is not None:
            fq.SCALE_SEARCH_FACTORS = tuple(round(1.0 - 0.01 * i, 2) for i in range(round((1.0 - low) / 0.01) + 1))
        model, tokenizer, seconds = prepared(path, args.recipe, init)
        with torch.no_grad():
            loss, _ = mean_loss(model, open_token_store(data, tokenizer, args.seq_len), batch_size=8,
                                device=torch.device("cpu"))
        label = "absmax" if low is None else f"mse {low:.2f}-1.00"
        print(f"{label}: perplexity {math.exp(loss):.3f}; choosing the scales took {seconds:.2f} s", flush=True)
        fq.SCALE_SEARCH_FACTORS = shipped


if __name__ == "__main__":
    main()
