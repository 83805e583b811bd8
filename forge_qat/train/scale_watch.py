"""How far learned weight scales moved since they started: a run whose scales barely move trains plain QAT
with extra work, and says so.

Called by the trainer: `ScaleWatch.begin` when the scales start (training start, or the step delayed fake
quantization starts), `movement` at each checkpoint (logged, and written to `forge_checkpoint.json` as
`learned_scales`), `state`/`from_state` to carry the starting point through a resume. It keeps a fixed
sample of each scale tensor's starting values (at most `SAMPLE` evenly spaced elements), not a copy of the
scales, so its memory does not grow with the model.
"""

import logging
from collections.abc import Callable
from contextlib import AbstractContextManager

import torch

from forge_qat.qat.prepare import learned_scales

log = logging.getLogger(__name__)

SAMPLE = 4096
"""Elements sampled per scale tensor."""

BARELY_MOVED = 0.01
"""Median relative change under which the scales are reported as not trained (1%)."""

FullTensor = Callable[[torch.nn.Parameter], AbstractContextManager[torch.Tensor]]


def sample_evenly(t: torch.Tensor) -> torch.Tensor:
    """At most `SAMPLE` evenly spaced elements of `t`, as float32 on the CPU (a whole tensor's, not a partition's)."""
    flat = t.detach().reshape(-1).float().cpu()
    index = torch.linspace(0, flat.numel() - 1, min(SAMPLE, flat.numel())).round().long()
    return flat[index]


def _sampled_scales(model: torch.nn.Module, full_tensor: FullTensor) -> dict[str, torch.Tensor]:
    """Each learned scale tensor's sample (collective: every rank gathers every scale, in name order)."""
    samples = {}
    for name, p in sorted(learned_scales(model).items()):
        with full_tensor(p) as whole:
            samples[name] = sample_evenly(whole)
    return samples


class ScaleWatch:
    def __init__(self, start: dict[str, torch.Tensor]):
        self.start = start

    @classmethod
    def begin(cls, model: torch.nn.Module, full_tensor: FullTensor) -> "ScaleWatch":
        return cls(_sampled_scales(model, full_tensor))

    def state(self) -> dict[str, torch.Tensor]:
        return dict(self.start)

    @classmethod
    def from_state(cls, state: dict[str, torch.Tensor]) -> "ScaleWatch":
        return cls(dict(state))

    def movement(self, model: torch.nn.Module, full_tensor: FullTensor) -> dict[str, float | int]:
        """The median over the sampled scales of |now / start - 1|, and how many were sampled (collective)."""
        now = _sampled_scales(model, full_tensor)
        if set(now) != set(self.start):
            raise ValueError("the model's learned scales are not the ones the watch started from")
        change = torch.cat([(now[k] / self.start[k] - 1).abs() for k in sorted(now)])
        return {"median_relative_change": float(change.median()), "sampled_scales": int(change.numel())}


def report(movement: dict[str, float | int], step: int, scale_lr: float) -> None:
    """Log the movement; a warning when the scales barely moved."""
    m = movement["median_relative_change"]
    if m < BARELY_MOVED:
        log.warning("learned scales moved a median %.2f%% since they started (step %d): under %.0f%%, they train "
                    "little beyond plain QAT; a larger --qat-scale-lr (now %g) trains them", 100 * m, step,
                    100 * BARELY_MOVED, scale_lr)
    else:
        log.info("learned scales moved a median %.2f%% since they started (step %d)", 100 * m, step)
