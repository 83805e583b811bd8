"""The files of a forge training checkpoint beside its HF weights: the metadata (`forge_checkpoint.json`, typed
as `CheckpointMeta`), the learned weight scales, and one process's trainer state for `--resume`.

A checkpoint is an HF model directory (float weights under the original state_dict keys, tokenizer, config)
plus these. Written by `forge_qat.train.checkpointing`; read by resume, finalize, eval and export.
"""

import json
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from forge_qat import __version__
from forge_qat.errors import InputError
from forge_qat.formats.run_dir import CHECKPOINT_META
from forge_qat.formats.versioned import check_version, read_json_object
from forge_qat.formats.weights import value_fault
from forge_qat.lora.config import CONFIG_FIELDS as LORA_FIELDS
from forge_qat.lora.config import LoraConfig

TRAINER_STATE = "trainer_state.pt"
LEARNED_SCALES = Path("learned_scales") / "scales.safetensors"
"""A checkpoint's learned weight scales (`--qat-learn-scales`), by state-dict name. Kept apart from the HF
weights, in a subdirectory no `*.safetensors` glob of the checkpoint sees, so the checkpoint stays a plain
float model for transformers and for `--model`."""
FORMAT_VERSION = 1
"""Version of `forge_checkpoint.json` this forge writes; files without one are version 1."""
_WHAT = "a forge checkpoint's metadata"


@dataclass(frozen=True, kw_only=True)
class CheckpointMeta:
    """`forge_checkpoint.json`: what a checkpoint was trained with. The one reader and writer of that file."""

    step: int
    qat_recipe: str | None
    """The QAT recipe the weights were trained with (None: float training)."""
    train_config: dict[str, Any] = field(default_factory=dict)
    """The run's configuration by flat option name (`forge_qat.config.TrainConfig.to_dict`)."""
    world_size: int = 1
    uses_deepspeed: bool | None = None
    """Whether the engine state is DeepSpeed's (`deepspeed/`) rather than `trainer_state.pt`. None in checkpoints
    written before it was recorded: `deepspeed` derives it from the recorded options."""
    fp8_recipe: str | None = None
    precision: str | None = None
    lr: float | None = None
    scale_lr: float | None = None
    """The peak learning rate the learned scales trained with (None: none learned)."""
    data_key: str | None = None
    """The token cache key of the training data (a resumed run must read the same batches)."""
    learned_scales: dict[str, Any] | None = None
    """How far the learned scales moved (`forge_qat.train.scale_watch`), with their `peak_lr`."""
    forge_qat_version: str = __version__
    format_version: int = FORMAT_VERSION

    @property
    def deepspeed(self) -> bool:
        """Whether DeepSpeed wrote the engine state: recorded, else derived as `DistributedConfig.uses_deepspeed`
        derives it (a ZeRO stage, or a user DeepSpeed config)."""
        if self.uses_deepspeed is not None:
            return self.uses_deepspeed
        return bool(self.train_config.get("zero_stage") or self.train_config.get("deepspeed_config"))

    @property
    def lora(self) -> LoraConfig | None:
        """The LoRA settings the checkpoint trained with (None: trained without adapters)."""
        cfg = self.train_config
        if not cfg.get("lora_rank"):
            return None
        return LoraConfig(**{k: cfg[k] for k in LORA_FIELDS if k in cfg})

    @property
    def learns_scales(self) -> bool:
        return bool(self.train_config.get("qat_learn_scales"))

    @property
    def trained_scale_lr(self) -> float | None:
        """The scales' peak learning rate as recorded (older checkpoints: in `learned_scales`)."""
        return self.scale_lr or (self.learned_scales or {}).get("peak_lr")

    def write(self, directory: Path) -> None:
        """Written last by the checkpoint writer: its presence marks a checkpoint complete."""
        (directory / CHECKPOINT_META).write_text(json.dumps(asdict(self), indent=2))

    @classmethod
    def from_dict(cls, raw: Any, source: Path) -> "CheckpointMeta":
        """Validated: a clear InputError for a file that is not forge's or comes from a newer forge."""
        if not isinstance(raw, dict):
            raise InputError(f"{source} is not {_WHAT} (a JSON object was expected)")
        check_version(raw, source, FORMAT_VERSION)
        expected = {"step": int, "qat_recipe": (str, type(None)), "train_config": dict, "world_size": int,
                    "uses_deepspeed": (bool, type(None)), "data_key": (str, type(None))}
        for key, kinds in expected.items():
            if key in raw and (not isinstance(raw[key], kinds) or (kinds is int and isinstance(raw[key], bool))):
                raise InputError(f"{source}: {key} is {raw[key]!r}, not {_WHAT}")
        if "step" not in raw:
            raise InputError(f"{source} records no step: not {_WHAT}")
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in known})


def read_checkpoint_meta(path: Path) -> CheckpointMeta | None:
    """forge metadata of a checkpoint directory, or None for a plain HF model directory."""
    meta = path / CHECKPOINT_META
    if not meta.is_file():
        return None
    return CheckpointMeta.from_dict(read_json_object(meta, _WHAT), meta)


def write_learned_scales(directory: Path, scales: dict) -> None:
    import torch
    from safetensors.torch import save_file

    (directory / LEARNED_SCALES).parent.mkdir(exist_ok=True)
    save_file({n: t.detach().to("cpu", torch.float32).contiguous() for n, t in scales.items()},
              directory / LEARNED_SCALES)


def read_learned_scales(ckpt: Path) -> dict | None:
    """A checkpoint's learned weight scales, or None when it was trained without them."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = ckpt / LEARNED_SCALES
    if not path.is_file():
        return None
    try:
        scales = load_file(path)
    except (SafetensorError, OSError) as e:
        raise InputError(f"{path} is truncated or corrupt ({str(e).splitlines()[0][:200]})") from None
    for name, value in scales.items():
        if fault := value_fault(value, nonzero=True):
            # negative ones are valid where the recipe's grid stores a signed scale (prepare checks that)
            raise InputError(f"{path}: {name} holds {fault}; learned scales are finite nonzero floats (the file "
                             f"was edited or damaged)")
    return scales


def save_trainer_state(directory: Path, state: dict[str, Any]) -> None:
    """One process's optimizer, scheduler and RNG state, for --resume."""
    import torch

    try:
        torch.save(state, directory / TRAINER_STATE)
    except RuntimeError as e:  # a full disk shows as torch.save's "unexpected pos" as often as an OSError
        raise OSError(str(e)) from None


def load_trainer_state(ckpt: Path) -> dict[str, Any]:
    """Optimizer, scheduler and RNG state for --resume, unpickled as plain data only."""
    import torch

    from forge_qat.formats.safe_load import UNSAFE_PICKLE

    path = ckpt / TRAINER_STATE
    if not path.is_file():
        raise InputError(f"--resume: {path} is missing; the checkpoint is incomplete, resume from an earlier one "
                         f"or start again with --overwrite")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except UNSAFE_PICKLE as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InputError(f"--resume: cannot load {path} as plain data (corrupt, truncated, or carrying code, which "
                         f"forge never runs): {first[:200]}") from None


_WEIGHT_FILE_RE = re.compile(r"^model(-\d{5}-of-\d{5})?\.safetensors(\.index\.json)?$")


def weight_files(ckpt: Path) -> list[Path]:
    """The float weight files of a checkpoint (shards and index)."""
    return sorted(p for p in ckpt.iterdir() if _WEIGHT_FILE_RE.match(p.name))
