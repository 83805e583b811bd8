"""llama.cpp against forge's fake-quant model, logit for logit, on tiny random models of every architecture the
GGUF export covers, for the recipe that trains with llama.cpp's numerics (`llama-cpp-q4-0`).

    pip install -e '.[export]' llama-cpp-python
    python bench/gguf_tiny_parity.py [--seeds 0 1 2 3]

Each model (2 layers, hidden 64, the tests' shapes) is converted, exported and run by llama.cpp with a float32
KV cache; the fake-quant model is the float model prepared with the recipe. The tests' byte tokenizer has no
BPE merges, which llama.cpp requires of a BPE vocabulary (and the gguf package writes no empty array), so one
placeholder merge is added to the file here; it does not touch the logits of the token ids evaluated.
"""

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from forge_qat.logs import quiet_libraries

quiet_libraries("transformers", "forge_qat")

RECIPE = "llama-cpp-q4-0"
DENSE = {"llama": {}, "qwen2": {}, "qwen3": {"head_dim": 16}, "mistral": {"head_dim": 16}}
MOE = {"qwen3_moe": dict(intermediate_size=64, moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2,
                         head_dim=16, norm_topk_prob=True),
       "mixtral": dict(intermediate_size=32, num_local_experts=4, num_experts_per_tok=2, head_dim=16)}


def _model(path: Path, model_type: str, seed: int) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM

    from forge_qat.models import byte_tokenizer

    tok = byte_tokenizer()
    shape = {"intermediate_size": 128, **DENSE.get(model_type, {}), **MOE.get(model_type, {})}
    cfg = AutoConfig.for_model(model_type, vocab_size=len(tok) + 5, hidden_size=64, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                               tie_word_embeddings=model_type == "llama", bos_token_id=tok.bos_token_id,
                               eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **shape)
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def compare(root: Path, model_type: str, seed: int, ids: list[int]) -> float:
    import gguf
    from llama_cpp import Llama
    from transformers import AutoModelForCausalLM

    from forge_qat.export.gguf import export_gguf
    from forge_qat.finalize.convert import finalize
    from forge_qat.finalize.job import FinalizeRequest
    from forge_qat.qat.prepare import prepare_qat
    from forge_qat.qat.registry import get_recipe

    src = _model(root / f"{model_type}-{seed}", model_type, seed)
    art = finalize(FinalizeRequest(source=src, dest=root / f"{model_type}-{seed}-artifact",
                                   ptq=get_recipe(RECIPE), ptq_scales="absmax")).dest  # as the fake-quant model
    add = gguf.SpecialVocab.add_to_gguf

    def with_a_merge(self, writer, quiet=False):
        self.merges = self.merges or ["a b"]
        return add(self, writer, quiet=quiet)

    gguf.SpecialVocab.add_to_gguf = with_a_merge
    try:
        export_gguf(art, root / f"{model_type}-{seed}.gguf")
    finally:
        gguf.SpecialVocab.add_to_gguf = add
    llm = Llama(model_path=str(root / f"{model_type}-{seed}.gguf"), n_ctx=32, logits_all=True, verbose=False,
                type_k=0, type_v=0)  # GGML_TYPE_F32 cache: forge's attention is float32
    llm.eval(ids)
    got = torch.from_numpy(np.array(llm.scores[: len(ids)], dtype=np.float32))
    fake = AutoModelForCausalLM.from_pretrained(src).eval()
    prepare_qat(fake, get_recipe(RECIPE))
    with torch.no_grad():
        want = fake(torch.tensor([ids])).logits[0]
    return float((got - want).abs().max())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    args = ap.parse_args()
    torch.set_num_threads(2)
    ids = [5, 6, 7, 8, 9, 10]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for model_type in [*DENSE, *MOE]:
            results[model_type] = [compare(Path(tmp), model_type, seed, ids) for seed in args.seeds]
            print(model_type, " ".join(f"seed {s}: {d:.1e}" for s, d in zip(args.seeds, results[model_type],
                                                                              strict=True)), flush=True)
    print(json.dumps({"seeds": args.seeds, "max_abs_logit_diff": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
