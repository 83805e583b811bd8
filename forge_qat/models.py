"""Model and tokenizer loading: local Hugging Face directories and built-in tiny presets.

Called by training, finalize and eval. Presets are Llama-style configs built from scratch (no hub
access) with a byte-level tokenizer that covers any text and saves as a stock HF tokenizer.
"""

import logging
import pickle
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, PretrainedConfig, PreTrainedTokenizerBase

from forge_qat.errors import InputError, choices_message, library_message
from forge_qat.formats.weights import TensorReader

log = logging.getLogger(__name__)

PRESETS: dict[str, dict] = {
    # ~3.4M parameters: the embedded demo, trains in minutes on 2 CPU cores.
    "tiny-llama": dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=2),
    # ~0.1M parameters: for tests.
    "micro-llama": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2),
}

CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


def byte_tokenizer() -> PreTrainedTokenizerBase:
    """A 259-token byte-level tokenizer (256 bytes + bos/eos/pad) with a simple chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    core = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    tok.chat_template = CHAT_TEMPLATE
    return tok


PRESET_MAX_POSITIONS = 2048


def preset_model(name: str, seed: int = 0) -> tuple[torch.nn.Module, PreTrainedTokenizerBase]:
    tok = byte_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tok), max_position_embeddings=PRESET_MAX_POSITIONS, tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        **PRESETS[name],
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model, tok


def is_preset(spec: str) -> bool:
    return spec in PRESETS


@dataclass(frozen=True, slots=True)
class ModelSource:
    """A model to train, before any weights are placed: what engines materialize it from."""

    spec: str
    """A preset name or a model directory."""
    seed: int
    config: PretrainedConfig
    tokenizer: PreTrainedTokenizerBase
    reader: TensorReader | None
    """The starting weights, on the rank that reads them (None on the others)."""


def open_model_source(spec: str, seed: int = 0, *, reads: bool = True) -> ModelSource:
    """Config and tokenizer of `spec`, and with `reads` a reader over its starting weights (a preset's are
    made from `seed`; a directory's are read from its safetensors shards one tensor at a time)."""
    if spec in PRESETS:
        # Every rank builds the same config and tokenizer; the reading rank keeps the (tiny) seeded weights,
        # so they equal a single-process run's exactly.
        reference, tokenizer = preset_model(spec, seed)
        return ModelSource(spec, seed, reference.config, tokenizer, _state_reader(reference) if reads else None)
    path = _model_dir(spec)
    return ModelSource(spec, seed, load_config(path), load_tokenizer(path), weights_reader(spec) if reads else None)


def weights_reader(spec: str, seed: int = 0) -> TensorReader:
    """A reader over the starting weights of `spec` that reads nothing until asked (a directory's safetensors
    headers only): for a rank that reads a part of them itself, as expert parallelism's ranks read their
    experts."""
    from forge_qat.formats.weights import SafetensorsReader

    if spec in PRESETS:
        return _state_reader(preset_model(spec, seed)[0])
    return SafetensorsReader.from_dir(_model_dir(spec))


def _state_reader(model: torch.nn.Module) -> TensorReader:
    from forge_qat.formats.weights import StateDictSource

    return StateDictSource(model.state_dict())


def is_quantized_artifact(path: Path) -> bool:
    """Whether `path` holds a finalized artifact (config with a quantization_config), read as JSON only."""
    import json

    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and "quantization_config" in config


def check_model_dir(path: Path) -> None:
    """Raise a clear error unless `path` is an HF model directory with safetensors weights."""
    if not path.exists():
        raise InputError(f"model {path} does not exist; give a model directory or one of the presets: "
                         f"{', '.join(PRESETS)}")
    if not path.is_dir():
        raise InputError(f"model {path} is not a directory")
    if not (path / "config.json").is_file():
        raise InputError(f"model directory {path} has no config.json")
    if not any(path.glob("*.safetensors")) and not any(path.glob("pytorch_model*.bin")):
        raise InputError(f"model directory {path} has no *.safetensors (or finalized pytorch_model*.bin) weights")


def load_config(path: Path):
    """A model directory's config; never runs code from it (`auto_map` models are refused)."""
    from transformers import AutoConfig

    from forge_qat.formats.versioned import read_json_object

    read_json_object(path / "config.json", "a model config")  # a clear line where transformers' is not
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=False)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        if "custom code" in str(e):
            raise InputError(f"{path}: its model type is implemented only by the directory's own Python code "
                             f"(auto_map), which forge never runs; use an architecture transformers ships") from None
        raise InputError(f"cannot read the model config in {path}: {library_message(e)}") from None
    if getattr(config, "auto_map", None):
        log.warning("%s declares its own Python code (auto_map); forge never runs code from a model directory and "
                    "uses transformers' built-in %s implementation", path, config.model_type)
    return config


def load_tokenizer(path: Path) -> PreTrainedTokenizerBase:
    """A model directory's tokenizer; never runs code from it."""
    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise InputError(f"model directory {path} has no usable tokenizer: {library_message(e)}") from None


def load_model_tokenizer(spec: str) -> tuple[PreTrainedTokenizerBase, int | None]:
    """The tokenizer `load_model(spec)` would return and the model's max_position_embeddings, without
    loading weights: training checks its options and prepares its data before the model loads."""
    if spec in PRESETS:
        return byte_tokenizer(), PRESET_MAX_POSITIONS
    return load_tokenizer(_model_dir(spec)), max_positions(spec)


def max_positions(spec: str) -> int | None:
    """The model's max_position_embeddings, from its config alone (a preset's: `PRESET_MAX_POSITIONS`)."""
    if spec in PRESETS:
        return PRESET_MAX_POSITIONS
    return getattr(load_config(_model_dir(spec)), "max_position_embeddings", None)


def _model_dir(spec: str) -> Path:
    """The checked model directory `spec` names (a bare word that is no directory is a mistyped preset)."""
    path = Path(spec)
    if not path.exists() and "/" not in spec and not spec.startswith("."):
        raise InputError(choices_message("model preset", spec, list(PRESETS)) + " (or give a local model directory)")
    check_model_dir(path)
    return path


def load_model(spec: str, seed: int = 0, dtype: torch.dtype = torch.float32,
               device: torch.device | str = "cpu") -> tuple[torch.nn.Module, PreTrainedTokenizerBase]:
    """Model (float32 on the CPU unless asked otherwise) and tokenizer from a preset or a local HF directory."""
    if spec in PRESETS:
        model, tok = preset_model(spec, seed)
        return model.to(device, dtype), tok
    path = _model_dir(spec)
    load_config(path)  # a clear error (and no code run) before the weights are touched
    tokenizer = load_tokenizer(path)
    # MoE artifacts of int4 recipes select experts through an operator torchao 0.18 lacks.
    from safetensors import SafetensorError

    import forge_qat.torchao_compat  # noqa: F401

    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=False)
    except pickle.UnpicklingError:
        raise InputError(f"{path}: a .bin weights file holds more than plain tensors (code, which forge never "
                         f"runs); use safetensors weights") from None
    except (SafetensorError, OSError, ValueError, KeyError, RuntimeError, RecursionError, TypeError) as e:
        if isinstance(e, SafetensorError):
            from forge_qat.formats.weights import SafetensorsReader

            SafetensorsReader.from_dir(path)  # names the broken shard when its header is what is broken
        raise InputError(f"cannot load model from {path} (a truncated or corrupt weights file?): "
                         f"{library_message(e)}") from None
    return (model if torch.device(device).type == "cpu" else model.to(device)), tokenizer
