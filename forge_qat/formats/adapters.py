"""LoRA adapters on disk, in PEFT's layout: `adapter/adapter_model.safetensors` + `adapter_config.json`, which
`peft` loads, and expert-stack pairs in a file beside them.

Written by the checkpoint writer (`forge_qat.train.checkpointing`); read by resume, finalize and eval.
"""

import json
from pathlib import Path

from forge_qat.errors import ConfigError, InputError
from forge_qat.formats.versioned import read_json_object
from forge_qat.formats.weights import value_fault
from forge_qat.lora.config import ADAPTER_ATTR, LoraConfig

ADAPTER_DIR = "adapter"
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_CONFIG = "adapter_config.json"
EXPERT_WEIGHTS = "forge_expert_adapters.safetensors"
"""Expert-stack pairs (experts, R, in)/(experts, out, R), under their state-dict names: PEFT's LoRA layout
has no per-expert pairs of a 3-D stack, so they are kept beside its file, which stays loadable by `peft`."""
_PEFT_PREFIX = "base_model.model."
_SUFFIX = {"lora_A": "lora_A.weight", "lora_B": "lora_B.weight"}


def to_peft(adapters: dict) -> tuple[dict, dict]:
    """Split state-dict-named adapter tensors into PEFT's keys (linear layers) and the expert-stack file's."""
    dense, stacks = {}, {}
    for name, tensor in adapters.items():
        layer, _, part = name.rpartition(f".{ADAPTER_ATTR}.")
        if "." in part:  # <experts>.forge_lora.<stack>.lora_A
            stacks[name] = tensor
        else:
            dense[f"{_PEFT_PREFIX}{layer}.{_SUFFIX[part]}"] = tensor
    return dense, stacks


def from_peft(dense: dict, stacks: dict) -> dict:
    """The inverse of `to_peft`: state-dict names."""
    out = dict(stacks)
    for key, tensor in dense.items():
        if not key.startswith(_PEFT_PREFIX) or not key.endswith((".lora_A.weight", ".lora_B.weight")):
            raise ConfigError(f"unexpected key in a LoRA adapter file: {key}")
        layer, part = key[len(_PEFT_PREFIX):-len(".weight")].rsplit(".", 1)
        out[f"{layer}.{ADAPTER_ATTR}.{part}"] = tensor
    return out


def peft_config(cfg: LoraConfig, peft_keys, base_model: str) -> dict:
    """adapter_config.json as `peft` reads it (`LoraConfig`): the adapted linear layers (the layers of
    `peft_keys`, the PEFT file's keys) by full module name."""
    layers = sorted({k[len(_PEFT_PREFIX):].rsplit(".", 2)[0] for k in peft_keys})
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
            "r": cfg.lora_rank, "lora_alpha": cfg.alpha, "lora_dropout": 0.0, "bias": "none",
            "target_modules": layers, "fan_in_fan_out": False, "inference_mode": True, "use_rslora": False,
            "init_lora_weights": True, "modules_to_save": None}


def has_adapters(directory: Path) -> bool:
    return (directory / ADAPTER_DIR).is_dir()


def write_adapters(directory: Path, adapters: dict) -> None:
    """LoRA adapters in PEFT's layout under `adapter/` (expert-stack pairs in a file beside it); its
    adapter_config.json is written by `write_adapter_config` from the run's settings."""
    from safetensors.torch import save_file

    folder = directory / ADAPTER_DIR
    folder.mkdir(exist_ok=True)
    dense, stacks = to_peft({n: t.detach().to("cpu").contiguous() for n, t in adapters.items()})
    save_file(dense, folder / PEFT_WEIGHTS)
    if stacks:
        save_file(stacks, folder / EXPERT_WEIGHTS)


def write_adapter_config(directory: Path, cfg: LoraConfig, base_model: str) -> None:
    from safetensors import safe_open

    folder = directory / ADAPTER_DIR
    with safe_open(folder / PEFT_WEIGHTS, "pt") as f:  # the names only: no tensor is read
        keys = list(f.keys())
    (folder / PEFT_CONFIG).write_text(json.dumps(peft_config(cfg, keys, base_model), indent=2) + "\n")


def read_adapters(ckpt: Path) -> dict | None:
    """A checkpoint's LoRA adapters by state-dict name, or None when it has none."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = ckpt / ADAPTER_DIR
    if not (folder / PEFT_WEIGHTS).is_file():
        return None
    try:
        stacks = load_file(folder / EXPERT_WEIGHTS) if (folder / EXPERT_WEIGHTS).is_file() else {}
        adapters = from_peft(load_file(folder / PEFT_WEIGHTS), stacks)
    except (SafetensorError, OSError) as e:
        raise InputError(f"{folder} is truncated or corrupt ({str(e).splitlines()[0][:200]})") from None
    except ConfigError as e:
        raise InputError(f"{folder}: {e}") from None
    for name, value in adapters.items():
        if fault := value_fault(value):
            raise InputError(f"{folder}: adapter {name} holds {fault}; adapters are finite floats (the file was "
                             f"edited or damaged, or the run diverged)")
    return adapters


def check_adapter_config(ckpt: Path, cfg: LoraConfig) -> None:
    """The `adapter_config.json` beside the adapters says what `peft` will apply (r, lora_alpha); it must be what
    the checkpoint trained with, which finalize and eval apply: an edited one would make them disagree."""
    path = ckpt / ADAPTER_DIR / PEFT_CONFIG
    if not path.is_file():
        return
    written = read_json_object(path, "PEFT's adapter config")
    trained = {"r": cfg.lora_rank, "lora_alpha": cfg.alpha}
    differ = [f"{k} {written.get(k)!r} (trained with {v!r})" for k, v in trained.items() if written.get(k) != v]
    if differ:
        raise InputError(f"{path} says {', '.join(differ)}: peft would apply other adapters than forge's finalize "
                         f"and eval; restore the file (the checkpoint's forge_checkpoint.json records the training)")
