"""Optimisation choices made once per run: device and precision for this machine, the learning rate, the
optimizer's parameter groups and the LR schedule.

Called by `forge_qat.train.trainer`.
"""

from dataclasses import dataclass

import torch
from transformers import get_scheduler

from forge_qat import hardware
from forge_qat.config import TrainConfig
from forge_qat.errors import HardwareError
from forge_qat.models import is_preset
from forge_qat.prepare import learned_scales
from forge_qat.weights import true_shape


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


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig, lr: float) -> torch.optim.Optimizer:
    # model.parameters() yields each Parameter once, so tied or shared parameters appear once here
    # (DeepSpeed would otherwise reject the duplicate). Decay weight matrices only. Learned quantization
    # scales get a group of their own: no decay (it would shrink them towards a grid that clips
    # everything) and their own peak learning rate (--qat-scale-lr; the schedule scales every group alike).
    scales = {id(p) for p in learned_scales(model).values()}
    params = [p for p in model.parameters() if p.requires_grad and id(p) not in scales]
    is_matrix = lambda p: len(true_shape(p)) >= 2
    groups = [
        {"params": [p for p in params if is_matrix(p)], "weight_decay": cfg.optim.weight_decay},
        {"params": [p for p in params if not is_matrix(p)], "weight_decay": 0.0},
        {"params": [p for p in model.parameters() if id(p) in scales], "weight_decay": 0.0,
         "lr": cfg.qat.qat_scale_lr or lr},
    ]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=(0.9, 0.95), eps=1e-8)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig):
    schedule = cfg.optim.lr_schedule
    return get_scheduler(schedule if schedule != "constant" else "constant_with_warmup", optimizer,
                         num_warmup_steps=cfg.optim.warmup_steps, num_training_steps=cfg.optim.max_steps)
