"""LoRA adapters on fake-quantized models (forge_qat/lora/adapters.py): merged mode trains the weight that ships,
separate mode the peers' way; checked against the converted artifact and against per-layer references."""

import pytest
import torch

from forge_qat.errors import ConfigError
from forge_qat.formats.adapters import ADAPTER_DIR, PEFT_CONFIG, PEFT_WEIGHTS, read_adapters
from forge_qat.formats.checkpoint import read_checkpoint_meta
from forge_qat.formats.run_dir import checkpoint_dirs
from forge_qat.lora import adapters as lora
from forge_qat.qat.convert import convert_qat
from forge_qat.qat.coverage import plan
from forge_qat.qat.prepare import LearnScales, prepare_qat
from forge_qat.qat.registry import DEFAULT_RECIPE, get_recipe


def _tiny(seed=0):
    from forge_qat.models import preset_model

    return preset_model("micro-llama", seed=seed)[0].eval()


def _with_lora(model, recipe_name=DEFAULT_RECIPE, mode="merged", learn=False, rank=4, targets="attention,mlp,experts"):
    recipe = get_recipe(recipe_name)
    coverage = prepare_qat(model, recipe, learn=LearnScales() if learn else None)
    cfg = lora.LoraConfig(lora_rank=rank, lora_qat=mode, lora_targets=targets)
    installed = lora.install(model, cfg, list(coverage.linears), coverage.experts)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():  # B starts at zero; give it values so the adapters change something
        for name, p in lora.adapter_parameters(model).items():
            if name.endswith("lora_B"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    return recipe, installed


def _ids(model, seed=1):
    return torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(seed))


def test_adapters_start_as_the_frozen_model_and_train_alone():
    model, reference = _tiny(), _tiny()
    recipe = get_recipe(DEFAULT_RECIPE)
    coverage = prepare_qat(model, recipe)
    prepare_qat(reference, recipe)
    installed = lora.install(model, lora.LoraConfig(lora_rank=4), list(coverage.linears), coverage.experts)
    x = _ids(model)
    torch.testing.assert_close(model(x).logits, reference(x).logits, rtol=0, atol=0)  # B = 0
    assert len(installed.linears) == len(coverage.linears) == 14
    a = lora.adapter_parameters(model)
    assert len(a) == 28 and installed.adapter_numel == sum(p.numel() for p in a.values())
    assert "model.layers.0.self_attn.q_proj.forge_lora.lora_A" in a
    only_attention = _tiny()
    cov = prepare_qat(only_attention, recipe)
    inst = lora.install(only_attention, lora.LoraConfig(lora_rank=2, lora_targets="attention"), list(cov.linears),
                        cov.experts)
    assert inst.linears and all("self_attn" in n for n in inst.linears)


@pytest.mark.parametrize("recipe_name", [DEFAULT_RECIPE, "int8-dynamic-act-int8-weight",
                                         "int8-dynamic-act-int4-weight-bf16-scales"])
@pytest.mark.parametrize("learn", [False, True])
def test_merged_mode_is_the_converted_merged_model(recipe_name, learn):
    """q(W + s*BA) in training == convert(merge(W, A, B)), bit for bit, with dynamic and learned scales."""
    model = _tiny()
    recipe, _ = _with_lora(model, recipe_name, "merged", learn)
    x = _ids(model)
    with torch.no_grad():
        fake = model(x).logits
        plain = _tiny()
        prepare_qat(plain, recipe)
        assert not torch.equal(fake, plain(x).logits)
        merged = lora.merge(model)
        assert len(merged) == 14 and not lora.adapter_parameters(model)
        convert_qat(model, recipe)
        torch.testing.assert_close(model(x).logits, fake, rtol=0, atol=0)


def test_separate_mode_trains_another_model_than_the_one_that_ships():
    model = _tiny()
    recipe, _ = _with_lora(model, DEFAULT_RECIPE, "separate")
    x = _ids(model)
    with torch.no_grad():
        fake = model(x).logits
        lora.merge(model)
        convert_qat(model, recipe)
        shipped = model(x).logits
    assert not torch.equal(fake, shipped)
    assert (fake - shipped).abs().max() < 0.5 * fake.abs().max()  # close, not the same


def _loss_grads_and_saved_bytes(model, x):
    """Loss, gradients and the bytes autograd keeps for backward during the forward."""
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(input_ids=x, labels=x).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads, sum(saved)


@pytest.mark.parametrize("learn", [False, True])
def test_merged_mode_recomputes_the_merged_weight_in_backward(learn, monkeypatch):
    """Training keeps no fake-quantized copy of W + s*BA for backward (it is recomputed), and the loss and
    every gradient are those of the plain forward, bit for bit."""
    model = _tiny().train()
    _with_lora(model, DEFAULT_RECIPE, "merged", learn=learn)
    x = _ids(model)
    loss, grads, kept = _loss_grads_and_saved_bytes(model, x)
    monkeypatch.setattr(lora, "checkpoint", lambda fn, *args, **kwargs: fn(*args))  # the plain forward
    plain_loss, plain_grads, plain_kept = _loss_grads_and_saved_bytes(model, x)
    assert torch.equal(loss, plain_loss) and grads.keys() == plain_grads.keys() and len(grads) >= 28
    for name, g in grads.items():
        torch.testing.assert_close(g, plain_grads[name], rtol=0, atol=0, msg=name)
    weights = sum(m.weight.numel() * m.weight.element_size() for m in model.modules() if lora.is_lora_linear(m))
    assert plain_kept - kept >= weights  # at least one full-size copy per adapted layer no longer kept


@pytest.mark.parametrize("kernel", ["grouped_mm", "eager"])
def test_merged_expert_stacks_are_recomputed_in_backward(kernel, monkeypatch):
    """The same for MoE expert stacks: the experts module keeps no merged or fake-quantized stack for backward,
    in the batched (grouped_mm) training path and the eager loop, and computes the plain forward's loss and
    gradients bit for bit."""
    from conftest import tiny_moe

    from forge_qat.qat import experts

    model, _ = tiny_moe("qwen3_moe")
    model.config._experts_implementation = kernel
    model.train()
    _with_lora(model, DEFAULT_RECIPE, "merged", learn=True, targets="experts")
    x = _ids(model)
    loss, grads, kept = _loss_grads_and_saved_bytes(model, x)
    monkeypatch.setattr(experts, "checkpoint", lambda fn, *args, **kwargs: fn(*args))
    plain_loss, plain_grads, plain_kept = _loss_grads_and_saved_bytes(model, x)
    assert torch.equal(loss, plain_loss) and grads.keys() == plain_grads.keys()
    assert any("forge_lora" in n for n in grads) and any(n.endswith("scale") for n in grads)
    for name, g in grads.items():
        torch.testing.assert_close(g, plain_grads[name], rtol=0, atol=0, msg=name)
    stacks = sum(p.numel() * p.element_size() for m in model.modules() if experts.has_lora(m)
                 for n, p in m.named_parameters(recurse=False))
    assert plain_kept - kept >= stacks  # at least one full-size copy of every stack no longer kept


@pytest.mark.parametrize("mode", ["merged", "separate"])
def test_gradients_reach_only_the_adapters(mode):
    model = _tiny().train()
    _with_lora(model, DEFAULT_RECIPE, mode, learn=True)
    x = _ids(model)
    model(input_ids=x, labels=x).loss.backward()
    for name, p in model.named_parameters():
        trainable = lora.is_adapter(name) or name.endswith("weight_fake_quantizer.scale")
        assert p.requires_grad == trainable, name
        if trainable:
            assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("mode", ["merged", "separate"])
def test_moe_expert_adapters_are_each_experts_linear_adapters(mode):
    """An experts module with adapters (one pair per expert) computes, in train (grouped_mm for merged) and
    eval mode (eager loop), what per-expert prepared `nn.Linear`s with the same adapters compute."""
    from conftest import EXPERT_STACKS, expert_linears, per_expert_reference, tiny_moe

    recipe = get_recipe(DEFAULT_RECIPE)
    model, _ = tiny_moe("qwen3_moe")
    block = model.model.layers[0].mlp
    module = block.experts
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(24, 64, generator=gen)
    _, weights, chosen = (t.detach() for t in block.gate(x))
    _with_lora(model, DEFAULT_RECIPE, mode, targets="experts")
    pairs = module.forge_lora
    stacks = EXPERT_STACKS
    reference = []
    for e in range(4):
        pair = expert_linears(module, e)
        cov = prepare_qat(pair, recipe)
        lora.install(pair, lora.LoraConfig(lora_rank=4, lora_qat=mode), list(cov.linears), {})
        with torch.no_grad():
            for stack, short in stacks.items():
                pair[short].forge_lora.lora_A.copy_(pairs[stack].lora_A[e])
                pair[short].forge_lora.lora_B.copy_(pairs[stack].lora_B[e])
        reference.append(pair)
    for training in (True, False):
        model.train(training)
        want = per_expert_reference(module, reference, chosen, weights, x)
        torch.testing.assert_close(module(x, chosen, weights), want, rtol=0, atol=1e-6)


def test_bad_lora_settings_are_one_line_errors():
    with pytest.raises(ConfigError, match="valid kinds are attention, mlp, experts"):
        lora.LoraConfig(lora_rank=4, lora_targets="attn")
    with pytest.raises(ConfigError, match="valid --lora-qat modes: merged, separate"):
        lora.LoraConfig(lora_rank=4, lora_qat="fused")
    model = _tiny()
    cov = plan(model, get_recipe(DEFAULT_RECIPE))
    with pytest.raises(ConfigError, match="no such layers"):
        lora.install(model, lora.LoraConfig(lora_rank=4, lora_targets="experts"), list(cov.linears), cov.experts)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from pydoc_data.topics import topics

    path = tmp_path_factory.mktemp("data") / "train.txt"
    path.write_text(topics["if"] + topics["while"] + topics["for"])
    return path


def _train(out, data, observer=None, **kw):
    from conftest import micro_train_args

    from forge_qat.config import TrainConfig
    from forge_qat.train.trainer import run_training

    return run_training(TrainConfig.from_flat(**micro_train_args(out, data, lora_rank=4, lr=1e-3, **kw)),
                        observer=observer)


@pytest.fixture(scope="module")
def lora_runs(tmp_path_factory, data):
    root = tmp_path_factory.mktemp("lora")
    for mode in ("merged", "separate"):
        _train(root / mode, data, lora_qat=mode)
    return root


def test_a_lora_run_trains_adapters_only_and_saves_them_in_peft_layout(lora_runs):
    from safetensors.torch import load_file

    from forge_qat.models import preset_model

    ckpt = checkpoint_dirs(lora_runs / "merged")[-1][1]
    base = preset_model("micro-llama", seed=0)[0].state_dict()
    weights = load_file(ckpt / "model.safetensors")
    assert all(torch.equal(weights[k], base[k]) for k in weights)  # the base stayed frozen
    adapter = ckpt / ADAPTER_DIR
    peft_weights = load_file(adapter / PEFT_WEIGHTS)
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in peft_weights
    assert len(peft_weights) == 28 and any(t.abs().sum() > 0 for k, t in peft_weights.items() if "lora_B" in k)
    import json

    config = json.loads((adapter / PEFT_CONFIG).read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8.0
    assert len(config["target_modules"]) == 14


def test_peft_loads_the_adapters_onto_the_base(lora_runs):
    """`peft.PeftModel.from_pretrained(base, checkpoint/adapter)` computes what forge's float model with the
    adapters merged computes (PEFT runs them beside the base: float rounding apart), and not the base's."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM


    ckpt = checkpoint_dirs(lora_runs / "merged")[-1][1]
    base = AutoModelForCausalLM.from_pretrained(ckpt).eval()
    x = _ids(base)
    with torch.no_grad():
        base_logits = base(x).logits
        with_peft = PeftModel.from_pretrained(base, ckpt / ADAPTER_DIR).eval()
        peft_logits = with_peft(x).logits
    merged = AutoModelForCausalLM.from_pretrained(ckpt).eval()
    cfg = read_checkpoint_meta(ckpt).lora
    assert lora.merge_into(merged, read_adapters(ckpt), cfg.scaling) == 14
    with torch.no_grad():
        want = merged(x).logits
    torch.testing.assert_close(peft_logits, want, rtol=1e-4, atol=1e-4)
    assert (peft_logits - base_logits).abs().max() > 100 * (peft_logits - want).abs().max()


def test_checkpoints_of_a_lora_run_share_one_copy_of_the_frozen_base(lora_runs, tmp_path, data):
    """Every checkpoint of a LoRA run links the first one's weight files (the base is frozen), stays a complete
    model directory, and outlives the pruning of the checkpoint it links; a full-QAT run writes its own."""
    from safetensors.torch import load_file

    from forge_qat.formats import checkpoint as ckpt_io

    ckpts = [p for _, p in checkpoint_dirs(lora_runs / "merged")]  # steps 2 and 4
    assert len(ckpts) == 2
    first, last = (ckpt_io.weight_files(p) for p in ckpts)
    assert [f.name for f in first] == [f.name for f in last] == ["model.safetensors"]
    assert first[0].stat().st_ino == last[0].stat().st_ino and last[0].stat().st_nlink == 2
    adapters = [load_file(p / ADAPTER_DIR / PEFT_WEIGHTS) for p in ckpts]
    assert any(not torch.equal(adapters[0][k], adapters[1][k]) for k in adapters[0])  # trained in between
    _train(tmp_path / "r", data, max_steps=3, save_every=1)  # checkpoint 1 pruned after 3 is written
    kept = [p for _, p in checkpoint_dirs(tmp_path / "r")]
    assert len(kept) == 2 and ckpt_io.weight_files(kept[0])[0].stat().st_nlink == 2
    assert load_file(kept[1] / "model.safetensors").keys() == load_file(ckpts[0] / "model.safetensors").keys()
    from conftest import micro_train_args

    from forge_qat.config import TrainConfig
    from forge_qat.train.trainer import run_training

    run_training(TrainConfig.from_flat(**micro_train_args(tmp_path / "full", data)))
    full = [ckpt_io.weight_files(p)[0] for _, p in checkpoint_dirs(tmp_path / "full")]
    assert full[0].stat().st_ino != full[1].stat().st_ino and full[1].stat().st_nlink == 1


@pytest.mark.parametrize("streaming", [False, True])
def test_merged_lora_artifact_is_the_trained_model(lora_runs, tmp_path, streaming):
    from transformers import AutoModelForCausalLM

    from forge_qat.eval.models import prepare_as_trained
    from forge_qat.finalize.convert import finalize, sample_batch
    from forge_qat.finalize.job import FinalizeRequest
    from forge_qat.models import load_model

    report = finalize(FinalizeRequest(source=lora_runs / "merged", dest=tmp_path / "a", streaming=streaming))
    assert report.lora_merged == 14
    if not streaming:
        assert report.lora_trained_vs_artifact == 0.0
    ckpt = checkpoint_dirs(lora_runs / "merged")[-1][1]
    fake, tok = load_model(str(ckpt))
    prepare_as_trained(fake, ckpt, get_recipe(report.recipe))  # learned scales and adapters as trained
    assert len(lora.adapter_parameters(fake)) == 28
    real = AutoModelForCausalLM.from_pretrained(tmp_path / "a")
    x = sample_batch(tok, fake.config.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(real(x).logits, fake.eval()(x).logits, rtol=0, atol=0)


def test_separate_lora_artifact_differs_and_the_report_says_by_how_much(lora_runs, tmp_path):
    from forge_qat.finalize.convert import finalize
    from forge_qat.finalize.job import FinalizeRequest

    report = finalize(FinalizeRequest(source=lora_runs / "separate", dest=tmp_path / "a"))
    assert report.lora_merged == 14 and report.lora_trained_vs_artifact > 0


def test_lora_resume_is_bit_identical(tmp_path, data):
    """A LoRA run stopped after its step-2 checkpoint and resumed ends where the uninterrupted run ends."""
    from conftest import CrashAt
    from safetensors.torch import load_file


    _train(tmp_path / "full", data, max_steps=4, save_every=2)
    with pytest.raises(RuntimeError, match="simulated crash"):
        _train(tmp_path / "part", data, max_steps=4, save_every=2, observer=CrashAt(3))
    _train(tmp_path / "part", data, max_steps=4, save_every=2, resume=True)
    want, got = (load_file(checkpoint_dirs(tmp_path / r)[-1][1] / ADAPTER_DIR / PEFT_WEIGHTS)
                 for r in ("full", "part"))
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)


def test_forge_eval_of_a_lora_checkpoint_uses_its_adapters(lora_runs, data, tmp_path):
    """Float eval merges the adapters, --fake-quant evaluates them as trained: the latter equals the artifact's
    loss exactly (artifact == fake quant), and both differ from the base model's."""
    from forge_qat.eval.models import evaluate_model
    from forge_qat.finalize.convert import finalize
    from forge_qat.finalize.job import FinalizeRequest

    run = lora_runs / "merged"
    kw = dict(seq_len=32, batch_size=2, max_batches=2)
    recipe = get_recipe(DEFAULT_RECIPE)
    fake = evaluate_model(str(run), str(data), fake_quant=recipe, **kw)
    finalize(FinalizeRequest(source=run, dest=tmp_path / "a"))
    assert evaluate_model(str(tmp_path / "a"), str(data), **kw).loss == fake.loss
    float_loss = evaluate_model(str(run), str(data), **kw).loss
    base = evaluate_model("micro-llama", str(data), **kw).loss
    assert float_loss != base and fake.loss != float_loss


@pytest.mark.parametrize("mode", ["merged", "separate"])
def test_the_self_teacher_of_a_lora_student_is_its_frozen_base(mode, monkeypatch):
    """KD composes with LoRA: `--kd-teacher self` distils from the float base with the adapters off."""
    from forge_qat.distill import objective as distill

    model, base = _tiny(), _tiny()
    _with_lora(model, DEFAULT_RECIPE, mode)
    seen = {}

    def capture(name, student, teacher, labels, **kw):
        seen["teacher"] = teacher
        return student.sum() * 0

    monkeypatch.setattr(distill, "kd_loss", capture)
    x = _ids(model)
    distill.Distillation("kl", 1.0, 1.0, 1.0, 0, None)(model, {"input_ids": x, "labels": x})
    with torch.no_grad():
        torch.testing.assert_close(seen["teacher"], base(x).logits, rtol=0, atol=0)
        assert not torch.equal(model(x).logits, base(x).logits)  # the adapters and fake quant are back on


@pytest.mark.parametrize("streaming", [False, True])
def test_ptq_of_a_lora_checkpoint_chooses_scales_from_the_merged_weights(lora_runs, tmp_path, streaming):
    """`--ptq` of a LoRA checkpoint with the recipe's extreme rule: streamed, the merged weights are read and the
    rule applies to them; in memory the model is prepared before the adapters merge, so the rule is not applied
    and a note says so (absmax scales), rather than choosing the base weights' scales."""
    from forge_qat.finalize.convert import finalize
    from forge_qat.finalize.job import FinalizeRequest

    report = finalize(FinalizeRequest(source=lora_runs / "merged", dest=tmp_path / "a", streaming=streaming,
                                      ptq=get_recipe("int8-dynamic-act-int4-weight")))
    assert report.lora_merged == 14 and report.mode == "ptq"
    assert report.weight_scales == ("extreme" if streaming else "absmax")
    assert streaming != any("not applied to a LoRA checkpoint" in n for n in report.notes)
