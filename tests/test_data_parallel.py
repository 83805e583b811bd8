"""LoRA runs on 2 CPU ranks without DeepSpeed (forge_qat/train/data_parallel.py: torch's DDP over the adapters), the
frozen base in its grid, the experts offloaded to one host copy the two ranks share (forge_qat/qat/host_store.py):
against one process on the same batches, and counted in each rank's memory."""

import json
import os
import sys
from pathlib import Path

import pytest
import torch
from conftest import micro_train_args, save_tiny_moe
from safetensors.torch import load_file

from forge_qat.config import TrainConfig
from forge_qat.errors import ConfigError
from forge_qat.formats.adapters import ADAPTER_DIR, EXPERT_WEIGHTS, PEFT_WEIGHTS
from forge_qat.formats.run_dir import checkpoint_dirs
from forge_qat.qat import host_store
from forge_qat.train.entry import launch_training
from forge_qat.train.trainer import run_training

WORKER = [sys.executable, str(Path(__file__).parent / "zero_worker.py")]
RECIPE = "int8-dynamic-act-int4-weight"
pytestmark = pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="needs 2 CPU cores for 2 ranks")


def _metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _adapters(run_dir):
    folder = checkpoint_dirs(run_dir)[-1][1] / ADAPTER_DIR
    return {**load_file(folder / PEFT_WEIGHTS), **load_file(folder / EXPERT_WEIGHTS)}


def _args(root: Path, **extra) -> dict:
    return dict(model=str(root / "model"), qat_recipe=RECIPE, qat_learn_scales=False, lora_rank=4, lora_qat="separate",
                experts_offload="host", max_steps=3, save_every=2, grad_accum=2, **extra)


@pytest.fixture(scope="module")
def dp_run(tmp_path_factory):
    """A tiny Qwen3-MoE, and a 3-step LoRA run on 2 ranks with the grid base and the experts offloaded (shared),
    checkpoints at steps 2 and 3; each rank's memory in the shared file in rank-N.json."""
    from pydoc_data.topics import topics

    root = tmp_path_factory.mktemp("dp")
    save_tiny_moe(root / "model", "qwen3_moe", "per-expert")
    (root / "train.txt").write_text(topics["if"] + topics["while"] + topics["for"])
    cfg = TrainConfig.from_flat(**micro_train_args(root / "dp", root / "train.txt", nproc=2, dist_timeout_s=60,
                                                   **_args(root)))
    assert cfg.distributed.data_parallel and cfg.lora.lora_base_grid  # the grid: on by default without DeepSpeed
    os.environ["FORGE_TEST_HOST_EXPERTS"] = str(root)
    try:
        launch_training(cfg, worker=WORKER)
    finally:
        del os.environ["FORGE_TEST_HOST_EXPERTS"]
    return root


def test_lora_data_parallel_with_shared_host_experts_matches_one_process(dp_run):
    tmp_path = dp_run
    run_training(TrainConfig.from_flat(**micro_train_args(tmp_path / "one", tmp_path / "train.txt", batch_size=4,
                                                          **_args(tmp_path))))
    for a, b in zip(_metrics(tmp_path / "dp"), _metrics(tmp_path / "one"), strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
    dp, one = _adapters(tmp_path / "dp"), _adapters(tmp_path / "one")
    assert dp.keys() == one.keys() and any(".experts." in k for k in dp)
    for k in dp:
        torch.testing.assert_close(dp[k], one[k], rtol=1e-4, atol=1e-6, msg=k)
    # one copy of the experts' grid on the machine: each rank maps it, their shares add up to it once
    held = [json.loads((tmp_path / f"rank-{r}.json").read_text()) for r in range(2)]
    grid = held[0]["host_bytes"]
    assert grid > 0 and held[1]["host_bytes"] == grid
    file_pages = -(-grid // 4096) * 4096
    assert all(0 < h["Rss"] <= file_pages + 8192 for h in held)
    assert abs(held[0]["Pss"] + held[1]["Pss"] - file_pages) <= 16 * 1024
    assert held[1]["Private"] == 0  # the second rank reads the first one's pages, never copies of them
    assert not list(host_store.DIRECTORY.glob(f"{host_store.PREFIX}{os.getpid()}-*"))  # unlinked when mapped


def test_several_ranks_without_deepspeed_need_lora(tmp_path, text_file):
    with pytest.raises(ConfigError, match="or train LoRA adapters"):
        TrainConfig.from_flat(**micro_train_args(tmp_path / "r", text_file, nproc=2))


def test_stale_shared_files_of_dead_processes_are_removed(tmp_path, monkeypatch):
    import subprocess

    monkeypatch.setattr(host_store, "DIRECTORY", tmp_path)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f"{host_store.PREFIX}{int(dead.stdout)}-abc"
    live = tmp_path / f"{host_store.PREFIX}{os.getpid()}-abc"
    other = tmp_path / "forge-experts-notapid"
    for f in (stale, live, other):
        f.write_bytes(b"x")
    assert host_store.remove_stale() == [stale]
    assert not stale.exists() and live.exists() and other.exists()


def test_a_data_parallel_run_resumes_where_it_stopped(dp_run, tmp_path, monkeypatch):
    """The same 2-rank run, its rank 1 killed in step 3, ends the job; resumed from its step-2 checkpoint it ends
    where the uninterrupted run ended: rank 0's optimizer state (the same on every rank) is read back by both."""
    from forge_qat.distributed.launch import RankFailedError

    args = micro_train_args(tmp_path / "b", dp_run / "train.txt", nproc=2, dist_timeout_s=60, **_args(dp_run))
    monkeypatch.setenv("FORGE_TEST_FAIL", "1:4")  # rank 1 dies drawing step 3's first micro-batch (2 per step)
    with pytest.raises(RankFailedError, match="injected failure at micro-batch 4"):
        launch_training(TrainConfig.from_flat(**args), worker=WORKER)
    assert [s for s, _ in checkpoint_dirs(tmp_path / "b")] == [2]
    monkeypatch.delenv("FORGE_TEST_FAIL")
    launch_training(TrainConfig.from_flat(**args, resume=True), worker=WORKER)
    assert [m["loss"] for m in _metrics(dp_run / "dp")] == [m["loss"] for m in _metrics(tmp_path / "b")]
    a, b = _adapters(dp_run / "dp"), _adapters(tmp_path / "b")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_torchrun_without_deepspeed_runs_a_lora_run_data_parallel(tmp_path, text_file):
    """torchrun starts 2 ranks of `forge train` without --nproc: a LoRA run is data parallel over them, not two runs
    writing one directory."""
    import subprocess

    flags = []
    for k, v in micro_train_args(tmp_path / "t", text_file, max_steps=2, dist_timeout_s=60, lora_rank=4,
                                 lora_qat="separate").items():
        flags += [f"--{k.replace('_', '-')}", str(v)]
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone",
                           "-m", "forge_qat.cli", "train", *flags],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    meta = json.loads((checkpoint_dirs(tmp_path / "t")[-1][1] / "forge_checkpoint.json").read_text())
    assert meta["world_size"] == 2


def test_launched_ranks_without_deepspeed_must_train_lora(tmp_path, text_file, monkeypatch):
    """torchrun's ranks reach the engine without --nproc (the config never saw them): training every weight there
    without DeepSpeed is refused before the process group is joined."""
    from forge_qat.train.optim import resolve_placement
    from forge_qat.train.trainer import make_engine

    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    cfg = TrainConfig.from_flat(**micro_train_args(tmp_path / "r", text_file))
    with pytest.raises(ConfigError, match="2 ranks without DeepSpeed train LoRA adapters only"):
        make_engine(cfg, resolve_placement(cfg))
