"""Capability checks for the hardware that real low-bit kernels need.

Recipes name their requirements as calls into this module; tests monkeypatch these functions to
exercise both sides of every gate on a CPU-only machine.
"""

import importlib.util

# torch is imported inside each check: the recipe registry imports this module and must not load torch
# (the CLI's help and argument errors run without it).


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def has_cuda_capability(major: int, minor: int) -> bool:
    """True when a CUDA device of at least compute capability `major.minor` is present."""
    if not cuda_available():
        return False
    import torch

    return torch.cuda.get_device_capability() >= (major, minor)


def has_mslk() -> bool:
    """The `mslk` kernel package that torchao's int4 tensor subclasses dispatch to."""
    return importlib.util.find_spec("mslk") is not None


def bf16_supported() -> bool:
    """bf16 autocast works on any CPU PyTorch build, and on CUDA where the device supports it."""
    import torch

    if cuda_available():
        return torch.cuda.is_bf16_supported()
    return True


def bf16_native() -> bool:
    """Whether bf16 runs at hardware speed, which `--precision auto` requires before choosing it: CUDA
    devices with bf16, or CPUs with AVX512-BF16 or AMX. Elsewhere CPU bf16 works but is emulated (measured
    about 40x slower than fp32 for the demo on an AVX2-only host). torch exposes the CPU checks only as
    private helpers of `torch.cpu`, hence the guarded lookup."""
    import torch

    if cuda_available():
        return torch.cuda.is_bf16_supported()
    checks = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(check() for check in checks if check is not None)
