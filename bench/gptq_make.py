"""GPTQ W4A16 (int4 per group of 128, symmetric) of a float checkpoint with llm-compressor: the post-training
quantization a vLLM user would run instead of QAT (issue 33). Runs in llm-compressor's own venv (it pins
transformers <= 5.17 and compressed-tensors 0.19; never a forge dependency), imports nothing of forge_qat, and
writes a compressed-tensors model directory that bench/quality_vs_gptq.py scores next to forge's rows.

    python -m venv /tmp/gptq-venv && /tmp/gptq-venv/bin/pip install torch==2.13.0 && \\
        /tmp/gptq-venv/bin/pip install llmcompressor==0.14.0.1
    /tmp/gptq-venv/bin/python bench/gptq_make.py --model CKPT --calibration TRAIN.jsonl --out DIR

Calibration: `--samples` windows of `--seq-len` tokens cut from the training split's documents joined (the
split the fine-tune trained on), GPTQ's defaults otherwise (block 128, dampening 0.01, activation ordering as
llm-compressor's W4A16 preset sets it); the output head stays float, as forge's w4a16 recipe keeps it.
"""

import argparse
import json
from pathlib import Path

import torch
from datasets import Dataset
from llmcompressor import oneshot
from llmcompressor.modifiers.quantization import GPTQModifier
from transformers import AutoModelForCausalLM, AutoTokenizer


def windows(tokenizer, path: Path, samples: int, seq_len: int) -> Dataset:
    texts = [json.loads(line)["text"] for line in path.read_text().splitlines() if line.strip()]
    ids = tokenizer("\n\n".join(texts))["input_ids"]
    cut = [ids[i * seq_len:(i + 1) * seq_len] for i in range(min(samples, len(ids) // seq_len))]
    return Dataset.from_dict({"input_ids": cut, "attention_mask": [[1] * seq_len for _ in cut]})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--calibration", type=Path, required=True, help="JSON Lines with a text field")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--group-size", type=int, default=128)
    args = ap.parse_args()
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32, trust_remote_code=False)
    scheme = "W4A16" if args.group_size == 128 else {
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": {
            "num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": args.group_size}}}}
    recipe = (GPTQModifier(targets="Linear", scheme=scheme, ignore=["lm_head"]) if isinstance(scheme, str) else
              GPTQModifier(ignore=["lm_head"], **scheme))
    data = windows(tokenizer, args.calibration, args.samples, args.seq_len)
    oneshot(model=model, dataset=data, recipe=recipe, max_seq_length=args.seq_len,
            num_calibration_samples=len(data), shuffle_calibration_samples=False)
    model.save_pretrained(args.out, save_compressed=True)
    tokenizer.save_pretrained(args.out)
    print(f"wrote {args.out}: GPTQ W4A16 g{args.group_size}, {len(data)} x {args.seq_len} calibration tokens")


if __name__ == "__main__":
    main()
