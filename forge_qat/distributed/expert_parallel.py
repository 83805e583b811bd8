"""Expert parallelism on DeepSpeed's AutoEP (`--expert-parallel E`): the model checks before any work, the
DeepSpeed config section, and the way back from AutoEP's layers to the transformers model's names and tensors,
so checkpoints are written in the input's HF layout.

Called by the ZeRO engine (`forge_qat.distributed.zero`). AutoEP replaces each MoE block inside
`deepspeed.initialize` by an `AutoEPMoELayer`: `router.gate.weight` (the block's `gate.weight`) and
`experts.w1`/`w3` (the gate and up rows of `experts.gate_up_proj`) and `w2` (`experts.down_proj`), each holding
this rank's contiguous block of E/ep experts (DeepSpeed's uniform placement, `autoep_affine`), partitioned by
ZeRO-3 within the ranks that share that block.
"""

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager

import torch
import torch.distributed as dist

from forge_qat.errors import ConfigError

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
