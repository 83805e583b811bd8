"""forge's W4A16 QAT against GPTQ W4A16, the post-training quantization a vLLM user would run instead (issue 33),
scored in transformers on the same text.

The float fine-tune and budget are bench/quality_vs_llamacpp.py's (same workdir, same runs): SmolLM2-135M-Instruct
fine-tuned on the wide split's training topics, float32. Rows, each the held-out perplexity of `forge eval`'s loop
(windows of `--seq-len` tokens of the held-out topics):

  float fine-tune             the checkpoint itself
  GPTQ W4A16 g64              llm-compressor's GPTQ of the fine-tune (bench/gptq_make.py, in its own venv), with
                              128 x 512 calibration tokens of the training split; loaded by transformers through
                              compressed-tensors
  forge PTQ w4a16-g64         `forge finalize --ptq w4a16-g64 --ptq-scales absmax|mse|extreme` of the fine-tune
  forge QAT w4a16-g64         `forge train --qat-recipe w4a16-g64`, shipped defaults, the fine-tune's data, steps and
                              seed, finalized

Groups of 64, not GPTQ's usual 128: SmolLM2's hidden size 576 is not a multiple of 128 (llm-compressor refuses
it, and forge's w4a16 would leave those layers float).

    python bench/quality_vs_gptq.py --gptq-python /tmp/gptq-venv/bin/python --seeds 0
"""

import argparse
import json
import subprocess
import sys
from pathlib import Path

from forge_qat.logs import quiet_libraries

quiet_libraries("transformers", "forge_qat")

from quality import smollm2_dir, wide_split  # noqa: E402
from quality_vs_llamacpp import budget_args, budget_key, budget_of, per_seed, train  # noqa: E402

RECIPE = "w4a16-g64"
ROWS = {
    "float": "float fine-tune",
    "gptq": "GPTQ W4A16 g64 (llm-compressor)",
    "forge-ptq-absmax": "forge PTQ w4a16-g64, absmax scales",
    "forge-ptq-mse": "forge PTQ w4a16-g64, mse scales",
    "forge-ptq-extreme": "forge PTQ w4a16-g64, extreme scales (default)",
    "forge-qat": "forge QAT w4a16-g64, shipped defaults",
}
HERE = Path(__file__).resolve().parent


def row_model(row: str, work: Path, base: Path, data: tuple[str, str], budget: dict, gptq_python: str) -> Path:
    from forge_qat.finalize.convert import finalize
    from forge_qat.finalize.job import FinalizeRequest
    from forge_qat.qat.registry import get_recipe

    float_ft = train(base, work / "float-ft", data[0], budget, "none")
    if row == "float":
        return float_ft
    out = work / f"w4a16-{row}"
    if (out / "config.json").is_file():
        return out
    if row == "gptq":
        subprocess.run([gptq_python, str(HERE / "gptq_make.py"), "--model", str(float_ft), "--calibration", data[0],
                        "--out", str(out), "--group-size", "64"], check=True)
        return out
    if row == "forge-qat":
        return finalize(FinalizeRequest(source=train(base, work / "qat-w4a16-g64", data[0], budget, RECIPE),
                                        dest=out)).dest
    rule = row.removeprefix("forge-ptq-")
    return finalize(FinalizeRequest(source=float_ft, dest=out, ptq=get_recipe(RECIPE), ptq_scales=rule)).dest


def main() -> None:
    from forge_qat.eval.models import evaluate_model

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gptq-python", default="/tmp/gptq-venv/bin/python", help="llm-compressor's venv's python")
    budget_args(ap)
    ap.add_argument("--eval-seq-len", type=int, default=512)
    ap.add_argument("--rows", default=",".join(ROWS))
    args = ap.parse_args()
    chosen = args.rows.split(",")
    if unknown := [r for r in chosen if r not in ROWS]:
        sys.exit(f"unknown rows {unknown}; valid: {', '.join(ROWS)}")
    base = smollm2_dir(args.workdir)
    data = wide_split(args.workdir)
    budget = budget_of(args)
    results_path = args.workdir / "results-gptq.json"
    stored = json.loads(results_path.read_text()) if results_path.is_file() else {}
    seeds = [int(s) for s in args.seeds.split(",")]
    for seed in seeds:
        key, work = budget_key(args.workdir, budget, seed)
        results = stored.setdefault(f"{key} eval {args.eval_seq_len}", {})
        for row in chosen:
            if row in results:
                continue
            model = row_model(row, work, base, data, {**budget, "seed": seed}, args.gptq_python)
            result = evaluate_model(str(model), data[1], seq_len=args.eval_seq_len)
            results[row] = {"perplexity": result.perplexity, "loss": result.loss, "tokens": result.tokens,
                            "kind": result.kind}
            results_path.write_text(json.dumps(stored, indent=2))
            print(f"seed {seed} {row}: perplexity {result.perplexity:.3f} ({result.kind})", flush=True)

    print(f"\nSmolLM2-135M-Instruct fine-tuned {args.steps} steps x {args.batch_size} x {args.seq_len}, fp32, lr "
          f"{args.lr:g}, seeds {args.seeds}; transformers, windows of {args.eval_seq_len} on {Path(data[1]).name}")
    print("| model | perplexity (mean over seeds) | per seed |")
    print("|---|---|---|")
    for row in chosen:
        got = [stored.get(f"{budget_key(args.workdir, budget, s)[0]} eval {args.eval_seq_len}", {}).get(row)
               for s in seeds]
        if all(got):
            ppl = [g["perplexity"] for g in got]
            print(f"| {ROWS[row]} | {per_seed(ppl)} |")


if __name__ == "__main__":
    main()
