"""Run the GPU suite and write a short report: `python tests/gpu/report.py [--out gpu-report.md]`.

Where a GPU is lent: runs `pytest tests/gpu` (every test's outcome), then times a training step of a
model large enough for the GPU to matter (hidden 1024, 8 layers, 4 x 1024 tokens, bf16 autocast) in
float and under each recipe's fake quantization, median of 10 steps after 3 warm-up steps, and writes
the device, versions, test outcomes and the QAT/float step-time ratios as Markdown.
"""

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

HERE = Path(__file__).parent


def run_suite(junit: Path) -> list[tuple[str, str, str]]:
    subprocess.run([sys.executable, "-m", "pytest", str(HERE), "-q", f"--junitxml={junit}"], check=False)
    rows = []
    for case in ET.parse(junit).getroot().iter("testcase"):
        outcome, detail = "passed", ""
        for kind in ("failure", "error", "skipped"):
            node = case.find(kind)
            if node is not None:
                outcome, detail = kind, (node.get("message") or "").splitlines()[0][:160] if node.get("message") else ""
        rows.append((f"{case.get('classname').rsplit('.', 1)[-1]}::{case.get('name')}", outcome, detail))
    return rows


def step_times() -> dict[str, float]:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from forge_qat.qat.prepare import prepare_qat
    from forge_qat.qat.registry import RECIPES

    config = LlamaConfig(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
                         num_attention_heads=16, num_key_value_heads=8, max_position_embeddings=2048)
    x = torch.randint(0, 32000, (4, 1024), device="cuda")
    times = {}
    for name in ["float", *RECIPES]:
        if name != "float" and RECIPES[name].missing_for_convert():
            continue
        torch.manual_seed(0)
        model = LlamaForCausalLM(config).cuda()
        if name != "float":
            prepare_qat(model, RECIPES[name])
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
        samples = []
        for i in range(13):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = model(input_ids=x, labels=x, use_cache=False).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            torch.cuda.synchronize()
            if i >= 3:
                samples.append(time.perf_counter() - t0)
        times[name] = statistics.median(samples)
        del model, opt
        torch.cuda.empty_cache()
    return times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("gpu-report.md"))
    args = p.parse_args()
    import torch
    import torchao
    import transformers

    if not torch.cuda.is_available():
        sys.exit("no CUDA GPU here: the GPU suite cannot run")
    with tempfile.TemporaryDirectory() as tmp:
        rows = run_suite(Path(tmp) / "junit.xml")
    times = step_times()
    lines = ["# GPU suite report", "",
             f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)} (compute capability "
             f"{'.'.join(map(str, torch.cuda.get_device_capability(0)))}); torch {torch.__version__}, torchao "
             f"{torchao.__version__}, transformers {transformers.__version__}", "",
             "| test | outcome | detail |", "|---|---|---|"]
    lines += [f"| `{name}` | {outcome} | {detail} |" for name, outcome, detail in rows]
    lines += ["", "Training step, Llama shape (hidden 1024, 8 layers), 4 x 1024 tokens, bf16 autocast, median of 10:",
              "", "| model | step | vs float |", "|---|---|---|"]
    lines += [f"| {name} | {t * 1e3:.1f} ms | {t / times['float']:.2f}x |" for name, t in times.items()]
    args.out.write_text("\n".join(lines) + "\n")
    print(args.out.read_text())


if __name__ == "__main__":
    main()
