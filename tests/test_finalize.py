"""Finalize: the QAT round trip end to end, formats, PTQ semantics, hardware gate, bad input.

The tool that inspired us shipped a finalize that silently did nothing on QAT checkpoints; these
tests train a real checkpoint, finalize it, and load the artifact in a process that never imports
forge_qat.
"""

import json
import subprocess
import sys

import pytest
import torch
from conftest import micro_train_args
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from forge_qat import hardware
from forge_qat.cli import app
from forge_qat.config import TrainConfig
from forge_qat.errors import ConfigError, HardwareError, InputError, OutputExistsError, OutputWriteError
from forge_qat.finalize.convert import finalize, sample_batch
from forge_qat.finalize.job import FinalizeRequest, choose_job
from forge_qat.formats.run_dir import resolve_checkpoint
from forge_qat.models import load_model
from forge_qat.qat.prepare import LearnScales, prepare_qat
from forge_qat.qat.registry import get_recipe
from forge_qat.train.trainer import run_training

runner = CliRunner()


@pytest.fixture(scope="module")
def runs(tmp_path_factory, request):
    """One QAT run and one float run on the micro preset, shared by this module's tests."""
    from pydoc_data.topics import topics

    root = tmp_path_factory.mktemp("runs")
    data = root / "train.txt"
    data.write_text(topics["if"] + topics["while"] + topics["for"])
    run_training(TrainConfig.from_flat(**micro_train_args(root / "qat", data, max_steps=3, save_every=0)))
    run_training(TrainConfig.from_flat(**micro_train_args(root / "float", data, max_steps=3, save_every=0,
                                                qat_recipe="none")))
    return root


def test_the_verification_line_has_a_yardstick(runs, tmp_path):
    """Top-1 agreement, the float logits' spread and the largest change, recomputed here from the float checkpoint
    and the artifact on the same batch (int2 PTQ: it changes some next tokens)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from forge_qat.finalize.convert import sample_batch

    dest = tmp_path / "artifact"
    result = runner.invoke(app, ["finalize", "--source", str(runs / "float"), "--dest", str(dest), "--ptq",
                                 "int8-dynamic-act-int2-weight", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    ckpt = sorted((runs / "float").glob("checkpoint-*"))[-1]
    float_model = AutoModelForCausalLM.from_pretrained(ckpt).eval()
    batch = sample_batch(AutoTokenizer.from_pretrained(ckpt), float_model.config.vocab_size)
    with torch.no_grad():
        float_logits = float_model(batch).logits
        quant_logits = AutoModelForCausalLM.from_pretrained(dest).eval()(batch).logits
    assert report["verification_positions"] == batch.numel()
    agree = (quant_logits.argmax(-1) == float_logits.argmax(-1)).float().mean().item()
    assert report["top1_agreement"] == pytest.approx(agree) and 0 < agree < 1
    assert report["float_logit_std"] == pytest.approx(float_logits.std().item(), rel=1e-4)
    assert report["max_logit_diff_vs_float"] == pytest.approx((quant_logits - float_logits).abs().max().item(),
                                                               rel=1e-4)
    shown = runner.invoke(app, ["finalize", "--source", str(runs / "float"), "--dest", str(dest), "--ptq",
                                "int8-dynamic-act-int2-weight", "--overwrite"]).output
    assert f"top-1 next token agrees on {agree:.1%}" in " ".join(shown.split())


def test_qat_round_trip_loads_in_stock_transformers(runs, tmp_path):
    dest = tmp_path / "artifact"
    result = runner.invoke(app, ["finalize", "--source", str(runs / "qat"), "--dest", str(dest), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["mode"] == "qat" and report["recipe"] == "int8-dynamic-act-int4-weight"
    assert report["converted"] == 14 and report["coverage"]["linear_layers"] == 14  # all but lm_head
    # the micro preset ties its head to the input embedding: one table, named as such and counted once
    assert report["coverage"]["kept_float"] == {"embedding table (tied with the output head)": 259 * 64}
    assert report["coverage"]["matmul_params"] - report["coverage"]["quantized_params"] == 259 * 64
    assert report["format"] == "safetensors" and report["reload_max_diff"] == 0.0
    assert report["max_logit_diff_vs_float"] > 0  # conversion really changed the numerics
    assert (dest / "model.safetensors").is_file() and not list(dest.glob("*.bin"))
    # A fresh interpreter that never imports forge_qat loads and generates.
    probe = f"""
import sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from torchao.utils import TorchAOBaseTensor
m = AutoModelForCausalLM.from_pretrained({str(dest)!r})
tok = AutoTokenizer.from_pretrained({str(dest)!r})
w = m.model.layers[0].mlp.up_proj.weight
assert isinstance(w, TorchAOBaseTensor), type(w)
out = m.generate(**tok("The if statement", return_tensors="pt"), max_new_tokens=5, do_sample=False)
assert out.shape[1] > 5
assert not any(name.startswith("forge_qat") for name in sys.modules)
print(type(w).__name__)
"""
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().endswith("IntxUnpackedToInt8Tensor")


def test_artifact_matches_fake_quant_model(runs, tmp_path):
    """The converted artifact computes what training's fake-quant forward computed."""
    from transformers import AutoModelForCausalLM

    from forge_qat.eval.models import prepare_as_trained
    from forge_qat.finalize.convert import sample_batch
    from forge_qat.formats.run_dir import resolve_checkpoint
    from forge_qat.models import load_model

    report = finalize(FinalizeRequest(source=runs / "qat", dest=tmp_path / "a"))
    ckpt = resolve_checkpoint(runs / "qat")
    fake, tok = load_model(str(ckpt))
    prepare_as_trained(fake, ckpt, get_recipe(report.recipe))  # with the scales it learned
    real = AutoModelForCausalLM.from_pretrained(tmp_path / "a")
    x = sample_batch(tok, fake.config.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(real(x).logits, fake.eval()(x).logits, rtol=0, atol=0)


def test_bin_format_and_sharding(runs, tmp_path):
    from transformers import AutoModelForCausalLM

    binary = finalize(FinalizeRequest(source=runs / "qat", dest=tmp_path / "bin", fmt="bin"))
    assert binary.format == "bin" and (tmp_path / "bin" / "pytorch_model.bin").is_file()
    sharded = finalize(FinalizeRequest(source=runs / "qat", dest=tmp_path / "shards", max_shard_bytes=20_000))
    assert len(sharded.shards) > 2
    index = json.loads((tmp_path / "shards" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(sharded.shards)
    m = AutoModelForCausalLM.from_pretrained(tmp_path / "shards")
    assert type(m.model.layers[1].self_attn.o_proj.weight).__name__ == "IntxUnpackedToInt8Tensor"


def test_int8_int8_recipe_finalizes(runs, tmp_path):
    report = finalize(FinalizeRequest(source=runs / "float", dest=tmp_path / "i8",
                                      ptq=get_recipe("int8-dynamic-act-int8-weight")))
    assert report.mode == "ptq" and report.converted == 14 and report.format == "safetensors"
    assert report.notes == []  # explicit --ptq: no warning


def test_safetensors_that_cannot_be_honoured_is_an_error(runs, tmp_path, monkeypatch):
    import forge_qat.finalize.convert as fin

    monkeypatch.setattr(fin, "unflattenable", lambda state: ["model.layers.0.mlp.up_proj.weight"])
    with pytest.raises(ConfigError, match="--format safetensors is not possible"):
        finalize(FinalizeRequest(source=runs / "qat", dest=tmp_path / "x", fmt="safetensors"))
    assert not (tmp_path / "x").exists()
    auto = finalize(FinalizeRequest(source=runs / "qat", dest=tmp_path / "auto"))
    assert auto.format == "bin" and "cannot flatten" in auto.format_reason


def test_ptq_semantics(runs):
    float_ckpt = runs / "float"
    i4, i8 = "int8-dynamic-act-int4-weight", "int8-dynamic-act-int8-weight"
    with pytest.raises(ConfigError, match="records no QAT recipe"):
        choose_job(FinalizeRequest(source=float_ckpt, dest=runs / "x"))
    plan = choose_job(FinalizeRequest(source=float_ckpt, dest=runs / "x", qat_convert=get_recipe(i4)))
    assert plan.mode == "ptq" and "not QAT-trained" in plan.notes[0]
    plan = choose_job(FinalizeRequest(source=runs / "qat", dest=runs / "x", qat_convert=get_recipe(i8)))
    assert plan.mode == "ptq" and "post-training quantization" in plan.notes[0]
    assert choose_job(FinalizeRequest(source=runs / "qat", dest=runs / "x")).mode == "qat"
    with pytest.raises(ConfigError, match="give one"):
        choose_job(FinalizeRequest(source=runs / "qat", dest=runs / "x", qat_convert=get_recipe(i4),
                                   ptq=get_recipe(i4)))


@pytest.mark.parametrize("streaming", [False, True])
def test_ptq_scales_are_chosen_by_error(runs, tmp_path, streaming):
    """`finalize --ptq` chooses each group's scale by the `extreme` rule by default (llama.cpp's Q4_0 rule for
    llama-cpp-q4-0) or by `--ptq-scales`: the artifact equals the fake-quant model with scales chosen that way, bit
    for bit, in memory and streamed, differs from `--ptq-scales absmax`'s, and the report says which scales it
    holds."""
    recipe = get_recipe("llama-cpp-q4-0")
    made = {rule: finalize(FinalizeRequest(source=runs / "float", dest=tmp_path / rule, ptq=recipe,
                                           streaming=streaming, **({} if rule == "extreme" else {"ptq_scales": rule})))
            for rule in ("extreme", "mse", "absmax")}
    assert [r.weight_scales for r in made.values()] == list(made)
    assert json.loads((made["extreme"].dest / "forge_artifact.json").read_text())["weight_scales"] == "extreme"
    fake, tok = load_model(str(resolve_checkpoint(runs / "float")))
    prepare_qat(fake, recipe, learn=LearnScales(init="mse"))
    x = sample_batch(tok, fake.config.vocab_size)
    with torch.no_grad():
        mse = AutoModelForCausalLM.from_pretrained(made["mse"].dest)(x).logits
        torch.testing.assert_close(mse, _without_activation_fake_quant(fake)(x).logits, rtol=0, atol=0)
    fake, tok = load_model(str(resolve_checkpoint(runs / "float")))
    prepare_qat(fake, recipe, learn=LearnScales(init="extreme"))
    artifact = AutoModelForCausalLM.from_pretrained(made["extreme"].dest)
    with torch.no_grad():
        got = artifact(x).logits
        torch.testing.assert_close(got, _without_activation_fake_quant(fake)(x).logits, rtol=0, atol=0)
        assert not torch.equal(got, mse)
        assert not torch.equal(got, AutoModelForCausalLM.from_pretrained(made["absmax"].dest)(x).logits)
    assert (artifact.model.layers[0].mlp.down_proj.weight.scale < 0).any()  # Q4_0's signed scales are kept
    result = runner.invoke(app, ["finalize", "--source", str(runs / "float"), "--dest", str(tmp_path / "x"),
                                 "--ptq", recipe.name, "--ptq-scales", "best"])
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert "unknown --ptq-scales rule 'best'; valid --ptq-scales rules: mse, absmax, extreme" in result.output


def _without_activation_fake_quant(model):
    """llama-cpp-q4-0's artifact runs float activations in transformers (`Recipe.artifact_activations`)."""
    from forge_qat.qat.prepare import set_activation_fake_quant_enabled

    set_activation_fake_quant_enabled(model, False)
    return model.eval()


def test_hardware_gate_fails_before_loading(runs, tmp_path, monkeypatch):
    import forge_qat.finalize.convert as fin

    float8 = get_recipe("float8-dynamic-act-float8-weight")

    def must_not_load(*a, **k):
        raise AssertionError("the model was loaded before the hardware check")

    monkeypatch.setattr(fin, "load_model", must_not_load)
    monkeypatch.setattr(hardware, "cuda_available", lambda: False)
    with pytest.raises(HardwareError, match="CUDA"):
        finalize(FinalizeRequest(source=runs / "qat", dest=tmp_path / "x", ptq=float8))
    # with the gate open the same request gets past it (and reaches loading)
    monkeypatch.setattr(hardware, "cuda_available", lambda: True)
    monkeypatch.setattr(hardware, "has_cuda_capability", lambda major, minor: True)
    with pytest.raises(AssertionError, match="loaded before"):
        finalize(FinalizeRequest(source=runs / "qat", dest=tmp_path / "x", ptq=float8))


def test_dry_run_writes_nothing(runs, tmp_path):
    result = runner.invoke(app, ["finalize", "--source", str(runs / "qat"), "--dest", str(tmp_path / "d"),
                                 "--dry-run", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["dry_run"] and report["converted"] == 14
    assert report["by_module"] == {k: 2 for k in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                  "down_proj")}
    assert 0 < report["artifact_bytes"] < report["source_bytes"] and report["source_dtype"] == "float32"
    assert not (tmp_path / "d").exists()


def test_bad_input(runs, tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        finalize(FinalizeRequest(source=tmp_path / "nope", dest=tmp_path / "x"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no config.json"):
        finalize(FinalizeRequest(source=tmp_path / "empty", dest=tmp_path / "x"))
    (tmp_path / "taken").mkdir()
    with pytest.raises(OutputExistsError, match="--overwrite"):
        finalize(FinalizeRequest(source=runs / "qat", dest=tmp_path / "taken"))
    result = runner.invoke(app, ["finalize", "--source", str(runs / "qat"), "--dest", str(tmp_path / "y"),
                                 "--qat-convert", "int3"])
    assert result.exit_code == 2 and "int8-dynamic-act-int4-weight" in result.output


def test_failed_write_leaves_no_artifact(runs, tmp_path, monkeypatch):
    def full_disk(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("safetensors.torch.save_file", full_disk)
    with pytest.raises(OutputWriteError, match="the disk is full"):  # one line, not the OSError
        finalize(FinalizeRequest(source=runs / "qat", dest=tmp_path / "out"))
    assert list(tmp_path.iterdir()) == [], "temporary output must be removed"


def test_eval_and_compare(runs, tmp_path):
    from forge_qat.eval.compare import compare
    from forge_qat.eval.models import evaluate_model
    from forge_qat.eval.plot import plot_loss_curves

    qat = finalize(FinalizeRequest(source=runs / "qat", dest=tmp_path / "qat"))
    # absmax: the scales the fake-quant eval's dynamic quantizer chooses
    ptq = finalize(FinalizeRequest(source=runs / "float", dest=tmp_path / "ptq", ptq=get_recipe(qat.recipe),
                                   ptq_scales="absmax"))
    data = str(runs / "train.txt")
    float_eval = evaluate_model(str(runs / "float"), data, seq_len=32)
    fake = evaluate_model(str(runs / "float"), data, seq_len=32, fake_quant=get_recipe(qat.recipe))
    ptq_eval = evaluate_model(str(ptq.dest), data, seq_len=32)
    assert float_eval.kind == "float" and ptq_eval.kind == "quantized artifact"
    assert fake.loss == pytest.approx(ptq_eval.loss, abs=1e-5)  # fake quant == converted
    assert float_eval.perplexity == pytest.approx(torch.tensor(float_eval.loss).exp().item())

    c = compare(str(runs / "float"), str(ptq.dest), str(qat.dest), data, seq_len=32)
    degradation = c.ptq_result.loss - c.float_result.loss
    if degradation > 0:
        assert c.recovered == pytest.approx((c.ptq_result.loss - c.qat_result.loss) / degradation)
    png = plot_loss_curves({"float": runs / "float", "qat": runs / "qat"}, tmp_path / "curves.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    result = runner.invoke(app, ["compare", "--float", str(runs / "float"), "--ptq", str(ptq.dest), "--qat",
                                 str(qat.dest), "--data", data, "--json"])
    assert result.exit_code == 0, result.output
    compared = json.loads(result.stdout)
    labels = ["float fine-tune", "PTQ of float (absmax scales)", "QAT converted"]
    assert [r["label"] for r in compared["rows"]] == labels
    assert compared["ptq_weight_scales"] == "absmax"


def test_forge_demo_end_to_end(tmp_path):
    out = tmp_path / "demo"
    result = runner.invoke(app, ["demo", "--output-dir", str(out), "--steps", "4", "--qat-steps", "2"],
                           terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "float vs PTQ vs QAT" in result.output
    comparison = json.loads((out / "comparison.json").read_text())
    assert [r["kind"] for r in comparison["rows"]] == ["float", "quantized artifact", "quantized artifact"]
    assert (out / "loss_curves.png").is_file()
    qat_metrics = [json.loads(x) for x in (out / "qat" / "metrics.jsonl").read_text().splitlines()]
    float_metrics = [json.loads(x) for x in (out / "float" / "metrics.jsonl").read_text().splitlines()]
    assert [r["fake_quant"] for r in qat_metrics] == [False, False, True, True]
    assert qat_metrics[1]["loss"] == float_metrics[1]["loss"]  # identical until fake quant starts
    # a second run reuses its own directory; a foreign one is refused
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "x").write_text("mine")
    refused = runner.invoke(app, ["demo", "--output-dir", str(foreign), "--steps", "2", "--qat-steps", "1"])
    assert refused.exit_code == 1 and "not a forge demo directory" in refused.output


@pytest.mark.parametrize("streaming", [False, True])
def test_float_tensors_keep_the_source_dtype(tmp_path, streaming):
    """A bf16 model finalized on the CPU: the tensors that stay float (embeddings, norms) are written in
    bf16, not widened to fp32; the in-memory route reloads to identical logits."""
    from safetensors.torch import load_file

    from forge_qat.finalize.convert import finalize
    from forge_qat.finalize.job import FinalizeRequest
    from forge_qat.models import preset_model

    model, tok = preset_model("micro-llama")
    model.to(torch.bfloat16).save_pretrained(tmp_path / "src")
    tok.save_pretrained(tmp_path / "src")
    report = finalize(FinalizeRequest(source=tmp_path / "src", dest=tmp_path / "out",
                                      ptq=get_recipe("int8-dynamic-act-int4-weight"), streaming=streaming))
    written = load_file(tmp_path / "out" / "model.safetensors")
    kept = {k: v.dtype for k, v in written.items() if "norm" in k or "embed_tokens" in k}
    assert kept and set(kept.values()) == {torch.bfloat16}
    assert streaming or report.reload_max_diff == 0.0


def test_cuda_recipes_convert_and_evaluate_on_the_gpu_in_bf16(tmp_path, monkeypatch):
    from forge_qat import hardware
    from forge_qat.errors import HardwareError
    from forge_qat.eval.models import eval_placement
    from forge_qat.finalize.job import ConvertJob, convert_placement
    from forge_qat.formats.artifact_meta import ARTIFACT_META
    from forge_qat.qat.registry import get_recipe

    for name in ("int4-weight-only", "float8-dynamic-act-float8-weight", "float8-dynamic-act-int4-weight"):
        plan = ConvertJob(tmp_path, get_recipe(name), "ptq", (), None)
        assert convert_placement(plan) == (torch.device("cuda"), torch.bfloat16)
    (tmp_path / ARTIFACT_META).write_text(json.dumps({"recipe": "int4-weight-only"}))
    monkeypatch.setattr(hardware, "cuda_available", lambda: False)
    with pytest.raises(HardwareError, match="need a CUDA GPU"):
        eval_placement(tmp_path)
    monkeypatch.setattr(hardware, "cuda_available", lambda: True)
    assert eval_placement(tmp_path) == (torch.device("cuda"), torch.bfloat16)
    (tmp_path / ARTIFACT_META).write_text(json.dumps({"recipe": "int8-dynamic-act-int4-weight"}))
    assert eval_placement(tmp_path) == (torch.device("cuda"), torch.float32)
