"""Model setup for training, the same on every engine: the student and the distillation teacher
materialized by the engine, QAT (or float8) installed, frozen parts, activation checkpointing, and the
input casts that mixed-precision weights need.

Called once by `forge_qat.train.trainer`, before the engine wraps the model for training (prepare before
sharding, as torchtune orders it).
"""

import logging
from dataclasses import dataclass

import torch
from torchao.quantization.qat import FakeQuantizedLinear
from transformers import PreTrainedTokenizerBase

from forge_qat.config import TrainConfig
from forge_qat.errors import ConfigError
from forge_qat.formats.layouts import Layout, model_layout_reader
from forge_qat.formats.weights import TensorReader
from forge_qat.lora import adapters as lora
from forge_qat.lora import grid_base
from forge_qat.models import ModelSource, open_model_source
from forge_qat.qat import experts, grouped_experts
from forge_qat.qat.coverage import Coverage, plan
from forge_qat.qat.ggml import ggml_types
from forge_qat.qat.prepare import (
    LearnScales,
    learned_scales,
    prepare_float8_training,
    prepare_qat,
    set_fake_quant_enabled,
)
from forge_qat.qat.registry import DEFAULT_RECIPE, Recipe, get_recipe
from forge_qat.train.engine import Engine

log = logging.getLogger(__name__)


@dataclass
class TrainingModels:
    student: torch.nn.Module
    """The model being trained, prepared (not yet wrapped by the engine)."""
    teacher: torch.nn.Module | None
    """The frozen float teacher of `--kd-teacher float`, with the student's starting weights."""
    tokenizer: PreTrainedTokenizerBase
    layout: Layout
    """How the input checkpoint stores the student's tensors (on rank 0): checkpoints are written the same way."""
    coverage: Coverage | None


def build_models(engine: Engine, cfg: TrainConfig) -> TrainingModels:
    """Materialize, prepare and (for mixed-precision weights) guard the models a run trains with (collective)."""
    source = open_model_source(cfg.run.model, cfg.run.seed, reads=engine.replicated or engine.rank == 0)
    grid_reader = None
    if cfg.lora.lora_base_grid:
        # the frozen base goes from the model directory straight into its grid, one weight at a time: no float copy
        student = grid_base.allocated(source.config, engine.param_dtype)
        grid_reader = model_layout_reader(source.reader, student)
    else:
        student = engine.materialize(source)
    teacher = None
    if cfg.distill.needs_float_teacher:
        # A second model with the same starting weights, frozen; taken from the source (not a copy of the
        # student) so that under ZeRO-3 it is built partitioned and no rank ever holds it whole.
        teacher = engine.materialize(source).requires_grad_(False).eval()
    layout = _input_layout(source, student) if source.reader is not None else Layout()
    coverage = prepare_student(student, cfg, cfg.qat.recipe, engine, grid_reader)
    if engine.param_dtype != torch.float32:
        for model in (student, teacher):
            if model is not None:
                cast_inputs_to_weight_dtype(model)
    return TrainingModels(student, teacher, source.tokenizer, layout, coverage)


def _input_layout(source: ModelSource, model: torch.nn.Module) -> Layout:
    return model_layout_reader(source.reader, model).layout


def prepare_student(model: torch.nn.Module, cfg: TrainConfig, recipe: Recipe | None,
                    engine: Engine, grid_reader: TensorReader | None = None) -> Coverage | None:
    """Everything a run config changes in a freshly materialized model before training, in the order
    torchtune uses (swaps, then activation checkpointing; sharding by the engine after). The swaps keep the
    model's Parameter objects (ZeRO-3 partitions included); `engine.gather` makes one whole while its
    learned scales are chosen. `grid_reader`: a `--lora-base-grid` model allocated but not read yet
    (`forge_qat.lora.grid_base.allocated`), filled from this reader once its grids are known."""
    coverage = None
    if recipe is not None:
        learn = LearnScales(gather=engine.gather, init=cfg.qat.qat_scale_init, unread=engine.unread_scales) \
            if cfg.qat.qat_learn_scales else None
        coverage = prepare_qat(model, recipe, learn=learn)
        if learn is not None:
            scales = learned_scales(model)
            log.info("learned weight scales: %d parameters in %d layers, started by --qat-scale-init %s",
                     sum(p.numel() for p in scales.values()), len(scales), cfg.qat.qat_scale_init)
        log.info("fake quantization: %s", coverage.describe())
        if types := ggml_types(model):
            log.info("llama.cpp types (parameters): %s", ", ".join(f"{t} {n:,}" for t, n in types.items()))
    elif cfg.qat.fp8_recipe:
        n = prepare_float8_training(model, cfg.qat.fp8_recipe)
        log.info("float8 training (%s) on %d linear layers", cfg.qat.fp8_recipe, n)
    if cfg.lora.enabled:
        _install_lora(model, cfg, coverage, grid_reader, engine)
    if engine.param_dtype != torch.float32:
        _hold_trained_in(model, engine.param_dtype)
    if cfg.optim.freeze_embeddings:
        model.get_input_embeddings().weight.requires_grad_(False)
    if cfg.optim.gradient_checkpointing:
        # Non-reentrant: works when no input requires grad (frozen embeddings), under autocast and
        # ZeRO-3's parameter hooks, and recomputes the fake quantizers exactly in backward.
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    return coverage


def quantize_expert_parallel_experts(model: torch.nn.Module, cfg: TrainConfig) -> None:
    """Under `--expert-parallel`, DeepSpeed's AutoEP replaced every MoE block inside the engine's wrap, and the
    engine gave its `GroupedExperts` (this rank's experts) the quantizers `prepare` installed on the transformers
    stacks (`forge_qat.qat.grouped_experts`): they start as the rest of the model's fake quantizers do."""
    if cfg.distributed.expert_parallel == 1 or cfg.qat.recipe is None:
        return
    layers = [m for m in model.modules() if grouped_experts.is_grouped_experts(m)]
    if not layers:
        raise ConfigError("--expert-parallel: AutoEP replaced no MoE block with expert-parallel experts; nothing "
                          "would be fake-quantized on its experts")
    set_fake_quant_enabled(model, cfg.qat.fake_quant_at(0))
    log.info("expert parallelism (AutoEP, size %d): each rank fake-quantizes its experts in %d layers",
             cfg.distributed.expert_parallel, sum(grouped_experts.is_fake_quantized(m) for m in layers))


def _hold_trained_in(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """DeepSpeed's mixed precision holds every trained parameter in the module dtype, with fp32 masters in the
    optimizer (which checkpoints save): ZeRO-3 packs the trained partitions into one buffer of one dtype, and
    asserts it. The parameters forge adds in float32 (learned scales, LoRA adapters) are held in `dtype` too,
    as torchao's dynamic scales of bf16 weights are."""
    for p in model.parameters():
        if p.requires_grad and p.dtype != dtype:
            p.data = p.data.to(dtype)


def _install_lora(model: torch.nn.Module, cfg: TrainConfig, coverage: Coverage | None,
                  grid_reader: TensorReader | None, engine: Engine) -> None:
    """Adapters on the layers the recipe quantizes (a float run: the layers the default recipe would), the
    rest of the model frozen."""
    basis = coverage or plan(model, get_recipe(DEFAULT_RECIPE))
    stacks = basis.experts if coverage is not None else {}
    if coverage is None and basis.experts and "experts" in cfg.lora.targets:
        log.warning("LoRA: %d experts modules stay frozen without adapters: expert adapters run through the "
                    "fake-quantized experts forward, which a float run (--qat-recipe none) does not install",
                    len(basis.experts))
    log.info("%s", lora.install(model, cfg.lora, list(basis.linears), stacks, seed=cfg.run.seed).describe())
    if cfg.lora.lora_base_grid:
        offload = cfg.lora.experts_offload == "host"
        shared = offload and engine.ranks_on_machine > 1
        # with one copy of the experts per machine, only its first rank reads them (`share_experts`)
        reads_experts = not shared or engine.local_rank == 0
        held = grid_base.install(model, list(basis.linears), stacks if reads_experts else {}, source=grid_reader)
        (log.info if held.layers or held.stacks else log.warning)("%s", held.describe())
        if cfg.lora.lora_qat == "merged":
            log.warning("--lora-base-grid with --lora-qat merged trains q(G + s*BA) against the grid's fixed scales: "
                        "the adapters change the forward only where they move a weight half a grid step (on "
                        "SmolLM2-135M, 40 steps moved none: the artifact was PTQ of the starting model; "
                        "docs/benchmarks.md); separate mode computes the same numerics on the grid as on the float "
                        "base")
        if offload:
            report = grid_base.share_experts(model, engine) if shared else grid_base.offload_experts(model)
            log.info("%s", report.describe(engine.device))
        if grid_reader is not None:
            grid_base.read_rest(model, grid_reader)
            grid_base.to_device(model, engine.device)


def cast_inputs_to_weight_dtype(model: torch.nn.Module) -> None:
    """Weights in bf16/fp16 without autocast (DeepSpeed mixed precision), but a model may hand a
    fake-quantized layer fp32 activations (e.g. from an fp32 norm): the fake quantizers run in the weight's
    dtype, so activations are cast to match before them (linear layers and MoE expert stacks alike)."""

    def hook(dtype: torch.dtype):
        def cast(module, args):
            x = args[0]
            return (x.to(dtype), *args[1:]) if x.dtype != dtype else None
        return cast

    for module in model.modules():
        if isinstance(module, FakeQuantizedLinear):
            module.register_forward_pre_hook(hook(module.weight.dtype))
        elif experts.is_fake_quantized(module):
            module.register_forward_pre_hook(hook(module.down_proj.dtype))
