"""Read float weights straight from a ZeRO-3 DeepSpeed checkpoint, one parameter at a time.

Called by finalize when `--source` is the `deepspeed/` directory `forge train` writes under ZeRO-3.
DeepSpeed's own `zero_to_fp32` in lazy mode maps each rank's optimizer-state file and reassembles a
parameter from its per-rank fp32 partitions only when asked, so no full float copy is written or
held; this adapts it to the reader interface of `forge_qat.finalize.streaming` and turns its failures
into errors naming the file.
"""

import contextlib
import sys
from pathlib import Path

import torch

from forge_qat.distributed import use_cpu_accelerator_without_cuda
from forge_qat.errors import InputError
from forge_qat.formats.safe_load import UNSAFE_PICKLE, weights_only_loads

use_cpu_accelerator_without_cuda()  # this module imports deepspeed in its functions

def deepspeed_checkpoint_globals() -> list:
    """The plain-data classes DeepSpeed pickles into its checkpoint files (an enum and the loss-scaler
    record), allowed when forge loads them with weights_only (see `checkpoint.weights_only_loads`)."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    return [ZeroStageEnum, LossScaler]


def is_zero_checkpoint(path: Path) -> bool:
    return path.is_dir() and ((path / "latest").is_file() or any(path.glob("*/*_optim_states.pt")))


class ZeroCheckpointReader:
    """A `forge_qat.formats.weights.TensorReader` over the fp32 master weights of a ZeRO checkpoint."""

    def __init__(self, directory: Path, tag: str | None = None):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        tag_dir = directory / self._tag(directory, tag)
        if not tag_dir.is_dir() or not any(tag_dir.glob("*_optim_states.pt")):
            raise InputError(f"{tag_dir} is not a ZeRO checkpoint tag directory (no *_optim_states.pt)")
        self._check_rank_files(tag_dir)
        try:
            # zero_to_fp32 reports progress with print(); keep stdout clean for `forge ... --json`.
            with contextlib.redirect_stdout(sys.stderr), weights_only_loads(deepspeed_checkpoint_globals()):
                self._lazy = get_fp32_state_dict_from_zero_checkpoint(str(directory), tag=tag_dir.name,
                                                                      lazy_mode=True)
        except UNSAFE_PICKLE as e:
            first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
            raise InputError(f"cannot load ZeRO checkpoint {tag_dir} as plain data (corrupt, truncated, or carrying "
                             f"code, which forge never runs): {first}") from None
        self._current: tuple[str, torch.Tensor] | None = None

    @staticmethod
    def _tag(directory: Path, tag: str | None) -> str:
        """The given tag, else the one named in `latest`, else the only tag directory there is."""
        if tag:
            return tag
        if (directory / "latest").is_file():
            return (directory / "latest").read_text().strip()
        tags = sorted({f.parent.name for f in directory.glob("*/*_optim_states.pt")})
        if len(tags) != 1:
            raise InputError(f"{directory} holds {len(tags)} ZeRO checkpoint tags {tags} and no 'latest' file; "
                             f"write the tag to use into {directory / 'latest'}")
        return tags[0]

    @staticmethod
    def _check_rank_files(tag_dir: Path) -> None:
        """Every rank's model and optimizer files present, none truncated (zip archives end with an
        end-of-central-directory record; torch.save writes zip archives)."""
        import zipfile

        optim = sorted(tag_dir.glob("*_optim_states.pt"))
        model = sorted(tag_dir.glob("*_model_states.pt"))
        if not model:
            raise InputError(f"{tag_dir} has no *_model_states.pt")
        for f in optim + model:
            if not zipfile.is_zipfile(f):
                raise InputError(f"{f} is truncated or not a torch checkpoint")
        rank_of = lambda f: int(f.name.split("_pp_rank_")[1].split("_")[0])  # noqa: E731
        # Every rank writes one model-states and one optimizer-states file; under bf16 DeepSpeed's
        # BF16_Optimizer names the optimizer files bf16_zero_pp_rank_*.
        ranks = {rank_of(f) for f in optim + model}
        prefix = "bf16_" if optim and all(f.name.startswith("bf16_") for f in optim) else ""
        expected = {f"{prefix if kind == 'optim' else ''}zero_pp_rank_{r}_mp_rank_00_{kind}_states.pt"
                    for r in range(max(ranks) + 1) for kind in ("model", "optim")}
        missing = sorted(expected - {f.name for f in optim + model})
        if missing:
            raise InputError(f"{tag_dir} is missing {', '.join(missing)}")
        # DeepSpeed itself checks the rank count against the world size recorded inside the files.

    def keys(self) -> set[str]:
        return set(self._lazy)

    def shape(self, name: str) -> list[int]:
        return list(self._lazy[name].shape)

    def read_flat(self, name: str, start: int, out: torch.Tensor) -> None:
        if self._current is None or self._current[0] != name:
            value = self._lazy[name]
            self._current = (name, value.contiguous() if hasattr(value, "flat_groups") else value)
        out.copy_(self._current[1].reshape(-1)[start:start + out.numel()])
