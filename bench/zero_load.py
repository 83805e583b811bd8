"""Per-rank memory and time to load a pretrained model under ZeRO-3, 2 ranks on this machine.

Compares, on the same sharded safetensors checkpoint (SmolLM2-135M shape, 538 MB float32):
  streamed       forge_qat.distributed.zero: partitioned construction, rank 0 reads one tensor at a
                 time into GatheredParameters(modifier_rank=0)
  from_pretrained transformers' from_pretrained under an active HfDeepSpeedConfig (ZeRO-3), what
                 users run today
and reports the peak RSS increase per rank during the load (VmHWM after the load, reset just
before it, minus the RSS then; see bench/memory.py) and the load time. Importing the architecture and
reading config and tokenizer happen before the reset: both modes pay them, and they do not grow with
the model. Then the step time of QAT
training (tiny preset, global batch 8x128) under ZeRO-3 with 2 ranks vs 1 rank.

    python bench/zero_load.py
"""

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))


def rank_main(mode: str, model_dir: str, result_dir: str) -> None:
    """One rank: load with `mode`, report memory and time as JSON."""

    import torch
    from memory import peak_rss_bytes, reset_peak, rss_bytes

    from forge_qat.logs import quiet_libraries

    quiet_libraries("DeepSpeed")
    import forge_qat.distributed  # noqa: F401  (DS_ACCELERATOR)
    from forge_qat.config import TrainConfig
    from forge_qat.train.model_setup import build_models
    from forge_qat.train.optim import resolve_placement
    from forge_qat.train.trainer import make_engine

    cfg = TrainConfig.from_flat(model=model_dir, zero_stage=3, precision="fp32", qat_recipe="none", nproc=2)
    engine = make_engine(cfg, resolve_placement(cfg))
    rank = engine.rank
    import torch.distributed as dist
    from transformers import AutoConfig, AutoTokenizer

    from forge_qat.distributed.zero import _import_architecture

    # Fixed costs both modes pay and that do not grow with the model (importing the architecture's
    # module, reading config and tokenizer: ~50 MB) are paid before the measured window, so the figure
    # is the memory the weights take, which is what the bound speaks of.
    _import_architecture(AutoConfig.from_pretrained(model_dir, trust_remote_code=False))
    AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)
    dist.barrier()
    reset_peak()
    before = rss_bytes()
    t0 = time.perf_counter()
    if mode == "streamed":
        model = build_models(engine, cfg).student
    else:
        from transformers import AutoModelForCausalLM
        from transformers.integrations import HfDeepSpeedConfig

        keep_alive = HfDeepSpeedConfig(engine.ds_config)  # noqa: F841
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    dist.barrier()
    elapsed = time.perf_counter() - t0
    peak = peak_rss_bytes()
    n_local = sum(p.numel() for p in model.parameters())
    Path(result_dir, f"{mode}-{rank}.json").write_text(json.dumps(
        {"rank": rank, "load_s": elapsed, "peak_increase_mb": (peak - before) / 1e6,
         "rss_before_mb": before / 1e6, "rss_after_mb": rss_bytes() / 1e6,
         "local_param_mb": n_local * 4 / 1e6}))
    engine.close()


def measure_loads(model_dir: Path, tmp: Path) -> dict:
    """Both loaders on 2 ranks, each rank in its own process: {mode: [rank 0 result, rank 1 result]}."""
    from forge_qat.config import TrainConfig
    from forge_qat.train.entry import launch_training

    results = {}
    for mode in ("streamed", "from_pretrained"):
        # the launcher appends the config path; rank_main ignores it
        launch_training(TrainConfig.from_flat(nproc=2, zero_stage=3),
               worker=[sys.executable, __file__, "--rank-mode", mode, str(model_dir), str(tmp)])
        results[mode] = [json.loads((tmp / f"{mode}-{r}.json").read_text()) for r in range(2)]
    return results


def print_loads(results: dict, what: str) -> None:
    target = results["model_mb"] / 2 + results["largest_tensor_mb"]
    print(f"model {results['model_mb']:.0f} MB float32 {what}, largest tensor {results['largest_tensor_mb']:.0f} MB, "
          f"2 ranks; target per rank <= {target * 1.1:.0f} MB (model/2 + largest tensor, +10%)")
    for mode in ("streamed", "from_pretrained"):
        for r in results[mode]:
            print(f"  {mode:15s} rank {r['rank']}: peak RSS +{r['peak_increase_mb']:.0f} MB "
                  f"({r['peak_increase_mb'] / results['model_mb']:.2f}x model), load {r['load_s']:.1f} s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--rank-mode", nargs=3, help=argparse.SUPPRESS)
    args, rest = ap.parse_known_args()
    if args.rank_mode:
        rank_main(*args.rank_mode)
        return

    import torch
    from train_step import smollm_shape
    from transformers import LlamaForCausalLM

    from forge_qat.config import TrainConfig
    from forge_qat.models import byte_tokenizer
    from forge_qat.train.entry import launch_training

    results = {"config": vars(args)}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        torch.manual_seed(0)
        model = LlamaForCausalLM(smollm_shape(args.layers))
        model.save_pretrained(tmp / "model", max_shard_size="200MB")
        byte_tokenizer().save_pretrained(tmp / "model")
        sizes = {n: p.numel() * 4 for n, p in model.named_parameters()}
        results["model_mb"] = sum(sizes.values()) / 1e6
        results["largest_tensor_mb"] = max(sizes.values()) / 1e6
        del model
        results.update(measure_loads(tmp / "model", tmp))

        for nproc in (1, 2):
            out = tmp / f"train-{nproc}"
            launch_training(TrainConfig.from_flat(nproc=nproc, zero_stage=3, model="tiny-llama", batch_size=8 // nproc,
                                         max_steps=15, eval_data="none", save_every=0, output_dir=str(out),
                                         precision="fp32"))
            times = [json.loads(line)["step_time_s"] for line in (out / "metrics.jsonl").read_text().splitlines()]
            results[f"step_s_{nproc}_rank"] = statistics.median(times[3:])

    print_loads(results, "in 200 MB shards")
    print(f"  QAT train step (tiny preset, global batch 8x128, fp32, ZeRO-3): 1 rank "
          f"{results['step_s_1_rank']:.3f} s, 2 ranks {results['step_s_2_rank']:.3f} s "
          f"({results['step_s_2_rank'] / results['step_s_1_rank']:.2f}x)")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
