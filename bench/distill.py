"""What distillation costs a QAT training step: time and memory, measured as ratios in one run.

Variants on the same model and batch, interleaved round by round so machine noise hits all alike:
  qat         cross-entropy on the fake-quantized student (int8-dynamic-act-int4-weight)
  kd-float    + KL to a frozen float copy of the starting model (--kd-teacher float)
  kd-self     + KL to the student with fake quantization off (--kd-teacher self: no copy, one more forward)
Step = forward(s) and backward through forge_qat.distill.objective's objective, fp32. Memory: the peak resident
memory of one step above the resident memory before it (VmHWM after a reset, bench/memory.py), and the
teacher copy's bytes.

    python bench/distill.py                      # SmolLM2-135M shape, 8 layers, batch 4x256
    python bench/distill.py --layers 2 --rounds 2  # quick look
"""

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from forge_qat.logs import quiet_libraries  # noqa: E402

quiet_libraries()

from memory import peak_rss_bytes, reset_peak, rss_bytes  # noqa: E402
from train_step import smollm_shape  # noqa: E402
from transformers import LlamaForCausalLM  # noqa: E402

from forge_qat.distill.objective import Distillation, LanguageModelLoss  # noqa: E402
from forge_qat.qat.prepare import prepare_qat  # noqa: E402
from forge_qat.qat.registry import DEFAULT_RECIPE, get_recipe  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()

    torch.manual_seed(0)
    model = LlamaForCausalLM(smollm_shape(args.layers))
    teacher = copy.deepcopy(model).requires_grad_(False).eval()
    prepare_qat(model, get_recipe(DEFAULT_RECIPE))
    x = torch.randint(0, 49152, (args.batch, args.seq), generator=torch.Generator().manual_seed(1))
    batch = {"input_ids": x, "labels": x, "use_cache": False}
    objectives = {"qat": LanguageModelLoss(), "kd-float": Distillation("kl", 1.0, 1.0, 1.0, 50, teacher),
                  "kd-self": Distillation("kl", 1.0, 1.0, 1.0, 50, None)}

    def step(name: str) -> tuple[float, int]:
        before = rss_bytes()
        reset_peak()
        t0 = time.perf_counter()
        loss, _ = objectives[name](model, batch, fake_quant=True)
        loss.backward()
        elapsed = time.perf_counter() - t0
        model.zero_grad(set_to_none=True)
        return elapsed, peak_rss_bytes() - before

    for name in objectives:  # warm-up
        step(name)
    times, peaks = {n: [] for n in objectives}, {n: [] for n in objectives}
    for _ in range(args.rounds):
        for name in objectives:
            t, m = step(name)
            times[name].append(t)
            peaks[name].append(m)
    med = {n: statistics.median(v) for n, v in times.items()}
    teacher_bytes = sum(t.numel() * t.element_size() for t in teacher.state_dict().values())
    print(f"SmolLM2-135M shape, {args.layers} layers, batch {args.batch}x{args.seq}, fp32, "
          f"median of {args.rounds} interleaved rounds; teacher copy {teacher_bytes / 1e6:.0f} MB")
    for name in objectives:
        print(f"  {name:9s} {med[name]:.3f} s ({med[name] / med['qat']:.2f}x)  "
              f"step peak above start {max(peaks[name]) / 1e6:6.0f} MB")
    print(json.dumps({"median_s": med, "ratio": {n: med[n] / med["qat"] for n in med},
                      "step_peak_bytes": {n: max(v) for n, v in peaks.items()}, "teacher_bytes": teacher_bytes,
                      "args": vars(args)}))


if __name__ == "__main__":
    main()
