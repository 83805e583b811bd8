"""Shared fixtures: tiny models built from configs, tiny data files, a clean torch state per test."""

import json
import logging

import pytest
import torch

for _noisy in ("torchao", "torch.utils._pytree", "torchao.kernel.intmm"):
    logging.getLogger(_noisy).setLevel(logging.ERROR)


@pytest.fixture(autouse=True, scope="session")
def _data_cache(tmp_path_factory):
    """Tokenized data goes to one cache per test session (inherited by the CLI and rank subprocesses),
    never to the user's ~/.cache."""
    import os

    path = tmp_path_factory.mktemp("data-cache")
    previous = os.environ.get("FORGE_DATA_CACHE")
    os.environ["FORGE_DATA_CACHE"] = str(path)
    yield path
    if previous is None:
        os.environ.pop("FORGE_DATA_CACHE", None)
    else:
        os.environ["FORGE_DATA_CACHE"] = previous


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


def partition_everything(directory) -> str:
    """A DeepSpeed config that partitions every parameter: by default ZeRO-3 keeps parameters of up to 1e5
    elements whole on every rank, which on these tiny models would be all learned scales."""
    path = directory / "ds_partition_all.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}))
    return str(path)


def per_expert_reference(module, pairs, chosen, weights, x):
    """What a Qwen3-MoE experts `module` computes for routing (`chosen`, `weights`), with each expert's two
    projections given as `pairs[e]["up"]`, `pairs[e]["down"]` (layers standing in for its stack slices)."""
    out = torch.zeros_like(x)
    for e, pair in enumerate(pairs):
        token, pos = torch.where(chosen == e)
        if len(token):
            gate, up = pair["up"](x[token]).chunk(2, dim=-1)
            h = pair["down"](module.act_fn(gate) * up) * weights[token, pos, None]
            out.index_add_(0, token, h)
    return out


MOE_SHAPES = {
    # 2 layers, 4 experts, top-2; dimensions multiples of the int4 group size (32).
    "qwen3_moe": dict(hidden_size=64, intermediate_size=64, moe_intermediate_size=32, num_experts=4,
                      num_experts_per_tok=2, head_dim=16, norm_topk_prob=True),  # as Qwen3-30B-A3B
    "mixtral": dict(hidden_size=64, intermediate_size=32, num_local_experts=4, num_experts_per_tok=2, head_dim=16),
}


def tiny_moe(model_type, seed=0):
    """A tiny MoE model of `model_type` from its transformers config, with the byte tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from forge_qat.models import byte_tokenizer

    tok = byte_tokenizer()
    cfg = AutoConfig.for_model(model_type, vocab_size=len(tok), num_hidden_layers=2, num_attention_heads=4,
                               num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False,
                               bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                               pad_token_id=tok.pad_token_id, **MOE_SHAPES[model_type])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    return model, tok


def save_tiny_moe(path, model_type, layout, seed=0, max_shard_size="10GB"):
    """Save a tiny MoE model in a checkpoint layout: "per-expert" (what transformers' save_pretrained and
    published checkpoints write: experts.0.gate_proj.weight, ...) or "fused" (the model's own 3-D stacks)."""
    from safetensors.torch import save_file

    model, tok = tiny_moe(model_type, seed)
    model.save_pretrained(path, max_shard_size=max_shard_size)
    tok.save_pretrained(path)
    if layout == "fused":
        for f in list(path.glob("model*.safetensors*")):
            f.unlink()
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path / "model.safetensors",
                  metadata={"format": "pt"})
    return model


class CrashAt:
    """A training observer that raises at `step` (a crash after the checkpoints before it)."""

    def __init__(self, step):
        self.step = step

    def on_data_progress(self, label, done_bytes, total_bytes): ...
    def on_start(self, total_steps, start_step): ...
    def on_checkpoint(self, path): ...
    def on_end(self): ...

    def on_step(self, record):
        if record["step"] == self.step:
            raise RuntimeError("simulated crash")


EXPERT_STACKS = {"gate_up_proj": "up", "down_proj": "down"}
"""A Qwen3-MoE experts module's stacks, by the short names `per_expert_reference` gives their layers."""


def expert_linears(module, e):
    """Expert `e` of a Qwen3-MoE experts `module` as two float `nn.Linear`s ("up", "down") holding copies of its
    stack slices: the per-expert reference layers tests prepare and compare with the stacks."""
    pair = torch.nn.ModuleDict({short: torch.nn.Linear(getattr(module, stack).shape[2],
                                                       getattr(module, stack).shape[1], bias=False)
                                for stack, short in EXPERT_STACKS.items()})
    for stack, short in EXPERT_STACKS.items():
        pair[short].weight.data = getattr(module, stack).data[e].clone()
    return pair


def fits_tiny_moe(recipe) -> bool:
    """Whether a recipe's weight groups fit the tiny MoE models' rows (64 and 96 wide): groups of up to 32. The
    w4a16 recipes with groups of 64 and 128 run the same code as w4a16-g32, which these tests cover."""
    return (recipe.group_size or 0) <= 32
