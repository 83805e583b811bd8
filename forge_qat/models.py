"""Model and tokenizer loading: local Hugging Face directories and built-in tiny presets.

Called by training, finalize and eval. Presets are Llama-style configs built from scratch (no hub
access) with a byte-level tokenizer that covers any text and saves as a stock HF tokenizer.
"""

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, PreTrainedTokenizerBase

from forge_qat.errors import InputError, choices_message

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


def preset_model(name: str, seed: int = 0) -> tuple[torch.nn.Module, PreTrainedTokenizerBase]:
    tok = byte_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tok), max_position_embeddings=2048, tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        **PRESETS[name],
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model, tok


@dataclass(frozen=True, slots=True)
class ModelSource:
    """Where a model came from: a preset name or a directory."""

    spec: str

    @property
    def is_preset(self) -> bool:
        return self.spec in PRESETS


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


def load_model(spec: str, seed: int = 0) -> tuple[torch.nn.Module, PreTrainedTokenizerBase]:
    """Float32 model and tokenizer from a preset name or a local HF directory."""
    if spec in PRESETS:
        return preset_model(spec, seed)
    path = Path(spec)
    if not path.exists() and "/" not in spec and not spec.startswith("."):
        raise InputError(choices_message("model preset", spec, list(PRESETS))
                         + " (or give a local model directory)")
    check_model_dir(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise InputError(f"model directory {path} has no usable tokenizer: {e}") from None
    # MoE artifacts of int4 recipes select experts through an operator torchao 0.18 lacks.
    import forge_qat.torchao_compat  # noqa: F401

    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    except (OSError, ValueError, KeyError) as e:
        raise InputError(f"cannot load model from {path}: {e}") from None
    return model, tokenizer
