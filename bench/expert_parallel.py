"""`--expert-parallel 2` vs ZeRO-3 alone on 2 CPU ranks, interleaved: per-rank peak RSS, step time, and the time
each rank spends in fake quantization (issue 31).

Model: Qwen3-MoE at Qwen3-30B-A3B's widths (hidden 2048, expert width 768, top-8, head_dim 128, 16/4 heads),
cut to fit 2 ranks in 24 GiB: 16 experts per layer (the published model has 128), 2 layers (48), a 259-token
byte vocabulary (151936). 302M parameters, float32, saved per expert as published checkpoints are. QAT with
the default recipe, learned scales off (EP does not take them yet), batch 1 x 128 tokens per rank.

    python bench/expert_parallel.py                 # 3 rounds of 6 steps per variant
    python bench/expert_parallel.py --rounds 1 --steps 3
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve()


def build(directory: Path, layers: int, experts: int) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from forge_qat.models import byte_tokenizer

    config = AutoConfig.for_model("qwen3_moe", vocab_size=259, hidden_size=2048, intermediate_size=6144,
                                  moe_intermediate_size=768, num_experts=experts, num_experts_per_tok=8,
                                  num_hidden_layers=layers, num_attention_heads=16, num_key_value_heads=4,
                                  head_dim=128, max_position_embeddings=1024, tie_word_embeddings=False)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(directory, max_shard_size="200MB")
    byte_tokenizer().save_pretrained(directory)


def rank_worker(argv: list[str]) -> None:
    """One rank: forge's worker, with the time spent in fake quantizers summed, and the peak RSS, written to
    $FORGE_BENCH_OUT/rank-N.json at the end."""
    from forge_qat.distributed import worker
    from forge_qat.qat import fake_quant

    spent = [0.0]
    real = fake_quant.AffineFakeQuantizer.forward

    def timed(self, *args, **kwargs):
        t0 = time.perf_counter()
        out = real(self, *args, **kwargs)
        spent[0] += time.perf_counter() - t0
        return out

    fake_quant.AffineFakeQuantizer.forward = timed
    code = worker.main(argv)
    status = Path("/proc/self/status").read_text().splitlines()
    peak = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:"))
    out = Path(os.environ["FORGE_BENCH_OUT"]) / f"rank-{os.environ['RANK']}.json"
    out.write_text(json.dumps({"fake_quant_s": spent[0], "peak_rss": peak}))
    worker.exit_rank(code)


def run(variant: str, model: Path, data: Path, out: Path, steps: int) -> dict:
    from forge_qat.config import TrainConfig
    from forge_qat.train.entry import launch_training

    out.mkdir(parents=True)
    os.environ["FORGE_BENCH_OUT"] = str(out)
    cfg = TrainConfig.from_flat(model=str(model), data=str(data), eval_data="none", output_dir=str(out / "run"),
                                max_steps=steps, batch_size=1, seq_len=128, warmup_steps=1, save_every=0,
                                save_total_limit=1, precision="fp32", qat_learn_scales=False, nproc=2, zero_stage=3,
                                dist_timeout_s=600, expert_parallel=2 if variant == "ep" else 1)
    launch_training(cfg, worker=[sys.executable, str(HERE), "--rank-worker"])
    ranks = [json.loads((out / f"rank-{r}.json").read_text()) for r in range(2)]
    times = [json.loads(line)["step_time_s"] for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    return {"step_s": statistics.median(times[1:]), "fake_quant_s": max(r["fake_quant_s"] for r in ranks) / steps,
            "peak_rss_gb": max(r["peak_rss"] for r in ranks) / 1e9}


def main() -> None:
    if sys.argv[1:2] == ["--rank-worker"]:
        return rank_worker(sys.argv[2:])
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--experts", type=int, default=16)
    args = ap.parse_args()
    from pydoc_data.topics import topics

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        build(tmp / "model", args.layers, args.experts)
        data = tmp / "train.txt"
        data.write_text("".join(topics.values()))
        results: dict[str, list[dict]] = {"zero3": [], "ep": []}
        for r in range(args.rounds):
            for variant in results:
                results[variant].append(run(variant, tmp / "model", data, tmp / f"{variant}-{r}", args.steps))
                print(f"round {r + 1} {variant}: {results[variant][-1]}", flush=True)
    med = {v: {k: statistics.median(x[k] for x in rows) for k in rows[0]} for v, rows in results.items()}
    print(json.dumps(med, indent=1))
    z, e = med["zero3"], med["ep"]
    print(f"per rank, EP=2 / ZeRO-3 alone: fake-quant time {e['fake_quant_s'] / z['fake_quant_s']:.2f}x, "
          f"step time {e['step_s'] / z['step_s']:.2f}x, peak RSS {e['peak_rss_gb']:.2f} GB vs "
          f"{z['peak_rss_gb']:.2f} GB")


if __name__ == "__main__":
    main()
