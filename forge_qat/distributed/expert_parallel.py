"""Expert parallelism on DeepSpeed's AutoEP (`--expert-parallel E`): the model checks before any work, the
DeepSpeed config section, and the way back from AutoEP's layers to the transformers model's names and tensors,
so checkpoints are written in the input's HF layout.

Called by the ZeRO engine (`forge_qat.distributed.zero`). AutoEP replaces each MoE block inside
`deepspeed.initialize` by an `AutoEPMoELayer`: `router.gate.weight` (the block's `gate.weight`) and
`experts.w1`/`w3` (the gate and up rows of `experts.gate_up_proj`) and `w2` (`experts.down_proj`), each holding
this rank's contiguous block of E/ep experts (DeepSpeed's uniform placement, `autoep_affine`), partitioned by
ZeRO-3 within the ranks that share that block.

Loading. AutoEP builds its experts from the transformers block's stacks: it all-gathers each layer's whole
ZeRO-3 stacks on every rank and keeps its rows (`deepspeed/moe/ep_repack.py`), so streaming the stacks in first
would have rank 0 read every expert and every rank hold a layer's whole stacks. Instead the stacks AutoEP will
take (found by AutoEP's own detection, `defer_expert_stacks`) are left unread: each becomes a placeholder of its
shape that holds no memory (a zero expanded to the shape; AutoEP's copy of its rows allocates only this rank's
experts, as zeros), and once AutoEP has placed the experts each rank reads its own experts' rows of its ZeRO
partition straight from the checkpoint (`read_local_experts`), into the module partition and the optimizer's
fp32 master. No rank reads another rank's experts; the dense part keeps the streamed ZeRO-3 loader.
"""

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager

import torch
import torch.distributed as dist

from forge_qat.errors import ConfigError
from forge_qat.formats.weights import TensorReader
from forge_qat.qat import grouped_experts
from forge_qat.qat.experts import FAKE_QUANT_ATTR, LORA_ATTR, is_experts
from forge_qat.qat.fake_quant import AffineSpec, ScaleInit, initial_scale
from forge_qat.qat.grouped_experts import DOWN, FIRST_EXPERT_ATTR, GATE_UP

FullTensor = Callable[[torch.nn.Parameter], AbstractContextManager[torch.Tensor]]
_RENAMES = {"router.gate.weight": "gate.weight", "experts.w1": "experts.gate_up_proj",
            "experts.w2": "experts.down_proj"}
"""AutoEP's name -> the transformers block's (`experts.w3` travels inside gate_up_proj)."""


def preset(model_config) -> str:
    """AutoEP's preset for the model type; a clear error for a dense model or one without a preset."""
    from deepspeed.module_inject.auto_ep_presets.registry import PRESET_MODELS, preset_name_for_hf_model_type

    name = preset_name_for_hf_model_type(getattr(model_config, "model_type", None))
    if name is None:
        kinds = sorted({t for p in PRESET_MODELS.values() for t in p.hf_model_types})
        raise ConfigError(f"--expert-parallel: model type {model_config.model_type!r} has no DeepSpeed AutoEP preset "
                          f"(a dense model has no experts to place); AutoEP covers {', '.join(kinds)}")
    return name


def check_model(model_config, ep: int, world_size: int) -> dict:
    """Before any weight loads: E divides the ranks and the experts, and AutoEP knows the architecture. Returns
    the DeepSpeed config section."""
    name = preset(model_config)
    experts = getattr(model_config, "num_experts", None) or getattr(model_config, "num_local_experts", None)
    if world_size % ep:
        raise ConfigError(f"--expert-parallel {ep} must divide the {world_size} ranks of this job")
    if not experts or experts % ep:
        raise ConfigError(f"--expert-parallel {ep} must divide the model's {experts} experts per layer")
    return {"enabled": True, "autoep_size": ep, "preset_model": name}


def _layers(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    return {name: m for name, m in model.named_modules() if type(m).__name__ == "AutoEPMoELayer"}


def hf_names(model: torch.nn.Module, names: list[str]) -> list[str]:
    """`names` (the model's state dict) under the transformers model's names."""
    return [hf for _, hf, _, _ in _translated(model, names)]


def _translated(model: torch.nn.Module, names: list[str]) -> Iterator[tuple[str, str, str | None, object]]:
    """(model name, HF name, the other name read with it: w3 beside w1, the AutoEP layer of an expert stack);
    w3 itself is skipped."""
    layers = _layers(model)
    for name in names:
        owner = next((p for p in layers if name.startswith(p + ".")), None)
        if owner is None:
            yield name, name, None, None
            continue
        local = name[len(owner) + 1:]
        if local == "experts.w3":
            continue
        if local.startswith((f"experts.{LORA_ATTR}.", f"experts.{FAKE_QUANT_ATTR}.")):  # all experts', as they are
            yield name, name, None, None
            continue
        if local not in _RENAMES:
            raise ConfigError(f"internal: AutoEP layer {owner} holds {local}, which forge does not write back into "
                              f"the transformers layout")
        stack = layers[owner] if local.startswith("experts.") else None
        yield name, f"{owner}.{_RENAMES[local]}", f"{owner}.experts.w3" if local == "experts.w1" else None, stack


def hf_full_tensors(model: torch.nn.Module, names: list[str], full_tensor: FullTensor,
                    only: Callable[[str], bool] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """The model's tensors under the transformers names (collective: every rank iterates to the end). An expert
    stack is gathered within the ranks sharing this rank's experts, then across the expert-parallel group in rank
    order: experts [r E/ep, (r + 1) E/ep) come from rank r of the group."""
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    for name, hf, beside, stack_layer in _translated(model, names):
        if only is not None and not only(hf):
            continue
        if name in buffers:
            yield hf, buffers[name].detach().to("cpu", copy=True)
            continue
        with full_tensor(params[name]) as value:
            local = value.to("cpu", torch.float32, copy=True)
        if beside is not None:
            with full_tensor(params[beside]) as value:
                local = torch.cat([local, value.to("cpu", torch.float32)], dim=1)  # gate rows, then up rows
        if stack_layer is not None:
            local = _gather_experts(local, stack_layer.ep_group)
        yield hf, local


def _gather_experts(local: torch.Tensor, group) -> torch.Tensor:
    size = dist.get_world_size(group=group)
    backend = dist.get_backend(group)
    device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    pieces = [torch.empty_like(local, device=device) for _ in range(size)]
    dist.all_gather(pieces, local.to(device), group=group)
    return torch.cat([p.to("cpu") for p in pieces])


# ---- loading a rank's experts ----------------------------------------------------------------------

UNREAD = "forge_unread"
"""On an expert stack's placeholder: the stack's name, whose rows each rank reads after the wrap."""


def defer_expert_stacks(model: torch.nn.Module, section: dict) -> list[str]:
    """Before the streamed load: every expert stack AutoEP will take becomes a placeholder that holds no memory
    (see the module's docstring); returns their names, which the streamed load skips. The stacks are found by
    AutoEP's own detection with the section the wrap will use, and must be the layout `read_local_experts` and
    the checkpoint writer map back (fused gate/up rows first, down apart), else one clear error."""
    from deepspeed.module_inject.auto_ep import AutoEP
    from deepspeed.module_inject.auto_ep_config import parse_autoep_config

    names = []
    for spec in AutoEP(model, parse_autoep_config(section)).ep_parser():
        names += _defer_stacks_of(model, spec)
    if not names:
        raise ConfigError("--expert-parallel: DeepSpeed AutoEP finds no MoE layer in this model; nothing would be "
                          "placed on the expert-parallel ranks")
    return names


def _defer_stacks_of(model: torch.nn.Module, spec) -> list[str]:
    experts = model.get_submodule(spec.moe_module_name).get_submodule(spec.experts_name)
    stacks = {"w1": spec.expert_w1_name, "w2": spec.expert_w2_name, "w3": spec.expert_w3_name}
    gate_up = getattr(experts, spec.expert_w1_name, None)
    shape = tuple(getattr(gate_up, "ds_shape", getattr(gate_up, "shape", ())))
    if (spec.expert_storage, f"{spec.router_name}.weight", f"{spec.experts_name}.{stacks['w1']}",
            f"{spec.experts_name}.{stacks['w2']}", stacks["w3"]) != ("fused_3d", *_RENAMES.values(), None) \
            or shape[1:2] != (2 * spec.ffn_hidden_size,):
        raise ConfigError(f"--expert-parallel: {spec.moe_module_name} holds its experts as {spec.expert_storage} "
                          f"{stacks} {list(shape)}; forge reads and writes back expert-parallel experts stored as "
                          f"transformers 5 fused stacks (gate_up_proj (E, 2I, H) with gate rows first, down_proj)")
    names = []
    for attr in (stacks["w1"], stacks["w2"]):
        old = getattr(experts, attr)
        shape = tuple(getattr(old, "ds_shape", old.shape))
        device = old.ds_tensor.device if hasattr(old, "ds_tensor") else old.device
        placeholder = torch.nn.Parameter(torch.zeros((), dtype=old.dtype, device=device).expand(shape),
                                         requires_grad=old.requires_grad)
        setattr(experts, attr, placeholder)
        names.append(f"{spec.moe_module_name}.{spec.experts_name}.{attr}")
        setattr(placeholder, UNREAD, names[-1])
    return names


def read_local_experts(model: torch.nn.Module, reader: TensorReader, chunk_bytes: int) -> None:
    """After AutoEP placed the experts (collective-free): fill this rank's ZeRO partition of each AutoEP layer's
    `w1`/`w3`/`w2` (its E/ep experts, partitioned within the ranks that share them) from `reader`, the
    checkpoint under the transformers names, reading only these experts' rows, at most `chunk_bytes` at a time.
    The optimizer's fp32 master of a trained partition is set from it."""
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus
    from deepspeed.utils import safe_set_local_fp32_param

    for owner, layer in _layers(model).items():
        first = layer.ep_rank * layer.num_local_experts
        for local, hf in (("w1", "gate_up_proj"), ("w3", "gate_up_proj"), ("w2", "down_proj")):
            p = getattr(layer.experts, local)
            name = f"{owner}.experts.{hf}"
            rows = reader.shape(name)[1]
            source = _ExpertRows(reader, name, first, rows, p.ds_shape, offset=p.ds_shape[1] if local == "w3" else 0)
            part = p.ds_tensor
            group_rank = dist.get_rank(group=p.ds_process_group)
            start = group_rank * part.ds_numel
            count = max(0, min(part.ds_numel, p.ds_numel - start))
            if p.ds_status != ZeroParamStatus.NOT_AVAILABLE:
                # DeepSpeed 0.19 gathers even the parameters it keeps whole (`ds_persist`) at their first use,
                # from the partition; one gathered already would keep AutoEP's zeros
                raise RuntimeError(f"internal: {owner}.experts.{local} is gathered before its first use; forge "
                                   f"fills expert-parallel experts through their ZeRO-3 partitions")
            with torch.no_grad():
                source.read(start, part.view(-1)[:count], chunk_bytes)
                part.view(-1)[count:].zero_()
            if p.requires_grad and getattr(p, "_z3_optimizer", None) is not None:
                safe_set_local_fp32_param(p, part.to(torch.float32))


class _ExpertRows:
    """A local expert stack (E/ep experts, `shape` = (E/ep, rows, cols)) as a flat tensor read from the
    checkpoint's (E, `hf_rows`, cols) stack `name`: local expert k is checkpoint expert `first` + k, its rows
    starting at `offset` (the up rows of gate_up_proj start after the gate rows)."""

    def __init__(self, reader: TensorReader, name: str, first: int, hf_rows: int, shape, offset: int):
        self.reader, self.name, self.first, self.offset = reader, name, first, offset
        _, self.rows, self.cols = shape
        self.per_expert, self.hf_per_expert = self.rows * self.cols, hf_rows * self.cols

    def read(self, start: int, out: torch.Tensor, chunk_bytes: int) -> None:
        """Local flat elements [start, start + out.numel()) into `out`, one expert's run (and at most a chunk)
        at a time; `out` may live on another device than the file's bytes (a CUDA partition)."""
        step = max(1, chunk_bytes // out.element_size())
        staged = out.device.type != "cpu"
        done = 0
        while done < out.numel():
            k, within = divmod(start + done, self.per_expert)
            n = min(out.numel() - done, self.per_expert - within, step)
            at = (self.first + k) * self.hf_per_expert + self.offset * self.cols + within
            target = out[done:done + n]
            if staged:
                buffer = torch.empty(n, dtype=out.dtype)
                self.reader.read_flat(self.name, at, buffer)
                target.copy_(buffer)
            else:
                self.reader.read_flat(self.name, at, target)
            done += n


# ---- quantizers and LoRA pairs across AutoEP's replacement --------------------------------------------

PARKED = "forge_expert_parallel_parked"
"""Where the experts' quantizers and LoRA pairs wait on the model's root while AutoEP replaces the MoE blocks."""
CARRIED = (FAKE_QUANT_ATTR, LORA_ATTR)


def park_expert_modules(model: torch.nn.Module) -> None:
    """Before the wrap: move what forge installed on every transformers experts module (its fake quantizers with
    any learned scales, `forge_fake_quant`; its LoRA pairs, `forge_lora`; both for all E experts) to the model's
    root. AutoEP drops the block it replaces with all it holds, and DeepSpeed's optimizer remap drops that
    block's parameters; on the root they stay in the model, so ZeRO-3 partitions the scales and pairs and the
    optimizer trains them like every other (replicated over the ranks: each rank's gradient has rows only for its
    own experts, whose tokens all come to it, so the data-parallel mean is the one-process gradient).
    `unpark_expert_modules` hands them to the AutoEP layers."""
    parked = torch.nn.ModuleDict()
    for name, module in list(model.named_modules()):
        if is_experts(module) and any(a in module._modules for a in CARRIED):
            parked[name.replace(".", "/")] = torch.nn.ModuleDict(
                {a: module._modules.pop(a) for a in CARRIED if a in module._modules})
    if len(parked):
        model.add_module(PARKED, parked)


def unpark_expert_modules(model: torch.nn.Module) -> list[tuple[torch.nn.Module, torch.nn.Parameter]]:
    """After the wrap: the parked quantizers and pairs go to the `GroupedExperts` of the AutoEP layer that replaced
    their block, under the names they had (`<block>.experts.forge_fake_quant...`, `...forge_lora...`, so
    checkpoints name learned scales and adapters as before), with the index of its first expert
    (`forge_qat.qat.grouped_experts`). Returns (experts module, parameter) pairs for the engine to register as
    read by that module (ZeRO-3 gathers a module's own parameters only)."""
    parked = model._modules.pop(PARKED, None)
    if parked is None:
        return []
    layers, read = _layers(model), []
    for key, carried in parked.items():
        owner, _, child = key.replace("/", ".").rpartition(".")
        layer = layers.get(owner)
        if layer is None or child != "experts":
            raise ConfigError(f"internal: what forge installed on {key.replace('/', '.')} has no AutoEP layer to go to")
        experts = layer.experts
        setattr(experts, FIRST_EXPERT_ATTR, layer.ep_rank * layer.num_local_experts)
        if FAKE_QUANT_ATTR in carried:
            quantizers = carried[FAKE_QUANT_ATTR]
            grouped_experts.install_fake_quant(experts, quantizers[GATE_UP], quantizers[DOWN])
        if LORA_ATTR in carried:
            setattr(experts, LORA_ATTR, carried[LORA_ATTR])
        read += [(experts, p) for p in carried.parameters()]
    return read


def unread_scales(reader: TensorReader, name: str, shape: tuple[int, ...], dtype: torch.dtype, spec: AffineSpec,
                  init: ScaleInit, rank: int, world: int, device: torch.device) -> torch.Tensor:
    """The starting learned scales (E, rows, groups) of the expert stack `name` (E, rows, cols), which no rank has
    read yet (collective): rank r chooses those of the r-th contiguous block of the experts from their rows in
    the checkpoint, read in `dtype` as the weight would hold them, chosen on `device` as the weight's would be,
    and the blocks are gathered. A scale depends on its own expert's rows only, so these are the values one
    process chooses from the whole stack."""
    experts, rows, cols = shape
    per = -(-experts // world)
    first, last = min(experts, rank * per), min(experts, (rank + 1) * per)
    local = torch.empty(0)
    if last > first:
        weights = torch.empty(last - first, rows, cols, dtype=dtype)
        reader.read_flat(name, first * rows * cols, weights.view(-1))
        local = initial_scale(weights.to(device), spec, init).cpu()
    seen = [None] * world
    dist.all_gather_object(seen, local)
    return torch.cat([piece for piece in seen if piece.numel()])


def frozen_experts(model: torch.nn.Module) -> list[str]:
    """The AutoEP expert stacks that do not train (a LoRA run's base)."""
    return [f"{owner}.experts.{w}" for owner, layer in _layers(model).items() for w in ("w1", "w2", "w3")
            if not getattr(layer.experts, w).requires_grad]
