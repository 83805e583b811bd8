"""Multi-process training under DeepSpeed ZeRO: the only package that imports torch.distributed
or deepspeed. `launch` starts ranks on this machine; `zero` is the training backend each rank runs.
"""

import os

import torch

# DeepSpeed picks its accelerator when first imported; on a machine without CUDA that must be the
# CPU accelerator (gloo collectives), whoever imports this package first.
if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
