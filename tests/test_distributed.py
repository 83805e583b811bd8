"""DeepSpeed ZeRO-3 on 2 CPU ranks (gloo), spawned from pytest, against single-process references."""

import json
import math
import os
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import micro_train_args, partition_everything
from safetensors.torch import load_file

from forge_qat.config import TrainConfig
from forge_qat.distributed.launch import RankFailedError, check_nproc
from forge_qat.errors import ConfigError
from forge_qat.formats import checkpoint as ckpt_io
from forge_qat.formats.adapters import read_adapters
from forge_qat.formats.run_dir import METRICS, checkpoint_dirs
from forge_qat.train.entry import launch_training
from forge_qat.train.trainer import run_training

WORKER = [sys.executable, str(Path(__file__).parent / "zero_worker.py")]
pytestmark = pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="needs 2 CPU cores for 2 ranks")


def _zero_args(out, data, **kw):
    return micro_train_args(out, data, nproc=2, zero_stage=3, dist_timeout_s=60, **kw)


def _metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _weights(run_dir):
    return load_file(checkpoint_dirs(run_dir)[-1][1] / "model.safetensors")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from pydoc_data.topics import topics

    path = tmp_path_factory.mktemp("data") / "train.txt"
    path.write_text(topics["if"] + topics["while"] + topics["for"] + topics["try"])
    return path


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A micro model saved as a sharded HF directory, as a pretrained model would be."""
    from forge_qat.models import preset_model

    path = tmp_path_factory.mktemp("pretrained")
    model, tok = preset_model("micro-llama", seed=7)
    model.save_pretrained(path, max_shard_size="60KB")
    tok.save_pretrained(path)
    assert len(list(path.glob("*.safetensors"))) > 1
    return path, model


def test_streamed_load_and_consolidation_are_bit_identical(tmp_path, data, pretrained, monkeypatch):
    """2 ranks stream a sharded pretrained model into partitions; rank 0 gathers it back out, shard
    by shard: every tensor equals the original bit for bit, tied weights stored once."""
    path, reference = pretrained
    out = tmp_path / "consolidated"
    monkeypatch.setenv("FORGE_TEST_LOAD_ONLY", str(out))
    launch_training(TrainConfig.from_flat(**_zero_args(tmp_path / "z", data, model=str(path), qat_recipe="none")),
                    worker=WORKER)
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) > 1 and (out / "model.safetensors.index.json").is_file()
    got = {k: v for f in shards for k, v in load_file(f).items()}
    want = {k: v for k, v in reference.state_dict().items() if k != "lm_head.weight"}  # tied to embed
    assert set(got) == set(want)
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_streamed_load_names_missing_keys(tmp_path, data, pretrained, monkeypatch):
    path, _ = pretrained
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in path.iterdir():
        if f.name != "model.safetensors.index.json":
            (broken / f.name).write_bytes(f.read_bytes())
    next(broken.glob("model-00001-*.safetensors")).unlink()
    monkeypatch.setenv("FORGE_TEST_LOAD_ONLY", str(tmp_path / "never"))
    with pytest.raises(RankFailedError, match="missing"):
        launch_training(TrainConfig.from_flat(**_zero_args(tmp_path / "z", data, model=str(broken), qat_recipe="none")),
               worker=WORKER)


# Stated tolerances on the per-step loss. In float the only difference is the all-reduce's
# summation order (measured: 6e-7 over 6 steps). With fake quantization those ~1e-7 weight
# differences can flip a rounding decision, which is then visible at the loss (measured: 1.6e-3
# by step 4 on this micro model at lr 1e-3).
TOLERANCE = {"none": 1e-5, "int8-dynamic-act-int4-weight": 5e-3,
             # the tied embedding and head fake-quantized from the partitioned table
             "int8-dynamic-act-int4-weight-int8-embeddings": 5e-3,
             # each layer's llama.cpp type chosen from its place in the partitioned model (micro: Q5_0, Q8_0)
             "llama-cpp-q4-k-m": 5e-3}


@pytest.mark.parametrize("recipe", list(TOLERANCE))
def test_zero3_training_matches_single_process(tmp_path, data, recipe):
    """Same global batch and seed: 2 ranks x batch 2 under ZeRO-3 vs 1 process x batch 4."""
    args = dict(max_steps=4, save_every=0, grad_accum=2, qat_recipe=recipe, eval_data=str(data), eval_every=2,
                eval_batches=2)
    launch_training(TrainConfig.from_flat(**_zero_args(tmp_path / "z", data, **args)), worker=WORKER)
    run_training(TrainConfig.from_flat(**micro_train_args(tmp_path / "s", data, batch_size=4, **args)))
    zero, single = _metrics(tmp_path / "z"), _metrics(tmp_path / "s")
    assert [r["step"] for r in zero] == [1, 2, 3, 4]
    assert zero[0]["loss"] == pytest.approx(single[0]["loss"], abs=1e-6)  # same weights, same batch
    for a, b in zip(zero, single, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=TOLERANCE[recipe])
    # eval under ZeRO-3 (every rank runs the same forwards) uses eval batch size 2 vs 4 here, so
    # compare it with the same model's numbers loosely; the steps it was measured at must agree.
    assert [r["step"] for r in zero if "eval_loss" in r] == [r["step"] for r in single if "eval_loss" in r] == [2, 4]
    assert zero[-1]["loss"] < zero[0]["loss"] - 0.05  # it trained
    # The consolidated rank-0 checkpoint is the single-process checkpoint (tied lm_head stored once).
    wz, ws = _weights(tmp_path / "z"), _weights(tmp_path / "s")
    assert set(wz) == set(ws) - {"lm_head.weight"}
    for k in wz:
        torch.testing.assert_close(wz[k], ws[k], rtol=0, atol=1e-5 if recipe == "none" else 2e-3)
    meta = json.loads((checkpoint_dirs(tmp_path / "z")[-1][1] / "forge_checkpoint.json").read_text())
    assert meta["world_size"] == 2 and meta["qat_recipe"] == (None if recipe == "none" else recipe)


@pytest.mark.parametrize("teacher", ["self", "float"])
def test_distillation_under_zero3_matches_single_process(tmp_path, data, teacher):
    """KD under ZeRO-3 with the `self` teacher (the partitioned student with fake quantization off) and
    the `float` teacher (a second partitioned model, frozen): 2 ranks vs one process on the same global
    batch, loss and both parts. The float teacher must stay the starting model: by step 3 the student
    has moved, and a teacher that moved with it would give another KD loss."""
    args = dict(max_steps=3, save_every=0, kd_weight=0.5, kd_loss="kl", kd_teacher=teacher)
    launch_training(TrainConfig.from_flat(**_zero_args(tmp_path / "z", data, **args)), worker=WORKER)
    run_training(TrainConfig.from_flat(**micro_train_args(tmp_path / "s", data, batch_size=4, **args)))
    zero, single = _metrics(tmp_path / "z"), _metrics(tmp_path / "s")
    for a, b in zip(zero, single, strict=True):
        for key in ("loss", "lm_loss", "kd_loss"):
            assert a[key] == pytest.approx(b[key], abs=5e-3), (key, a, b)
    assert zero[0]["kd_loss"] > 0


@pytest.mark.parametrize(("recipe", "delay"), [("int8-dynamic-act-int8-weight", 0),
                                               ("int8-dynamic-act-int4-weight", 2)])
def test_learned_scales_under_zero3_match_single_process(tmp_path, data, recipe, delay):
    """--qat-learn-scales under ZeRO-3 (scales chosen from each gathered weight, then partitioned and
    trained like any parameter; with `delay`, chosen again from the partitioned weights when fake
    quantization starts) vs one process; the artifact finalized from the live partitioned model
    reproduces the fake-quant model built from the checkpoint's weights and learned scales exactly. The int8
    recipe's linear multiplies with its scales itself (not through its quantizer's forward, for which
    DeepSpeed would gather them): the engine registers them as the linear's external parameters. Default
    recipe without delay: with MoE experts in tests/test_distributed_moe.py."""
    from forge_qat.finalize.convert import sample_batch
    from forge_qat.models import load_model
    from forge_qat.qat.prepare import LearnScales, prepare_qat
    from forge_qat.qat.registry import get_recipe

    # int8 per-row scales are ~1e-3: at the preset's lr (1e-3) Adam would move them by their own size per step
    args = dict(max_steps=3, save_every=0, qat_learn_scales=True, qat_recipe=recipe, finalize=recipe,
                fake_quant_after_steps=delay, qat_scale_lr=1e-5 if "int8-weight" in recipe else None)
    launch_training(TrainConfig.from_flat(**_zero_args(tmp_path / "z", data,
                                                       deepspeed_config=partition_everything(tmp_path), **args)),
                    worker=WORKER)
    run_training(TrainConfig.from_flat(**micro_train_args(tmp_path / "s", data, batch_size=4, **args)))
    for a, b in zip(_metrics(tmp_path / "z"), _metrics(tmp_path / "s"), strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=5e-3)
    ckpt = checkpoint_dirs(tmp_path / "z")[-1][1]
    sz = ckpt_io.read_learned_scales(ckpt)
    ss = ckpt_io.read_learned_scales(checkpoint_dirs(tmp_path / "s")[-1][1])
    assert sz and set(sz) == set(ss) and not set(sz) & set(_weights(tmp_path / "z"))
    # Adam's first updates move every element by about lr whatever its gradient's size: an element whose gradient
    # is ~0 may move either way under the all-reduce's different summation order (seen with `delay`, once the
    # weights have had float steps). So: almost all elements close, none further apart than two such moves.
    for k in sz:
        close = torch.isclose(sz[k], ss[k], rtol=2e-3, atol=1e-6)
        assert close.float().mean() >= 0.98 and (sz[k] - ss[k]).abs().max() <= 2e-3, k
    fake, tok = load_model(str(ckpt))
    prepare_qat(fake, get_recipe(recipe), learn=LearnScales(initial=sz))
    from transformers import AutoModelForCausalLM

    real = AutoModelForCausalLM.from_pretrained(tmp_path / "z" / f"final-{recipe}")
    x = sample_batch(tok, fake.config.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(real(x).logits, fake.eval()(x).logits, rtol=0, atol=0)


def test_rank_failure_ends_job_then_resume_continues_identically(tmp_path, data, monkeypatch):
    args = dict(max_steps=4, save_every=2)
    launch_training(TrainConfig.from_flat(**_zero_args(tmp_path / "a", data, **args)), worker=WORKER)

    monkeypatch.setenv("FORGE_TEST_FAIL", "1:2")  # rank 1 dies drawing step 3's batch
    t0 = time.monotonic()
    with pytest.raises(RankFailedError) as e:
        launch_training(TrainConfig.from_flat(**_zero_args(tmp_path / "b", data, **args)), worker=WORKER)
    assert e.value.rank == 1 and e.value.exit_code != 0
    assert "injected failure at micro-batch 2" in str(e.value)
    assert time.monotonic() - t0 < 90, "the surviving rank must not wait for the collective timeout"
    assert [s for s, _ in checkpoint_dirs(tmp_path / "b")] == [2]

    monkeypatch.delenv("FORGE_TEST_FAIL")
    launch_training(TrainConfig.from_flat(**_zero_args(tmp_path / "b", data, resume=True, **args)), worker=WORKER)
    a, b = _metrics(tmp_path / "a"), _metrics(tmp_path / "b")
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    assert [r["loss"] for r in b] == [r["loss"] for r in a]
    wa, wb = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_a_rank_that_cannot_see_the_run_directory_stops_the_job_before_training(tmp_path, data, monkeypatch):
    monkeypatch.setenv("FORGE_TEST_BLIND_RANK", "1")
    with pytest.raises(RankFailedError, match=r"rank\(s\) \[1\] cannot see the run directory"):
        launch_training(TrainConfig.from_flat(**_zero_args(tmp_path / "z", data, max_steps=2)), worker=WORKER)
    assert not (tmp_path / "z" / METRICS).exists() or not _metrics(tmp_path / "z")


def test_checkpoint_from_other_world_size_refuses_to_resume(tmp_path, data):
    launch_training(TrainConfig.from_flat(**_zero_args(tmp_path / "r", data, max_steps=2)), worker=WORKER)
    with pytest.raises(ConfigError, match="2 process"):
        run_training(TrainConfig.from_flat(**micro_train_args(tmp_path / "r", data, max_steps=4, resume=True)))


def test_a_run_started_with_only_a_deepspeed_config_resumes(tmp_path, data):
    """`--deepspeed-config` without `--zero-stage` records zero_stage 0. Whether a run used DeepSpeed is a recorded
    fact of its checkpoints (older ones derive it from both options, as the run config does), so `--resume` with
    the recorded configuration continues it; it used to be refused as a change of engine."""
    from forge_qat.config import build_config

    args = _zero_args(tmp_path / "d", data, max_steps=2, save_every=1)
    del args["zero_stage"]
    launch_training(TrainConfig.from_flat(**args, deepspeed_config=partition_everything(tmp_path)), worker=WORKER)
    meta_file = checkpoint_dirs(tmp_path / "d")[-1][1] / "forge_checkpoint.json"
    meta = json.loads(meta_file.read_text())
    assert meta["uses_deepspeed"] is True and meta["train_config"]["zero_stage"] == 0
    launch_training(build_config(resume=True, output_dir=str(tmp_path / "d"), max_steps=3), worker=WORKER)

    meta_file = checkpoint_dirs(tmp_path / "d")[-1][1] / "forge_checkpoint.json"
    meta = json.loads(meta_file.read_text())
    del meta["uses_deepspeed"]  # as a checkpoint written before the fact was recorded
    meta_file.write_text(json.dumps(meta))
    launch_training(build_config(resume=True, output_dir=str(tmp_path / "d"), max_steps=4), worker=WORKER)
    assert [r["step"] for r in _metrics(tmp_path / "d")] == [1, 2, 3, 4]


def test_gradient_checkpointing_with_frozen_embeddings(tmp_path, data):
    launch_training(TrainConfig.from_flat(**_zero_args(tmp_path / "g", data, max_steps=3, gradient_checkpointing=True,
                                    freeze_embeddings=True)), worker=WORKER)
    from forge_qat.models import preset_model

    initial, _ = preset_model("micro-llama")
    w = _weights(tmp_path / "g")
    assert torch.equal(w["model.embed_tokens.weight"], initial.model.embed_tokens.weight)
    assert not torch.equal(w["model.layers.0.mlp.up_proj.weight"], initial.model.layers[0].mlp.up_proj.weight)
    assert all(r["loss"] == r["loss"] for r in _metrics(tmp_path / "g"))


def test_ds_config_contradictions_and_nproc_limits(tmp_path):
    from forge_qat.distributed import config as dist_config

    def ds_config(cfg, precision, world_size):
        batching = dist_config.Batching(micro_batch=cfg.optim.batch_size, grad_accum=cfg.optim.grad_accum,
                                        max_grad_norm=cfg.optim.max_grad_norm, precision=precision)
        return dist_config.ds_config(cfg.distributed, batching, world_size)

    cfg_file = tmp_path / "ds.json"
    cfg_file.write_text(json.dumps({"zero_optimization": {"stage": 2}, "train_micro_batch_size_per_gpu": "auto"}))
    cfg = TrainConfig.from_flat(zero_stage=3, deepspeed_config=str(cfg_file))
    with pytest.raises(ConfigError, match="zero_optimization.stage is 2.*zero_stage = 3"):
        ds_config(cfg, "fp32", 2)
    cfg_file.write_text(json.dumps({"train_micro_batch_size_per_gpu": 16}))
    with pytest.raises(ConfigError, match="train_micro_batch_size_per_gpu is 16.*batch_size = 8"):
        ds_config(TrainConfig.from_flat(zero_stage=3, deepspeed_config=str(cfg_file)), "fp32", 2)
    cfg_file.write_text(json.dumps({"zero_optimization": {"stage": "auto", "overlap_comm": False},
                                    "train_micro_batch_size_per_gpu": "auto"}))
    merged = ds_config(TrainConfig.from_flat(zero_stage=3, deepspeed_config=str(cfg_file), batch_size=2), "bf16", 2)
    assert merged["zero_optimization"] == {"stage": 3, "overlap_comm": False}
    assert merged["train_micro_batch_size_per_gpu"] == 2 and merged["bf16"]["enabled"]
    for zero, refused in (({"zero_hpz_partition_size": 8}, "hierarchical"), ({"mics_shard_size": 4}, "MiCS"),
                          ({"offload_param": {"device": "cpu"}}, "offload_param")):
        cfg_file.write_text(json.dumps({"zero_optimization": {"stage": 3, **zero}}))
        with pytest.raises(ConfigError, match=refused):
            ds_config(TrainConfig.from_flat(zero_stage=3, deepspeed_config=str(cfg_file)), "bf16", 2)
    cfg_file.write_text(json.dumps({"zero_optimization": {"stage": 3, "zero_hpz_partition_size": 1,
                                                          "offload_optimizer": {"device": "cpu"}}}))
    ds_config(TrainConfig.from_flat(zero_stage=3, deepspeed_config=str(cfg_file)), "bf16", 2)  # both are fine
    with pytest.raises(ConfigError, match="exceeds"):
        check_nproc(10_000)
    with pytest.raises(ConfigError, match="trains every weight under DeepSpeed"):
        TrainConfig.from_flat(nproc=2)


def test_the_reported_rank_is_the_cause_not_a_consequence():
    """torch's launcher lists every rank it stopped; forge reports the one that failed first on its own."""
    from forge_qat.distributed.launch import _cause

    assert _cause({0: -15, 1: -9}) == 1  # rank 1 killed; rank 0 stopped by the launcher
    assert _cause({0: 3, 1: 1, 2: -15}) == 1  # rank 1's own error; rank 0's collective broke under it
    assert _cause({0: -15, 1: 3}) == 1
    assert _cause({0: 1, 1: 1}) == 0


def test_process_group_maps_each_device_type_to_its_backend(monkeypatch):
    """One process group: NCCL for CUDA tensors, gloo for CPU tensors (forge's own sends, the loss mean)."""
    from forge_qat.distributed.collectives import process_group_backend

    assert process_group_backend(cuda=True) == "cpu:gloo,cuda:nccl"
    assert process_group_backend(cuda=False) == "cpu:gloo"


def test_torchrun_launches_forge_train(tmp_path, data):
    """The standard launcher contract: torchrun starts `forge train` (module mode) once per rank."""
    import subprocess

    flags = []
    for k, v in micro_train_args(tmp_path / "t", data, max_steps=2, zero_stage=3, dist_timeout_s=60,
                                 precision="bf16").items():
        flags += [f"--{k.replace('_', '-')}", str(v)]
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                           "--standalone", "-m", "forge_qat.cli", "train", *flags],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    meta = json.loads((checkpoint_dirs(tmp_path / "t")[-1][1] / "forge_checkpoint.json").read_text())
    assert meta["world_size"] == 2 and meta["precision"] == "bf16"


def test_finalize_reads_a_zero3_checkpoint(tmp_path, data):
    from forge_qat.finalize.convert import finalize
    from forge_qat.finalize.job import FinalizeRequest

    launch_training(TrainConfig.from_flat(**_zero_args(tmp_path / "z", data, max_steps=2)), worker=WORKER)
    report = finalize(FinalizeRequest(source=tmp_path / "z", dest=tmp_path / "artifact"))
    assert report.mode == "qat" and report.converted == 14 and report.reload_max_diff == 0.0


@pytest.fixture(scope="module", params=["fp32", "bf16"])
def zero_run(tmp_path_factory, data, request):
    """A 2-rank ZeRO-3 QAT run that also finalizes itself at the end (--finalize), in fp32 and in bf16
    (module weights in bf16, fp32 masters in the optimizer, optimizer files named bf16_zero_pp_rank_*)."""
    root = tmp_path_factory.mktemp("zero_run")
    launch_training(TrainConfig.from_flat(**_zero_args(root / "run", data, max_steps=2,
                                                       finalize="int8-dynamic-act-int4-weight",
                                                       precision=request.param)), worker=WORKER)
    return root / "run"


def test_three_ways_to_finalize_a_zero3_run_agree(zero_run, tmp_path):
    """(1) streaming from the consolidated HF checkpoint, (2) straight from the per-rank ZeRO
    partitions, (3) gathered live at the end of training: one artifact."""
    from test_streaming import assert_same_artifact

    from forge_qat.finalize.convert import finalize
    from forge_qat.finalize.job import FinalizeRequest

    ckpt = checkpoint_dirs(zero_run)[-1][1]
    from_hf = finalize(FinalizeRequest(source=ckpt, dest=tmp_path / "hf", streaming=True))
    from_zero = finalize(FinalizeRequest(source=ckpt / "deepspeed", dest=tmp_path / "zero"))
    assert from_hf.mode == from_zero.mode == "qat" and from_zero.streaming
    assert from_hf.converted == from_zero.converted == 14
    live = zero_run / "final-int8-dynamic-act-int4-weight"
    assert_same_artifact(tmp_path / "hf", tmp_path / "zero")
    assert_same_artifact(tmp_path / "hf", live)
    # the consolidated checkpoint holds the fp32 masters the deepspeed/ route reads, bit for bit
    from forge_qat.distributed.zero_checkpoint import ZeroCheckpointReader

    masters = ZeroCheckpointReader(ckpt / "deepspeed")
    consolidated = load_file(ckpt / "model.safetensors")
    for name, tensor in consolidated.items():
        assert tensor.dtype == torch.float32
        if name in masters.keys():
            expected = torch.empty(tensor.numel())
            masters.read_flat(name, 0, expected)
            assert torch.equal(tensor.flatten(), expected), name


def test_broken_zero_checkpoints_name_the_file(zero_run, tmp_path):
    import shutil

    from forge_qat.errors import InputError
    from forge_qat.finalize.convert import finalize
    from forge_qat.finalize.job import FinalizeRequest

    ckpt = checkpoint_dirs(zero_run)[-1][1]
    for breakage in ("missing rank", "truncated"):
        copy = tmp_path / breakage.replace(" ", "-")
        shutil.copytree(ckpt, copy)
        rank1 = next((copy / "deepspeed").glob("*/*pp_rank_1_*optim_states.pt"))
        if breakage == "missing rank":
            rank1.unlink()
            match = f"missing {rank1.name}"
        else:
            rank1.write_bytes(rank1.read_bytes()[: rank1.stat().st_size // 2])
            match = f"{rank1.name} is truncated"
        with pytest.raises(InputError, match=match):
            finalize(FinalizeRequest(source=copy / "deepspeed", dest=tmp_path / "out"))
        assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("mode", ["merged"])  # separate mode's ZeRO-3 path is the same (tried: passes);
# its numerics are tested on one process (tests/test_lora.py)
def test_lora_under_zero3_matches_single_process(tmp_path, data, mode):
    """LoRA adapters under ZeRO-3 (every parameter partitioned: the frozen base, the adapters, the learned
    scales; adapters gathered with the layers that read them) vs one process on the same batches; the artifact
    finalized from the live partitioned model is the model as trained (merged mode: atol 0)."""
    from transformers import AutoModelForCausalLM

    from forge_qat.eval.models import prepare_as_trained
    from forge_qat.finalize.convert import sample_batch
    from forge_qat.lora import adapters as lora
    from forge_qat.models import load_model
    from forge_qat.qat.registry import DEFAULT_RECIPE, get_recipe

    args = dict(max_steps=3, save_every=2, lora_rank=4, lora_qat=mode, finalize=DEFAULT_RECIPE)
    launch_training(TrainConfig.from_flat(**_zero_args(tmp_path / "z", data,
                                                       deepspeed_config=partition_everything(tmp_path), **args)),
                    worker=WORKER)
    run_training(TrainConfig.from_flat(**micro_train_args(tmp_path / "s", data, batch_size=4, **args)))
    for a, b in zip(_metrics(tmp_path / "z"), _metrics(tmp_path / "s"), strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=5e-3)
    ckpts = [p for _, p in checkpoint_dirs(tmp_path / "z")]  # steps 2 and 3: the base written once
    assert len(ckpts) == 2 and len({ckpt_io.weight_files(p)[0].stat().st_ino for p in ckpts}) == 1
    ckpt = ckpts[-1]
    az, a1 = read_adapters(ckpt), read_adapters(checkpoint_dirs(tmp_path / "s")[-1][1])
    assert az and set(az) == set(a1) and not any(lora.is_adapter(k) for k in _weights(tmp_path / "z"))
    for k in az:
        close = torch.isclose(az[k], a1[k], rtol=2e-3, atol=2e-5)
        assert close.float().mean() >= 0.98, k
    assert torch.equal(_weights(tmp_path / "z")["model.layers.0.self_attn.q_proj.weight"],
                       _weights(tmp_path / "s")["model.layers.0.self_attn.q_proj.weight"])  # the base is frozen
    if mode == "merged":
        fake, tok = load_model(str(ckpt))
        prepare_as_trained(fake, ckpt, get_recipe(DEFAULT_RECIPE))
        real = AutoModelForCausalLM.from_pretrained(tmp_path / "z" / f"final-{DEFAULT_RECIPE}")
        x = sample_batch(tok, fake.config.vocab_size)
        with torch.no_grad():
            torch.testing.assert_close(real(x).logits, fake.eval()(x).logits, rtol=0, atol=0)


def test_lora_under_zero3_in_bf16_with_the_default_learned_scales(tmp_path, data):
    """The defaults where the CPU runs bf16 natively (`--precision auto` picks bf16 there): LoRA adapters and
    learned scales (on by default for the int4 recipes) under ZeRO-3 in bf16. DeepSpeed packs the trained
    partitions into one buffer of one dtype; the float32 adapters beside the bf16 scales made it assert in
    `defragment` before training. The run trains, resumes, and its live `--finalize` artifact is the fake-quant
    model of the checkpoint it saved (the fp32 masters), logit for logit."""
    from transformers import AutoModelForCausalLM

    from forge_qat.config import build_config
    from forge_qat.eval.models import prepare_as_trained
    from forge_qat.finalize.convert import sample_batch
    from forge_qat.models import load_model
    from forge_qat.qat.registry import DEFAULT_RECIPE, get_recipe

    args = _zero_args(tmp_path / "z", data, max_steps=2, save_every=2, lora_rank=4, precision="bf16",
                      finalize=DEFAULT_RECIPE)
    launch_training(TrainConfig.from_flat(**args), worker=WORKER)
    launch_training(build_config(resume=True, output_dir=str(tmp_path / "z"), max_steps=3), worker=WORKER)
    assert [r["step"] for r in _metrics(tmp_path / "z")] == [1, 2, 3]
    assert all(math.isfinite(r["loss"]) for r in _metrics(tmp_path / "z"))
    ckpt = checkpoint_dirs(tmp_path / "z")[-1][1]
    meta = json.loads((ckpt / "forge_checkpoint.json").read_text())
    recorded = meta["train_config"]
    assert meta["precision"] == "bf16" and recorded["qat_learn_scales"] and recorded["lora_rank"] == 4
    adapters = read_adapters(ckpt)
    assert adapters and all(t.dtype == torch.float32 for t in adapters.values())  # the masters
    assert any(k.endswith("lora_B") and t.abs().max() > 0 for k, t in adapters.items())  # B trained from zero
    real = AutoModelForCausalLM.from_pretrained(tmp_path / "z" / f"final-{DEFAULT_RECIPE}")
    fake, tok = load_model(str(ckpt), dtype=real.dtype)
    prepare_as_trained(fake, ckpt, get_recipe(DEFAULT_RECIPE))
    x = sample_batch(tok, fake.config.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(real(x).logits, fake.eval()(x).logits, rtol=0, atol=0)
