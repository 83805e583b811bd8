"""--qat-learn-scales: trainable weight scales, checked against torchao's range learning, through
training, checkpoints, resume and convert (artifact == fake-quant logits, bit for bit)."""

import copy
import json
import shutil

import pytest
import torch
from conftest import fits_tiny_moe, micro_train_args
from safetensors.torch import load_file
from torchao.quantization.qat.utils import _fake_quantize_per_channel_group
from transformers import AutoModelForCausalLM

from forge_qat.config import TrainConfig
from forge_qat.errors import ConfigError
from forge_qat.finalize.convert import finalize, sample_batch
from forge_qat.finalize.job import FinalizeRequest
from forge_qat.formats import checkpoint as ckpt_io
from forge_qat.formats.run_dir import CHECKPOINT_META, checkpoint_dirs, resolve_checkpoint
from forge_qat.models import load_model
from forge_qat.qat.convert import convert_qat
from forge_qat.qat.fake_quant import SCALE_SUFFIX, AffineSpec, LearnedScaleFakeQuantizer, initial_scale
from forge_qat.qat.prepare import LearnScales, learned_scales, prepare_qat, set_activation_fake_quant_enabled
from forge_qat.qat.registry import DEFAULT_RECIPE, RECIPES, get_recipe
from forge_qat.train.trainer import run_training

SPEC = AffineSpec(bits=4, granularity="per_group", symmetric=True, group_size=32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_learned_quantizer_matches_torchao_range_learning(dtype):
    """Forward and both gradients against autograd through torchao's own range-learning fake quantization
    (`_fake_quantize_per_channel_group` with a scale Parameter), including clipped values."""
    torch.manual_seed(0)
    w = (torch.randn(48, 96) * 0.05).to(dtype)
    w[0, :4] = torch.tensor([0.9, -0.9, 0.5, -0.7])  # outliers the shrunk scales below clip
    scale0 = initial_scale(w, SPEC) * torch.empty(48, 3).uniform_(0.6, 1.1)
    ours = LearnedScaleFakeQuantizer(SPEC, scale0)
    w1 = w.clone().requires_grad_(True)
    out = ours(w1)
    w2 = w.clone().requires_grad_(True)
    s2 = torch.nn.Parameter(scale0.clone())
    ref = _fake_quantize_per_channel_group(w2.float(), s2, torch.zeros_like(s2), SPEC.qmin, SPEC.qmax, 32).to(dtype)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    grad = torch.randn_like(out)
    out.backward(grad)
    ref.backward(grad)
    torch.testing.assert_close(w1.grad, w2.grad, rtol=0, atol=0)
    # d/ds sums q - w/s over a group: a cancellation whose float rounding depends on the order of the
    # ops (ours: g * (q - w * (1/s)); autograd: g * q + (g * s * w) * (-1/s^2)).
    torch.testing.assert_close(ours.scale.grad, s2.grad, rtol=0, atol=1e-5 * s2.grad.abs().max().item())
    assert ours.scale.grad.abs().sum() > 0 and (w1.grad == 0).any()  # clipped values pass no gradient


def _tiny(seed=0):
    from forge_qat.models import preset_model

    return preset_model("micro-llama", seed=seed)[0]


def test_bf16_scale_recipes_round_the_learned_scale_in_every_forward():
    """Recipes that store bf16 scales (the grid XNNPACK and GGUF Q4_0 hold) learn a float32 scale and quantize
    with its bf16 rounding, straight through: the forward and both gradients are those of a quantizer whose
    scale is the rounded value, and at the start they are the dynamic bf16-scale quantizer's."""
    from forge_qat.qat.fake_quant import AffineFakeQuantizer

    spec = get_recipe("int8-dynamic-act-int4-weight-bf16-scales").fake_quant.weight
    assert spec.scale_dtype == torch.bfloat16
    torch.manual_seed(0)
    w = torch.randn(48, 96) * 0.05
    start = initial_scale(w, spec, "absmax")
    assert torch.equal(start, start.bfloat16().float())  # the dynamic choice, already on the bf16 grid
    torch.testing.assert_close(LearnedScaleFakeQuantizer(spec, start)(w), AffineFakeQuantizer(spec)(w),
                               rtol=0, atol=0)
    moved = start * torch.empty_like(start).uniform_(0.7, 1.1)
    assert not torch.equal(moved, moved.bfloat16().float())
    ours, rounded = LearnedScaleFakeQuantizer(spec, moved), LearnedScaleFakeQuantizer(spec, moved.bfloat16().float())
    w1, w2 = w.clone().requires_grad_(True), w.clone().requires_grad_(True)
    out, ref = ours(w1), rounded(w2)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    assert not torch.equal(out, LearnedScaleFakeQuantizer(SPEC, moved)(w))  # the float32 scale would differ
    grad = torch.randn_like(out)
    out.backward(grad)
    ref.backward(grad)
    torch.testing.assert_close(w1.grad, w2.grad, rtol=0, atol=0)
    torch.testing.assert_close(ours.scale.grad, rounded.scale.grad, rtol=0, atol=0)
    assert ours.scale.dtype == torch.float32 and ours.scale.grad.abs().sum() > 0


@pytest.mark.parametrize("recipe_name", [DEFAULT_RECIPE, "int8-dynamic-act-int8-weight",
                                         "int8-dynamic-act-int4-weight-bf16-scales",
                                         "int8-dynamic-act-int4-weight-int8-embeddings"])
def test_learned_scales_start_at_the_dynamic_ones_and_convert_exactly(recipe_name):
    model, reference = _tiny(), _tiny()
    recipe = get_recipe(recipe_name)
    prepare_qat(model, recipe, learn=LearnScales(init="absmax"))
    prepare_qat(reference, recipe)
    x = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(model(x).logits, reference(x).logits, rtol=0, atol=0)  # step 0 is plain QAT
    scales = learned_scales(model)
    assert len(scales) == sum(1 for n in reference.state_dict() if n.endswith("proj.weight"))
    with torch.no_grad():
        for p in scales.values():
            p.mul_(torch.empty_like(p).uniform_(0.7, 1.2))
        fake = model(x).logits
        assert not torch.equal(fake, reference(x).logits)
        convert_qat(model, recipe)
        torch.testing.assert_close(model(x).logits, fake, rtol=0, atol=0)


def _nearest_scale_reference(w: torch.Tensor, spec: AffineSpec) -> torch.Tensor:
    """The mse start, group by group in plain Python: every candidate multiple of the absmax scale (and, for a
    signed-scale grid, of llama.cpp's `d = max / -8`), rounded to the recipe's scale dtype, quantized the learned
    forward's way; the first with the least error."""
    from forge_qat.qat.fake_quant import SCALE_SEARCH_FACTORS, LearnedScaleFakeQuantizer

    absmax = initial_scale(w, spec, "absmax")
    out = absmax.clone()
    size = spec.group_size or w.shape[-1]
    for r in range(w.shape[0]):
        for g in range(absmax.shape[1]):
            group = w[r:r + 1, g * size:(g + 1) * size]
            bases = [absmax[r:r + 1, g:g + 1]]
            if spec.signed_scale:
                extreme = group[0, group[0].abs().argmax()]
                bases.append((extreme / spec.qmin).reshape(1, 1))
            errors = []
            for base, f in ((b, f) for b in bases for f in SCALE_SEARCH_FACTORS):
                s = base * f
                s = s.to(spec.scale_dtype).float() if spec.scale_dtype else s
                errors.append((float((LearnedScaleFakeQuantizer(spec, s)(group).detach() - group).square().sum()), s))
            out[r, g] = min(errors, key=lambda e: e[0])[1].item()  # min keeps the first of equal errors
    return out


@pytest.mark.parametrize("recipe_name", [DEFAULT_RECIPE, "int8-dynamic-act-int8-weight",
                                         "int8-dynamic-act-int4-weight-bf16-scales", "llama-cpp-q4-0"])
def test_mse_start_is_each_groups_nearest_candidate(recipe_name, monkeypatch):
    """The default start of learned scales: per group (per row for int8's per-channel grid), the candidate
    scale whose quantized weights are nearest the weights, on the recipe's scale grid, never further than
    absmax's; the same when the search works through the weight in small chunks, and for a 3-D expert stack."""
    import forge_qat.qat.fake_quant as fq

    model = _tiny()
    prepare_qat(model, get_recipe(recipe_name), learn=LearnScales())
    spec = model.model.layers[0].self_attn.q_proj.weight_fake_quantizer.spec
    torch.manual_seed(0)
    w = torch.randn(24, 64) * 0.05
    w[3, 5], w[7, 40] = 0.6, -0.45  # outliers: clipping them buys the rest of the group a finer grid
    start = initial_scale(w, spec)
    torch.testing.assert_close(start, _nearest_scale_reference(w, spec), rtol=0, atol=0)
    if spec.scale_dtype is not None:
        assert torch.equal(start, start.to(spec.scale_dtype).float())

    def error(scale):
        size = spec.group_size or w.shape[-1]
        q = LearnedScaleFakeQuantizer(spec, scale)(w).detach()
        return (q - w).square().reshape(w.shape[0], -1, size).sum(-1)

    absmax = initial_scale(w, spec, "absmax")
    assert (error(start) <= error(absmax)).all()
    if spec.bits == 4:  # on int8's 255 levels clipping rarely pays: there the start may be absmax throughout
        assert (error(start) < error(absmax)).any() and not torch.equal(start, absmax)
    assert (start < 0).any() == spec.signed_scale  # only Q4_0's grid stores a negative scale
    monkeypatch.setattr(fq, "SEARCH_CHUNK_ELEMENTS", 100)  # one or two rows per chunk
    torch.testing.assert_close(initial_scale(w, spec), start, rtol=0, atol=0)
    stack = torch.stack([w, w.flip(0)])
    torch.testing.assert_close(initial_scale(stack, spec), torch.stack([start, start.flip(0)]), rtol=0, atol=0)


def test_scale_init_is_a_checked_option():
    import typing

    from forge_qat.qat.config import SCALE_INITS
    from forge_qat.qat.fake_quant import ScaleInit

    assert SCALE_INITS == typing.get_args(ScaleInit)  # the torch-free copy the config checks against
    assert TrainConfig.from_flat(qat_recipe=DEFAULT_RECIPE).qat.qat_scale_init == "mse"
    assert TrainConfig.from_flat(qat_recipe=DEFAULT_RECIPE, qat_scale_init="absmax").qat.qat_scale_init == "absmax"
    with pytest.raises(ConfigError, match="--qat-scale-init.*mse.*absmax"):
        TrainConfig.from_flat(qat_recipe=DEFAULT_RECIPE, qat_scale_init="minmax")


def test_recipes_and_models_learned_scales_cannot_serve_are_refused():
    able = [n for n, r in RECIPES.items() if r.learnable_scales]
    fixed = "int4-weight-only"  # torchao's tiled int4 tensor takes no custom scale
    assert {DEFAULT_RECIPE, "int8-dynamic-act-int8-weight", "int8-dynamic-act-int4-weight-bf16-scales",
            "llama-cpp-q4-0"} <= set(able) and fixed not in able
    with pytest.raises(ConfigError, match="--qat-learn-scales needs a QAT recipe"):
        TrainConfig.from_flat(qat_recipe=fixed, qat_learn_scales=True)
    with pytest.raises(ConfigError, match="--qat-learn-scales needs a QAT recipe"):
        TrainConfig.from_flat(qat_recipe="none", qat_learn_scales=True)
    with pytest.raises(ConfigError, match="no learnable weight scales"):
        prepare_qat(_tiny(), get_recipe(fixed), learn=LearnScales())


LEARNABLE = [n for n, r in RECIPES.items() if r.learnable_scales and not r.missing_for_convert()]
LEARNABLE_MOE = [n for n in LEARNABLE if fits_tiny_moe(RECIPES[n])]


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("recipe_name", [DEFAULT_RECIPE, "int8-dynamic-act-int8-weight"])
def test_moe_learned_scales_are_each_experts_linear_learned_scales(recipe_name, mode):
    """An experts module with learned scales (one per expert, output row and group) computes, and
    differentiates to its input, weights and scales, what a loop over experts computes in which each
    expert's slices are `nn.Linear`s prepared with learned scales (the dense path, checked against torchao's
    range learning above) starting from that expert's slice of the scales. In train mode the default recipe
    runs transformers' grouped_mm kernel on the whole fake-quantized stacks; eval mode and the integer-grid
    recipe run the eager loop, one expert's scales at a time."""
    from conftest import EXPERT_STACKS, expert_linears, per_expert_reference, tiny_moe

    from forge_qat.qat import experts

    recipe = get_recipe(recipe_name)
    model, _ = tiny_moe("qwen3_moe")
    model.train(mode == "train")
    block = model.model.layers[0].mlp
    module = block.experts
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(24, 64, generator=gen)
    _, weights, chosen = (t.detach() for t in block.gate(x))
    prepare_qat(model, recipe, learn=LearnScales())
    stacks = EXPERT_STACKS
    scales = {stack: learned_scales(module)[f"forge_fake_quant.{stack}{SCALE_SUFFIX}"] for stack in stacks}
    assert [tuple(s.shape) for s in scales.values()] == (
        [(4, 64, 2), (4, 64, 1)] if recipe_name == DEFAULT_RECIPE else [(4, 64, 1), (4, 64, 1)])
    with torch.no_grad():  # away from the dynamic choice, so clipping and both gradient cases occur
        for s in scales.values():
            s.mul_(torch.empty_like(s).uniform_(0.6, 1.1, generator=gen))

    reference = []
    for e in range(4):
        pair = expert_linears(module, e)
        prepare_qat(pair, recipe, learn=LearnScales(initial={
            f"{short}{SCALE_SUFFIX}": scales[stack].data[e].clone() for stack, short in stacks.items()}))
        reference.append(pair)

    if module.training:
        batched = not recipe.fake_quant or not recipe.fake_quant.integer_matmul
        assert (experts._batched_kernel(module) is not None) == batched
    xr, xo = x.clone().requires_grad_(), x.clone().requires_grad_()
    want, got = per_expert_reference(module, reference, chosen, weights, xr), module(xo, chosen, weights)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    got.square().sum().backward()
    want.square().sum().backward()
    torch.testing.assert_close(xo.grad, xr.grad, rtol=1e-5, atol=1e-6)
    hit = chosen.unique().tolist()
    for stack, short in stacks.items():
        for e, pair in enumerate(reference):
            torch.testing.assert_close(getattr(module, stack).grad[e], pair[short].weight.grad, rtol=1e-5, atol=1e-6)
            ref_grad = pair[short].weight_fake_quantizer.scale.grad
            if e in hit:
                torch.testing.assert_close(scales[stack].grad[e], ref_grad, rtol=1e-4,
                                           atol=1e-5 * ref_grad.abs().max().item())
                assert ref_grad.abs().sum() > 0
            else:
                assert ref_grad is None and not scales[stack].grad[e].any()


@pytest.mark.parametrize("recipe_name", LEARNABLE_MOE)
def test_moe_artifact_with_learned_scales_equals_fake_quant_per_expert(recipe_name):
    """Converting stacks with learned scales: every expert of the converted stack holds exactly the codes and
    scales the fake quantizer multiplied by, and the converted model's logits are the fake-quant model's
    (eval, the eager loop both run), atol 0; they differ from dynamic scales'."""
    from conftest import tiny_moe

    recipe = get_recipe(recipe_name)
    model, tok = tiny_moe("qwen3_moe")
    model.eval()
    prepare_qat(model, recipe, learn=LearnScales())
    with torch.no_grad():
        for p in learned_scales(model).values():
            p.mul_(torch.empty_like(p).uniform_(0.7, 1.2, generator=torch.Generator().manual_seed(2)))
    scales = {k: v.detach().clone() for k, v in learned_scales(model).items()}
    dynamic, _ = tiny_moe("qwen3_moe")
    prepare_qat(dynamic.eval(), recipe)
    x = torch.randint(0, len(tok), (2, 40), generator=torch.Generator().manual_seed(1))
    if not recipe.artifact_activations:  # llama.cpp's per-block activations run where GGUF runs them
        set_activation_fake_quant_enabled(model, False)
        set_activation_fake_quant_enabled(dynamic, False)
    with torch.no_grad():
        fake = model(x).logits
        assert not torch.equal(fake, dynamic(x).logits)
        convert_qat(model, recipe)
        torch.testing.assert_close(model(x).logits, fake, rtol=0, atol=0)
    state = model.state_dict()
    stored = recipe.fake_quant.weight.scale_dtype if recipe.fake_quant else None  # bf16 for the GGUF/XNNPACK grid
    if stored is not None:
        scales = {k: v.to(stored).float() for k, v in scales.items()}
    stacks = [k for k in scales if ".forge_fake_quant." in k]
    assert len(stacks) == 4  # 2 layers x 2 stacks, besides the attention layers' scales
    for key, scale in scales.items():
        owner = key.removesuffix(SCALE_SUFFIX)
        converted = state[owner.replace(".forge_fake_quant.", ".") if key in stacks else owner + ".weight"]
        assert torch.equal(converted.scale.reshape(scale.shape).float(), scale), key


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from pydoc_data.topics import topics

    path = tmp_path_factory.mktemp("data") / "train.txt"
    path.write_text(topics["if"] + topics["while"] + topics["for"])
    return path


def _args(out, data, **kw):
    return micro_train_args(out, data, qat_learn_scales=True, lr=1e-3, **kw)


@pytest.fixture(scope="module")
def learned_run(tmp_path_factory, data):
    out = tmp_path_factory.mktemp("runs") / "ls"
    run_training(TrainConfig.from_flat(**_args(out, data, max_steps=4, save_every=2)))
    return out


def test_scales_train_and_are_saved_beside_a_plain_hf_checkpoint(learned_run):
    ckpt = checkpoint_dirs(learned_run)[-1][1]
    weights = load_file(ckpt / "model.safetensors")
    assert not any(k.endswith(SCALE_SUFFIX) for k in weights)  # the HF weights stay a float model
    AutoModelForCausalLM.from_pretrained(ckpt)  # loads without unexpected keys (would warn, not fail)
    scales = ckpt_io.read_learned_scales(ckpt)
    assert scales and all(k.endswith(SCALE_SUFFIX) for k in scales)
    # Trained: not the scales the dynamic quantizer would choose from the same (trained) weights.
    moved = 0
    for key, s in scales.items():
        weight = weights[key.removesuffix(SCALE_SUFFIX) + ".weight"]
        moved += int(not torch.equal(s, initial_scale(weight, SPEC)))
    assert moved == len(scales)
    meta = json.loads((ckpt / CHECKPOINT_META).read_text())
    assert meta["train_config"]["qat_learn_scales"] is True
    movement = meta["learned_scales"]  # at lr 1e-3 they train: more than the "barely moved" line
    assert movement["median_relative_change"] > 0.01 and movement["sampled_scales"] == sum(s.numel() for s in
                                                                                            scales.values())


def test_scales_that_barely_move_are_reported(tmp_path, data, caplog):
    import logging

    with caplog.at_level(logging.WARNING, logger="forge_qat"):
        run_training(TrainConfig.from_flat(**_args(tmp_path / "r", data, max_steps=2, save_every=2,
                                                   qat_scale_lr=1e-9)))
    meta = json.loads((checkpoint_dirs(tmp_path / "r")[-1][1] / CHECKPOINT_META).read_text())
    assert meta["learned_scales"]["median_relative_change"] < 1e-6
    assert any("learned scales moved a median 0.00%" in r.getMessage() and "--qat-scale-lr" in r.getMessage()
               for r in caplog.records)


def test_resume_continues_identically_with_learned_scales(tmp_path, data, learned_run):
    out = tmp_path / "r"
    run_training(TrainConfig.from_flat(**_args(out, data, max_steps=4, save_every=2)))
    shutil.rmtree(checkpoint_dirs(out)[-1][1])  # as if the job had died after step 2's checkpoint
    run_training(TrainConfig.from_flat(**_args(out, data, max_steps=4, save_every=2, resume=True)))
    a = ckpt_io.read_learned_scales(checkpoint_dirs(learned_run)[-1][1])
    b = ckpt_io.read_learned_scales(checkpoint_dirs(out)[-1][1])
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    # the movement is measured from where the scales started, not from where the resumed job did
    metas = [json.loads((checkpoint_dirs(r)[-1][1] / CHECKPOINT_META).read_text()) for r in
             (learned_run, out)]
    assert metas[0]["learned_scales"] == metas[1]["learned_scales"]
    with pytest.raises(ConfigError, match="qat_learn_scales"):
        run_training(TrainConfig.from_flat(**dict(_args(out, data, max_steps=6, resume=True), qat_learn_scales=False)))


def test_moe_learned_scales_train_save_and_resume_identically(tmp_path, data):
    """A Qwen3-MoE run with learned scales: the stacks' scales are saved beside the HF weights, they move,
    and a run resumed from step 2 ends bit-identical to the uninterrupted one."""
    from conftest import save_tiny_moe

    src = tmp_path / "src"
    save_tiny_moe(src, "qwen3_moe", "per-expert")
    args = dict(model=str(src), max_steps=4, save_every=2)
    run_training(TrainConfig.from_flat(**_args(tmp_path / "a", data, **args)))
    run_training(TrainConfig.from_flat(**_args(tmp_path / "b", data, **args)))
    shutil.rmtree(checkpoint_dirs(tmp_path / "b")[-1][1])
    run_training(TrainConfig.from_flat(**_args(tmp_path / "b", data, resume=True, **args)))
    a, b = (ckpt_io.read_learned_scales(checkpoint_dirs(tmp_path / r)[-1][1]) for r in "ab")
    stacks = [k for k in a if ".forge_fake_quant." in k]
    assert len(stacks) == 4 and set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    start = ckpt_io.read_learned_scales(checkpoint_dirs(tmp_path / "a")[0][1])
    assert all(not torch.equal(a[k], start[k]) for k in stacks)  # trained between steps 2 and 4


@pytest.mark.parametrize("streaming", [False, True])
def test_artifact_uses_the_learned_scales(learned_run, tmp_path, streaming):
    """The converted artifact reproduces the fake-quant model with the checkpoint's learned scales bit for
    bit, and differs from one made with dynamic scales."""
    report = finalize(FinalizeRequest(source=learned_run, dest=tmp_path / "a", streaming=streaming))
    assert report.learned_scales and json.loads((report.dest / "forge_artifact.json").read_text())["learned_scales"]
    ckpt = resolve_checkpoint(learned_run)
    fake, tok = load_model(str(ckpt))
    prepare_qat(fake, get_recipe(report.recipe), learn=LearnScales(initial=ckpt_io.read_learned_scales(ckpt)))
    dynamic = copy.deepcopy(_tiny())
    dynamic.load_state_dict(load_model(str(ckpt))[0].state_dict())
    prepare_qat(dynamic, get_recipe(report.recipe))
    real = AutoModelForCausalLM.from_pretrained(report.dest)
    x = sample_batch(tok, fake.config.vocab_size)
    with torch.no_grad():
        got = real(x).logits
        torch.testing.assert_close(got, fake.eval()(x).logits, rtol=0, atol=0)
        assert not torch.equal(got, dynamic.eval()(x).logits)
    ptq = finalize(FinalizeRequest(source=learned_run, dest=tmp_path / "p", ptq=get_recipe(report.recipe)))
    assert any("learned" in n for n in ptq.notes)  # PTQ says it ignores them


def test_missing_or_corrupt_learned_scales_are_one_clear_error(learned_run, tmp_path):
    from forge_qat.errors import InputError

    ckpt = tmp_path / "ckpt"
    shutil.copytree(resolve_checkpoint(learned_run), ckpt)
    (ckpt / ckpt_io.LEARNED_SCALES).write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{broken")
    with pytest.raises(InputError, match="truncated or corrupt"):
        finalize(FinalizeRequest(source=ckpt, dest=tmp_path / "a"))
    shutil.rmtree((ckpt / ckpt_io.LEARNED_SCALES).parent)
    with pytest.raises(InputError, match="lacks its scales"):
        finalize(FinalizeRequest(source=ckpt, dest=tmp_path / "a"))
    good = ckpt_io.read_learned_scales(resolve_checkpoint(learned_run))
    name = sorted(good)[0]
    for value, fault in ((0.0, "1 zeros"), (float("nan"), "1 non-finite"), (-0.01, "1 negative values")):
        bad = {**good, name: good[name].clone()}
        bad[name].view(-1)[0] = value
        ckpt_io.write_learned_scales(ckpt, bad)  # a negative scale: only for grids that store it signed (Q4_0)
        with pytest.raises(InputError, match=fault):
            finalize(FinalizeRequest(source=ckpt, dest=tmp_path / "a"))
    assert not (tmp_path / "a").exists()


def test_scales_have_their_own_optimizer_group():
    from forge_qat.train.optim import build_optimizer

    model = _tiny()
    prepare_qat(model, get_recipe(DEFAULT_RECIPE), learn=LearnScales())
    scales = {id(p) for p in learned_scales(model).values()}
    cfg = TrainConfig.from_flat(qat_learn_scales=True, qat_scale_lr=1e-3, weight_decay=0.1)
    groups = build_optimizer(model, cfg, lr=2e-5).param_groups
    mine = [g for g in groups if any(id(p) in scales for p in g["params"])]
    assert len(mine) == 1 and {id(p) for p in mine[0]["params"]} == scales
    assert mine[0]["lr"] == 1e-3 and mine[0]["weight_decay"] == 0.0
    assert all(g["lr"] == 2e-5 for g in groups if g is not mine[0])
    # default: a share of the scales' median starting value, whatever the weights' size
    from forge_qat.train.optim import SCALE_LR_RELATIVE
    default = build_optimizer(model, TrainConfig.from_flat(qat_learn_scales=True), lr=2e-5).param_groups[-1]["lr"]
    median = torch.cat([p.detach().reshape(-1) for p in learned_scales(model).values()]).median().item()
    assert default == pytest.approx(SCALE_LR_RELATIVE * median, rel=0.05)
    with torch.no_grad():
        for p in learned_scales(model).values():
            p.mul_(10)
    bigger = build_optimizer(model, TrainConfig.from_flat(qat_learn_scales=True), lr=2e-5).param_groups[-1]["lr"]
    assert bigger == pytest.approx(10 * default, rel=1e-6)
    with pytest.raises(ConfigError, match="remove --no-qat-learn-scales"):
        TrainConfig.from_flat(qat_scale_lr=1e-3, qat_learn_scales=False)
    with pytest.raises(ConfigError, match=r"recipe \(int4-weight-only\) has none"):
        TrainConfig.from_flat(qat_scale_lr=1e-3, qat_recipe="int4-weight-only")


def test_learned_scales_are_on_by_default_where_the_recipe_has_them():
    for name, recipe in RECIPES.items():
        assert TrainConfig.from_flat(qat_recipe=name).qat.qat_learn_scales is recipe.learn_scales_by_default, name
        assert recipe.learnable_scales or not recipe.learn_scales_by_default
    assert not TrainConfig.from_flat(qat_recipe="int8-dynamic-act-int2-weight").qat.qat_learn_scales
    assert TrainConfig.from_flat(qat_recipe="int8-dynamic-act-int2-weight", qat_learn_scales=True).qat.qat_learn_scales
    with pytest.raises(ConfigError, match="learns none by default: add --qat-learn-scales"):
        TrainConfig.from_flat(qat_recipe="int8-dynamic-act-int2-weight", qat_scale_lr=1e-3)
    assert TrainConfig.from_flat().qat.qat_learn_scales  # the default recipe
    assert not TrainConfig.from_flat(qat_recipe="none").qat.qat_learn_scales
    assert not TrainConfig.from_flat(qat_learn_scales=False).qat.qat_learn_scales
    assert TrainConfig.from_flat().to_dict()["qat_learn_scales"] is True  # recorded resolved, for --resume


def test_int8_integer_grid_gradients_are_the_learned_quantizers():
    """int8 x int8 with learned per-row scales: the integer-grid product equals the dequantized one, and the
    gradients of input, weight and scale are those of `LearnedScaleFakeQuantizer`'s weight fed to a linear
    (the reference)."""
    from forge_qat.qat.fake_quant import LearnedScaleFakeQuantizer, initial_scale, integer_grid_linear
    from forge_qat.qat.registry import get_recipe as recipe_of

    plan = recipe_of("int8-dynamic-act-int8-weight").fake_quant
    torch.manual_seed(0)
    x = torch.randn(6, 48, requires_grad=True)
    w = (torch.randn(16, 48) * 0.1).requires_grad_(True)
    s = (initial_scale(w.detach(), plan.weight) * torch.empty(16, 1).uniform_(0.6, 1.1)).requires_grad_(True)
    y = integer_grid_linear(x, w, None, plan.activation, plan.weight, s)
    g = torch.randn_like(y)
    y.backward(g)

    from forge_qat.qat.fake_quant import fake_quantize

    quantizer = LearnedScaleFakeQuantizer(plan.weight, s.detach())
    w2, x2 = w.detach().clone().requires_grad_(True), x.detach().clone().requires_grad_(True)
    ref = torch.nn.functional.linear(fake_quantize(x2, plan.activation), quantizer(w2))
    ref.backward(g)
    # the same grids and decisions; only the order of float sums differs
    torch.testing.assert_close(y, ref.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(s.grad, quantizer.scale.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(w.grad, w2.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-4, atol=1e-6)
    assert s.grad.abs().sum() > 0


def test_int8_x_int8_trains_learned_scales_into_an_artifact_that_equals_its_fake_quant(tmp_path, data):
    """The int8 x int8 recipe end to end: trained scales move, and the artifact (an `Int8Tensor` built with
    them) reproduces the fake-quant model with the checkpoint's scales bit for bit."""
    recipe = "int8-dynamic-act-int8-weight"
    run_training(TrainConfig.from_flat(**_args(tmp_path / "run", data, max_steps=3, save_every=3, qat_recipe=recipe)))
    ckpt = resolve_checkpoint(tmp_path / "run")
    scales = ckpt_io.read_learned_scales(ckpt)
    weights = load_file(ckpt / "model.safetensors")
    spec = get_recipe(recipe).fake_quant.weight
    assert all(not torch.equal(s, initial_scale(weights[k.removesuffix(SCALE_SUFFIX) + ".weight"], spec))
               for k, s in scales.items())
    report = finalize(FinalizeRequest(source=tmp_path / "run", dest=tmp_path / "a"))
    assert report.learned_scales and report.recipe == recipe
    fake, tok = load_model(str(ckpt))
    prepare_qat(fake, get_recipe(recipe), learn=LearnScales(initial=scales))
    x = sample_batch(tok, fake.config.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(AutoModelForCausalLM.from_pretrained(report.dest)(x).logits, fake.eval()(x).logits,
                                   rtol=0, atol=0)


def test_delayed_fake_quantization_starts_the_scales_from_the_weights_of_that_step(tmp_path, data, monkeypatch):
    """With --fake-quant-after-steps 2 the float steps leave the scales alone (zero gradient), then the scales
    are chosen from the weights after those steps, exactly as the dynamic quantizer would; a run resumed
    before that step ends where the uninterrupted one does."""
    import forge_qat.train.trainer as trainer_mod
    from forge_qat.qat.prepare import learned_scales, reinitialize_learned_scales

    seen = {}

    def spy(model, *args):
        layers = reinitialize_learned_scales(model, *args)
        seen.update({k: v.detach().clone() for k, v in learned_scales(model).items()})
        return layers

    monkeypatch.setattr(trainer_mod, "reinitialize_learned_scales", spy)
    args = _args(tmp_path / "d", data, max_steps=4, save_every=1, save_total_limit=10, fake_quant_after_steps=2)
    run_training(TrainConfig.from_flat(**args))
    ckpts = dict(checkpoint_dirs(tmp_path / "d"))
    weights = load_file(ckpts[2] / "model.safetensors")  # the weights fake quantization starts from
    assert seen and all(torch.equal(s, initial_scale(weights[k.removesuffix(SCALE_SUFFIX) + ".weight"], SPEC))
                        for k, s in seen.items())
    before = ckpt_io.read_learned_scales(ckpts[2])  # untouched by the float steps: the step-0 choice
    assert all(torch.equal(before[k], ckpt_io.read_learned_scales(ckpts[1])[k]) for k in before)
    assert not all(torch.equal(before[k], seen[k]) for k in seen)
    final = ckpt_io.read_learned_scales(ckpts[4])

    for step in (3, 4):
        shutil.rmtree(ckpts[step])  # the job died after step 2's checkpoint, before fake quantization began
    run_training(TrainConfig.from_flat(**{**args, "resume": True}))
    resumed = ckpt_io.read_learned_scales(checkpoint_dirs(tmp_path / "d")[-1][1])
    assert set(resumed) == set(final) and all(torch.equal(resumed[k], final[k]) for k in final)


def test_scales_warm_up_with_the_weights_then_hold_their_peak_lr():
    from forge_qat.train.optim import build_optimizer, build_scheduler

    model = _tiny()
    prepare_qat(model, get_recipe(DEFAULT_RECIPE), learn=LearnScales())
    cfg = TrainConfig.from_flat(max_steps=10, warmup_steps=3, qat_scale_lr=1e-3)
    optimizer = build_optimizer(model, cfg, lr=2e-5)
    scheduler = build_scheduler(optimizer, cfg)
    lrs = []
    for _ in range(10):
        lrs.append([g["lr"] for g in optimizer.param_groups])
        optimizer.step()
        scheduler.step()
    weights, scales = [r[0] for r in lrs], [r[-1] for r in lrs]
    assert scales[:4] == pytest.approx([0, 1e-3 / 3, 2e-3 / 3, 1e-3]) and scales[4:] == [1e-3] * 6
    assert weights[3] == pytest.approx(2e-5) and weights[-1] < 0.1 * weights[3]  # cosine decay, as before
    plain = _tiny()
    prepare_qat(plain, get_recipe(DEFAULT_RECIPE))
    single = build_scheduler(build_optimizer(plain, TrainConfig.from_flat(max_steps=10, warmup_steps=3,
                                                                          qat_learn_scales=False), lr=2e-5), cfg)
    assert len(single.lr_lambdas) == 2  # no scales: transformers' schedule for every group


@pytest.mark.parametrize("shape", [(96, 576), (64, 1536), (4, 48, 64)])  # SmolLM2's widths; an expert stack
def test_q4_0_start_is_nearer_than_llama_cpps_own_quantizer(shape):
    """llama-cpp-q4-0's error-chosen scales (the PTQ default and the learned scales' start): on random and
    heavy-tailed weights of real shapes, in total squared error nearer the weights than llama.cpp's own Q4_0
    quantizer (gguf's reference of `quantize_row_q4_0_ref`, `d = max / -8`) and than torchao's absmax / 7.5, which
    clips a positive extreme to 7; each group never further than absmax's."""
    import gguf

    spec = get_recipe("llama-cpp-q4-0").fake_quant.weight
    torch.manual_seed(0)
    for w in (torch.randn(shape) * 0.02, torch.distributions.StudentT(3.0).sample(shape) * 0.02):
        q4_0 = gguf.GGMLQuantizationType.Q4_0
        llama_cpp = torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(w.numpy(), q4_0), q4_0))

        def error(scale, w=w):
            return (LearnedScaleFakeQuantizer(spec, scale)(w).detach() - w).square().reshape(-1, 32).sum(-1)

        start, absmax = initial_scale(w, spec), initial_scale(w, spec, "absmax")
        assert (error(start) <= error(absmax)).all()
        assert error(start).sum() < 0.95 * (llama_cpp.reshape(w.shape) - w).square().sum()
        assert error(absmax).sum() > (llama_cpp.reshape(w.shape) - w).square().sum()  # the gap the issue found


@pytest.mark.parametrize("recipe_name", ["llama-cpp-q4-0", DEFAULT_RECIPE, "int8-dynamic-act-int8-weight"])
def test_extreme_scales_hold_each_groups_largest_weight_exactly(recipe_name):
    """The `extreme` rule (`finalize --ptq`'s default): llama-cpp-q4-0's scale is llama.cpp's `d = max / -8` (on
    the recipe's bf16 grid), so the group's largest-magnitude weight quantizes to -8; on a positive-scale grid it is
    the smallest scale that clips nothing: the group's largest or smallest weight lands on its end of the grid."""
    spec = get_recipe(recipe_name).fake_quant.weight if get_recipe(recipe_name).fake_quant else SPEC
    torch.manual_seed(0)
    w = torch.randn(8, 256) * 0.02
    w[0, 3], w[1, 40] = 0.3, -0.3
    scale = initial_scale(w, spec, "extreme")
    size = spec.group_size or w.shape[-1]
    groups = w.reshape(w.shape[0], -1, size)
    extreme = groups.gather(-1, groups.abs().argmax(-1, keepdim=True)).squeeze(-1)
    ratio = groups / scale.unsqueeze(-1)
    if spec.signed_scale:
        want = extreme / -8
        want = want.to(spec.scale_dtype).float() if spec.scale_dtype else want
        assert torch.equal(scale, want) and bool((scale < 0).any())
        codes = ratio.gather(-1, groups.abs().argmax(-1, keepdim=True)).round()
        assert bool((codes == -8).all())
    else:
        assert bool((scale > 0).all())
        assert bool((ratio.round() >= spec.qmin).all() and (ratio.round() <= spec.qmax).all())  # nothing clipped
        binding = torch.maximum(ratio.amax(-1) / spec.qmax, ratio.amin(-1) / spec.qmin)
        torch.testing.assert_close(binding, torch.ones_like(binding), rtol=4e-3 if spec.scale_dtype else 1e-6, atol=0)


def test_default_scale_lr_is_relative_to_the_scales_magnitude():
    """llama-cpp-q4-0's starting scales are about half negative (Q4_0's signed `d`): the default scale lr is 1.75%
    of their median magnitude, positive, not of their signed median (near zero, or below it: on a fine-tuned
    SmolLM2 the extreme start gave a negative lr, gradient ascent on the scales)."""
    from types import SimpleNamespace

    from forge_qat.train.optim import SCALE_LR_RELATIVE, scale_learning_rate

    model = _tiny()
    prepare_qat(model, get_recipe("llama-cpp-q4-0"), learn=LearnScales(init="extreme"))
    scales = torch.cat([p.detach().flatten() for p in learned_scales(model).values()])
    assert (scales < 0).float().mean() > 0.3 and scales.median() < 0.7 * scales.abs().median()
    lr = scale_learning_rate(model, SimpleNamespace(qat=SimpleNamespace(qat_scale_lr=None)))
    assert lr == pytest.approx(SCALE_LR_RELATIVE * scales.abs().median().item(), rel=0.05) and lr > 0
