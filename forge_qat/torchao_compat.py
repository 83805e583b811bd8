"""The one operator torchao 0.18 lacks for int4 mixture-of-experts artifacts: `aten.select` on
`IntxUnpackedToInt8Tensor`. Importing this module registers it (idempotently, and never over an
implementation torchao itself provides).

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

import torch
from torch.utils._python_dispatch import return_and_correct_aliasing
from torchao.quantization.quantize_.workflows.intx.intx_unpacked_to_int8_tensor import IntxUnpackedToInt8Tensor

aten = torch.ops.aten


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
