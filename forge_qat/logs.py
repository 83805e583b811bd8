"""Quieting what libraries log that no user can act on; shared by the CLI, each rank of a multi-process job
and the benchmarks. Imports nothing heavy: it must run before torchao is first imported.
"""

import logging

NOISY_LOGGERS = ("torchao", "torch.utils._pytree", "torchao.kernel.intmm")
"""torchao logs load failures of its CUDA-only extensions at import time (expected on CPU); torch's pytree
warns once per Enum torchao registers."""


def quiet_libraries(*extra: str) -> None:
    """Show only errors from the noisy library loggers (and `extra` ones)."""
    for name in (*NOISY_LOGGERS, *extra):
        logging.getLogger(name).setLevel(logging.ERROR)
