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


Q4K_ATTR = "forge_q4_k"
"""The attribute where a converted Q4_K layer keeps its blocks (`forge_qat.qat.ggml.Q4K`) for the artifact."""


def q4_k_blocks(model: torch.nn.Module) -> dict[str, ggml.Q4K]:
    """The Q4_K blocks of a converted model's layers whose weights are stored as values, by weight name."""
    return {f"{n}.weight": getattr(m, Q4K_ATTR) for n, m in model.named_modules() if hasattr(m, Q4K_ATTR)}


def _convert_ggml(model: torch.nn.Module, prepared: FakeQuantizedLinear, name: str) -> None:
    """A layer in one of llama.cpp's types: the blocks llama.cpp's quantizer chooses for its weight (what the fake
    quantizer multiplied by), as a weight-only torchao tensor where one holds them (`ggml.INTX`), else (Q4_K) as
    the values they decode to, in the weight's dtype, with the blocks kept on the layer (`Q4K_ATTR`)."""
    ggml_type = prepared.weight_fake_quantizer.ggml_type
    weight = prepared.weight.detach()
    blocks = ggml.QUANTIZERS[ggml_type](weight)
    linear = prepared.to_linear()
    if ggml_type in ggml.INTX:
        linear.weight = torch.nn.Parameter(ggml.intx_tensor(blocks, ggml_type, weight.dtype), requires_grad=False)
    else:
        linear.weight = torch.nn.Parameter(blocks.dequantize().to(weight.dtype), requires_grad=False)
        setattr(linear, Q4K_ATTR, blocks)
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
