"""The next-token loss loop of the round-trip benches (bench/compressed_tensors_e2e.py, bench/vllm_serve.py), one
for every model they score: shifted cross-entropy, token-weighted, over saved batches of (input ids, labels).

    python bench/stock_loss.py MODEL_DIR BATCHES.pt [--dtype bfloat16] [--scores OUT.pt]

Imported for forge's own (fake-quant) model; run as a script (stock transformers, no forge_qat: prints JSON) for
the directories stock transformers loads. `--scores` also saves each scored position's log-probability of its
target and the model's top-1 token, in the order `scores` gives them.
"""

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch


def scores(model: torch.nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Every scored position's (labels -100 are not) log-probability of its next token and the model's top-1
    token, row by row, position by position, computed in float32 from the model's logits."""
    logprob, top1 = [], []
    with torch.no_grad():
        for ids, labels in batches:
            logits = model(ids).logits[:, :-1].float()
            target = labels[:, 1:]
            keep = target != -100
            lp = torch.log_softmax(logits[keep], -1)
            logprob.append(lp.gather(-1, target[keep][:, None])[:, 0])
            top1.append(lp.argmax(-1))
    return {"logprob": torch.cat(logprob), "top1": torch.cat(top1)}


def loss(model: torch.nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[float, int]:
    """Mean next-token loss over `batches` and the number of tokens scored."""
    logprob = scores(model, batches)["logprob"]
    return -logprob.double().mean().item(), logprob.numel()


def stock(directory: Path, batches: Path, dtype: str = "float32", save_scores: Path | None = None
          ) -> tuple[float, int]:
    """Loss and tokens of `directory` in stock transformers, in a process of its own that never imports forge_qat."""
    command = [sys.executable, __file__, str(directory), str(batches), "--dtype", dtype]
    if save_scores is not None:
        command += ["--scores", str(save_scores)]
    result = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
    return result["loss"], result["tokens"]


def main() -> None:
    from transformers import AutoModelForCausalLM

    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("batches")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--scores")
    args = ap.parse_args()
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=getattr(torch, args.dtype)).eval()
    result = scores(model, torch.load(args.batches, weights_only=True))
    assert "forge_qat" not in sys.modules
    if args.scores:
        torch.save(result, args.scores)
    logprob = result["logprob"]
    print(json.dumps({"loss": -logprob.double().mean().item(), "tokens": logprob.numel()}))


if __name__ == "__main__":
    main()
