"""Every use of torchao beyond its public API, in one place: internal import paths, the config-handler
registry, the prototype safetensors support, building an `Int8Tensor` with a given scale, and the one
operator torchao 0.18 lacks for int4 mixture-of-experts artifacts (`aten.select` on
`IntxUnpackedToInt8Tensor`). A torchao upgrade that moves any of them breaks here and nowhere else.

Importing this module registers that operator (idempotently, and never over an implementation torchao
itself provides), and registers transformers' eager expert loop under this module's name as an experts
implementation (`EXPERTS_IMPLEMENTATION`), which int4 MoE artifacts name in their config: so such an
artifact runs wherever this module was imported, and anywhere else fails at `from_pretrained` with
transformers' own error naming this module, instead of loading and then failing at the first forward.

Imported by forge's own loaders (finalize's reload check, eval) and by users before loading an MoE
artifact of an `IntxUnpackedToInt8Tensor` recipe: `import forge_qat.torchao_compat` and then stock
`AutoModelForCausalLM.from_pretrained(ARTIFACT)`. Why it is needed: transformers' eager experts
forward picks one expert with `weights[expert_idx]` (`aten.select.int`), which torchao implements
for `Int8Tensor` and `Float8Tensor` but not for `IntxUnpackedToInt8Tensor`. The rule is the same as
torchao's `Int8Tensor` select: index the data, scale and zero point along dim 0 and drop the leading
block size, giving exactly the 2-D tensor that converting that expert as an `nn.Linear` produces
(tests/test_moe.py checks both, and that stock torchao still lacks the operator, so this module is
dropped the day torchao has it).
"""

from collections.abc import Callable

import torch
from torch.utils._python_dispatch import return_and_correct_aliasing
from torchao.core.config import AOBaseConfig
from torchao.prototype.safetensors.safetensors_support import flatten_tensor_state_dict
from torchao.prototype.safetensors.safetensors_utils import ALLOWED_TENSORS_SUBCLASSES
from torchao.quantization.quant_api import _adjust_scale_dtype_in_intx_unpacked_tensor
from torchao.quantization.quantize_.workflows.int8.int8_tensor import Int8Tensor, QuantizeTensorToInt8Kwargs
from torchao.quantization.quantize_.workflows.intx.intx_unpacked_to_int8_tensor import IntxUnpackedToInt8Tensor
from torchao.quantization.transform_module import _QUANTIZE_CONFIG_HANDLER
from transformers.integrations.moe import ExpertsInterface

__all__ = ["ALLOWED_TENSORS_SUBCLASSES", "EXPERTS_IMPLEMENTATION", "IntxUnpackedToInt8Tensor",
           "flatten_tensor_state_dict", "int8_weight_with_scale", "quantize_handler", "set_intx_scale_dtype",
           "TORCHAO_HAS_SELECT"]

aten = torch.ops.aten


def set_intx_scale_dtype(tensor: IntxUnpackedToInt8Tensor, weight: torch.Tensor, dtype: torch.dtype) -> None:
    """What `Int8DynamicActivationIntxWeightConfig(weight_scale_dtype=...)` does to the tensors it builds:
    round the scales to `dtype`, then quantize `weight` again with them."""
    _adjust_scale_dtype_in_intx_unpacked_tensor(tensor, weight, dtype)


def int8_weight_with_scale(weight: torch.Tensor, config: AOBaseConfig, scale: torch.Tensor) -> torch.Tensor:
    """What `Int8DynamicActivationInt8WeightConfig` makes of `weight`, with the given per-row `scale` instead of
    the one it would choose (its handler takes no custom scale; `Int8Tensor.from_hp` does)."""
    act_granularity, weight_granularity = Int8Tensor._normalize_granularity(config.granularity)
    kwargs = QuantizeTensorToInt8Kwargs(granularity=act_granularity, mapping_type=config.act_mapping_type,
                                        reduce_range=config.reduce_range)
    return Int8Tensor.from_hp(weight, granularity=weight_granularity, scale=scale, act_quant_kwargs=kwargs,
                              reduce_range=config.reduce_range)


def quantize_handler(config: AOBaseConfig) -> Callable[..., torch.nn.Module]:
    """The module transform `quantize_` applies for `config`'s type; called directly where forge passes
    arguments `quantize_` cannot (a custom scale from learned scales)."""
    return _QUANTIZE_CONFIG_HANDLER[type(config)]


def _registered_select():
    table = getattr(IntxUnpackedToInt8Tensor, "_ATEN_OP_TABLE", {}).get(IntxUnpackedToInt8Tensor, {})
    return table.get(aten.select.int)


TORCHAO_HAS_SELECT = _registered_select() is not None
"""Whether torchao itself implemented the operator before this module ran (then nothing is registered)."""


def _select(func, types, args, kwargs):
    tensor, dim, index = args
    if dim != 0:
        raise NotImplementedError(f"IntxUnpackedToInt8Tensor select on dim {dim}: only dim 0 (an expert) is supported")
    selected = IntxUnpackedToInt8Tensor(
        tensor.qdata[index], tensor.scale[index], tensor.zero_point[index], tensor.target_dtype,
        tuple(tensor.block_size[1:]), tensor.dtype, tensor.activation_quantization,
    )
    return return_and_correct_aliasing(func, args, kwargs, selected)


if not TORCHAO_HAS_SELECT:
    IntxUnpackedToInt8Tensor.implements(aten.select.int)(_select)


EXPERTS_IMPLEMENTATION = __name__
"""The `experts_implementation` an artifact whose expert stacks need this module names in its config.
Stock transformers validates the name when it builds the model: where this module was not imported, that
fails with 'Specified `experts_implementation="forge_qat.torchao_compat"` is not supported', naming the
import the artifact needs."""


def _eager_experts_forward(self, *args, **kwargs):
    """transformers' own per-expert loop: the experts class's undecorated forward (`use_experts_implementation`
    wraps it with functools.wraps), which selects one expert's tensor at a time."""
    return type(self).forward.__wrapped__(self, *args, **kwargs)


ExpertsInterface.register(EXPERTS_IMPLEMENTATION, _eager_experts_forward)
