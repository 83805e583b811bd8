"""`--lora-base-grid`: a LoRA run's frozen base held as its recipe's codes and scales (forge_qat/qat/grid.py,
forge_qat/lora/grid_base.py). Checked against today's float-base LoRA (separate mode: the same numerics),
against the artifact (merged mode: what trained is what ships), and against the source weights (checkpoints)."""

import contextlib
from pathlib import Path

import pytest
import torch
from conftest import micro_train_args
from safetensors.torch import load_file

from forge_qat.config import TrainConfig
from forge_qat.errors import ConfigError
from forge_qat.formats.run_dir import checkpoint_dirs
from forge_qat.lora import adapters as lora
from forge_qat.lora import grid_base
from forge_qat.models import preset_model
from forge_qat.qat.fake_quant import AffineSpec, fake_quantize
from forge_qat.qat.grid import FrozenGrid
from forge_qat.qat.prepare import prepare_qat, set_fake_quant_enabled
from forge_qat.qat.registry import get_recipe
from forge_qat.train.trainer import run_training

RECIPE = "int8-dynamic-act-int4-weight"  # without learned scales: its dynamic scales make the base constant


@pytest.mark.parametrize("bits,granularity,group", [(4, "per_group", 32), (3, "per_group", 32),
                                                    (2, "per_group", 32), (8, "per_token", None)])
@pytest.mark.parametrize("dtype,scale_dtype", [(torch.float32, None), (torch.bfloat16, None),
                                               (torch.float32, torch.bfloat16)])
def test_the_grid_gives_the_fake_quantizers_values_bit_for_bit(bits, granularity, group, dtype, scale_dtype):
    spec = AffineSpec(bits=bits, granularity=granularity, symmetric=True, group_size=group, scale_dtype=scale_dtype)
    w = torch.randn(48, 128, generator=torch.Generator().manual_seed(bits)).to(dtype) * 0.05
    w[0, :5] = torch.tensor([0.3, -0.3, 0.0, 1e-9, -0.2])  # extremes of both signs, an exact zero, a tiny value
    grid = FrozenGrid.of(w, spec)
    for out in (dtype, torch.bfloat16):  # its own dtype, and autocast's
        assert torch.equal(grid.dequantize(out), fake_quantize(w, spec, out))
    codes = grid.int_codes()
    assert codes.dtype == torch.int8 and codes.min() >= spec.qmin and codes.max() <= spec.qmax
    assert codes.min() == spec.qmin  # the grid's whole range is used: packing keeps the negative end
    per_weight = grid.nbytes() / w.numel()
    assert per_weight <= (0.5 + 4 / 32 if bits <= 4 else 1 + 4 / 128)  # packed two to a byte up to 4 bits


@contextlib.contextmanager
def _saved_bytes():
    """The bytes autograd keeps for backward during the block."""
    sizes = []

    def pack(t):
        sizes.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield sizes


def _model():
    model, tok = preset_model("micro-llama", seed=0)
    return model.eval(), tok


def _with_lora(mode: str, grid: bool, seed: int = 5):
    model, _ = _model()
    coverage = prepare_qat(model, get_recipe(RECIPE))
    lora.install(model, lora.LoraConfig(lora_rank=4, lora_qat=mode, lora_targets="attention"),
                 list(coverage.linears), coverage.experts)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in lora.adapter_parameters(model).items():
            if name.endswith("lora_B"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    held = grid_base.install(model, list(coverage.linears), coverage.experts) if grid else None
    return model, held


@pytest.mark.parametrize("autocast", [False, True])
def test_separate_mode_on_the_grid_is_todays_separate_mode(autocast):
    """Logits, loss and every adapter's gradient: the grid base computes fq(W) x exactly as the float base did
    (attention layers adapted, mlp layers frozen on their grid without adapters)."""
    ids = torch.randint(0, 259, (2, 24), generator=torch.Generator().manual_seed(1))
    results = []
    saved = []
    for grid in (False, True):
        model, held = _with_lora("separate", grid)
        model.train()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast), _saved_bytes() as kept:
            out = model(ids, labels=ids)
        out.loss.backward()
        results.append((out.logits.detach(), out.loss.detach(),
                        {n: p.grad for n, p in lora.adapter_parameters(model).items()}))
        saved.append(sum(kept))
    # autograd keeps no copy of the base's values for backward: before, F.linear kept fq(W) (in the autocast dtype)
    # wherever its input needs a gradient, i.e. everywhere but layer 0's q/k/v, which read the frozen embedding
    first = sum(getattr(model.model.layers[0].self_attn, n).weight.numel() for n in ("q_proj", "k_proj", "v_proj"))
    assert saved[0] - saved[1] == (held.float_bytes - 4 * first) // (2 if autocast else 1)
    assert held.layers == 14 and held.params == sum(m.weight.numel() for m in model.modules()
                                                    if grid_base.grid_of(m) is not None)
    (la, loss_a, ga), (lb, loss_b, gb) = results
    torch.testing.assert_close(lb, la, rtol=0, atol=0)
    torch.testing.assert_close(loss_b, loss_a, rtol=0, atol=0)
    assert ga.keys() == gb.keys() and len(ga) == 16
    for name in ga:
        torch.testing.assert_close(gb[name], ga[name], rtol=1e-5, atol=1e-7, msg=name)


def test_the_grid_replaces_the_float_base_and_nothing_reads_it():
    model, held = _with_lora("merged", grid=True)
    gridded = [m for m in model.modules() if grid_base.grid_of(m) is not None]
    assert len(gridded) == 14
    # each float weight is one broadcast NaN now; the grid is int4 codes two to a byte plus fp32 group scales
    assert all(m.weight.untyped_storage().nbytes() == 4 for m in gridded)
    assert held.grid_bytes == sum(grid_base.grid_of(m).nbytes() for m in gridded)
    assert held.grid_bytes / held.float_bytes == pytest.approx((0.5 + 4 / 32) / 4)
    assert "kept in float" not in held.describe()
    ids = torch.randint(0, 259, (1, 16), generator=torch.Generator().manual_seed(2))
    assert torch.isfinite(model(ids).logits).all()
    set_fake_quant_enabled(model, False)
    with pytest.raises(RuntimeError, match="held in its grid only"):
        model(ids)


@pytest.fixture(scope="module")
def grid_runs(tmp_path_factory):
    """The micro preset saved as a model directory, and a merged-mode and a separate-mode LoRA run on it whose
    base is held in its grid (on by default: no learned scales, one process, a model directory)."""
    from pydoc_data.topics import topics

    root = tmp_path_factory.mktemp("grid")
    model, tok = _model()
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    data = root / "train.txt"
    data.write_text(topics["if"] + topics["while"])
    for mode in ("merged", "separate"):
        cfg = TrainConfig.from_flat(**micro_train_args(
            root / mode, data, model=str(root / "model"), qat_recipe=RECIPE, qat_learn_scales=False, lora_rank=4,
            lora_qat=mode, max_steps=3, save_every=2, **({"lora_base_grid": True} if mode == "merged" else {})))
        assert cfg.lora.lora_base_grid is True  # separate mode: by default
        run_training(cfg)
    return root


def test_checkpoints_hold_the_source_weights(grid_runs):
    source = load_file(grid_runs / "model" / "model.safetensors")
    ckpts = [p for _, p in checkpoint_dirs(grid_runs / "merged")]
    assert len(ckpts) == 2
    for ckpt in ckpts:
        written = load_file(ckpt / "model.safetensors")
        assert written.keys() == source.keys()
        for name, value in source.items():
            assert torch.equal(written[name], value.float()), name
    assert (ckpts[0] / "model.safetensors").stat().st_ino == (ckpts[1] / "model.safetensors").stat().st_ino


@pytest.mark.parametrize("streaming", [False, True])
def test_a_merged_grid_run_ships_what_it_trained(grid_runs, tmp_path, streaming):
    """The artifact is q(G + s*BA) with G the base's grid: the model as trained (fake quant, grid, adapters),
    logit for logit; and it is not q(W + s*BA), today's merged deployment of the same adapters."""
    from transformers import AutoModelForCausalLM

    from forge_qat.eval.models import prepare_as_trained
    from forge_qat.finalize.convert import finalize, sample_batch
    from forge_qat.finalize.job import FinalizeRequest
    from forge_qat.models import load_model

    report = finalize(FinalizeRequest(source=grid_runs / "merged", dest=tmp_path / "a", streaming=streaming))
    assert report.lora_merged == 14
    if not streaming:
        assert report.lora_trained_vs_artifact == 0.0
    ckpt = checkpoint_dirs(grid_runs / "merged")[-1][1]
    fake, tok = load_model(str(ckpt))
    prepare_as_trained(fake, ckpt, get_recipe(RECIPE))
    assert sum(grid_base.grid_of(m) is not None for m in fake.modules()) == 14
    real = AutoModelForCausalLM.from_pretrained(tmp_path / "a")
    x = sample_batch(tok, fake.config.vocab_size)
    with torch.no_grad():
        trained = fake.eval()(x).logits
        torch.testing.assert_close(real(x).logits, trained, rtol=0, atol=0)
        float_base, _ = load_model(str(ckpt))
        prepare_qat(float_base, get_recipe(RECIPE))
        cfg = lora.LoraConfig(lora_rank=4)
        lora.install(float_base, cfg, [n for n, m in float_base.named_modules() if hasattr(m, "weight_fake_quantizer")],
                     {})
        lora.load(float_base, {k: v for k, v in fake.state_dict().items() if lora.is_adapter(k)}, ckpt)
        assert not torch.equal(float_base.eval()(x).logits, trained)  # q(W + s*BA) is another model


def test_a_separate_grid_run_deploys_the_base_plus_adapters(grid_runs, tmp_path):
    from forge_qat.finalize.convert import finalize
    from forge_qat.finalize.job import FinalizeRequest

    memory = finalize(FinalizeRequest(source=grid_runs / "separate", dest=tmp_path / "m"))
    finalize(FinalizeRequest(source=grid_runs / "separate", dest=tmp_path / "s", streaming=True))
    assert memory.lora_merged == 14 and memory.lora_trained_vs_artifact > 0  # q(W + s*BA), as without the grid
    a, b = load_file(tmp_path / "m" / "model.safetensors"), load_file(tmp_path / "s" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("extra,match", [
    (dict(qat_learn_scales=True), "learned weight scales"),
    (dict(fake_quant_after_steps=1), "--fake-quant-after-steps"),
    (dict(kd_weight=1.0, kd_loss="kl", kd_teacher="self"), "--kd-teacher self"),
    (dict(zero_stage=3), "DeepSpeed"),
    (dict(model="micro-llama"), "a preset has none"),
    (dict(qat_recipe="none"), "float run"),
    (dict(lora_rank=0), "add --lora-rank"),
])
def test_runs_the_grid_can_not_hold_are_refused_and_others_fall_back(tmp_path, extra, match):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    args = micro_train_args(tmp_path / "run", tmp_path / "data.txt", model=str(model_dir), qat_recipe=RECIPE,
                            qat_learn_scales=False, lora_rank=4, lora_qat="separate")
    assert TrainConfig.from_flat(**args).lora.lora_base_grid is True  # the default, where it is exact
    assert TrainConfig.from_flat(**{**args, "lora_qat": "merged"}).lora.lora_base_grid is False  # not today's merged
    args.update(extra)
    with pytest.raises(ConfigError, match=match):
        TrainConfig.from_flat(**args, lora_base_grid=True)
    if extra.get("lora_rank") != 0:
        assert TrainConfig.from_flat(**args).lora.lora_base_grid is False  # and off where it would not be


def _moe_with_lora(model_type: str, mode: str, targets: str, grid: bool):
    from conftest import tiny_moe

    model, _ = tiny_moe(model_type)
    coverage = prepare_qat(model, get_recipe(RECIPE))
    lora.install(model, lora.LoraConfig(lora_rank=4, lora_qat=mode, lora_targets=targets), list(coverage.linears),
                 coverage.experts)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in lora.adapter_parameters(model).items():
            if name.endswith("lora_B"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    held = grid_base.install(model, list(coverage.linears), coverage.experts) if grid else None
    return model.train(), held


@pytest.mark.parametrize("model_type", ["qwen3_moe", "mixtral"])
@pytest.mark.parametrize("targets", ["attention,mlp,experts", "attention"])
def test_separate_mode_on_gridded_expert_stacks_is_todays(model_type, targets):
    """Expert stacks on their grid: with separate adapters (transformers' eager loop) and without adapters (the
    batched kernel, recomputed in backward): the float base's logits and loss, and its adapters' gradients."""
    ids = torch.randint(0, 259, (2, 16), generator=torch.Generator().manual_seed(3))
    results = []
    saved = []
    for grid in (False, True):
        model, held = _moe_with_lora(model_type, "separate", targets, grid)
        with _saved_bytes() as kept:
            out = model(ids, labels=ids)
        out.loss.backward()
        results.append((out.logits.detach(), {n: p.grad for n, p in lora.adapter_parameters(model).items()}))
        saved.append(sum(kept))
    # the stacks' values are made again in backward, not kept (an expert's at a time in the eager loop; the batched
    # kernel's whole forward recomputed); layer 0's q/k/v read the frozen embedding, kept nothing before either
    first = sum(getattr(model.model.layers[0].self_attn, n).weight.numel() for n in ("q_proj", "k_proj", "v_proj"))
    assert saved[0] - saved[1] >= held.float_bytes - 4 * first
    assert held.stacks == 4 and held.kept == {}
    gridded = grid_base.gridded_weights(model)
    assert {n for n in gridded if ".experts." in n} == {f"model.layers.{i}.mlp.experts.{s}" for i in range(2)
                                                        for s in ("gate_up_proj", "down_proj")}
    (la, ga), (lb, gb) = results
    torch.testing.assert_close(lb, la, rtol=0, atol=0)
    for name in ga:
        torch.testing.assert_close(gb[name], ga[name], rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("layout", ["per-expert", "fused"])
def test_a_merged_moe_grid_run_ships_what_it_trained(tmp_path, text_file, layout):
    """Expert stacks and linears trained as q(G + s*BA) on their grids; the checkpoint keeps the source's
    layout; the artifact (in memory and block by block) is the model as trained."""
    from conftest import save_tiny_moe

    from forge_qat.finalize.convert import finalize
    from forge_qat.finalize.job import FinalizeRequest

    save_tiny_moe(tmp_path / "model", "qwen3_moe", layout)
    cfg = TrainConfig.from_flat(**micro_train_args(tmp_path / "run", text_file, model=str(tmp_path / "model"),
                                                   qat_recipe=RECIPE, qat_learn_scales=False, lora_rank=4,
                                                   max_steps=2, save_every=0, lora_base_grid=True))
    run_training(cfg)
    ckpt = checkpoint_dirs(tmp_path / "run")[-1][1]
    source, written = load_file(tmp_path / "model" / "model.safetensors"), load_file(ckpt / "model.safetensors")
    assert written.keys() == source.keys() and all(torch.equal(written[k], source[k]) for k in source)
    memory = finalize(FinalizeRequest(source=tmp_path / "run", dest=tmp_path / "m"))
    assert memory.lora_merged == 2 * (4 + 2) and memory.lora_trained_vs_artifact == 0.0  # 4 attention, 2 stacks
    finalize(FinalizeRequest(source=tmp_path / "run", dest=tmp_path / "s", streaming=True))
    a, b = load_file(tmp_path / "m" / "model.safetensors"), load_file(tmp_path / "s" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_base_is_read_straight_into_its_grid(tmp_path):
    """A grid run's model is allocated without being written and each frozen weight is read into its grid one at a
    time: the process's memory grows by about the grids, not by the float weights, even at its peak."""
    import sys

    sys.path.insert(0, str(Path(__file__).parent.parent / "bench"))
    from memory import peak_rss_bytes, reset_peak, rss_bytes
    from transformers import AutoModelForCausalLM, LlamaConfig

    from forge_qat import heap
    from forge_qat.formats.layouts import model_layout_reader
    from forge_qat.formats.weights import SafetensorsReader

    config = LlamaConfig(vocab_size=259, hidden_size=1024, intermediate_size=2816, num_hidden_layers=2,
                         num_attention_heads=8, num_key_value_heads=8, tie_word_embeddings=True)
    torch.manual_seed(0)
    reference = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    reference.save_pretrained(tmp_path / "model")
    del reference
    float_bytes = (tmp_path / "model" / "model.safetensors").stat().st_size
    heap.map_large_allocations()  # the `forge` entry point's heap policy: freed temporaries go back to the system
    before = rss_bytes()
    reset_peak()
    model = grid_base.allocated(config, torch.float32)
    coverage = prepare_qat(model, get_recipe(RECIPE))
    model.requires_grad_(False)
    reader = model_layout_reader(SafetensorsReader.from_dir(tmp_path / "model"), model)
    held = grid_base.install(model, list(coverage.linears), coverage.experts, source=reader)
    grid_base.read_rest(model, reader)
    grown, peak = rss_bytes() - before, peak_rss_bytes() - before
    assert held.params > 0.95 * float_bytes / 4
    assert grown < held.grid_bytes + 0.1 * float_bytes, (grown, held.grid_bytes, float_bytes)
    # at its peak: the grids, the weight being read, and the temporaries of making its grid (measured: 1-1.5 times
    # the largest weight here) and of the heap between trims; a float copy would be 1x the float bytes and more
    largest = max(p.numel() * 4 for p in model.parameters())
    assert peak < held.grid_bytes + 3 * largest and peak < 0.5 * float_bytes, (peak, held.grid_bytes, largest)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "model")  # the same grids as from the whole model
    prepare_qat(loaded, get_recipe(RECIPE))
    for name in coverage.linears:
        layer = model.get_submodule(name)
        assert torch.equal(grid_base.grid_of(layer).codes, FrozenGrid.of(loaded.get_submodule(name).weight,
                                                                          layer.weight_fake_quantizer.spec).codes)


@pytest.mark.parametrize("model_type", [None, "qwen3_moe"])
def test_merged_mode_on_the_grid_starts_as_the_frozen_quantized_base(model_type):
    """At B = 0 merged mode on a grid is the frozen model's fake quantization exactly: G + 0 is quantized against
    the grid's own scales (the recipe's dynamic quantizer would choose new ones from G and move values)."""
    ids = torch.randint(0, 259, (2, 16), generator=torch.Generator().manual_seed(4))
    logits = []
    for grid in (False, True):
        if model_type is None:
            model, _ = _with_lora("merged", grid)
        else:
            model, _ = _moe_with_lora(model_type, "merged", "attention,mlp,experts", grid)
        with torch.no_grad():
            for name, p in lora.adapter_parameters(model).items():
                if name.endswith("lora_B"):
                    p.zero_()
            logits.append(model.eval()(ids).logits)
    torch.testing.assert_close(logits[1], logits[0], rtol=0, atol=0)


@pytest.mark.parametrize("mode", ["separate", "merged"])
def test_a_grid_run_resumes_bit_identically(grid_runs, tmp_path, mode):
    """Stopped after its step-2 checkpoint and resumed, a grid run ends where the uninterrupted run ended: the
    base's grid is made again from the model directory, the adapters and their optimizer state restored."""
    from conftest import CrashAt

    from forge_qat.formats.adapters import ADAPTER_DIR, PEFT_WEIGHTS

    args = micro_train_args(tmp_path / "part", grid_runs / "train.txt", model=str(grid_runs / "model"),
                            qat_recipe=RECIPE, qat_learn_scales=False, lora_rank=4, lora_qat=mode, max_steps=3,
                            save_every=2, lora_base_grid=True)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_training(TrainConfig.from_flat(**args), observer=CrashAt(3))
    run_training(TrainConfig.from_flat(**args, resume=True))
    want, got = (load_file(checkpoint_dirs(run)[-1][1] / ADAPTER_DIR / PEFT_WEIGHTS)
                 for run in (grid_runs / mode, tmp_path / "part"))
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)


def test_forge_eval_of_a_merged_grid_run_is_its_artifacts_loss(grid_runs, tmp_path):
    from forge_qat.eval.models import evaluate_model
    from forge_qat.finalize.convert import finalize
    from forge_qat.finalize.job import FinalizeRequest

    kw = dict(seq_len=32, batch_size=2, max_batches=2)
    fake = evaluate_model(str(grid_runs / "merged"), str(grid_runs / "train.txt"), fake_quant=get_recipe(RECIPE), **kw)
    artifact = finalize(FinalizeRequest(source=grid_runs / "merged", dest=tmp_path / "a")).dest
    real = evaluate_model(str(artifact), str(grid_runs / "train.txt"), **kw)
    assert fake.loss == real.loss
