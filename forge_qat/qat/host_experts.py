"""`--experts-offload host`: a LoRA run's frozen expert stacks held in host memory, in their grid, and computed
there; the accelerator holds and computes the rest of the model.

An MoE model's routed experts are most of its weights (Qwen3-30B-A3B: 29 of 30.5 billion parameters) and, with
the base frozen (`--lora-rank`), need no gradient or optimizer state of their own. So each offloaded experts module
keeps its stacks as `FrozenGrid`s pinned to the host (`pin`: a model's `.to(device)` leaves them there), and its
forward (`run`) moves the layer's routed tokens and routing weights to the host, runs the experts module's own
fake-quantized forward there (`forge_qat.qat.experts`: per expert, the activation quantizer, the grid's values
made from its codes and multiplied by oneDNN, the separate adapters beside them), and moves the output back. The
experts' adapters stay with the rest of the trained parameters (one optimizer, one device); a forward copies them
to the host and their gradients come back with the tokens'.

Kernels. The host multiplies each expert's dequantized values (bf16 under autocast) with oneDNN's GEMM (AMX or
AVX-512 where the CPU has them). torch's int4 CPU kernel (`torch._weight_int4pack_mm_for_cpu`) multiplies the
packed codes directly, but measured here (bench/lora_grid.py --kernels) it is faster only for a handful of tokens
per expert (decode) and 1.3-4.7x slower at the 64-256 tokens per expert of a training batch; it also rounds
differently, so the loss would no longer be the in-place experts' exactly. torchao's CPU kernels (`da8w4`) are not
in its PyPI wheels.

Activations. The experts' forward on the host records its own autograd graph, held by the one autograd node
(`_HostExperts`) the accelerator's graph sees: the experts' activations live in host memory until backward, and
the node's backward runs the host graph and returns the tokens' and adapters' gradients to the accelerator. Under
gradient checkpointing the decoder layer is run again in backward to remake the accelerator's activations; the
experts' part of that rerun returns the output kept from the first forward instead of computing the experts again
(their host graph is still held), so the experts' forward runs once per step, as ktransformers' SFT backend does.

Called by `forge_qat.qat.experts` (its forward) and `forge_qat.lora.grid_base` (which pins the grids).
"""

import threading
from contextlib import contextmanager, nullcontext

import torch

from forge_qat.qat.grid import GRID_ATTR, FrozenGrid

HOST = torch.device("cpu")
OFFLOAD_ATTR = "_forge_experts_on_host"
_OUTPUT_ATTR = "_forge_host_output"
_state = threading.local()


def offloaded(module: torch.nn.Module) -> bool:
    """Whether `pin` put this experts module's stacks on the host, so its forward runs there."""
    return module.__dict__.get(OFFLOAD_ATTR, False)


def pin(module: torch.nn.Module) -> None:
    """Pin the grids of an experts module's stacks to the host and make its forward run there."""
    grids = module._modules.get(GRID_ATTR)
    if not isinstance(grids, torch.nn.ModuleDict) or not len(grids):
        raise ValueError("only an experts module whose stacks are held in their grid can be offloaded")
    for grid in grids.values():
        grid.to_host()
    module.__dict__[OFFLOAD_ATTR] = True


def computing_on_host() -> bool:
    """True inside `run`'s call of the module's own forward (which then computes in place, on the host)."""
    return getattr(_state, "active", False)


@contextmanager
def _on_host():
    _state.active = True
    try:
        yield
    finally:
        _state.active = False


def _autocast_like(device: torch.device):
    """The accelerator's autocast, mirrored on the host: the experts multiply in the dtype they would have there."""
    if device.type != HOST.type and torch.is_autocast_enabled(device.type):
        return torch.autocast(HOST.type, dtype=torch.get_autocast_dtype(device.type))
    return nullcontext()


def _split(module: torch.nn.Module) -> tuple[list[str], list[torch.Tensor], dict[str, torch.Tensor]]:
    """(names, tensors) of the module's trained parameters, and host copies of its other parameters and buffers
    that are elsewhere (biases, norms), leaving out the placeholders of the stacks its grids hold."""
    grids = module._modules[GRID_ATTR]
    names, trained, frozen = [], [], {}
    for name, p in module.named_parameters():
        if name in grids:
            continue
        if p.requires_grad:
            names.append(name)
            trained.append(p)
        elif p.device != HOST:
            frozen[name] = p.detach().to(HOST)
    for name, b in module.named_buffers():  # the grids' are pinned to the host already
        if b.device != HOST:
            frozen[name] = b.to(HOST)
    return names, trained, frozen


def _call(module, tensors: dict[str, torch.Tensor], hidden, top_k_index, top_k_weights) -> torch.Tensor:
    with _on_host():
        return torch.func.functional_call(module, tensors, (hidden, top_k_index, top_k_weights), strict=False)


def _back(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`t` on `device`, never sharing its storage (a host output handed to the accelerator's graph)."""
    return t.to(device, copy=True)


def _in_backward() -> bool:
    """Whether autograd is running a backward pass on this thread: a forward seen here is activation
    checkpointing's rerun of a layer."""
    return torch._C._current_graph_task_id() != -1


def run(module: torch.nn.Module, hidden: torch.Tensor, top_k_index: torch.Tensor,
        top_k_weights: torch.Tensor) -> torch.Tensor:
    """The offloaded experts module's forward: the tokens to the host, its own forward there, the output back."""
    names, trained, frozen = _split(module)
    device = hidden.device
    if torch.is_grad_enabled() and (hidden.requires_grad or top_k_weights.requires_grad or trained):
        if _in_backward() and module.__dict__.get(_OUTPUT_ATTR) is not None:
            # checkpointing's rerun: the first forward's host graph is still held for backward, and its output
            # is all the rerun needs from the experts
            return _back(module.__dict__[_OUTPUT_ATTR], device)
        return _HostExperts.apply(module, tuple(names), frozen, hidden, top_k_index, top_k_weights, *trained)
    with _autocast_like(device):
        tensors = {**frozen, **{n: p.detach().to(HOST) for n, p in zip(names, trained, strict=True)}}
        out = _call(module, tensors, hidden.to(HOST), top_k_index.to(HOST), top_k_weights.to(HOST))
    return _back(out, device)


def _keep(t: torch.Tensor) -> torch.Tensor:
    return t


class _HostExperts(torch.autograd.Function):
    """The experts' forward on the host as one node of the accelerator's graph (see the module docstring)."""

    @staticmethod
    def forward(ctx, module, names, frozen, hidden, top_k_index, top_k_weights, *trained):
        device = hidden.device
        # identity hooks over any activation checkpointing's: the host graph keeps what it saves (host memory) and
        # the checkpoint counts only the accelerator's tensors, in the first forward and in its rerun alike
        with torch.enable_grad(), _autocast_like(device), torch.autograd.graph.saved_tensors_hooks(_keep, _keep):
            h = hidden.detach().to(HOST).requires_grad_(hidden.requires_grad)
            w = top_k_weights.detach().to(HOST).requires_grad_(top_k_weights.requires_grad)
            leaves = [p.detach().to(HOST).requires_grad_() for p in trained]
            out = _call(module, {**frozen, **dict(zip(names, leaves, strict=True))}, h, top_k_index.to(HOST), w)
        ctx.graph = (out, h, w, leaves)
        ctx.devices = (device, top_k_weights.device, [p.device for p in trained])
        module.__dict__[_OUTPUT_ATTR] = out.detach()
        return _back(out, device)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        out, h, w, leaves = ctx.graph
        # the host activations go as soon as their gradients are computed; the output stays until the module's
        # next forward, for a checkpointing rerun that reaches the experts after this backward
        ctx.graph = None
        wanted = [t for t in (h, w, *leaves) if t.requires_grad]
        found = iter(torch.autograd.grad(out, wanted, grad.to(HOST), allow_unused=True))
        grads = [next(found) if t.requires_grad else None for t in (h, w, *leaves)]
        hidden_device, weights_device, trained_devices = ctx.devices
        devices = [hidden_device, weights_device, *trained_devices]
        grads = [None if g is None else g.to(d) for g, d in zip(grads, devices, strict=True)]
        return (None, None, None, grads[0], None, grads[1], *grads[2:])


def host_bytes(model: torch.nn.Module) -> int:
    """Bytes of the grids pinned to the host."""
    return sum(m.nbytes() for m in model.modules() if isinstance(m, FrozenGrid) and m.on_host)
