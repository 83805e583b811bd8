"""QAT convert through the registry: prepared linear layers, expert stacks and tables swapped for real low-bit
torchao tensors, with the learned scales where training learned them.

Called by finalize (in memory and block by block) after `forge_qat.qat.prepare` installed what training ran.
"""

import copy

import torch
from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_
from torchao.quantization.qat import FakeQuantizedLinear, QATConfig

from forge_qat.errors import ConversionError
from forge_qat.qat import embeddings, experts, ggml
from forge_qat.qat.fake_quant import LearnedScaleFakeQuantizer
from forge_qat.qat.prepare import filter_for
from forge_qat.qat.registry import Recipe
from forge_qat.torchao_compat import int8_weight_with_scale, quantize_handler


def convert_qat(model: torch.nn.Module, recipe: Recipe) -> list[str]:
    """Swap prepared layers, expert stacks and tables for real low-bit torchao tensors; returns the names of
    the converted weights (`...q_proj.weight`, `...experts.gate_up_proj`, `model.embed_tokens.weight`)."""
    recipe.check_convert_hardware()
    tables = embeddings.convert_tables(model, recipe.embeddings)
    linears = {n for n, m in model.named_modules() if isinstance(m, FakeQuantizedLinear)}
    stacks = {n: m for n, m in model.named_modules() if experts.is_fake_quantized(m)}
    if not linears and not stacks and not tables:
        raise ConversionError("the model has no fake-quantized layers: nothing to convert")
    modules = dict(model.named_modules())
    learned = {n for n in linears if isinstance(modules[n].weight_fake_quantizer, LearnedScaleFakeQuantizer)}
    if learned:
        _convert_with_learned_scales(model, modules, learned, recipe)
    llama = {n for n in linears if isinstance(modules[n].weight_fake_quantizer, ggml.GgmlWeightFakeQuantizer)}
    for name in sorted(llama):
        _convert_ggml(model, modules[name], name)
    if linears - learned - llama:
        quantize_(model, QATConfig(recipe.base_config(), step="convert"),
                  filter_fn=filter_for(linears - learned - llama))
    converted = [f"{n}.weight" for n in sorted(linears)] + tables
    for name, module in stacks.items():
        converted += [f"{name}.{stack}" for stack in experts.convert(module, recipe)]
    if stacks and hasattr(model, "set_experts_implementation"):
        # The converted stacks are torchao tensors that select per expert: transformers' eager loop runs them,
        # its grouped_mm/batched_mm paths (the default) call ops torchao does not implement.
        model.set_experts_implementation("eager")
    return converted


def q4_k_blocks(model: torch.nn.Module) -> dict[str, ggml.Q4K]:
    """The Q4_K blocks of a converted model's weights stored as values (linears and expert stacks), by name."""
    return {f"{n}.{param}" if n else param: blocks for n, m in model.named_modules()
            for param, blocks in getattr(m, ggml.Q4K_ATTR, {}).items()}


def _convert_ggml(model: torch.nn.Module, prepared: FakeQuantizedLinear, name: str) -> None:
    """A layer in one of llama.cpp's types (`ggml.convert_weight`), as a plain linear."""
    linear = prepared.to_linear()
    ggml.convert_weight(linear, "weight", prepared.weight_fake_quantizer.ggml_type)
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, linear)


def _convert_with_learned_scales(model: torch.nn.Module, modules: dict[str, torch.nn.Module], names: set[str],
                                 recipe: Recipe) -> None:
    """What torchao's `QATConfig(step="convert")` does for its own range-learning quantizers (a plain linear,
    then the base config's handler with `custom_scale`, the qparams algorithm off), for forge's
    `LearnedScaleFakeQuantizer`, which torchao does not recognise: the converted tensor's scales are the
    learned ones, its values `clamp(round(w * (1 / scale)))` exactly as the fake quantizer's."""
    base = copy.copy(recipe.base_config())
    int8 = isinstance(base, Int8DynamicActivationInt8WeightConfig)
    if not int8:
        base.intx_choose_qparams_algorithm = None
    handler = quantize_handler(base)
    for name in sorted(names):
        prepared = modules[name]
        scale = prepared.weight_fake_quantizer.converted_scale(prepared.weight)
        if int8:  # its handler takes no custom scale: the same tensor, built with the learned one
            linear = prepared.to_linear()
            linear.weight = torch.nn.Parameter(int8_weight_with_scale(linear.weight.detach(), base, scale),
                                               requires_grad=False)
        else:
            linear = handler(prepared.to_linear(), base, custom_scale=scale,
                             custom_zero_point=torch.zeros_like(scale, dtype=torch.int8))
        parent, _, child = name.rpartition(".")
        setattr(modules[parent] if parent else model, child, linear)
