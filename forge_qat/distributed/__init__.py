"""Multi-process training under DeepSpeed ZeRO: the only package that imports torch.distributed
or deepspeed. `launch` starts ranks on this machine; `zero` is the training backend each rank runs.
The package itself imports nothing heavy: `config` is read by the CLI's help.
"""

import os


def use_cpu_accelerator_without_cuda() -> None:
    """DeepSpeed picks its accelerator when first imported; on a machine without CUDA that must be the CPU
    accelerator (gloo collectives). Each module here calls this before it first imports deepspeed."""
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
