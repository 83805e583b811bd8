"""The next-token loss loop of bench/compressed_tensors_e2e.py, one for every model it scores: shifted
cross-entropy, token-weighted, over saved batches of (input ids, labels).

    python bench/stock_loss.py MODEL_DIR BATCHES.pt     # stock transformers, no forge_qat: prints JSON

Imported for forge's own (fake-quant) model; run as a script for the directories stock transformers loads.
"""

import json
import sys

import torch
import torch.nn.functional as F


def loss(model: torch.nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[float, int]:
    """Mean next-token loss over `batches` and the number of tokens scored (labels -100 are not)."""
    total, count = 0.0, 0
    with torch.no_grad():
        for ids, labels in batches:
            logits = model(ids).logits[:, :-1]
            target = labels[:, 1:]
            keep = target != -100
            total += F.cross_entropy(logits[keep], target[keep], reduction="sum").item()
            count += int(keep.sum())
    return total / count, count


def main() -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32).eval()
    mean, tokens = loss(model, torch.load(sys.argv[2], weights_only=True))
    assert "forge_qat" not in sys.modules
    print(json.dumps({"loss": mean, "tokens": tokens}))


if __name__ == "__main__":
    main()
