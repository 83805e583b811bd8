"""Streaming vs in-memory finalize on two models that differ only in depth, in one run.

SmolLM2-135M shape (hidden 576, vocab 49152) at 8 and 32 layers, random init, float32 HF checkpoints.
Each finalize (recipe int8-dynamic-act-int4-weight, 20 MB output shards, so that both depths fill
shards and the comparison is about depth) runs in its own subprocess,
after a warm-up finalize of a 1-layer model, with the peak RSS reset just before it (VmHWM, see
bench/memory.py). Reports peak RSS increase, wall time and convert throughput (GB of float weights
per second), and checks the streaming target: peak <= 1.5 x (largest block's float bytes + one
output shard), growing < 10% from 8 to 32 layers.

    python bench/stream_finalize.py
"""

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent

_CHILD = """
import json, sys, time
sys.path.insert(0, sys.argv[5])
from pathlib import Path
from memory import peak_rss_bytes, reset_peak, rss_bytes
from transformers.utils import logging as hf_logging
hf_logging.disable_progress_bar()
from forge_qat.finalize.job import FinalizeRequest
from forge_qat.finalize.convert import finalize
from forge_qat.qat.registry import get_recipe
def run(src, dest):
    return finalize(FinalizeRequest(source=Path(src), dest=Path(dest), ptq=get_recipe("int8-dynamic-act-int4-weight"),
                                    streaming=sys.argv[3] == "1", max_shard_bytes=int(sys.argv[6])))
run(sys.argv[4], sys.argv[2] + "-warmup")
reset_peak(); before = rss_bytes(); t = time.perf_counter()
r = run(sys.argv[1], sys.argv[2])
print(json.dumps({"wall_s": time.perf_counter() - t, "peak_increase_mb": (peak_rss_bytes() - before) / 1e6,
                  "source_mb": r.source_bytes / 1e6, "artifact_mb": r.artifact_bytes / 1e6}))
"""


def make(path: Path, layers: int) -> dict:
    import torch
    from train_step import smollm_shape
    from transformers import LlamaForCausalLM

    from forge_qat.models import byte_tokenizer

    torch.manual_seed(0)
    model = LlamaForCausalLM(smollm_shape(layers))
    model.save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    layer_bytes = sum(p.numel() * 4 for p in model.model.layers[0].parameters())
    embed_bytes = model.model.embed_tokens.weight.numel() * 4
    return {"largest_block_mb": max(layer_bytes, embed_bytes) / 1e6}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--depths", type=int, nargs=2, default=[8, 32])
    ap.add_argument("--shard-mb", type=int, default=20)
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    shard = args.shard_mb * 10**6
    sys.path.insert(0, str(HERE))
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make(tmp / "warmup", 1)
        for layers in args.depths:
            info = make(tmp / f"m{layers}", layers)
            for mode, flag in (("streaming", "1"), ("in_memory", "0")):
                argv = [sys.executable, "-c", _CHILD, str(tmp / f"m{layers}"), str(tmp / f"o{layers}{flag}"),
                        flag, str(tmp / "warmup"), str(HERE), str(shard)]
                out = subprocess.run(argv, capture_output=True, text=True, check=True)
                r = json.loads(out.stdout.strip().splitlines()[-1])
                r["throughput_gb_s"] = r["source_mb"] / 1e3 / r["wall_s"]
                results[f"{mode}_{layers}"] = r | info
    a, b = args.depths
    bound = 1.5 * (results[f"streaming_{b}"]["largest_block_mb"] + shard / 1e6)
    growth = results[f"streaming_{b}"]["peak_increase_mb"] / results[f"streaming_{a}"]["peak_increase_mb"] - 1
    results["target"] = {"bound_mb": bound, "streaming_growth": growth}
    print(f"SmolLM2-135M shape, recipe int8-dynamic-act-int4-weight, {args.shard_mb} MB shards; "
          f"target: streaming peak <= {bound:.0f} MB and growth {a}->{b} layers < 10%")
    for key, r in results.items():
        if key == "target":
            continue
        print(f"  {key:14s} source {r['source_mb']:6.0f} MB: peak RSS +{r['peak_increase_mb']:6.0f} MB, "
              f"{r['wall_s']:5.1f} s, {r['throughput_gb_s']:.3f} GB/s")
    print(f"  streaming peak growth {a}->{b} layers: {growth:+.1%}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
