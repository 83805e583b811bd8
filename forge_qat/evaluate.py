"""Perplexity of float checkpoints, fake-quant models and finalized artifacts; comparison and plots.

Called by `forge eval`, `forge compare` and the demo. Models are evaluated in float32 without
autocast (on the GPU when there is one), so float, fake-quant and converted models are measured by the
same arithmetic; only artifacts of recipes whose kernels need CUDA and bf16 run that way.
"""

import contextlib
import json
import math
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from forge_qat import checkpoint as ckpt_io
from forge_qat import hardware, lora
from forge_qat.data.build import DataOptions
from forge_qat.data.encode import IGNORE_INDEX
from forge_qat.data.store import TokenStore, model_inputs, open_token_store
from forge_qat.errors import ConfigError, HardwareError, InputError
from forge_qat.models import load_model
from forge_qat.prepare import LearnScales, prepare_qat
from forge_qat.recipes import Recipe


@dataclass(frozen=True, slots=True)
class EvalResult:
    model: str
    kind: str
    loss: float
    perplexity: float
    tokens: int
    sequences: tuple[tuple[float, int], ...] = field(default=(), repr=False, compare=False)
    """Per evaluated sequence: (summed loss, tokens scored), in order; for the noise of a comparison."""

    def to_dict(self) -> dict:
        d = asdict(self)
        del d["sequences"]
        return d


def model_kind(model: torch.nn.Module, fake_quant: Recipe | None) -> str:
    if fake_quant:
        return f"fake-quant ({fake_quant.name})"
    qc = getattr(model.config, "quantization_config", None)
    return "quantized artifact" if qc else "float"


def eval_placement(target: Path) -> tuple[torch.device, torch.dtype]:
    """Device and dtype to evaluate `target` in: float32 (on the GPU when there is one), except artifacts
    of recipes whose kernels need CUDA and bf16 (int4-weight-only, float8), which run that way."""
    from forge_qat.finalize import artifact_recipe
    from forge_qat.recipes import RECIPES

    recipe = RECIPES.get(artifact_recipe(target))
    if recipe is not None and recipe.convert_dtype is not None:
        if not hardware.cuda_available():
            raise HardwareError(f"{target} holds {recipe.name} tensors, whose kernels need a CUDA GPU to run")
        return torch.device("cuda"), recipe.convert_dtype
    return torch.device("cuda" if hardware.cuda_available() else "cpu"), torch.float32


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


def prepare_as_trained(model: torch.nn.Module, checkpoint: Path, recipe: Recipe) -> None:
    """Fake-quantize `model` (the checkpoint's weights) as training did: with the scales the checkpoint
    learned where it learned them, else with scales chosen from the weights; with its LoRA adapters, in the
    mode they trained in."""
    scales = ckpt_io.read_learned_scales(checkpoint)
    coverage = prepare_qat(model, recipe, learn=LearnScales(initial=scales) if scales is not None else None)
    cfg = lora.recorded_config(ckpt_io.read_checkpoint_meta(checkpoint))
    if cfg is not None:
        lora.install(model, cfg, list(coverage.linears), coverage.experts)
        lora.load(model, ckpt_io.read_adapters(checkpoint) or {}, checkpoint)


def _merge_adapters(model: torch.nn.Module, checkpoint: Path) -> None:
    """A LoRA checkpoint evaluated in float: the model is its base with the adapters merged."""
    cfg = lora.recorded_config(ckpt_io.read_checkpoint_meta(checkpoint))
    if cfg is not None:
        lora.merge_into(model, ckpt_io.read_adapters(checkpoint) or {}, cfg.scaling)


@torch.no_grad()
def evaluate_model(path: str, data: str, *, seq_len: int = 128, batch_size: int = 8,
                   max_batches: int | None = None, fake_quant: Recipe | None = None,
                   data_options: DataOptions | None = None, packing: str = "documents") -> EvalResult:
    """Mean next-token loss (and its exp, perplexity) over `data`, token-weighted, in float32."""
    target = ckpt_io.resolve_checkpoint(Path(path)) if Path(path).exists() else Path(path)
    device, dtype = eval_placement(target)
    model, tokenizer = load_model(str(target), dtype=dtype, device=device)
    if fake_quant and getattr(model.config, "quantization_config", None):
        raise ConfigError(f"{target} is already a quantized artifact; --fake-quant applies to float checkpoints")
    if fake_quant:
        prepare_as_trained(model, target, fake_quant)
    elif target.is_dir():
        _merge_adapters(model, target)
    packed = open_token_store(data, tokenizer, seq_len, data_options, packing=packing)
    sequences: list[tuple[float, int]] = []
    loss, count = mean_loss(model, packed, batch_size=batch_size, device=device, max_batches=max_batches,
                            per_sequence=sequences)
    return EvalResult(str(target), model_kind(model, fake_quant), loss, math.exp(loss), count, tuple(sequences))


@dataclass(frozen=True, slots=True)
class Comparison:
    float_result: EvalResult
    ptq_result: EvalResult
    qat_result: EvalResult

    @property
    def degradation(self) -> float:
        """PTQ's eval loss minus the float model's."""
        return self.ptq_result.loss - self.float_result.loss

    @property
    def degradation_noise(self) -> float:
        """Two standard errors of `degradation` as a token-weighted mean over the eval sequences, paired by
        sequence (both models scored the same text): how much of it another sample of held-out text of this
        size could move. NaN when the results carry no per-sequence losses."""
        f, q = self.float_result.sequences, self.ptq_result.sequences
        if len(f) != len(q) or len(f) < 2:
            return math.nan
        tokens = sum(t for _, t in f)
        diff = [(lq - lf, t) for (lf, t), (lq, _) in zip(f, q, strict=True)]
        mean = sum(d for d, _ in diff) / tokens
        # the ratio estimator's variance: residuals d_i - mean * t_i over sequences
        var = sum((d - mean * t) ** 2 for d, t in diff) * len(diff) / (len(diff) - 1)
        return 2 * math.sqrt(var) / tokens

    @property
    def within_noise(self) -> bool:
        """PTQ's degradation is not distinguishable from the eval set's sampling noise."""
        return self.degradation <= self.degradation_noise

    @property
    def recovered(self) -> float:
        """Fraction of the PTQ degradation (in eval loss) that QAT recovers: 1 = all, 0 = none."""
        degradation = self.ptq_result.loss - self.float_result.loss
        if degradation <= 0:
            return math.nan
        return (self.ptq_result.loss - self.qat_result.loss) / degradation

    def rows(self) -> list[dict]:
        return [dict(label=label, **r.to_dict()) for label, r in
                (("float fine-tune", self.float_result), ("PTQ of float", self.ptq_result),
                 ("QAT converted", self.qat_result))]

    def finals(self) -> dict[str, float]:
        """Eval loss by label, for a plot."""
        return {"float": self.float_result.loss, "PTQ": self.ptq_result.loss,
                "QAT\nconverted": self.qat_result.loss}

    def summary(self) -> str:
        """One line: what QAT recovered of PTQ's degradation, or why no share is meaningful."""
        if self.degradation <= 0:
            return "PTQ did not degrade eval loss"
        if self.within_noise:
            return f"PTQ gap {self.degradation:.4f} within noise (+-{self.degradation_noise:.4f})"
        return f"QAT recovers {self.recovered:.0%} of the PTQ gap ({self.degradation:.4f})"

    def to_dict(self) -> dict:
        return {"rows": self.rows(), "qat_recovers_fraction_of_ptq_degradation": self.recovered,
                "ptq_degradation": self.degradation, "ptq_degradation_noise": self.degradation_noise,
                "within_noise": self.within_noise, "sequences": len(self.float_result.sequences)}


def compare(float_model: str, ptq_model: str, qat_model: str, data: str, **kw) -> Comparison:
    return Comparison(*(evaluate_model(m, data, **kw) for m in (float_model, ptq_model, qat_model)))


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / ckpt_io.METRICS
    if not path.is_file():
        raise InputError(f"{run_dir} has no {ckpt_io.METRICS}; give forge run directories to plot")
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def plot_loss_curves(runs: dict[str, Path], out: Path, finals: dict[str, float] | None = None,
                     summary: str = "") -> Path:
    """PNG of train loss (light) and eval loss (points) against step, one colour per run. With `finals` (label ->
    eval loss, e.g. float, PTQ and QAT-converted from a comparison), a panel beside the curves shows them side by
    side on their own scale, `summary` under it: the PTQ gap and what QAT won back at a glance. The curves'
    y-range follows the eval losses and the later train loss, not the first steps, which would flatten the
    rest."""
    if not runs:
        raise ConfigError("no runs to plot")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    if finals:
        fig, (ax, side) = plt.subplots(1, 2, figsize=(11, 5), dpi=120, gridspec_kw={"width_ratios": [3, 1]})
    else:
        fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    shown: list[float] = []  # values the curves' y-range must include
    switched = False
    for i, (label, run_dir) in enumerate(runs.items()):
        records = read_metrics(run_dir)
        color = f"C{i}"
        losses = [r["loss"] for r in records]
        ax.plot([r["step"] for r in records], losses, color=color, alpha=0.3, lw=1, label=f"{label} train")
        shown += losses[len(losses) // 4:]  # the train loss once past its first quarter
        evals = [r for r in records if "eval_loss" in r]
        if evals:
            ax.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", color=color, ms=4,
                    label=f"{label} eval")
            shown += [r["eval_loss"] for r in evals[len(evals) // 3:]]
        switch = next((r["step"] for r in records if r.get("fake_quant")), None)
        if switch and switch > 1:
            ax.axvline(switch, color=color, ls=":", lw=1)
            switched = True
    if shown:
        lo, hi = min(shown), max(shown)
        pad = max(hi - lo, 1e-3) * 0.1
        ax.set_ylim(lo - pad, hi + pad)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("training" + (" (dotted: fake quantization starts)" if switched else ""), fontsize=10)
    ax.legend(fontsize=8, loc="upper right")
    ax.grid(alpha=0.3)
    if finals:
        labels, values = list(finals), list(finals.values())
        side.plot(range(len(values)), values, "o", ms=8, color="C3")
        for x, v in enumerate(values):
            side.annotate(f"{v:.4f}", (x, v), xytext=(0, 7), textcoords="offset points", ha="center", fontsize=8)
        lo, hi = min(values), max(values)
        pad = max(hi - lo, 1e-3) * 0.3
        side.set_ylim(lo - pad, hi + pad)
        side.set_xlim(-0.6, len(values) - 0.4)
        side.set_xticks(range(len(values)), labels, fontsize=8)
        side.set_title("eval loss of the finished models", fontsize=10)
        side.grid(alpha=0.3, axis="y")
        if summary:
            side.set_xlabel(summary, fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out
