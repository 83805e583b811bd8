"""`--experts-offload host` (forge_qat/qat/host_experts.py): a LoRA run's frozen expert stacks held in host memory in
their grid and computed there. Checked against the same experts computed in place (the grid base of
tests/test_lora_grid.py, itself checked against the float base): losses, logits and every adapter's gradient, with
and without gradient checkpointing, and that checkpointing's rerun does not compute the experts again."""

import pytest
import torch
from conftest import micro_train_args, save_tiny_moe, tiny_moe

from forge_qat.config import TrainConfig
from forge_qat.errors import ConfigError
from forge_qat.lora import adapters as lora
from forge_qat.lora import grid_base
from forge_qat.qat import experts as experts_mod
from forge_qat.qat import host_experts
from forge_qat.qat.grid import FrozenGrid
from forge_qat.qat.prepare import prepare_qat
from forge_qat.qat.registry import get_recipe
from forge_qat.train.trainer import run_training

RECIPE = "int8-dynamic-act-int4-weight"


def _model(model_type: str, targets: str, offload: bool, checkpointing: bool = False):
    model, _ = tiny_moe(model_type)
    coverage = prepare_qat(model, get_recipe(RECIPE))
    lora.install(model, lora.LoraConfig(lora_rank=4, lora_qat="separate", lora_targets=targets),
                 list(coverage.linears), coverage.experts)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in lora.adapter_parameters(model).items():
            if name.endswith("lora_B"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    grid_base.install(model, list(coverage.linears), coverage.experts)
    report = grid_base.offload_experts(model) if offload else None
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model.train(), report


@pytest.fixture
def count_expert_forwards(monkeypatch):
    """How many times an experts module computed its experts (the eager loop or the batched kernel)."""
    calls = []
    real = experts_mod._fake_quant_forward

    def counted(module, *args):
        calls.append(host_experts.computing_on_host())
        return real(module, *args)

    monkeypatch.setattr(experts_mod, "_fake_quant_forward", counted)
    return calls


@pytest.mark.parametrize("model_type,targets", [("qwen3_moe", "attention,mlp,experts"), ("mixtral", "attention")])
@pytest.mark.parametrize("checkpointing", [None, "early stop", "whole rerun"])
def test_offloaded_experts_train_as_the_experts_in_place(model_type, targets, checkpointing, count_expert_forwards):
    """Checkpointing reruns a decoder layer in backward up to the last tensor it needs: with torch's early stop (its
    default) that is before the experts (their host node saves nothing on the accelerator), without it (a layer that
    needs tensors after its experts, e.g. a shared expert after the routed ones) through them."""
    from torch.utils.checkpoint import set_checkpoint_early_stop

    ids = torch.randint(0, 259, (2, 16), generator=torch.Generator().manual_seed(3))
    results = []
    for offload in (False, True):
        model, report = _model(model_type, targets, offload, checkpointing is not None)
        count_expert_forwards.clear()
        with set_checkpoint_early_stop(checkpointing != "whole rerun"):
            out = model(ids, labels=ids)
            out.loss.backward()
        results.append((out.loss.detach(), out.logits.detach(),
                        {n: p.grad for n, p in lora.adapter_parameters(model).items()}))
        if offload:
            assert report.modules == 2 and report.stacks == 4
            assert report.params == sum(g.shape[0] * g.shape[1] * g.shape[2] for m in model.modules()
                                        if isinstance(m, FrozenGrid) and m.on_host for g in [m])
            # every layer's experts computed once, on the host, checkpointing's rerun included
            assert count_expert_forwards == [True, True]
    (la, za, ga), (lb, zb, gb) = results
    assert torch.equal(lb, la) and torch.equal(zb, za)
    assert ga.keys() == gb.keys() and any(".experts." in n for n in ga) == ("experts" in targets)
    for name in ga:
        torch.testing.assert_close(gb[name], ga[name], rtol=1e-5, atol=1e-8, msg=name)


def test_without_grad_the_offloaded_experts_compute_on_the_host_too(count_expert_forwards):
    ids = torch.randint(0, 259, (1, 12), generator=torch.Generator().manual_seed(4))
    logits = []
    for offload in (False, True):
        model, _ = _model("qwen3_moe", "attention,experts", offload)
        count_expert_forwards.clear()
        with torch.no_grad():
            logits.append(model.eval()(ids).logits)
        assert count_expert_forwards == [offload, offload]
    assert torch.equal(logits[0], logits[1])


def test_the_offloaded_grids_stay_on_the_host_when_the_model_moves():
    """What `.to(device)` and forge's own move (`grid_base.to_device`'s buffers) do to a model whose experts are
    offloaded: everything moves but the experts' grids (the meta device stands in for an accelerator here)."""
    model, report = _model("qwen3_moe", "attention,experts", offload=True)
    dense = next(m for name, m in model.named_modules() if isinstance(m, FrozenGrid) and ".experts." not in name)
    grid_base.move_buffers(model, torch.device("meta"))
    pinned = [m for m in model.modules() if isinstance(m, FrozenGrid) and m.on_host]
    assert len(pinned) == 4 and all(m.codes.device.type == "cpu" and m.scale.device.type == "cpu" for m in pinned)
    assert dense.codes.is_meta and not dense.on_host
    assert host_experts.host_bytes(model) == report.host_bytes == sum(m.nbytes() for m in pinned)
    model.to("meta")
    assert all(m.codes.device.type == "cpu" for m in pinned)
    assert all(p.is_meta for n, p in model.named_parameters() if "lora_" in n)


@pytest.mark.parametrize("extra,match", [
    (dict(lora_rank=0, lora_qat="merged"), "full QAT trains the experts"),
    (dict(lora_qat="merged"), "add --lora-qat separate"),
    (dict(lora_base_grid=False), "drop --no-lora-base-grid"),
    (dict(qat_learn_scales=True), "learned weight scales"),
    (dict(zero_stage=3), "DeepSpeed"),
    (dict(experts_offload="gpu"), "valid --experts-offload places: none, host"),
])
def test_runs_that_can_not_offload_are_refused(tmp_path, extra, match):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    args = micro_train_args(tmp_path / "run", tmp_path / "data.txt", model=str(model_dir), qat_recipe=RECIPE,
                            qat_learn_scales=False, lora_rank=4, lora_qat="separate", experts_offload="host")
    assert TrainConfig.from_flat(**args).lora.experts_offload == "host"
    with pytest.raises(ConfigError, match=match):
        TrainConfig.from_flat(**{**args, **extra})


class _Losses:
    def __init__(self):
        self.losses = []

    def on_step(self, record):
        self.losses.append(record["loss"])

    def __getattr__(self, name):  # the observer's other events
        return lambda *args: None


def test_a_dense_model_has_nothing_to_offload(tmp_path, text_file):
    from forge_qat.models import preset_model

    model, tok = preset_model("micro-llama", seed=0)
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    cfg = TrainConfig.from_flat(**micro_train_args(tmp_path / "run", text_file, model=str(tmp_path / "model"),
                                                   qat_recipe=RECIPE, qat_learn_scales=False, lora_rank=4,
                                                   lora_qat="separate", experts_offload="host"))
    with pytest.raises(ConfigError, match="no expert stacks held in their grid"):
        run_training(cfg)


def test_an_offloaded_run_is_the_run_in_place(tmp_path, text_file):
    """`forge train --experts-offload host` end to end: the same losses and the same adapters as the run without it."""
    from safetensors.torch import load_file

    from forge_qat.formats.adapters import ADAPTER_DIR, EXPERT_WEIGHTS, PEFT_WEIGHTS
    from forge_qat.formats.run_dir import checkpoint_dirs

    save_tiny_moe(tmp_path / "model", "qwen3_moe", "per-expert")
    losses = []
    for offload in ("none", "host"):
        run = tmp_path / offload
        cfg = TrainConfig.from_flat(**micro_train_args(run, text_file, model=str(tmp_path / "model"),
                                                       qat_recipe=RECIPE, qat_learn_scales=False, lora_rank=4,
                                                       lora_qat="separate", max_steps=3, save_every=0,
                                                       gradient_checkpointing=True, experts_offload=offload))
        observer = _Losses()
        run_training(cfg, observer)
        losses.append(observer.losses)
    assert len(losses[0]) == 3 and losses[0] == losses[1]
    a, b = ({**load_file(folder / PEFT_WEIGHTS), **load_file(folder / EXPERT_WEIGHTS)}
            for folder in (checkpoint_dirs(tmp_path / o)[-1][1] / ADAPTER_DIR for o in ("none", "host")))
    assert a.keys() == b.keys() and any(".experts." in k for k in a)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-8, msg=k)
