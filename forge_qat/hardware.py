"""Capability checks for the hardware that real low-bit kernels need.

Recipes name their requirements as calls into this module; tests monkeypatch these functions to
exercise both sides of every gate on a CPU-only machine.
"""

import importlib.util

import torch


def cuda_available() -> bool:
    return torch.cuda.is_available()


def has_cuda_capability(major: int, minor: int) -> bool:
    """True when a CUDA device of at least compute capability `major.minor` is present."""
    if not cuda_available():
        return False
    return torch.cuda.get_device_capability() >= (major, minor)


def has_mslk() -> bool:
    """The `mslk` kernel package that torchao's int4 tensor subclasses dispatch to."""
    return importlib.util.find_spec("mslk") is not None


def bf16_supported() -> bool:
    """bf16 autocast works on any CPU PyTorch build, and on CUDA where the device supports it."""
    if cuda_available():
        return torch.cuda.is_bf16_supported()
    return True
