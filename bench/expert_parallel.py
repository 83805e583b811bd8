"""`--expert-parallel 2` vs ZeRO-3 alone on 2 CPU ranks, interleaved: per-rank peak RSS, step time, and the time
each rank spends in fake quantization (issue 31).

Model: Qwen3-MoE at Qwen3-30B-A3B's widths (hidden 2048, expert width 768, top-8, head_dim 128, 16/4 heads),
cut to fit 2 ranks in 24 GiB: 16 experts per layer (the published model has 128), 2 layers (48), a 259-token
byte vocabulary (151936). 173M parameters (151M of them experts), float32, saved per expert as published
checkpoints are. QAT with the default recipe, learned scales off (the figures in docs/benchmarks.md were measured
so; EP runs them since), batch 1 x 128 tokens per rank.

    python bench/expert_parallel.py                 # 3 rounds of 6 steps per variant
    python bench/expert_parallel.py --rounds 1 --steps 3

`--load` measures loading alone instead (the model built, streamed in and wrapped by DeepSpeed without an
optimizer, so AutoEP places the experts and each rank reads its own): per-rank peak RSS above the RSS before the
load, against the bound dense bytes / N + expert bytes / E + one transfer chunk. 16 layers of 8 experts there, so
that a layer is the small part of the experts it is in the published models (AutoEP converts one layer at a time,
its transient is about twice that layer's local experts):

    python bench/expert_parallel.py --load --layers 16 --experts 8
    python bench/expert_parallel.py --load --layers 16 --experts 8 --sliding-mmap-threshold   # glibc's default
"""

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve()
TOKENS_PER_RANK = 128
"""One sequence of 128 tokens per rank per step."""


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


RECEIVED = {}
"""Bytes this rank received, by collective (see `count_received`)."""


def count_received() -> None:
    """Count what each collective brings this rank, wrapped at torch.distributed before DeepSpeed binds them (its
    communication backend keeps references from `init_distributed`): an all-gather or reduce-scatter of a buffer
    of B bytes over g ranks brings (g-1)/g * B (ring), an all-reduce twice that, an all-to-all the rows other
    ranks send, a broadcast B to the receivers."""
    import inspect

    import torch.distributed as dist
    from torch.distributed import distributed_c10d as c10d

    def size(group) -> int:
        return dist.get_world_size(group=group)

    def nbytes(t) -> int:
        return t.numel() * t.element_size()

    def ring(group, buffer) -> float:
        return nbytes(buffer) * (size(group) - 1) / size(group)

    def all_to_all(a) -> float:
        out, splits, group = a["output"], a.get("output_split_sizes"), a.get("group")
        if not splits:
            return ring(group, out)
        return nbytes(out) - splits[dist.get_rank(group=group)] * nbytes(out) // max(1, out.shape[0])

    rules = {  # on the bound arguments, as torch names them
        "all_gather_into_tensor": lambda a: ring(a.get("group"), a["output_tensor"]),
        "_all_gather_base": lambda a: ring(a.get("group"), a["output_tensor"]),
        "all_gather": lambda a: sum(ring(a.get("group"), t) for t in a["tensor_list"]),
        "reduce_scatter_tensor": lambda a: ring(a.get("group"), a["input"]),
        "_reduce_scatter_base": lambda a: ring(a.get("group"), a["input"]),
        "all_reduce": lambda a: 2 * ring(a.get("group"), a["tensor"]),
        "broadcast": lambda a: 0 if dist.get_rank() == a.get("src") else nbytes(a["tensor"]),
        "all_to_all_single": all_to_all,
    }

    def counted(name, real, rule):
        signature = inspect.signature(real)

        def call(*args, **kwargs):
            RECEIVED[name] = RECEIVED.get(name, 0) + rule(signature.bind(*args, **kwargs).arguments)
            return real(*args, **kwargs)
        return call

    for name, rule in rules.items():
        if hasattr(c10d, name):
            wrapped = counted(name, getattr(c10d, name), rule)
            for module in (dist, c10d):
                setattr(module, name, wrapped)


def rank_worker(argv: list[str]) -> None:
    """One rank: forge's worker, with the time spent in fake quantizers summed, the bytes received per
    collective between the first and the last optimizer step, and the peak RSS, written to
    $FORGE_BENCH_OUT/rank-N.json at the end."""
    count_received()
    from forge_qat.distributed import worker
    from forge_qat.distributed.zero import ZeroEngine
    from forge_qat.qat import fake_quant

    snapshots = []
    real_step = ZeroEngine.step

    def step(self):
        real_step(self)
        snapshots.append(dict(RECEIVED))

    ZeroEngine.step = step

    spent = [0.0]
    real = fake_quant.AffineFakeQuantizer.forward

    def timed(self, *args, **kwargs):
        t0 = time.perf_counter()
        out = real(self, *args, **kwargs)
        spent[0] += time.perf_counter() - t0
        return out

    fake_quant.AffineFakeQuantizer.forward = timed
    code = worker.main(argv)
    peak = _status("VmHWM")
    out = Path(os.environ["FORGE_BENCH_OUT"]) / f"rank-{os.environ['RANK']}.json"
    first, last = snapshots[0], snapshots[-1]
    received = {k: (last[k] - first.get(k, 0)) / (len(snapshots) - 1) for k in last if last[k] != first.get(k, 0)}
    out.write_text(json.dumps({"fake_quant_s": spent[0], "peak_rss": peak, "received_per_step": received}))
    worker.exit_rank(code)


def _status(field: str) -> int:
    return next(int(line.split()[1]) * 1024 for line in Path("/proc/self/status").read_text().splitlines()
                if line.startswith(field + ":"))


def load_worker(argv: list[str]) -> None:
    """One rank that loads and stops: the model materialized by the ZeRO engine and wrapped frozen (AutoEP's
    conversion and each rank's expert read happen there), peak RSS from just before to just after."""
    from forge_qat import heap
    from forge_qat.config import TrainConfig
    from forge_qat.distributed import worker
    from forge_qat.models import open_model_source
    from forge_qat.train.optim import resolve_placement
    from forge_qat.train.trainer import make_engine

    if not os.environ.get("FORGE_BENCH_SLIDING_MMAP"):
        heap.map_large_allocations()  # as forge's worker sets up a rank
    cfg = TrainConfig.from_flat(**json.loads(Path(argv[1]).read_text()))  # argv: ENTRY CONFIG
    engine = make_engine(cfg, resolve_placement(cfg))
    source = open_model_source(cfg.run.model, cfg.run.seed, reads=engine.rank == 0)
    Path("/proc/self/clear_refs").write_text("5")  # the peak (VmHWM) restarts from the RSS now
    before = _status("VmRSS")
    t0 = time.perf_counter()
    model = engine.materialize(source).requires_grad_(False)
    built = _status("VmHWM") - before
    engine.wrap_frozen(model)
    engine.barrier()
    out = Path(os.environ["FORGE_BENCH_OUT"]) / f"rank-{engine.rank}.json"
    out.write_text(json.dumps({"load_s": time.perf_counter() - t0, "built_peak": built,
                               "load_peak": _status("VmHWM") - before, "after": _status("VmRSS") - before}))
    engine.close()
    worker.exit_rank(0)


def checkpoint_bytes(model: Path) -> dict[str, int]:
    from forge_qat.formats.weights import SafetensorsReader

    files = SafetensorsReader.from_dir(model)
    sizes = {"dense": 0, "experts": 0}
    for key in files.keys():
        sizes["experts" if ".experts." in key else "dense"] += math.prod(files.shape(key)) * files.dtype(key).itemsize
    return sizes


def run_load(variant: str, model: Path, data: Path, out: Path) -> dict:
    from forge_qat.config import TrainConfig
    from forge_qat.train.entry import launch_training

    out.mkdir(parents=True)
    os.environ["FORGE_BENCH_OUT"] = str(out)
    cfg = TrainConfig.from_flat(model=str(model), data=str(data), eval_data="none", output_dir=str(out / "run"),
                                precision="fp32", qat_recipe="none", nproc=2, zero_stage=3, dist_timeout_s=600,
                                expert_parallel=2 if variant == "ep" else 1)
    launch_training(cfg, worker=[sys.executable, str(HERE), "--load-worker"])
    ranks = [json.loads((out / f"rank-{r}.json").read_text()) for r in range(2)]
    return {"load_s": max(r["load_s"] for r in ranks),
            **{f"{k}_gb": [round(r[k] / 1e9, 3) for r in ranks] for k in ("built_peak", "load_peak", "after")}}


def main_load(args, tmp: Path, data: Path) -> None:
    from forge_qat.distributed.zero import TRANSFER_CHUNK_BYTES

    sizes = checkpoint_bytes(tmp / "model")
    results: dict[str, list[dict]] = {"zero3": [], "ep": []}
    for r in range(args.rounds):
        for variant in results:
            results[variant].append(run_load(variant, tmp / "model", data, tmp / f"load-{variant}-{r}"))
            print(f"round {r + 1} {variant}: {results[variant][-1]}", flush=True)
    # N = 2 ranks and E = 2: the bound is the same for both variants
    bound = sizes["dense"] / 2 + sizes["experts"] / 2 + TRANSFER_CHUNK_BYTES
    print(f"checkpoint: dense {sizes['dense'] / 1e9:.3f} GB, experts {sizes['experts'] / 1e9:.3f} GB (fp32); "
          f"bound per rank dense/N + experts/E + {TRANSFER_CHUNK_BYTES / 2**20:.0f} MiB chunk = {bound / 1e9:.3f} GB")
    for variant, rows in results.items():
        peak = max(statistics.median(row["load_peak_gb"][r] for row in rows) for r in range(2))
        seconds = statistics.median(x["load_s"] for x in rows)
        print(f"{variant}: per-rank peak RSS during load (median of rounds, worse rank) {peak:.3f} GB = "
              f"{peak * 1e9 / bound:.2f}x the bound; load {seconds:.1f} s")


def run(variant: str, model: Path, data: Path, out: Path, steps: int) -> dict:
    from forge_qat.config import TrainConfig
    from forge_qat.train.entry import launch_training

    out.mkdir(parents=True)
    os.environ["FORGE_BENCH_OUT"] = str(out)
    cfg = TrainConfig.from_flat(model=str(model), data=str(data), eval_data="none", output_dir=str(out / "run"),
                                max_steps=steps, batch_size=1, seq_len=TOKENS_PER_RANK, warmup_steps=1, save_every=0,
                                save_total_limit=1, precision="fp32", qat_learn_scales=False, nproc=2, zero_stage=3,
                                dist_timeout_s=600, expert_parallel=2 if variant == "ep" else 1)
    launch_training(cfg, worker=[sys.executable, str(HERE), "--rank-worker"])
    ranks = [json.loads((out / f"rank-{r}.json").read_text()) for r in range(2)]
    times = [json.loads(line)["step_time_s"] for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    return {"step_s": statistics.median(times[1:]), "fake_quant_s": max(r["fake_quant_s"] for r in ranks) / steps,
            "peak_rss_gb": max(r["peak_rss"] for r in ranks) / 1e9,
            "received_gb": max(sum(r["received_per_step"].values()) for r in ranks) / 1e9,
            "received_by_op": ranks[0]["received_per_step"]}


def main() -> None:
    if sys.argv[1:2] == ["--rank-worker"]:
        return rank_worker(sys.argv[2:])
    if sys.argv[1:2] == ["--load-worker"]:
        return load_worker(sys.argv[2:])
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--load", action="store_true", help="measure loading alone (see above)")
    ap.add_argument("--sliding-mmap-threshold", action="store_true",
                    help="--load with glibc's own sliding mmap threshold, as before forge's worker fixed it")
    args = ap.parse_args()
    from pydoc_data.topics import topics

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        build(tmp / "model", args.layers, args.experts)
        data = tmp / "train.txt"
        data.write_text("".join(topics.values()))
        if args.load:
            if args.sliding_mmap_threshold:
                os.environ["FORGE_BENCH_SLIDING_MMAP"] = "1"  # inherited by the ranks
            return main_load(args, tmp, data)
        results: dict[str, list[dict]] = {"zero3": [], "ep": []}
        for r in range(args.rounds):
            for variant in results:
                results[variant].append(run(variant, tmp / "model", data, tmp / f"{variant}-{r}", args.steps))
                print(f"round {r + 1} {variant}: {results[variant][-1]}", flush=True)
    med = {v: {k: statistics.median(x[k] for x in rows) for k in rows[0] if k != "received_by_op"}
           for v, rows in results.items()}
    print(json.dumps(med, indent=1))
    z, e = med["zero3"], med["ep"]
    print(f"per rank, EP=2 / ZeRO-3 alone: fake-quant time {e['fake_quant_s'] / z['fake_quant_s']:.2f}x, "
          f"step time {e['step_s'] / z['step_s']:.2f}x, peak RSS {e['peak_rss_gb']:.2f} GB vs "
          f"{z['peak_rss_gb']:.2f} GB")
    check_plan(args, med, {v: rows[-1]["received_by_op"] for v, rows in results.items()})


def check_plan(args, med: dict, by_op: dict) -> None:
    """bench/expert_parallel_plan.py's bytes per rank per step for this model, against what the ranks received."""
    sys.path.insert(0, str(HERE.parent))
    from expert_parallel_plan import Shape, per_rank, token_bytes

    shape = Shape("bench", hidden=2048, layers=args.layers, experts=args.experts, top_k=8, expert_ffn=768, heads=16,
                  kv_heads=4, head_dim=128, vocab=259)
    for variant, ep in (("zero3", 1), ("ep", 2)):
        predicted = per_rank(shape, 2, ep, TOKENS_PER_RANK, width=4)["moved_gb"]
        print(f"{variant}: received per rank per step {med[variant]['received_gb']:.3f} GB, the plan predicts "
              f"{predicted:.3f} GB ({med[variant]['received_gb'] / predicted:.2f}x); by collective, GB: "
              + ", ".join(f"{k} {v / 1e9:.3f}" for k, v in sorted(by_op[variant].items())))
    print(f"of which the plan's token all-to-all: {token_bytes(shape, 2, TOKENS_PER_RANK, 4) / 1e9:.4f} GB")


if __name__ == "__main__":
    main()
