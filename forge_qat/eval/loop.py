"""The one eval loop: token-weighted mean next-token loss over fixed batches. Training's eval loss, `forge eval`
and `forge compare` all measure with it, so the loss logged at a step is what `forge eval` reports for that
step's checkpoint.
"""

import contextlib
from contextlib import AbstractContextManager

import torch

from forge_qat.data.encode import IGNORE_INDEX
from forge_qat.data.store import TokenStore, model_inputs


@torch.no_grad()
def mean_loss(model: torch.nn.Module, data: TokenStore, *, batch_size: int, device: torch.device,
              max_batches: int | None = None, autocast: AbstractContextManager | None = None,
              per_sequence: list[tuple[float, int]] | None = None) -> tuple[float, int]:
    """The one eval loop (training's eval loss, `forge eval`, `forge compare`): mean next-token loss over the
    first `max_batches` micro-batches of `data` (all by default) in a fixed order, weighted by the tokens each
    batch scores; returns it and the token count. Every rank of a ZeRO-3 job runs the same batches: each
    forward is a collective. `per_sequence`, when given, receives each sequence's (summed loss, tokens)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    n = len(data) if max_batches is None else min(len(data), max_batches * batch_size)
    for start in range(0, n, batch_size):
        batch = model_inputs(data, torch.arange(start, min(start + batch_size, n)), model, device)
        tokens = int((batch["labels"][..., 1:] != IGNORE_INDEX).sum())
        with autocast or contextlib.nullcontext():
            out = model(**batch)
        total += out.loss.float().item() * tokens
        if per_sequence is not None:
            per_sequence.extend(_sequence_losses(out.logits, batch["labels"]))
        count += tokens
    model.train(was_training)
    return total / count, count


def _sequence_losses(logits: torch.Tensor, labels: torch.Tensor) -> list[tuple[float, int]]:
    """Each row's summed next-token loss and scored-token count, as the model's own loss shifts its labels."""
    targets = labels[..., 1:]
    losses = torch.nn.functional.cross_entropy(logits[..., :-1, :].float().transpose(1, 2), targets,
                                               ignore_index=IGNORE_INDEX, reduction="none")
    return list(zip(losses.sum(-1).tolist(), (targets != IGNORE_INDEX).sum(-1).tolist(), strict=True))
