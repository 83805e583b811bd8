"""End-to-end training on the micro preset: CLI, checkpoints, resume, delayed fake quant, bad input."""

import json

import pytest
import torch
from conftest import CrashAt, micro_train_args
from typer.testing import CliRunner

from forge_qat.cli import app
from forge_qat.config import TrainConfig
from forge_qat.errors import OutputExistsError, OutputWriteError
from forge_qat.formats.run_dir import checkpoint_dirs
from forge_qat.train.checkpointing import restore_rng_state, rng_state
from forge_qat.train.trainer import run_training

runner = CliRunner()


def _flags(**kw) -> list[str]:
    out = []
    for k, v in kw.items():
        out += [f"--{k.replace('_', '-')}", str(v)]
    return out


def _metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_cli_train_writes_hf_checkpoints(tmp_path, text_file):
    out = tmp_path / "run"
    result = runner.invoke(app, ["train", *_flags(**micro_train_args(out, text_file, eval_data=str(text_file),
                                                                      eval_every=2))])
    assert result.exit_code == 0, result.output
    records = _metrics(out)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert all({"loss", "lr", "tokens_per_s", "fake_quant"} <= r.keys() for r in records)
    assert [r["step"] for r in records if "eval_loss" in r] == [2, 4]
    ckpts = checkpoint_dirs(out)
    assert [s for s, _ in ckpts] == [2, 4]
    final = ckpts[-1][1]
    meta = json.loads((final / "forge_checkpoint.json").read_text())
    assert meta["qat_recipe"] == "int8-dynamic-act-int4-weight" and meta["step"] == 4

    # Stock transformers loads it; keys are the original model's, weights are float.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from forge_qat.models import preset_model

    loaded = AutoModelForCausalLM.from_pretrained(final)
    AutoTokenizer.from_pretrained(final)
    reference, _ = preset_model("micro-llama")
    assert set(loaded.state_dict()) == set(reference.state_dict())
    assert all(t.dtype == torch.float32 for t in loaded.state_dict().values())
    assert not torch.equal(loaded.model.layers[0].mlp.up_proj.weight, reference.model.layers[0].mlp.up_proj.weight)


def test_training_reduces_loss_with_qat(tmp_path, text_file):
    result = run_training(TrainConfig.from_flat(**micro_train_args(tmp_path / "r", text_file, max_steps=30,
                                                                   batch_size=4, save_every=0)))
    losses = [r["loss"] for r in _metrics(tmp_path / "r")]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5
    assert result.checkpoint.name == "checkpoint-000030"


def test_resume_continues_identically(tmp_path, text_file):
    args = micro_train_args(tmp_path / "a", text_file, max_steps=6, save_every=3, grad_accum=2,
                            fake_quant_after_steps=2)
    run_training(TrainConfig.from_flat(**args))
    straight = _metrics(tmp_path / "a")

    args_b = dict(args, output_dir=str(tmp_path / "b"))
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_training(TrainConfig.from_flat(**args_b), observer=CrashAt(5))
    assert [r["step"] for r in _metrics(tmp_path / "b")] == [1, 2, 3, 4, 5]
    run_training(TrainConfig.from_flat(**dict(args_b, resume=True)))
    resumed = _metrics(tmp_path / "b")

    assert [r["step"] for r in resumed] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in resumed] == [r["loss"] for r in straight]
    assert [r["fake_quant"] for r in resumed] == [False, False, True, True, True, True]
    a_final = checkpoint_dirs(tmp_path / "a")[-1][1] / "model.safetensors"
    b_final = checkpoint_dirs(tmp_path / "b")[-1][1] / "model.safetensors"
    from safetensors.torch import load_file

    sa, sb = load_file(a_final), load_file(b_final)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_delayed_fake_quant_changes_training(tmp_path, text_file):
    common = micro_train_args(tmp_path, text_file, max_steps=3, save_every=0)
    run_training(TrainConfig.from_flat(**dict(common, output_dir=str(tmp_path / "d0"))))
    run_training(TrainConfig.from_flat(**dict(common, output_dir=str(tmp_path / "d2"), fake_quant_after_steps=2)))
    run_training(TrainConfig.from_flat(**dict(common, output_dir=str(tmp_path / "f"), qat_recipe="none")))
    qat, delayed, float_ = (_metrics(tmp_path / d) for d in ("d0", "d2", "f"))
    assert delayed[0]["loss"] == float_[0]["loss"] != qat[0]["loss"]
    assert delayed[2]["loss"] != float_[2]["loss"]


def test_chat_data_and_memory_options_train(tmp_path, chat_file):
    run_training(TrainConfig.from_flat(**micro_train_args(tmp_path / "c", chat_file, gradient_checkpointing=True,
                                                grad_accum=2, precision="bf16",
                                                qat_recipe="int8-dynamic-act-int8-weight")))
    assert all(r["loss"] == r["loss"] for r in _metrics(tmp_path / "c"))  # finite, not NaN


def test_crash_mid_save_keeps_previous_checkpoint(tmp_path, text_file, monkeypatch):
    real_save = torch.save
    calls = []

    def flaky_save(obj, path, *a, **k):
        calls.append(path)
        if len(calls) == 2:
            raise OSError("disk full")
        return real_save(obj, path, *a, **k)

    monkeypatch.setattr(torch, "save", flaky_save)
    with pytest.raises(OutputWriteError, match="cannot write checkpoint .*disk full"):
        run_training(TrainConfig.from_flat(**micro_train_args(tmp_path / "r", text_file)))
    assert [s for s, _ in checkpoint_dirs(tmp_path / "r")] == [2]
    assert not [p for p in (tmp_path / "r").iterdir() if p.name.startswith(".")], "temporary dirs left behind"
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(tmp_path / "r" / "checkpoint-000002")


def test_output_dir_guard(tmp_path, text_file):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "precious.txt").write_text("keep me")
    with pytest.raises(OutputExistsError, match="--overwrite"):
        run_training(TrainConfig.from_flat(**micro_train_args(foreign, text_file)))
    assert (foreign / "precious.txt").read_text() == "keep me"
    run_training(TrainConfig.from_flat(**micro_train_args(tmp_path / "mine", text_file, max_steps=2)))
    with pytest.raises(OutputExistsError, match="--resume"):
        run_training(TrainConfig.from_flat(**micro_train_args(tmp_path / "mine", text_file, max_steps=2)))


@pytest.mark.parametrize("extra, exit_code, message", [
    (["--qat-recipe", "int3-magic"], 2, "int8-dynamic-act-int4-weight"),
    (["--qat-recipe", "int8-dynamic-act-int4-weight", "--fp8-recipe", "rowwise"], 2, "--fp8-recipe rowwise"),
    (["--model", "/no/such/model"], 1, "/no/such/model does not exist"),
    (["--precision", "fp16"], 1, "fp16 autocast needs a CUDA device"),
])
def test_cli_bad_input_is_one_clear_line(tmp_path, text_file, extra, exit_code, message):
    args = micro_train_args(tmp_path / "r", text_file)
    result = runner.invoke(app, ["train", *_flags(**args), *extra])
    assert result.exit_code == exit_code
    assert message in result.output.replace("\n", " ")
    assert "Traceback" not in result.output


def test_cli_bad_model_dir_and_config(tmp_path, text_file):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    result = runner.invoke(app, ["train", *_flags(**micro_train_args(tmp_path / "r", text_file)),
                                 "--model", str(model_dir)])
    assert result.exit_code == 1 and "has no config.json" in result.output
    cfg = tmp_path / "run.yaml"
    cfg.write_text("learning_rate: 3\n")
    result = runner.invoke(app, ["train", str(cfg)])
    assert result.exit_code == 2 and "learning_rate" in result.output


def test_cli_resume_continues_with_the_recorded_config(tmp_path, text_file):
    out = tmp_path / "run"
    first = runner.invoke(app, ["train", *_flags(**micro_train_args(out, text_file, max_steps=2, lr=0.002))])
    assert first.exit_code == 0, first.output
    # Only the run directory and the new step budget: model, data, lr, ... come from forge_run.json.
    again = runner.invoke(app, ["train", "--resume", "--output-dir", str(out), "--max-steps", "4"])
    assert again.exit_code == 0, again.output
    assert [r["step"] for r in _metrics(out)] == [1, 2, 3, 4]
    meta = json.loads((checkpoint_dirs(out)[-1][1] / "forge_checkpoint.json").read_text())
    assert meta["train_config"]["model"] == "micro-llama" and meta["train_config"]["lr"] == 0.002
    assert meta["train_config"]["max_steps"] == 4
    missing = runner.invoke(app, ["train", "--resume", "--output-dir", str(tmp_path / "nope")])
    assert missing.exit_code == 1 and "not a forge run directory" in missing.output


def test_losses_stay_on_the_device_until_once_per_step(tmp_path, text_file, monkeypatch):
    """Each micro-batch's loss terms stay tensors on the device and the loop reads them on the host once per
    optimizer step (on a GPU, a .item() per micro-step is a device sync each); the optimizer steps once per
    grad_accum micro-batches."""
    from forge_qat.train.local import LocalEngine

    backwards, means, optimizer_steps = [], [], []
    real_backward, real_mean, real_step = LocalEngine.backward, LocalEngine.mean, LocalEngine.step
    monkeypatch.setattr(LocalEngine, "backward", lambda self, loss: backwards.append(loss) or real_backward(self, loss))
    monkeypatch.setattr(LocalEngine, "mean", lambda self, v: means.append(v) or real_mean(self, v))

    def adam_steps(engine) -> float:
        return float(engine.optimizer.state_dict()["state"].get(0, {}).get("step", 0))

    def step(self):
        before = adam_steps(self)
        real_step(self)
        optimizer_steps.append(adam_steps(self) != before)

    monkeypatch.setattr(LocalEngine, "step", step)
    run_training(TrainConfig.from_flat(**micro_train_args(tmp_path / "r", text_file, max_steps=2, grad_accum=3)))
    assert len(backwards) == 6 and len(means) == 2
    assert all(isinstance(v, torch.Tensor) and v.shape == (1,) for v in means)
    assert optimizer_steps == [False, False, True] * 2


def test_rng_state_round_trip_and_cuda_state_without_cuda(caplog):

    state = rng_state()
    expected = torch.rand(3)
    torch.rand(5)
    restore_rng_state(state)
    assert torch.equal(torch.rand(3), expected)
    if not torch.cuda.is_available():
        assert "cuda_rng" not in state
        restore_rng_state({**state, "cuda_rng": [torch.zeros(16, dtype=torch.uint8)]})
        assert "random state of 1 CUDA device" in caplog.text



@pytest.mark.parametrize("recipe", ["int8-dynamic-act-int4-weight", "none"])
def test_logged_eval_loss_is_what_forge_eval_reports_for_that_checkpoint(tmp_path, text_file, chat_file, recipe):
    """Training's eval and `forge eval` are one loop (token-weighted, fixed batches): the eval loss logged at a
    step equals `forge eval` of that step's checkpoint on the same data and batches (with fake quantization
    for a QAT run), to float rounding. Chat data scores a different number of tokens per batch, so a mean of
    per-batch means would differ."""
    out = tmp_path / "r"
    run_training(TrainConfig.from_flat(**micro_train_args(out, text_file, qat_recipe=recipe, eval_data=str(chat_file),
                                                          eval_every=2, eval_batches=3, save_every=2)))
    logged = {r["step"]: r["eval_loss"] for r in _metrics(out) if "eval_loss" in r}
    assert set(logged) == {2, 4}
    fake_quant = ["--fake-quant", recipe] if recipe != "none" else []
    for step, ckpt in checkpoint_dirs(out):
        result = runner.invoke(app, ["eval", str(ckpt), "--data", str(chat_file), "--seq-len", "32", "--batch-size",
                                     "2", "--max-batches", "3", *fake_quant, "--json"])
        assert result.exit_code == 0, result.output
        reported = json.loads(result.stdout[result.stdout.index("["):])[0]
        assert 0 < reported["tokens"] < 3 * 2 * 31  # prompts are not scored
        assert reported["loss"] == pytest.approx(logged[step], abs=1e-6), step
    assert logged[2] != logged[4]
