"""Perplexity of float checkpoints, fake-quant models and finalized artifacts.

Called by `forge eval` and `forge compare` (`forge_qat.eval.compare`). Models are evaluated in float32 without
autocast (on the GPU when there is one), so float, fake-quant and converted models are measured by the
same arithmetic; only artifacts of recipes whose kernels need CUDA and bf16 run that way.
"""

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from forge_qat import hardware
from forge_qat.data.build import DataOptions
from forge_qat.data.store import open_token_store
from forge_qat.errors import ConfigError, HardwareError
from forge_qat.eval.loop import mean_loss
from forge_qat.formats.adapters import check_adapter_config, read_adapters
from forge_qat.formats.artifact_meta import ArtifactMeta
from forge_qat.formats.checkpoint import read_checkpoint_meta, read_learned_scales
from forge_qat.formats.run_dir import resolve_checkpoint
from forge_qat.lora import adapters as lora
from forge_qat.lora import grid_base
from forge_qat.lora.config import LoraConfig
from forge_qat.models import load_model, max_positions
from forge_qat.qat.prepare import LearnScales, prepare_qat
from forge_qat.qat.registry import RECIPES, Recipe


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
    meta = ArtifactMeta.read(target) if target.is_dir() else None
    recipe = RECIPES.get(meta.recipe) if meta else None
    if recipe is not None and recipe.convert_dtype is not None:
        if not hardware.cuda_available():
            raise HardwareError(f"{target} holds {recipe.name} tensors, whose kernels need a CUDA GPU to run")
        return torch.device("cuda"), recipe.convert_dtype
    return torch.device("cuda" if hardware.cuda_available() else "cpu"), torch.float32


def prepare_as_trained(model: torch.nn.Module, checkpoint: Path, recipe: Recipe) -> None:
    """Fake-quantize `model` (the checkpoint's weights) as training did: with the scales the checkpoint
    learned where it learned them, else with scales chosen from the weights; with its LoRA adapters, in the
    mode they trained in, on its base's grid where it held the base in one (`--lora-base-grid`)."""
    scales = read_learned_scales(checkpoint)
    coverage = prepare_qat(model, recipe, learn=LearnScales(initial=scales) if scales is not None else None)
    trained = _lora_of(checkpoint)
    if trained is not None:
        cfg, adapters = trained
        lora.install(model, cfg, list(coverage.linears), coverage.experts)
        lora.load(model, adapters, checkpoint)
        if cfg.lora_base_grid:  # its frozen base trained on its grid (G; merged mode: q(G + s*BA))
            grid_base.install(model, list(coverage.linears), coverage.experts, keep_weights=True)


def _merge_adapters(model: torch.nn.Module, checkpoint: Path) -> None:
    """A LoRA checkpoint evaluated in float: the model is its base with the adapters merged."""
    trained = _lora_of(checkpoint)
    if trained is not None:
        cfg, adapters = trained
        lora.check_pairs(adapters, {n: list(p.shape) for n, p in model.state_dict().items()}, cfg.lora_rank,
                         checkpoint)
        lora.merge_into(model, adapters, cfg.scaling)


def _lora_of(checkpoint: Path) -> tuple[LoraConfig, dict] | None:
    """The LoRA settings a checkpoint trained with and its adapters (its adapter_config.json checked against
    them), or None for a checkpoint trained without."""
    meta = read_checkpoint_meta(checkpoint)
    cfg = meta.lora if meta else None
    if cfg is None:
        return None
    check_adapter_config(checkpoint, cfg)
    return cfg, read_adapters(checkpoint) or {}


@torch.no_grad()
def evaluate_model(path: str, data: str, *, seq_len: int = 128, batch_size: int = 8,
                   max_batches: int | None = None, fake_quant: Recipe | None = None,
                   data_options: DataOptions | None = None, packing: str = "documents") -> EvalResult:
    """Mean next-token loss (and its exp, perplexity) over `data`, token-weighted, in float32."""
    target = resolve_checkpoint(Path(path)) if Path(path).exists() else Path(path)
    positions = max_positions(str(target))  # checked before any weight loads
    if positions and seq_len > positions:
        raise ConfigError(f"--seq-len {seq_len} exceeds {target}'s max_position_embeddings {positions}; use "
                          f"--seq-len {positions} or less")
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
