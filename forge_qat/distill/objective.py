"""Knowledge distillation for QAT: the fake-quantized student learns from a float teacher's logits.

Owns the training objective (its settings are `forge_qat.distill.config.DistillConfig`): the LM loss
alone, or with `--kd-weight` > 0 `lm_weight * CE + kd_weight * KD`, each returning its named terms. Every KD
loss is per token, computed in fp32 over the positions the LM loss uses (label != IGNORE_INDEX, after the
causal shift), and averaged over them. The teacher is the starting float model, frozen (`--kd-teacher
float`), or the student's own weights with fake quantization off (`--kd-teacher self`: one more
forward pass, no second copy of the weights).
"""

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

from forge_qat.data.encode import IGNORE_INDEX
from forge_qat.distill.config import DistillConfig
from forge_qat.errors import ConfigError, choices_message
from forge_qat.lora import adapters as lora
from forge_qat.qat.prepare import set_fake_quant_enabled

PerToken = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float, int], torch.Tensor]


def _kl(p_log: torch.Tensor, q_log: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per row, from log-probabilities."""
    return (p_log.exp() * (p_log - q_log)).sum(-1)


def _forward_kl(s, t, y, tau, k):
    return _kl(F.log_softmax(t, -1), F.log_softmax(s, -1))


def _reverse_kl(s, t, y, tau, k):
    return _kl(F.log_softmax(s, -1), F.log_softmax(t, -1))


def _mse(s, t, y, tau, k):
    return (s - t).pow(2).mean(-1)


def _tempered_kl(s, t, y, tau, k):
    return tau * tau * _kl(F.log_softmax(t / tau, -1), F.log_softmax(s / tau, -1))


def _top_k_kl(s, t, y, tau, k):
    """KL over the teacher's top-k tokens, both distributions renormalised over them."""
    idx = t.topk(min(k, t.shape[-1]), dim=-1).indices
    return _kl(F.log_softmax(t.gather(-1, idx), -1), F.log_softmax(s.gather(-1, idx), -1))


def _top_k_reverse_kl(s, t, y, tau, k):
    """Reverse KL over the student's top-k tokens, both distributions renormalised over them."""
    idx = s.topk(min(k, s.shape[-1]), dim=-1).indices
    return _kl(F.log_softmax(s.gather(-1, idx), -1), F.log_softmax(t.gather(-1, idx), -1))


def _cakld(s, t, y, tau, k):
    """Confidence-aware KL: c * RKL + (1 - c) * FKL, c the teacher's probability of the gold token."""
    t_log = F.log_softmax(t, -1)
    c = t_log.gather(-1, y[:, None]).squeeze(-1).exp()
    return c * _reverse_kl(s, t, y, tau, k) + (1 - c) * _forward_kl(s, t, y, tau, k)


KD_LOSSES: dict[str, PerToken] = {
    "kl": _forward_kl, "rkl": _reverse_kl, "mse": _mse, "kd": _tempered_kl,
    "kl-top-k": _top_k_kl, "rkl-top-k": _top_k_reverse_kl, "cakld": _cakld,
}


KD_CHUNK_ELEMENTS = 16 * 1024**2
"""Logit elements per piece of the KD term (64 MB per fp32 copy): 341 tokens of a 49,152-token vocabulary.
Each piece is recomputed in backward (activation checkpointing), so the fp32 copies, log-softmaxes and
probabilities of full-vocabulary rows exist for one piece at a time instead of for the whole batch
(bench/distill.py measures the difference)."""


def kd_loss(name: str, student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, *,
            temperature: float = 1.0, top_k: int = 50, chunk_tokens: int | None = None) -> torch.Tensor:
    """The mean per-token KD loss `name` over the positions whose (shifted) label is not IGNORE_INDEX."""
    from torch.utils.checkpoint import checkpoint

    if name not in KD_LOSSES:
        raise ConfigError(choices_message("KD loss name", name, list(KD_LOSSES)))
    per_token = KD_LOSSES[name]
    chunk_tokens = chunk_tokens or max(1, KD_CHUNK_ELEMENTS // student_logits.shape[-1])
    shifted = labels[..., 1:]
    rows = (shifted != IGNORE_INDEX).nonzero(as_tuple=True)  # (batch index, position) of each scored token
    count = rows[0].numel()
    if count == 0:
        return student_logits.sum() * 0.0

    def piece(student: torch.Tensor, teacher: torch.Tensor, b: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        s, q = student[b, t].float(), teacher[b, t].float()
        return per_token(s, q, shifted[b, t], temperature, top_k).sum()

    total = student_logits.new_zeros((), dtype=torch.float32)
    for a in range(0, count, chunk_tokens):
        b, t = rows[0][a:a + chunk_tokens], rows[1][a:a + chunk_tokens]
        if student_logits.requires_grad:
            total = total + checkpoint(piece, student_logits, teacher_logits, b, t, use_reentrant=False)
        else:
            total = total + piece(student_logits, teacher_logits, b, t)
    return total / count


Terms = dict[str, torch.Tensor]
"""The detached, named parts of a step's loss that training logs (`loss`, and with distillation `lm_loss`
and `kd_loss`), each a 0-d fp32 tensor still on the device."""


class Objective(Protocol):
    """What a training step minimises: `(loss to back-propagate, its named terms)` of one micro-batch.
    `fake_quant`: whether the student's fake quantization is on at this step."""

    def __call__(self, model: torch.nn.Module, batch: dict, fake_quant: bool) -> tuple[torch.Tensor, Terms]: ...


class LanguageModelLoss:
    """Plain next-token cross-entropy: the model's own loss."""

    def __call__(self, model: torch.nn.Module, batch: dict, fake_quant: bool = True) -> tuple[torch.Tensor, Terms]:
        loss = model(**batch).loss
        return loss, {"loss": loss.detach().float()}


@dataclass(frozen=True, slots=True)
class Distillation:
    """`lm_weight * CE + kd_weight * KD` against `teacher` (a frozen module, or None for the student
    itself with fake quantization off)."""

    kd_loss: str
    lm_weight: float
    kd_weight: float
    temperature: float
    top_k: int
    teacher: torch.nn.Module | None

    def __call__(self, model: torch.nn.Module, batch: dict, fake_quant: bool = True) -> tuple[torch.Tensor, Terms]:
        with torch.no_grad():
            if self.teacher is not None:
                teacher_logits = self.teacher(**batch).logits
            else:
                set_fake_quant_enabled(model, False)
                lora.set_enabled(model, False)  # a LoRA student's own teacher is its frozen base
                try:
                    teacher_logits = model(**batch).logits
                finally:
                    set_fake_quant_enabled(model, fake_quant)
                    lora.set_enabled(model, True)
        out = model(**batch)
        kd = kd_loss(self.kd_loss, out.logits, teacher_logits, batch["labels"], temperature=self.temperature,
                     top_k=self.top_k)
        loss = self.lm_weight * out.loss.float() + self.kd_weight * kd
        return loss, {"loss": loss.detach().float(), "lm_loss": out.loss.detach().float(), "kd_loss": kd.detach()}


def objective(cfg: DistillConfig, teacher: torch.nn.Module | None) -> Objective:
    """The training objective of a run's distillation section: the LM loss alone, or distillation from
    `teacher` (None: the student with fake quantization off)."""
    if not cfg.enabled:
        return LanguageModelLoss()
    return Distillation(cfg.kd_loss, cfg.lm_weight, cfg.kd_weight, cfg.kd_temperature, cfg.kd_top_k, teacher)
