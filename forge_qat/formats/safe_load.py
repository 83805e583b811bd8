"""Loading pickled files as plain data only: what `torch.load` may unpickle, whoever calls it.

Called by the checkpoint reader (`forge_qat.formats.checkpoint`) and the DeepSpeed state readers
(`forge_qat.distributed`): nothing forge loads from a run, checkpoint or model directory may run code.
"""

import os
import pickle
from contextlib import contextmanager

import torch


@contextmanager
def weights_only_loads(allowed_globals: list | None = None):
    """Every `torch.load` inside the block unpickles plain data only (tensors, containers, numbers, and
    `allowed_globals`), even where a library explicitly asks torch for full unpickling (DeepSpeed does,
    for its checkpoint files): torch reads `TORCH_FORCE_WEIGHTS_ONLY_LOAD` at each call. A file holding anything
    else (a pickled `__reduce__` payload) raises instead of running code."""
    previous = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        with torch.serialization.safe_globals(list(allowed_globals or [])):
            yield
    finally:
        if previous is None:
            os.environ.pop("TORCH_FORCE_WEIGHTS_ONLY_LOAD", None)
        else:
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = previous


UNSAFE_PICKLE = (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError, KeyError, AttributeError)
"""What torch.load raises on a corrupt, truncated or code-carrying file."""
