"""`forge train` step time of this checkout against another revision, measured as ratios in one run.

Each round runs the same short training through the real CLI once per side, alternating, so machine noise
hits both alike; the figure per run is the median step time after warm-up, from metrics.jsonl. The
baseline revision is checked out into a temporary git worktree and put first on PYTHONPATH.

    python bench/trainer_ab.py --baseline 67b3ffc                      # 1 process, tiny preset
    python bench/trainer_ab.py --baseline 67b3ffc --nproc 2 --zero-stage 3
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def train(source: Path, out: Path, args: argparse.Namespace) -> float:
    flags = ["--model", args.model, "--max-steps", str(args.steps), "--eval-data", "none", "--save-every", "0",
             "--precision", "fp32", "--batch-size", str(args.batch), "--seq-len", str(args.seq_len),
             "--output-dir", str(out), "--nproc", str(args.nproc), "--zero-stage", str(args.zero_stage)]
    env = {**os.environ, "PYTHONPATH": str(source)}
    cmd = [sys.executable, "-c", "from forge_qat.cli import main; main()", "train", *flags]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{source}: forge train failed:\n{done.stderr[-2000:]}")
    times = [json.loads(line)["step_time_s"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    return statistics.median(times[args.warmup:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--baseline", required=True, help="git revision to compare with")
    ap.add_argument("--model", default="tiny-llama")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--nproc", type=int, default=1)
    ap.add_argument("--zero-stage", type=int, default=0)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        base = tmp / "baseline"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q", str(base), args.baseline],
                       check=True)
        try:
            runs = {"baseline": [], "this": []}
            for r in range(args.rounds):
                for side, source in (("baseline", base), ("this", ROOT)):
                    runs[side].append(train(source, tmp / f"{side}-{r}", args))
                    print(f"round {r + 1} {side:8s} {runs[side][-1]:.4f} s/step", flush=True)
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(base)], check=False)
    b, t = statistics.median(runs["baseline"]), statistics.median(runs["this"])
    print(f"{args.model}, {args.nproc} process(es), ZeRO stage {args.zero_stage}, batch {args.batch}x{args.seq_len}, "
          f"fp32, QAT (default recipe), median of {args.rounds} rounds: baseline {args.baseline} {b:.4f} s/step, "
          f"this checkout {t:.4f} s/step ({t / b:.3f}x)")


if __name__ == "__main__":
    main()
