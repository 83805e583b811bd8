"""Mixture-of-experts models on one process: every expert fake-quantized with the numerics of an
`nn.Linear`, both checkpoint layouts, converted experts, coverage counted by parameters.

References: the recipe's dense path (`FakeQuantizedLinear` per expert) for training numerics; the
converted model and the reloaded artifact for fake-quant parity; transformers' own `from_pretrained`
conversion for the checkpoint layouts. The ZeRO-3 side is in tests/test_distributed_moe.py.
"""

import json
import subprocess
import sys

import pytest
import torch
from conftest import fits_tiny_moe, micro_train_args, per_expert_reference, save_tiny_moe, tiny_moe
from safetensors.torch import load_file

from forge_qat import torchao_compat
from forge_qat.config import TrainConfig
from forge_qat.errors import ConfigError
from forge_qat.eval.models import prepare_as_trained
from forge_qat.finalize.convert import finalize
from forge_qat.finalize.job import FinalizeRequest
from forge_qat.formats.run_dir import checkpoint_dirs
from forge_qat.qat import experts
from forge_qat.qat.convert import convert_qat
from forge_qat.qat.coverage import MISFIT, OUTPUT_HEAD, ROUTER, plan
from forge_qat.qat.prepare import prepare_qat, set_activation_fake_quant_enabled, set_fake_quant_enabled
from forge_qat.qat.registry import RECIPES, get_recipe
from forge_qat.train.trainer import run_training

CPU_RECIPES = [n for n, r in RECIPES.items() if not r.missing_for_convert() and fits_tiny_moe(r)]
ARCHS = ["qwen3_moe", "mixtral"]


def _experts_modules(model):
    return [m for m in model.modules() if experts.is_experts(m)]


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("recipe", CPU_RECIPES)
def test_each_expert_gets_the_numerics_of_a_linear_layer(recipe, mode):
    """Forward values and gradients of the fake-quantized experts module equal a loop over experts in
    which each expert's slices are the recipe's prepared `nn.Linear`s (the dense path, tested against
    torchao elsewhere). In train mode the default recipe runs transformers' grouped_mm kernel on whole
    fake-quantized stacks (same quantized operands, other float summation order); eval mode runs the
    eager loop of the converted model."""
    if get_recipe(recipe).layer_quantizers is not None:
        pytest.skip("a layer's llama.cpp type depends on its place in the model, not on a bare linear's shape: "
                    "tests/test_q4_k_m.py checks its stacks against llama.cpp's types and GGUF decoding")
    model, _ = tiny_moe("qwen3_moe")
    model.train(mode == "train")
    plan = get_recipe(recipe).fake_quant
    batched = mode == "train" and not (plan and plan.integer_matmul)  # the integer-grid recipe stays eager
    block = model.model.layers[0].mlp
    module = block.experts
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(24, 64, generator=gen)
    _, weights, chosen = (t.detach() for t in block.gate(x))

    reference = []
    for e in range(4):
        pair = torch.nn.ModuleDict({n: torch.nn.Linear(w.shape[2], w.shape[1], bias=False)
                                    for n, w in (("up", module.gate_up_proj), ("down", module.down_proj))})
        pair["up"].weight.data = module.gate_up_proj.data[e].clone()
        pair["down"].weight.data = module.down_proj.data[e].clone()
        prepare_qat(pair, get_recipe(recipe))
        reference.append(pair)

    prepare_qat(model, get_recipe(recipe))
    assert experts.is_fake_quantized(module)
    if module.training:
        assert (experts._batched_kernel(module) is not None) == batched
    xr, xo = x.clone().requires_grad_(), x.clone().requires_grad_()
    want, got = per_expert_reference(module, reference, chosen, weights, xr), module(xo, chosen, weights)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    got.square().sum().backward()
    want.square().sum().backward()
    torch.testing.assert_close(xo.grad, xr.grad, rtol=1e-5, atol=1e-6)
    for e, pair in enumerate(reference):
        torch.testing.assert_close(module.gate_up_proj.grad[e], pair["up"].weight.grad, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(module.down_proj.grad[e], pair["down"].weight.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("recipe", CPU_RECIPES)
def test_expert_stack_conversion_equals_per_expert_linear_conversion(recipe):
    """Each converted 3-D stack selects, expert by expert, to the tensor converting that expert as an
    `nn.Linear` gives, and multiplies the same."""
    from torchao.quantization import quantize_

    r = get_recipe(recipe)
    if r.expert_stacks == "ggml":
        pytest.skip("a stack's llama.cpp type is its fake quantizer's: tests/test_q4_k_m.py checks each type's stack "
                    "against the same conversion of each expert")
    stack = torch.randn(3, 64, 96, generator=torch.Generator().manual_seed(0))
    holder = torch.nn.Module()
    holder.w = torch.nn.Parameter(stack.clone())
    r.convert_expert_stack(r.base_config(), holder, "w")
    x = torch.randn(5, 96)
    for e in range(3):
        linear = torch.nn.Linear(96, 64, bias=False)
        linear.weight.data = stack[e].clone()
        quantize_(linear, r.base_config())
        picked = holder.w[e]
        assert type(picked) is type(linear.weight)
        for part in linear.weight.tensor_data_names:
            assert torch.equal(getattr(picked, part), getattr(linear.weight, part)), part
        assert torch.equal(torch.nn.functional.linear(x, picked), torch.nn.functional.linear(x, linear.weight))


def test_torchao_still_lacks_select_for_int4_tensors():
    """forge_qat.torchao_compat exists because of this; when torchao implements the operator, this test
    fails and the module (and the import artifacts of int4 MoE models need) can go."""
    assert not torchao_compat.TORCHAO_HAS_SELECT


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("recipe", CPU_RECIPES)
def test_moe_fake_quant_matches_converted(arch, recipe):
    """The dense parity target (fake-vs-real under 5% of float-vs-real) holds, and is exactly 0 here."""
    model, tok = tiny_moe(arch)
    model.eval()
    x = torch.randint(0, len(tok), (2, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        float_logits = model(x).logits
        cov = prepare_qat(model, get_recipe(recipe))
        if not get_recipe(recipe).artifact_activations:
            set_activation_fake_quant_enabled(model, False)  # the artifact's float activations (test_parity.py)
        fake_logits = model(x).logits
        converted = convert_qat(model, get_recipe(recipe))
        real_logits = model(x).logits
    assert set(converted) == set(cov.quantized)
    assert sum(name.endswith(("gate_up_proj", "down_proj")) for name in converted) == 4  # 2 stacks x 2 layers
    float_gap = (float_logits - real_logits).abs().max().item()
    fake_gap = (fake_logits - real_logits).abs().max().item()
    assert float_gap > 1e-3
    assert fake_gap <= 0.05 * float_gap, (fake_gap, float_gap)


def test_coverage_counts_parameters_and_reasons():
    model, _ = tiny_moe("qwen3_moe")
    cov = plan(model, get_recipe("int8-dynamic-act-int4-weight"))
    stacks = {f"model.layers.{i}.mlp.experts.{p}" for i in range(2) for p in ("gate_up_proj", "down_proj")}
    assert stacks <= set(cov.quantized)
    expert_numel = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    assert cov.expert_numel() == expert_numel  # 100% of the expert weights
    kept = cov.kept_by_reason()
    assert kept == {OUTPUT_HEAD: model.lm_head.weight.numel(),
                    ROUTER: sum(layer.mlp.gate.weight.numel() for layer in model.model.layers)}
    linear_numel = sum(m.weight.numel() for n, m in model.named_modules()
                       if isinstance(m, torch.nn.Linear) and not n.endswith("lm_head"))
    assert cov.quantized_numel == expert_numel + linear_numel
    assert cov.share == pytest.approx(cov.quantized_numel / (cov.quantized_numel + sum(kept.values())))
    assert "router" in cov.describe() and "expert stacks" in cov.describe()


def test_group_size_misfits_are_reported_by_parameters():
    from transformers import LlamaConfig, LlamaForCausalLM

    # hidden 64 fits int4's group of 32; intermediate 48 does not, so down_proj stays float.
    model = LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=48, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2))
    cov = plan(model, get_recipe("int8-dynamic-act-int4-weight"))
    assert cov.kept["model.layers.0.mlp.down_proj.weight"] == (MISFIT, 64 * 48)


def test_a_recipe_that_would_quantize_nothing_is_an_error_before_training(tmp_path, text_file):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    from forge_qat.models import byte_tokenizer

    gpt2 = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(vocab_size=259, n_embd=64, n_layer=1, n_head=4)).save_pretrained(gpt2)
    byte_tokenizer().save_pretrained(gpt2)
    with pytest.raises(ConfigError, match="Conv1D"):
        run_training(TrainConfig.from_flat(**micro_train_args(tmp_path / "g", text_file, model=str(gpt2))))
    assert not checkpoint_dirs(tmp_path / "g")

    misfit = tmp_path / "misfit"
    LlamaForCausalLM(LlamaConfig(vocab_size=259, hidden_size=48, intermediate_size=48, num_hidden_layers=1,
                                 num_attention_heads=4, num_key_value_heads=2)).save_pretrained(misfit)
    byte_tokenizer().save_pretrained(misfit)
    with pytest.raises(ConfigError, match="would quantize none.*group-size misfit"):
        run_training(TrainConfig.from_flat(**micro_train_args(tmp_path / "m", text_file, model=str(misfit))))

    moe = tmp_path / "moe"
    save_tiny_moe(moe, "qwen3_moe", "per-expert")
    with pytest.raises(ConfigError, match="no torchao route for mixture-of-experts"):
        run_training(TrainConfig.from_flat(**micro_train_args(tmp_path / "w", text_file, model=str(moe),
                                                    qat_recipe="int4-weight-only")))


def test_fake_quant_delay_and_gradient_checkpointing_reach_the_experts(tmp_path, text_file):
    model, tok = tiny_moe("mixtral")
    x = torch.randint(0, len(tok), (1, 16))
    with torch.no_grad():
        ref = model(x).logits
        prepare_qat(model, get_recipe("int8-dynamic-act-int4-weight"))
        set_fake_quant_enabled(model, False)
        torch.testing.assert_close(model(x).logits, ref, rtol=1e-6, atol=1e-6)  # experts run in float
        set_fake_quant_enabled(model, True)
        assert not torch.allclose(model(x).logits, ref)
    src = tmp_path / "m"
    save_tiny_moe(src, "mixtral", "per-expert")
    run = tmp_path / "run"
    run_training(TrainConfig.from_flat(**micro_train_args(run, text_file, model=str(src), gradient_checkpointing=True,
                                                fake_quant_after_steps=2, qat_recipe="int8-dynamic-act-int8-weight")))
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["fake_quant"] for r in records] == [False, False, True, True]
    assert all(r["loss"] == r["loss"] for r in records)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """1-process QAT runs of both architectures from per-expert checkpoints, and one from a fused one."""
    from pydoc_data.topics import topics

    root = tmp_path_factory.mktemp("moe")
    data = root / "train.txt"
    data.write_text(topics["if"] + topics["while"] + topics["for"])
    runs = {}
    for arch, layout in (("qwen3_moe", "per-expert"), ("mixtral", "per-expert"), ("qwen3_moe", "fused")):
        src = root / f"{arch}-{layout}"
        save_tiny_moe(src, arch, layout)
        run = root / f"run-{arch}-{layout}"
        run_training(TrainConfig.from_flat(**micro_train_args(run, data, model=str(src), max_steps=3, save_every=0)))
        runs[arch, layout] = (src, run)
    return runs


def _keys(directory):
    return {k for f in directory.glob("*.safetensors") for k in load_file(f)}


@pytest.mark.parametrize("case", [("qwen3_moe", "per-expert"), ("mixtral", "per-expert"), ("qwen3_moe", "fused")])
def test_checkpoints_keep_the_input_layout(trained, case):
    src, run = trained[case]
    ckpt = checkpoint_dirs(run)[-1][1]
    assert _keys(ckpt) == _keys(src)
    trained_weights, initial = load_file(next(ckpt.glob("*.safetensors"))), load_file(next(src.glob("*.safetensors")))
    expert_key = next(k for k in initial if "experts" in k)
    assert not torch.equal(trained_weights[expert_key], initial[expert_key])  # the experts trained


LOAD_ARTIFACT = """
import sys, torch
from transformers import AutoModelForCausalLM
if sys.argv[2] == "compat":
    import forge_qat.torchao_compat  # noqa: F401  (int4 expert stacks: see its docstring)
from torchao.utils import TorchAOBaseTensor
model = AutoModelForCausalLM.from_pretrained(sys.argv[1])
stacks = [m.gate_up_proj for m in model.modules() if hasattr(m, "gate_up_proj")]
assert stacks and all(isinstance(s, TorchAOBaseTensor) for s in stacks), [type(s) for s in stacks]
assert model.config._experts_implementation in ("eager", "forge_qat.torchao_compat")
print("loaded")
ids = torch.tensor([[1, 2, 3, 4, 5, 6]])
torch.save(model(ids).logits, sys.argv[3])
print("forge_qat" in sys.modules and sys.argv[2] != "compat")
"""


@pytest.mark.parametrize("arch", ARCHS)
def test_finalize_converts_experts_and_stock_transformers_runs_the_artifact(trained, arch, tmp_path):
    from forge_qat.models import load_model

    _, run = trained[arch, "per-expert"]
    report = finalize(FinalizeRequest(source=run, dest=tmp_path / "a"))
    cov = report.coverage
    assert report.mode == "qat" and report.reload_max_diff == 0.0
    assert cov["expert_stacks"] == 4 and cov["expert_params_quantized"] > 0.5 * cov["matmul_params"]
    assert set(cov["kept_float"]) == {"output head", "router"}
    needs_compat = get_recipe(report.recipe).stacks_need_compat
    assert json.loads((tmp_path / "a" / "config.json").read_text())["experts_implementation"] == (
        "forge_qat.torchao_compat" if needs_compat else "eager")

    # Fake-quant model vs the artifact, the artifact loaded by stock transformers in a fresh process.
    ckpt = checkpoint_dirs(run)[-1][1]
    fake, _ = load_model(str(ckpt))
    prepare_as_trained(fake.eval(), ckpt, get_recipe(report.recipe))  # with the scales it learned
    with torch.no_grad():
        want = fake(torch.tensor([[1, 2, 3, 4, 5, 6]])).logits
    out = tmp_path / "logits.pt"
    done = subprocess.run([sys.executable, "-c", LOAD_ARTIFACT, str(tmp_path / "a"), "compat", str(out)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    torch.testing.assert_close(torch.load(out, weights_only=True), want, rtol=0, atol=1e-5)


def test_int4_moe_artifact_without_the_compat_import_fails_at_load_naming_it(trained, tmp_path):
    """In a process that never imports forge_qat, an artifact whose expert stacks need the compat operator
    fails inside `from_pretrained`, with a message naming the import, instead of loading and then failing at
    the first forward."""
    _, run = trained["qwen3_moe", "per-expert"]
    report = finalize(FinalizeRequest(source=run, dest=tmp_path / "a"))
    assert get_recipe(report.recipe).stacks_need_compat
    done = subprocess.run([sys.executable, "-c", LOAD_ARTIFACT, str(tmp_path / "a"), "stock", str(tmp_path / "l.pt")],
                          capture_output=True, text=True)
    assert done.returncode != 0 and "loaded" not in done.stdout
    assert 'experts_implementation="forge_qat.torchao_compat"' in done.stderr, done.stderr[-2000:]


def test_int8_moe_artifacts_need_nothing_but_stock_transformers(trained, tmp_path):
    _, run = trained["qwen3_moe", "per-expert"]
    finalize(FinalizeRequest(source=run, dest=tmp_path / "a", ptq=get_recipe("int8-dynamic-act-int8-weight")))
    done = subprocess.run([sys.executable, "-c", LOAD_ARTIFACT, str(tmp_path / "a"), "stock", str(tmp_path / "l.pt")],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "False"  # forge_qat was never imported


@pytest.mark.parametrize("case", [("qwen3_moe", "per-expert"), ("qwen3_moe", "fused")])
def test_streaming_finalize_of_moe_equals_in_memory(trained, case, tmp_path):
    from test_streaming import assert_same_artifact

    _, run = trained[case]
    in_memory = finalize(FinalizeRequest(source=run, dest=tmp_path / "mem", streaming=False, max_shard_bytes=40_000))
    streamed = finalize(FinalizeRequest(source=run, dest=tmp_path / "stream", streaming=True, max_shard_bytes=40_000))
    assert streamed.coverage == in_memory.coverage and streamed.converted == in_memory.converted
    assert_same_artifact(tmp_path / "mem", tmp_path / "stream")


def test_dry_run_reports_expert_coverage(trained):
    src, run = trained["mixtral", "per-expert"]
    report = finalize(FinalizeRequest(source=run, dest=src / "never", dry_run=True))
    assert report.dry_run and report.coverage["expert_stacks"] == 4
    assert report.by_module["experts.gate_up_proj"] == 2 and report.by_module["experts.down_proj"] == 2


def test_unrecognised_stacked_weights_are_refused_not_left_float():
    model, _ = tiny_moe("qwen3_moe")
    experts_module = model.model.layers[0].mlp.experts
    for flag in ("has_gate", "is_transposed"):
        delattr(experts_module, flag)
    cov = plan(model, get_recipe("int8-dynamic-act-int4-weight"))
    assert cov.kept["model.layers.0.mlp.experts.gate_up_proj"][0] == "unrecognised 3-D weights"
    with pytest.raises(ConfigError, match="3-D weights"):
        prepare_qat(model, get_recipe("int8-dynamic-act-int4-weight"))
