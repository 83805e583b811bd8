"""Shared fixtures: tiny models built from configs, tiny data files, a clean torch state per test."""

import json
import logging

import pytest
import torch

for _noisy in ("torchao", "torch.utils._pytree", "torchao.kernel.intmm"):
    logging.getLogger(_noisy).setLevel(logging.ERROR)


@pytest.fixture(autouse=True)
def _clean_torch_state():
    dtype, seed_state = torch.get_default_dtype(), torch.get_rng_state()
    yield
    torch.set_default_dtype(dtype)
    torch.set_rng_state(seed_state)


@pytest.fixture
def text_file(tmp_path):
    from pydoc_data.topics import topics

    path = tmp_path / "train.txt"
    path.write_text(topics["if"] + topics["while"] + topics["for"])
    return path


@pytest.fixture
def chat_file(tmp_path):
    path = tmp_path / "chat.jsonl"
    rows = [{"messages": [{"role": "user", "content": f"What is {i} + {i}?"},
                          {"role": "assistant", "content": f"{i} + {i} = {2 * i}."}]} for i in range(40)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def micro_train_args(output_dir, data, **extra):
    """Keyword overrides for a fast TrainConfig on the micro preset."""
    args = dict(model="micro-llama", data=str(data), eval_data="none", output_dir=str(output_dir),
                max_steps=4, batch_size=2, seq_len=32, warmup_steps=1, eval_every=0, save_every=2,
                precision="fp32")
    args.update(extra)
    return args
