"""The numerics figures quoted in docs/design.md, reproduced in one run.

1. torch.aminmax vs separate amin + amax on the row shapes fake quantization reduces over
   (why forge_qat.qat.fake_quant uses two reductions).
2. int8 x int8 fake quantization vs the converted Int8Tensor model: scaling before the matmul
   (F.linear(fq(x), fq(w)), "naive") against forge's integer-grid linear, as a fraction of the
   float-vs-converted gap (target < 5%), plus the naive single-layer rounding difference.

    python bench/numerics.py
"""

import statistics
import time

import torch

from forge_qat.logs import quiet_libraries  # noqa: E402

quiet_libraries()

from torchao.quantization.qat import FakeQuantizedLinear  # noqa: E402

from forge_qat.models import preset_model  # noqa: E402
from forge_qat.qat.convert import convert_qat  # noqa: E402
from forge_qat.qat.fake_quant import IntegerGridFakeQuantizedLinear  # noqa: E402
from forge_qat.qat.prepare import prepare_qat  # noqa: E402
from forge_qat.qat.registry import get_recipe  # noqa: E402

RECIPE = "int8-dynamic-act-int8-weight"


def median_ms(fn, calls: int = 30, rounds: int = 5) -> float:
    fn()
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - t) / calls * 1e3)
    return statistics.median(times)


def reductions() -> None:
    print("torch.aminmax vs amin + amax (median ms):")
    for shape in [(1536 * 576 // 32, 32), (1024, 576), (1024, 1536)]:
        x = torch.randn(shape)
        both = median_ms(lambda x=x: torch.aminmax(x, dim=-1, keepdim=True))
        split = median_ms(lambda x=x: (x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)))
        print(f"  {str(shape):14s} aminmax {both:.3f}  amin+amax {split:.3f}  ({both / split:.1f}x slower)")


def int8_gaps() -> None:
    print(f"{RECIPE}: fake-vs-converted max logit gap as a fraction of float-vs-converted:")
    for preset in ("micro-llama", "tiny-llama"):
        model, tok = preset_model(preset, seed=0)
        model.eval()
        x = torch.randint(0, len(tok), (2, 48), generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            ref = model(x).logits
            prepare_qat(model, get_recipe(RECIPE))
            grid = model(x).logits
            layers = [m for m in model.modules() if isinstance(m, IntegerGridFakeQuantizedLinear)]
            for m in layers:  # the same quantizers, scaled before the matmul
                m.__class__ = FakeQuantizedLinear
            naive = model(x).logits
            convert_qat(model, get_recipe(RECIPE))
            real = model(x).logits
        gap = (ref - real).abs().max().item()
        print(f"  {preset:12s} naive {(naive - real).abs().max().item() / gap:.1%}   "
              f"integer grid {(grid - real).abs().max().item() / gap:.1%}")
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 64, bias=False)
    x = torch.randn(2, 5, 64)
    holder = torch.nn.ModuleDict({"l": lin})
    prepare_qat(holder, get_recipe(RECIPE))
    with torch.no_grad():
        grid_out = holder["l"](x)
        holder["l"].__class__ = FakeQuantizedLinear
        naive_out = holder["l"](x)
    print(f"  one 64x64 layer: naive vs integer grid differ by {(naive_out - grid_out).abs().max().item():.1e}")


if __name__ == "__main__":
    reductions()
    int8_gaps()
