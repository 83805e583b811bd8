"""Optimisation choices made once per run: device and precision for this machine, the learning rate, the
optimizer's parameter groups and the LR schedule.

Called by `forge_qat.train.trainer`.
"""

import functools
from dataclasses import dataclass

import torch
from torch.optim.lr_scheduler import LambdaLR
from transformers import get_scheduler

from forge_qat import hardware
from forge_qat.config import TrainConfig
from forge_qat.errors import HardwareError
from forge_qat.formats.weights import true_shape
from forge_qat.models import is_preset
from forge_qat.qat.prepare import learned_scales
from forge_qat.train.scale_watch import sample_evenly


@dataclass(frozen=True, slots=True)
class Placement:
    """Where and in which precision a run trains, decided once from the config and the machine, and logged."""

    device: torch.device
    precision: str
    lr: float


def resolve_placement(cfg: TrainConfig) -> Placement:
    device = torch.device("cuda" if hardware.cuda_available() else "cpu")
    precision = cfg.optim.precision
    if precision == "auto":
        precision = "bf16" if hardware.bf16_native() else ("fp16" if device.type == "cuda" else "fp32")
    if precision == "fp16" and device.type != "cuda":
        raise HardwareError("fp16 autocast needs a CUDA device; use --precision bf16 or fp32 on CPU")
    if precision == "bf16" and not hardware.bf16_supported():
        raise HardwareError("this GPU does not support bf16; use --precision fp16 or fp32")
    lr = cfg.optim.lr if cfg.optim.lr is not None else (1e-3 if is_preset(cfg.run.model) else 2e-5)
    return Placement(device, precision, lr)


SCALE_LR_RELATIVE = 0.0175
"""Default peak learning rate of learned scales, as a share of their median starting value (see
`scale_learning_rate`; the sweep that chose it: docs/benchmarks.md, "Learned-scale learning rate")."""

def scale_learning_rate(model: torch.nn.Module, cfg: TrainConfig) -> float | None:
    """The peak learning rate of the model's learned scales: `--qat-scale-lr` when given, else
    `SCALE_LR_RELATIVE` times the median magnitude of the scales as they start (a signed-scale grid's,
    llama-cpp-q4-0's, are about half negative: their plain median is near zero or below it). Adam moves every
    element by about its learning rate per step whatever the gradient's size, and scales are as large as the
    weights they divide (int4 groups of SmolLM2-135M: median 0.058; its int8 rows: 0.005): so one absolute
    default would move one model's (or recipe's) scales by a percent a step and another's by a fifth. Relative to
    their own size every scale moves alike. Called before the engine partitions the scales (every rank computes the same
    value from the same whole tensors); on resume the model starts from the same weights, so the value is the
    original run's. None: the model has no learned scales."""
    scales = learned_scales(model)
    if not scales:
        return None
    if cfg.qat.qat_scale_lr is not None:
        return cfg.qat.qat_scale_lr
    sample = torch.cat([sample_evenly(p) for _, p in sorted(scales.items())])
    return SCALE_LR_RELATIVE * sample.abs().median().item()


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig, lr: float,
                    scale_lr: float | None = None) -> torch.optim.Optimizer:
    """AdamW over the model's trainable parameters; `scale_lr`: the learned scales' peak learning rate
    (`scale_learning_rate`; None: computed here)."""
    # model.parameters() yields each Parameter once, so tied or shared parameters appear once here
    # (DeepSpeed would otherwise reject the duplicate). Decay weight matrices only. Learned quantization
    # scales get a group of their own: no decay (it would shrink them towards a grid that clips
    # everything) and their own peak learning rate (the schedule scales every group alike).
    scale_lr = scale_lr if scale_lr is not None else scale_learning_rate(model, cfg)
    scales = {id(p) for p in learned_scales(model).values()}
    params = [p for p in model.parameters() if p.requires_grad and id(p) not in scales]
    is_matrix = lambda p: len(true_shape(p)) >= 2
    groups = [
        {"params": [p for p in params if is_matrix(p)], "weight_decay": cfg.optim.weight_decay},
        {"params": [p for p in params if not is_matrix(p)], "weight_decay": 0.0},
        {"params": [p for p in model.parameters() if id(p) in scales], "weight_decay": 0.0,
         "lr": scale_lr, SCALE_GROUP: True},
    ]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=(0.9, 0.95), eps=1e-8)


SCALE_GROUP = "forge_learned_scales"
"""Marks the optimizer's group of learned scales (`build_scheduler` gives it its own schedule)."""


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> LambdaLR:
    """The weights' schedule (`--lr-schedule` after `--warmup-steps`); learned scales warm up alike and then
    hold their peak learning rate to the end. Scales follow weights that keep changing until the last step,
    and a decayed scale lr freezes them early. On bench/quality.py the held schedule averaged better than the
    decayed one over two seeds and both parts, but single rows there swing 10-20 points under small changes
    (docs/benchmarks.md, "Learned-scale learning rate"): not an established difference."""
    schedule = cfg.optim.lr_schedule
    weights = get_scheduler(schedule if schedule != "constant" else "constant_with_warmup", optimizer,
                            num_warmup_steps=cfg.optim.warmup_steps, num_training_steps=cfg.optim.max_steps)
    if not any(g.get(SCALE_GROUP) for g in optimizer.param_groups):
        return weights
    warmup = cfg.optim.warmup_steps
    # transformers' constant_with_warmup factor, per group: LambdaLR takes one function per parameter group.
    held = functools.partial(_warmup_then_constant, warmup=warmup)
    lambdas = [held if g.get(SCALE_GROUP) else weights.lr_lambdas[0] for g in optimizer.param_groups]
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"]  # undo the first scheduler's step before the second starts
    return LambdaLR(optimizer, lambdas)


def _warmup_then_constant(step: int, warmup: int) -> float:
    return step / max(1, warmup) if step < warmup else 1.0
