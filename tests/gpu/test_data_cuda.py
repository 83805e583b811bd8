"""Packed sequences on CUDA: documents stay apart under the attention kernels a GPU runs. Skipped without a
GPU (this repository's CI has none); run where one is lent: `python -m pytest tests/gpu`."""

import importlib.util
import json

import pytest
import torch

from forge_qat.data.build import DataOptions
from forge_qat.data.encode import IGNORE_INDEX
from forge_qat.data.store import model_inputs, open_token_store
from forge_qat.models import preset_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

TEXTS = ["The first document is here.", "A second, shorter one.", "And a third document that runs on a while."]


def _store(tmp_path, tok):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    return open_token_store(str(path), tok, 32, DataOptions(cache_dir=tmp_path / "cache", workers=1))


def _separate_loss(model, tokens) -> float:
    """Token-weighted loss of every document piece run alone."""
    total, count = 0.0, 0
    for row in range(tokens["input_ids"].shape[0]):
        pos = tokens["position_ids"][row]
        starts = [*(pos == 0).nonzero().flatten().tolist(), len(pos)]
        for a, b in zip(starts, starts[1:], strict=False):
            piece = {k: v[row:row + 1, a:b].cuda() for k, v in tokens.items() if k != "position_ids"}
            n = int((piece["labels"][:, 1:] != IGNORE_INDEX).sum())
            if n:
                total += model(**piece, use_cache=False).loss.item() * n
                count += n
    return total / count


@pytest.mark.parametrize("implementation", ["sdpa", "flash_attention_2"])
def test_packed_loss_equals_documents_alone_on_cuda(tmp_path, implementation):
    if implementation == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        pytest.skip("flash-attn is not installed")
    model, tok = preset_model("micro-llama")
    dtype = torch.bfloat16 if implementation.startswith("flash") else torch.float32
    model = model.to("cuda", dtype).eval()
    model.set_attn_implementation(implementation)
    store = _store(tmp_path, tok)
    idx = torch.arange(len(store))
    with torch.no_grad():
        packed = model(**model_inputs(store, idx, model, torch.device("cuda"))).loss.item()
        alone = _separate_loss(model, store.batch(idx))
    assert packed == pytest.approx(alone, rel=2e-2 if dtype == torch.bfloat16 else 1e-5)
