"""The on-disk contracts, each with one typed owner (`forge_qat.formats`): written and read back alike,
validated on read (a foreign, corrupt or newer file is one clear InputError), and older files still read."""

import json
import re

import pytest
from conftest import micro_train_args
from typer.testing import CliRunner

from forge_qat.cli import app
from forge_qat.errors import InputError
from forge_qat.formats.artifact_meta import ARTIFACT_META, ArtifactMeta
from forge_qat.formats.checkpoint import CheckpointMeta, read_checkpoint_meta
from forge_qat.formats.run_dir import CHECKPOINT_META, RUN_MARKER, RunRecord, checkpoint_dirs

runner = CliRunner()


def test_checkpoint_meta_round_trips(tmp_path):
    meta = CheckpointMeta(step=7, qat_recipe="int8-dynamic-act-int4-weight", world_size=2, uses_deepspeed=True,
                          train_config={"lora_rank": 4, "lora_alpha": 8.0, "qat_learn_scales": True}, scale_lr=1e-3)
    meta.write(tmp_path)
    back = read_checkpoint_meta(tmp_path)
    assert back == meta
    assert back.lora.lora_rank == 4 and back.lora.scaling == 2.0 and back.learns_scales and back.deepspeed


@pytest.mark.parametrize("content, message", [
    ("[1, 2]", "not a forge checkpoint's metadata"),
    ('{"qat_recipe": null}', "records no step"),
    ('{"step": "7", "qat_recipe": null}', "step is '7'"),
    ('{"step": 7, "qat_recipe": null, "train_config": []}', "train_config is []"),
    ('{"step": 7, "qat_recipe": null, "format_version": 99}', "upgrade forge_qat"),
    ('{"step": 7,', "is corrupt"),
])
def test_checkpoint_meta_refuses_a_foreign_or_newer_file(tmp_path, content, message):
    (tmp_path / CHECKPOINT_META).write_text(content)
    with pytest.raises(InputError, match=re.escape(message)):
        read_checkpoint_meta(tmp_path)


def test_checkpoints_before_the_recorded_engine_derive_it_from_their_options():
    """`uses_deepspeed` is recorded since issue 29; older checkpoints say DeepSpeed by a ZeRO stage or by a user
    DeepSpeed config (a run started with --deepspeed-config alone records zero_stage 0)."""
    legacy = CheckpointMeta.from_dict({"step": 2, "qat_recipe": None,
                                       "train_config": {"zero_stage": 0, "deepspeed_config": "ds.json"}}, None)
    assert legacy.uses_deepspeed is None and legacy.deepspeed
    assert not CheckpointMeta.from_dict({"step": 2, "qat_recipe": None, "train_config": {"zero_stage": 0}},
                                        None).deepspeed
    assert not CheckpointMeta(step=2, qat_recipe=None, uses_deepspeed=False,
                              train_config={"zero_stage": 3}).deepspeed  # recorded wins


def test_run_record_round_trips_and_refuses_a_newer_one(tmp_path):
    (tmp_path / RUN_MARKER).write_text(RunRecord(config={"lr": 0.1}, created="now").to_json())
    assert RunRecord.read(tmp_path).config == {"lr": 0.1}
    (tmp_path / RUN_MARKER).write_text(json.dumps({"format_version": 2, "config": {}}))
    with pytest.raises(InputError, match="upgrade forge_qat"):
        RunRecord.read(tmp_path)
    (tmp_path / RUN_MARKER).write_text(json.dumps({"config": [1]}))
    with pytest.raises(InputError, match="corrupt"):
        RunRecord.read(tmp_path)


def test_artifact_meta_round_trips_flat_and_refuses_a_foreign_file(tmp_path):
    ArtifactMeta(recipe="llama-cpp-q4-0", source="ckpt", report={"converted": 3, "mode": "qat"}).write(tmp_path)
    raw = json.loads((tmp_path / ARTIFACT_META).read_text())
    assert raw["recipe"] == "llama-cpp-q4-0" and raw["converted"] == 3 and raw["format_version"] == 1
    back = ArtifactMeta.read(tmp_path)
    assert back.recipe == "llama-cpp-q4-0" and back.report == {"converted": 3, "mode": "qat"}
    assert ArtifactMeta.read(tmp_path / "elsewhere") is None
    (tmp_path / ARTIFACT_META).write_text(json.dumps({"converted": 3}))
    with pytest.raises(InputError, match="no recipe name"):
        ArtifactMeta.read(tmp_path)


def test_a_tampered_checkpoint_meta_is_one_line_through_the_cli(tmp_path, text_file):
    """finalize and eval read the checkpoint's metadata through its owner: a file that is not forge's is one
    line and exit code 1, not a traceback or a KeyError."""
    from forge_qat.config import TrainConfig
    from forge_qat.train.trainer import run_training

    run_training(TrainConfig.from_flat(**micro_train_args(tmp_path / "r", text_file, max_steps=2)))
    ckpt = checkpoint_dirs(tmp_path / "r")[-1][1]
    meta = json.loads((ckpt / CHECKPOINT_META).read_text())
    assert meta["uses_deepspeed"] is False and meta["format_version"] == 1
    (ckpt / CHECKPOINT_META).write_text(json.dumps({**meta, "train_config": "lora_rank=4"}))
    for command in (["finalize", "--source", str(ckpt), "--dest", str(tmp_path / "a")],
                    ["eval", str(ckpt), "--max-batches", "1", "--seq-len", "32"]):
        result = runner.invoke(app, command)
        output = result.output + (result.stderr if result.stderr_bytes is not None else "")
        assert result.exit_code == 1 and "Traceback" not in output, output
        assert "train_config is 'lora_rank=4'" in " ".join(output.split())
    assert not (tmp_path / "a").exists()
