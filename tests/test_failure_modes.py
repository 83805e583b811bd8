"""Bad inputs and faults, one table: each probe runs the real CLI, and checks the exit code, the one-line
message, that no traceback was printed, and the files on disk before and after (nothing lost, nothing
left half-written, no code from a file ever run). docs/failure-modes.md lists the same probes.
"""

import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import micro_train_args
from typer.testing import CliRunner

from forge_qat.cli import app
from forge_qat.config import TrainConfig
from forge_qat.formats import checkpoint as ckpt_io
from forge_qat.formats.run_dir import METRICS, RUN_MARKER, checkpoint_dirs
from forge_qat.train.trainer import run_training

runner = CliRunner()
PWNED = "FORGE_TEST_PWNED"


class Payload:
    """Unpickling this runs code: it creates the file named by $FORGE_TEST_PWNED."""

    def __reduce__(self):
        return (os.system, (f"touch {os.environ[PWNED]}",))


def _flags(**kw) -> list[str]:
    out = []
    for k, v in kw.items():
        flag = "--" + k.replace("_", "-")
        out += [flag] if v is True else ([] if v is False else [flag, str(v)])
    return out


def _cli(*args) -> tuple[int, str]:
    result = runner.invoke(app, [str(a) for a in args])
    output = result.output + (result.stderr if result.stderr_bytes is not None else "")
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in output, output
    return result.exit_code, " ".join(output.split())


def _tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A finished 2-step single-process run (micro preset) to break copies of."""
    from pydoc_data.topics import topics

    root = tmp_path_factory.mktemp("fm")
    data = root / "train.txt"
    data.write_text(topics["if"] + topics["while"])
    run_training(TrainConfig.from_flat(**micro_train_args(root / "run", data, max_steps=2, save_every=2)))
    return root / "run", data


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


@dataclass(frozen=True)
class Probe:
    name: str
    check: Callable


NUMERIC = [
    (["train", "--max-grad-norm", "-1"], "max_grad_norm"),
    (["train", "--weight-decay", "-0.1"], "weight_decay"),
    (["train", "--lr", "nan"], "lr"),
    (["train", "--lr", "inf"], "lr"),
    (["train", "--seq-len", "0"], "seq_len"),
    (["finalize", "--source", ".", "--dest", "x", "--max-shard-size", "0B"], "--max-shard-size"),
    (["finalize", "--source", ".", "--dest", "x", "--max-shard-size", "-1GB"], "--max-shard-size"),
    (["finalize", "--source", ".", "--dest", "x", "--max-shard-size", "infGB"], "--max-shard-size"),
    (["eval", "micro-llama", "--seq-len", "0"], "--seq-len"),
    (["eval", "micro-llama", "--seq-len", "-4"], "--seq-len"),
    (["eval", "micro-llama", "--batch-size", "0"], "--batch-size"),
    (["demo", "--steps", "0"], "--steps"),
    (["train", "--lora-alpha", "8"], "--lora-alpha"),
    (["train", "--lora-qat", "separate"], "--lora-qat"),
    (["export", ".", "--to", "executorch", "--output", "o.pte", "--max-seq-len", "0"], "--max-seq-len"),
    (["eval", "micro-llama", "--seq-len", "4096"], "max_position_embeddings"),
]


def probe_resume_pickle_payload(tmp_path, run, monkeypatch):
    src, data = run
    r = _copy(src, tmp_path / "r")
    ckpt = checkpoint_dirs(r)[-1][1]
    monkeypatch.setenv(PWNED, str(tmp_path / "pwned"))
    torch.save({"step": 2, "optimizer": Payload()}, ckpt / ckpt_io.TRAINER_STATE)
    code, out = _cli("train", "--resume", "--output-dir", r, "--max-steps", 4)
    assert code == 1 and "carrying code" in out and ckpt_io.TRAINER_STATE in out
    assert not (tmp_path / "pwned").exists()


def probe_resume_truncated_trainer_state(tmp_path, run, monkeypatch):
    src, _ = run
    r = _copy(src, tmp_path / "r")
    state = checkpoint_dirs(r)[-1][1] / ckpt_io.TRAINER_STATE
    state.write_bytes(state.read_bytes()[:100])
    before = _tree(r)
    code, out = _cli("train", "--resume", "--output-dir", r, "--max-steps", 4)
    assert code == 1 and "truncated" in out
    assert _tree(r) == before


def probe_resume_missing_trainer_state(tmp_path, run, monkeypatch):
    src, _ = run
    r = _copy(src, tmp_path / "r")
    (checkpoint_dirs(r)[-1][1] / ckpt_io.TRAINER_STATE).unlink()
    code, out = _cli("train", "--resume", "--output-dir", r, "--max-steps", 4)
    assert code == 1 and "is missing" in out


def probe_resume_with_changed_lr(tmp_path, run, monkeypatch):
    src, _ = run
    r = _copy(src, tmp_path / "r")
    before = _tree(r)
    code, out = _cli("train", "--resume", "--output-dir", r, "--max-steps", 4, "--lr", "0.5")
    assert code == 2 and "lr" in out and "0.5" in out
    assert _tree(r) == before


def probe_resume_after_data_changed(tmp_path, run, monkeypatch):
    _, data = run
    mine = tmp_path / "train.txt"
    mine.write_text(data.read_text())
    assert _cli("train", *_flags(**micro_train_args(tmp_path / "r", mine, max_steps=2)))[0] == 0
    before = _tree(tmp_path / "r")
    mine.write_text(data.read_text() + " appended")
    code, out = _cli("train", "--resume", "--output-dir", tmp_path / "r", "--max-steps", 4)
    assert code == 2 and "training data" in out and "changed" in out
    assert _tree(tmp_path / "r") == before


def probe_data_cache_unwritable(tmp_path, run, monkeypatch):
    _, data = run
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    code, out = _cli("train", *_flags(**micro_train_args(tmp_path / "r", data, data_cache=blocker / "cache")))
    assert code == 1 and "cannot create the data cache directory" in out
    assert not (tmp_path / "r").exists()


def probe_zero_checkpoint_pickle_payload(tmp_path, run, monkeypatch):
    """A DeepSpeed checkpoint whose rank files carry a payload: DeepSpeed's own loader passes
    weights_only=False; forge forces weights-only loading around it."""
    src, _ = run
    ckpt = _copy(checkpoint_dirs(src)[-1][1], tmp_path / "ckpt")
    tag = ckpt / "deepspeed" / "state"
    tag.mkdir(parents=True)
    (ckpt / "deepspeed" / "latest").write_text("state")
    monkeypatch.setenv(PWNED, str(tmp_path / "pwned"))
    for kind in ("model", "optim"):
        torch.save({"payload": Payload()}, tag / f"zero_pp_rank_0_mp_rank_00_{kind}_states.pt")
    code, out = _cli("finalize", "--source", ckpt / "deepspeed", "--dest", tmp_path / "out")
    assert code == 1 and "carrying code" in out
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "out").exists()


def probe_model_dir_with_remote_code(tmp_path, run, monkeypatch):
    """A model directory whose config asks for its own Python code: refused, the code never runs."""
    from forge_qat.models import preset_model

    model, tok = preset_model("micro-llama")
    d = tmp_path / "evil"
    model.save_pretrained(d)
    tok.save_pretrained(d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}
    (d / "config.json").write_text(json.dumps(cfg))
    (d / "evil.py").write_text(f"open({str(tmp_path / 'pwned')!r}, 'w').close()\n")
    code, out = _cli("train", *_flags(**micro_train_args(tmp_path / "r", run[1], model=d, max_steps=1)))
    assert code == 0 and "never runs code" in out  # the built-in Llama class, and a warning
    cfg["model_type"] = "evil_model"  # an architecture only its own code implements: refused
    (d / "config.json").write_text(json.dumps(cfg))
    code, out = _cli("train", *_flags(**micro_train_args(tmp_path / "r2", run[1], model=d)))
    assert code == 1 and "never runs" in out
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "r2" / RUN_MARKER).exists()


def probe_init_overwrite_keeps_other_files(tmp_path, run, monkeypatch):
    d = tmp_path / "proj"
    assert _cli("init", d, "--template", "tiny-demo")[0] == 0
    (d / "notes.txt").write_text("mine")
    code, _ = _cli("init", d, "--template", "tiny-demo", "--overwrite")  # re-render forge's own files
    assert code == 0 and (d / "notes.txt").read_text() == "mine"
    (d / "forge.yaml").write_text("# edited by hand\n")
    code, out = _cli("init", d, "--template", "tiny-demo", "--overwrite")
    assert code == 1 and "forge.yaml" in out and "--force" in out
    assert (d / "forge.yaml").read_text() == "# edited by hand\n"
    assert _cli("init", d, "--template", "tiny-demo", "--overwrite", "--force")[0] == 0
    assert (d / "forge.yaml").read_text() != "# edited by hand\n" and (d / "notes.txt").read_text() == "mine"


def probe_init_overwrite_refuses_foreign_file(tmp_path, run, monkeypatch):
    d = tmp_path / "proj"
    d.mkdir()
    (d / "forge.yaml").write_text("someone else's\n")
    code, out = _cli("init", d, "--template", "tiny-demo", "--overwrite")
    assert code == 1 and "did not render" in out
    assert (d / "forge.yaml").read_text() == "someone else's\n"


def probe_train_overwrite_with_bad_data_keeps_old_run(tmp_path, run, monkeypatch):
    src, data = run
    r = _copy(src, tmp_path / "r")
    before = _tree(r)
    code, out = _cli("train", *_flags(**micro_train_args(r, tmp_path / "typo.txt", overwrite=True)))
    assert code == 1 and "typo.txt" in out
    assert _tree(r) == before


def probe_train_overwrite_refuses_non_forge_dir(tmp_path, run, monkeypatch):
    d = tmp_path / "photos"
    d.mkdir()
    (d / "holiday.jpg").write_bytes(b"\xff\xd8 precious")
    code, out = _cli("train", *_flags(**micro_train_args(d, run[1], overwrite=True)))
    assert code == 1 and "not a forge run" in out
    assert _tree(d) == {"holiday.jpg": b"\xff\xd8 precious"}


def probe_failed_start_leaves_no_run_marker(tmp_path, run, monkeypatch):
    r = tmp_path / "new"
    code, _ = _cli("train", *_flags(**micro_train_args(r, tmp_path / "missing.txt")))
    assert code == 1 and not (r / RUN_MARKER).exists()
    code, _ = _cli("train", *_flags(**micro_train_args(r, run[1], max_steps=1, save_every=1)))
    assert code == 0  # the next start is not refused


def probe_finalize_dest_is_source(tmp_path, run, monkeypatch):
    src, _ = run
    r = _copy(src, tmp_path / "r")
    ckpt = checkpoint_dirs(r)[-1][1]
    before = _tree(r)
    for dest in (ckpt, r, ckpt / "inside"):
        code, out = _cli("finalize", "--source", ckpt, "--dest", dest, "--overwrite")
        assert code == 2 and "overlaps" in out
    assert _tree(r) == before


def probe_finalize_overwrite_replaces_only_artifacts(tmp_path, run, monkeypatch):
    src, _ = run
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("x")
    code, out = _cli("finalize", "--source", src, "--dest", other, "--overwrite")
    assert code == 1 and "not a forge artifact" in out and (other / "keep.txt").read_text() == "x"


def probe_numeric_ranges(tmp_path, run, monkeypatch):
    for args, name in NUMERIC:
        code, out = _cli(*args, *(["--output-dir", tmp_path / "n"] if args[0] == "train" else []))
        assert code == 2 and name in out, (args, code, out)
    assert not (tmp_path / "n").exists()


def probe_seq_len_above_model_positions(tmp_path, run, monkeypatch):
    code, out = _cli("train", *_flags(**micro_train_args(tmp_path / "r", run[1], seq_len=4096)))
    assert code == 2 and "max_position_embeddings 2048" in out
    assert not (tmp_path / "r" / RUN_MARKER).exists()


def probe_yaml_exponent_learning_rate(tmp_path, run, monkeypatch):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("lr: 1e-3\nmax_steps: 1\n")
    from forge_qat.config import build_config

    assert build_config(cfg).optim.lr == 1e-3


def probe_stale_temporaries_are_removed(tmp_path, run, monkeypatch):
    src, data = run
    r = _copy(src, tmp_path / "r")
    dead = 2**22 + 12345  # above pid_max on Linux by default: no such process
    stale = r / f".checkpoint-000004.tmp-{dead}"
    stale.mkdir()
    (stale / "big.bin").write_bytes(b"0" * 1000)
    live = r / f".checkpoint-000099.tmp-{os.getpid()}"  # a live process's: kept
    live.mkdir()
    code, _ = _cli("train", "--resume", "--output-dir", r, "--max-steps", 4)
    assert code == 0 and not stale.exists() and live.exists()


def probe_non_utf8_jsonl(tmp_path, run, monkeypatch):
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n')
    code, out = _cli("train", *_flags(**micro_train_args(tmp_path / "r", bad)))
    assert code == 1 and "bad.jsonl:2" in out and "UTF-8" in out
    assert not (tmp_path / "r" / RUN_MARKER).exists()


def probe_truncated_safetensors(tmp_path, run, monkeypatch):
    """Truncated weights: training from them, eval, in-memory and streaming finalize, and resume."""
    src, data = run
    r = _copy(src, tmp_path / "r")
    ckpt = checkpoint_dirs(r)[-1][1]
    weights = ckpt / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5000])
    for args in (["train", *_flags(**micro_train_args(tmp_path / "t", data, model=ckpt))],
                 ["eval", ckpt, "--data", data],
                 ["finalize", "--source", ckpt, "--dest", tmp_path / "a", "--in-memory"],
                 ["finalize", "--source", ckpt, "--dest", tmp_path / "b", "--streaming"],
                 ["train", "--resume", "--output-dir", r, "--max-steps", 4]):
        code, out = _cli(*args)
        assert code == 1 and "model.safetensors" in out and ("truncated" in out or "corrupt" in out), (args, out)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def probe_pickle_payload_in_bin_weights(tmp_path, run, monkeypatch):
    src, data = run
    d = _copy(checkpoint_dirs(src)[-1][1], tmp_path / "m")
    (d / "model.safetensors").unlink()
    monkeypatch.setenv(PWNED, str(tmp_path / "pwned"))
    torch.save({"model.embed_tokens.weight": Payload()}, d / "pytorch_model.bin")
    code, out = _cli("eval", d, "--data", data)
    assert code == 1 and "never runs" in out and not (tmp_path / "pwned").exists()


def probe_corrupt_run_marker(tmp_path, run, monkeypatch):
    src, _ = run
    r = _copy(src, tmp_path / "r")
    (r / RUN_MARKER).write_text("{not json")
    code, out = _cli("train", "--resume", "--output-dir", r, "--max-steps", 4)
    assert code == 1 and RUN_MARKER in out and "corrupt" in out


def probe_partial_metrics_line(tmp_path, run, monkeypatch):
    src, _ = run
    r = _copy(src, tmp_path / "r")
    with (r / METRICS).open("a") as f:
        f.write('{"step": 3, "lo')  # what a kill -9 mid-write leaves
    code, _ = _cli("train", "--resume", "--output-dir", r, "--max-steps", 3)
    steps = [json.loads(line)["step"] for line in (r / METRICS).read_text().splitlines()]
    assert code == 0 and steps == [1, 2, 3]


def probe_finalize_an_artifact(tmp_path, run, monkeypatch):
    src, data = run
    assert _cli("finalize", "--source", src, "--dest", tmp_path / "a")[0] == 0
    code, out = _cli("finalize", "--source", tmp_path / "a", "--dest", tmp_path / "b")
    assert code == 1 and "already a quantized artifact" in out
    code, out = _cli("eval", tmp_path / "a", "--data", data, "--fake-quant", "int8-dynamic-act-int4-weight")
    assert code == 2 and "already a quantized artifact" in out


def probe_unwritable_destinations(tmp_path, run, monkeypatch):
    src, data = run
    code, out = _cli("train", *_flags(**micro_train_args("/proc/forge-test/run", data)))
    assert code == 1 and "cannot write" in out
    code, out = _cli("finalize", "--source", src, "--dest", "/proc/forge-test/artifact")
    assert code == 1 and "cannot write" in out


def probe_disk_full_during_train_save(tmp_path, run, monkeypatch):
    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", full)  # the trainer state, written after the weights
    r = tmp_path / "r"
    code, out = _cli("train", *_flags(**micro_train_args(r, run[1], max_steps=1, save_every=1)))
    assert code == 1 and "disk full" in out
    assert not checkpoint_dirs(r) and not [p for p in r.iterdir() if p.name.startswith(".checkpoint")]


def probe_hardware_checked_before_training(tmp_path, run, monkeypatch):
    code, out = _cli("train", *_flags(**micro_train_args(tmp_path / "r", run[1], finalize="int4-weight-only")))
    assert code == 1 and "CUDA" in out and not (tmp_path / "r" / RUN_MARKER).exists()
    code, out = _cli("demo", "--recipe", "float8-dynamic-act-float8-weight", "--output-dir", tmp_path / "d")
    assert code == 1 and "CUDA" in out and not (tmp_path / "d").exists()


def probe_demo_never_deletes_a_foreign_directory(tmp_path, run, monkeypatch):
    d = tmp_path / "d"
    d.mkdir()
    (d / "thesis.tex").write_text("years of work")
    code, out = _cli("demo", "--output-dir", d, "--steps", 2, "--qat-steps", 1)
    assert code == 1 and "not a forge demo" in out and (d / "thesis.tex").read_text() == "years of work"


def probe_init_values_are_yaml_scalars(tmp_path, run, monkeypatch):
    from forge_qat.config import load_yaml

    d = tmp_path / "proj\nmax_steps: 1"
    tricky = {"model": "models/a # b", "data": "yes", "eval_data": "x\nmax_steps: 1"}
    code, _ = _cli("init", d, "--template", "qat-finetune", *[a for k, v in tricky.items()
                                                               for a in (f"--{k.replace('_', '-')}", v)])
    assert code == 0
    cfg = load_yaml(d / "forge.yaml")
    assert {k: cfg[k] for k in tricky} == tricky and cfg["max_steps"] == 1000


def _children(pid: int) -> list[int]:
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


def _start_zero_job(tmp_path, data, name):
    import subprocess
    import sys
    import time

    run_dir = tmp_path / name
    flags = _flags(**micro_train_args(run_dir, data, max_steps=100000, save_every=0, nproc=2, zero_stage=3,
                                      dist_timeout_s=60))
    job = subprocess.Popen([sys.executable, "-m", "forge_qat.cli", "train", *flags], stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 180
    while not ((run_dir / "metrics.jsonl").is_file() and (run_dir / "metrics.jsonl").read_text().strip()):
        assert job.poll() is None and time.monotonic() < deadline, job.stderr.read() if job.poll() else "timeout"
        time.sleep(0.5)
    return job, _children(job.pid)


@pytest.mark.skipif(not Path("/proc/self/stat").is_file() or (os.cpu_count() or 1) < 2, reason="Linux, 2 cores")
def probe_killed_launcher_and_killed_rank(tmp_path, run, monkeypatch):
    """kill -9 of the launcher takes its ranks down; a rank killed by a signal is reported as that."""
    import signal
    import time

    job, ranks = _start_zero_job(tmp_path, run[1], "a")
    assert len(ranks) == 2
    job.kill()
    job.wait()
    deadline = time.monotonic() + 20
    while any(_alive(r) for r in ranks) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(_alive(r) for r in ranks), "ranks outlived their launcher"

    job, ranks = _start_zero_job(tmp_path, run[1], "b")
    os.kill(max(ranks), signal.SIGKILL)  # rank 1 (started second)
    _, err = job.communicate(timeout=120)
    err = " ".join(err.split())
    assert job.returncode == 128 + signal.SIGKILL and "killed by signal SIGKILL" in err, err[-500:]
    assert "Traceback" not in err


# ---- issue 30: exports, LoRA, learned scales, trackers, compare, the token cache ----------------------------

_ARTIFACTS: dict[tuple[Path, str], Path] = {}


def _artifact(run, recipe: str = "int8-dynamic-act-int4-weight") -> Path:
    """The run's checkpoint finalized with `recipe` (once per test session and recipe)."""
    src, _ = run
    key = (src, recipe)
    if key not in _ARTIFACTS:
        dest = src.parent / f"artifact-{recipe}"
        flag = "--qat-convert" if recipe == "int8-dynamic-act-int4-weight" else "--ptq"
        assert _cli("finalize", "--source", src, "--dest", dest, flag, recipe)[0] == 0
        _ARTIFACTS[key] = dest
    return _ARTIFACTS[key]


def _dead_pid() -> int:
    import subprocess

    done = subprocess.Popen(["true"])
    done.wait()
    return done.pid


def probe_export_never_replaces_a_users_tokenizer(tmp_path, run, monkeypatch):
    """The ExecuTorch tokenizer beside `o.pte` is an output like the program: a user's file or a symbolic link
    there is refused before any work (with or without --overwrite), and nothing is finalized on the way."""
    src, _ = run
    user = tmp_path / "o.tokenizer.json"
    user.write_text("mine")
    for extra in ([], ["--overwrite"]):
        code, out = _cli("export", src, "--to", "executorch", "--output", tmp_path / "o.pte",
                         "--recipe", "int8-dynamic-act-int4-weight", *extra)
        assert code == 1 and "o.tokenizer.json" in out, out
    assert user.read_text() == "mine"
    user.unlink()
    target = tmp_path / "elsewhere.json"
    target.write_text("theirs")
    user.symlink_to(target)
    code, out = _cli("export", src, "--to", "executorch", "--output", tmp_path / "o.pte",
                     "--recipe", "int8-dynamic-act-int4-weight")
    assert code == 1 and "symbolic link" in out and target.read_text() == "theirs"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["elsewhere.json", "o.tokenizer.json"]


def probe_export_sweeps_what_a_killed_export_left(tmp_path, run, monkeypatch):
    """kill -9 during `forge export` leaves `.OUT.tmp-PID` and, with --recipe, `.OUT.artifact-PID` (a whole
    quantized model): the next export of OUT removes both."""
    src, _ = run
    dead = _dead_pid()
    tmp_file = tmp_path / f".o.gguf.tmp-{dead}"
    tmp_file.write_bytes(b"0" * 100)
    left = tmp_path / f".o.gguf.artifact-{dead}"
    left.mkdir()
    (left / "model.safetensors").write_bytes(b"0" * 100)
    code, out = _cli("export", src, "--to", "gguf", "--output", tmp_path / "o.gguf",
                     "--recipe", "int8-dynamic-act-int4-weight")
    assert code == 0, out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.gguf"]


def probe_export_output_faults_are_one_line(tmp_path, run, monkeypatch):
    """An output that is a directory, a parent that is a file, a disk that fills, a missing artifact: one line,
    exit 1, nothing left behind; a missing parent directory is made."""
    import errno

    import gguf

    art = _artifact(run)
    (tmp_path / "d.gguf").mkdir()
    code, out = _cli("export", art, "--to", "gguf", "--output", tmp_path / "d.gguf")
    assert code == 1 and "is a directory" in out
    (tmp_path / "file").write_text("x")
    code, out = _cli("export", art, "--to", "gguf", "--output", tmp_path / "file" / "o.gguf")
    assert code == 1 and "cannot write" in out
    code, out = _cli("export", tmp_path / "nothing", "--to", "gguf", "--output", tmp_path / "o.gguf")
    assert code == 1 and "does not exist" in out
    assert _cli("export", art, "--to", "gguf", "--output", tmp_path / "new" / "o.gguf")[0] == 0

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensor_data", full)
    code, out = _cli("export", art, "--to", "gguf", "--output", tmp_path / "full.gguf")
    assert code == 1 and "cannot write" in out and "disk is full" in out, out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.gguf", "file", "new"]


def probe_finalize_output_faults_are_one_line(tmp_path, run, monkeypatch):
    """finalize's disk faults: a parent that is a file, a disk that fills while shards are written (in memory and
    streaming): one line, exit 1, no temporary left."""
    import errno

    import safetensors.torch

    src, _ = run
    (tmp_path / "file").write_text("x")
    code, out = _cli("finalize", "--source", src, "--dest", tmp_path / "file" / "a")
    assert code == 1 and "cannot write" in out

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    for route in ("--in-memory", "--streaming"):
        code, out = _cli("finalize", "--source", src, "--dest", tmp_path / "a", route)
        assert code == 1 and "disk is full" in out, out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def probe_export_checks_its_output_before_finalizing(tmp_path, run, monkeypatch):
    """`forge export --recipe` refuses an existing output before it finalizes anything (and `--max-seq-len 0` is
    a bad value, not 'not given')."""
    import forge_qat.finalize.convert as fin

    def must_not_finalize(*a, **k):
        raise AssertionError("finalized before checking the output")

    monkeypatch.setattr(fin, "finalize", must_not_finalize)
    (tmp_path / "o.gguf").write_bytes(b"not ours")
    code, out = _cli("export", run[0], "--to", "gguf", "--output", tmp_path / "o.gguf",
                     "--recipe", "int8-dynamic-act-int4-weight")
    assert code == 1 and "exists" in out and (tmp_path / "o.gguf").read_bytes() == b"not ours"


def probe_failed_tracker_leaves_no_run_marker(tmp_path, run, monkeypatch):
    """A `--report-to` tracker that cannot start stops the start with one line (exit 1 for a disk it cannot
    write, 2 for a tracking URI it does not know) and takes back the run directory it began: the next start is
    not refused as "holds a forge run"."""
    import errno

    from forge_qat.train import tracking

    def read_only(self, output_dir, config):
        raise OSError(errno.EROFS, "Read-only file system", str(output_dir / "tensorboard"))

    r = tmp_path / "r"
    with monkeypatch.context() as m:
        m.setattr(tracking._TensorBoard, "__init__", read_only)
        code, out = _cli("train", *_flags(**micro_train_args(r, run[1], max_steps=1, report_to="tensorboard")))
    assert code == 1 and "--report-to tensorboard cannot write" in out, out
    assert not r.exists()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "nope://nowhere")
    code, out = _cli("train", *_flags(**micro_train_args(r, run[1], max_steps=1, report_to="mlflow")))
    assert code == 2 and "--report-to mlflow could not start" in out, out
    assert not (r / RUN_MARKER).exists()
    monkeypatch.setenv("TRACKIO_DIR", "/proc/forge-test/trackio")  # trackio itself would only warn, in a thread
    code, out = _cli("train", *_flags(**micro_train_args(r, run[1], max_steps=1, report_to="trackio")))
    assert code == 1 and "--report-to trackio cannot write" in out, out
    assert not (r / RUN_MARKER).exists()
    assert _cli("train", *_flags(**micro_train_args(r, run[1], max_steps=1)))[0] == 0


def _tamper_scales(ckpt: Path, change) -> None:
    from safetensors.torch import load_file, save_file

    path = ckpt / ckpt_io.LEARNED_SCALES
    scales = load_file(path)
    name = sorted(scales)[0]
    scales[name] = change(scales[name])
    save_file(scales, path)


def probe_tampered_learned_scales(tmp_path, run, monkeypatch):
    """NaN, zero or integer learned scales, and a scale of another shape (which `copy_` would broadcast over a
    whole layer): finalize (both routes), eval --fake-quant and resume refuse them with one line; nothing is
    written."""
    src, _ = run
    cases = {"nan": lambda s: s.clone().fill_(float("nan")), "zero": lambda s: torch.zeros_like(s),
             "int": lambda s: s.to(torch.int32), "shape": lambda s: s.flatten()[:1].clone()}
    for label, change in cases.items():
        r = _copy(src, tmp_path / label)
        ckpt = checkpoint_dirs(r)[-1][1]
        _tamper_scales(ckpt, change)
        for route in ("--in-memory", "--streaming"):
            code, out = _cli("finalize", "--source", ckpt, "--dest", tmp_path / f"{label}-a", route)
            assert code == 1 and ("learned scale" in out or "scales.safetensors" in out), (label, route, out)
        code, out = _cli("eval", ckpt, "--fake-quant", "int8-dynamic-act-int4-weight", "--max-batches", 1,
                         "--seq-len", 32)
        assert code == 1, (label, out)
        code, out = _cli("train", "--resume", "--output-dir", r, "--max-steps", 4)
        assert code == 1 and "scale" in out, (label, out)
        assert not list(tmp_path.glob(f"{label}-a*")) and len(checkpoint_dirs(r)) == 1


def probe_tampered_adapters(tmp_path, run, monkeypatch):
    """NaN adapters, an adapter of another shape, and an `adapter_config.json` edited to another r or alpha (what
    peft would apply then differs from the artifact): finalize, eval and resume refuse them with one line."""
    from safetensors.torch import load_file, save_file

    from forge_qat.formats.adapters import ADAPTER_DIR, PEFT_CONFIG, PEFT_WEIGHTS

    lora_run = _lora_run(run)
    for label in ("nan", "shape", "config"):
        r = _copy(lora_run, tmp_path / label)
        ckpt = checkpoint_dirs(r)[-1][1]
        if label == "config":
            path = ckpt / ADAPTER_DIR / PEFT_CONFIG
            path.write_text(json.dumps({**json.loads(path.read_text()), "lora_alpha": 64}))
        else:
            path = ckpt / ADAPTER_DIR / PEFT_WEIGHTS
            adapters = load_file(path)
            name = sorted(adapters)[0]
            adapters[name] = (adapters[name].clone().fill_(float("nan")) if label == "nan"
                              else adapters[name][:1].clone())
            save_file(adapters, path)
        for route in ("--in-memory", "--streaming"):
            code, out = _cli("finalize", "--source", ckpt, "--dest", tmp_path / f"{label}-a", route)
            assert code == 1 and ("adapter" in out or "lora_alpha" in out), (label, route, out)
        code, out = _cli("eval", ckpt, "--max-batches", 1, "--seq-len", 32)
        assert code == 1, (label, out)
        if label != "config":
            code, out = _cli("train", "--resume", "--output-dir", r, "--max-steps", 4)
            assert code == 1 and "adapter" in out, (label, out)
        assert not list(tmp_path.glob(f"{label}-a*"))


_LORA_RUNS: dict[Path, Path] = {}


def _lora_run(run) -> Path:
    """A 2-step LoRA run on the run fixture's data (once per session)."""
    src, data = run
    if src not in _LORA_RUNS:
        out = src.parent / "lora-run"
        run_training(TrainConfig.from_flat(**micro_train_args(out, data, max_steps=2, lora_rank=4)))
        _LORA_RUNS[src] = out
    return _LORA_RUNS[src]


def probe_compare_refuses_models_that_are_not_one_model(tmp_path, run, monkeypatch):
    """`forge compare` scores one model in three forms: an artifact as --float, artifacts of two recipes, a QAT
    artifact that is a PTQ, or another architecture are refused before anything is evaluated."""
    from conftest import save_tiny_moe

    src, _ = run
    qat = _artifact(run)
    ptq = _artifact(run, "int8-dynamic-act-int8-weight")
    code, out = _cli("compare", "--float", qat, "--ptq", ptq, "--qat", qat)
    assert code == 1 and "--float" in out and "quantized artifact" in out
    code, out = _cli("compare", "--float", src, "--ptq", ptq, "--qat", qat)
    assert code == 1 and "int8-dynamic-act-int8-weight" in out and "one recipe" in out
    code, out = _cli("compare", "--float", src, "--ptq", qat, "--qat", ptq)
    assert code == 1
    code, out = _cli("compare", "--float", src, "--ptq", qat, "--qat", qat)
    assert code == 1 and "QAT-trained model's artifact" in out
    other = tmp_path / "moe"
    save_tiny_moe(other, "qwen3_moe", "per-expert")
    assert _cli("finalize", "--source", other, "--dest", tmp_path / "moe-ptq", "--ptq",
                "int8-dynamic-act-int4-weight")[0] == 0
    code, out = _cli("compare", "--float", other, "--ptq", tmp_path / "moe-ptq", "--qat", qat)
    assert code == 1 and "not one model" in out, out


def probe_compare_plot_and_lora_rank_checked_before_work(tmp_path, run, monkeypatch):
    """`compare --plot` onto a file forge did not plot, to a name that is no PNG, or without --runs: refused before
    the three evaluations (the user's file intact); a half-written metrics line is skipped in the plot; a
    `--lora-rank` above a weight's smaller dimension is refused before training."""
    import forge_qat.eval.compare as compare_mod

    def must_not_evaluate(*a, **k):
        raise AssertionError("evaluated before checking --plot")

    src, data = run
    qat, ptq = _artifact(run), _artifact(run, "int8-dynamic-act-int8-weight")
    user = tmp_path / "mine.png"
    user.write_bytes(b"not a plot forge wrote")
    with monkeypatch.context() as m:
        m.setattr(compare_mod, "evaluate_model", must_not_evaluate)
        base = ("compare", "--float", src, "--ptq", ptq, "--qat", qat)
        code, out = _cli(*base, "--plot", user, "--runs", src.parent / "run")
        assert code == 1 and "not a plot forge wrote" in out and user.read_bytes() == b"not a plot forge wrote"
        assert _cli(*base, "--plot", tmp_path / "p.txt", "--runs", src)[0] == 2
        assert _cli(*base, "--plot", tmp_path / "p.png")[0] == 2
    r = _copy(src, tmp_path / "r")
    with (r / METRICS).open("a") as f:
        f.write('{"step": 3, "lo')  # kill -9 mid-line
    from forge_qat.eval.plot import plot_loss_curves, read_metrics

    assert [m["step"] for m in read_metrics(r)] == [1, 2]
    plot_loss_curves({"r": r}, tmp_path / "p.png")
    code, out = _cli("train", *_flags(**micro_train_args(tmp_path / "big", data, max_steps=1, lora_rank=100000)))
    assert code == 2 and "--lora-rank 100000 exceeds" in out
    assert not (tmp_path / "big" / RUN_MARKER).exists()


def probe_damaged_token_cache_is_rebuilt(tmp_path, run, monkeypatch):
    """A token cache damaged after it was built (an Arrow file truncated or deleted, `store.json` cut) is found,
    said, and tokenized again: the data command succeeds instead of failing until the user deletes it."""
    from forge_qat.data.build import STORE_META

    data = tmp_path / "train.txt"
    data.write_text(run[1].read_text())
    monkeypatch.setenv("FORGE_DATA_CACHE", str(tmp_path / "cache"))
    args = ("data", "--model", "micro-llama", "--data", data, "--seq-len", 32, "--json")

    def cache() -> Path:
        return next(p for p in (tmp_path / "cache").iterdir() if p.is_dir() and not p.name.startswith("."))

    assert _cli(*args)[0] == 0
    for damage in ("truncate", "delete", "cut meta"):
        arrow = next(cache().glob("*.arrow"))
        if damage == "truncate":
            arrow.write_bytes(arrow.read_bytes()[:64])
        elif damage == "delete":
            arrow.unlink()
        else:
            meta = cache() / STORE_META
            meta.write_text(meta.read_text()[:20])
        code, out = _cli(*args)
        assert code == 0 and '"built": true' in out, (damage, out)


def probe_config_json_holding_a_number(tmp_path, run, monkeypatch):
    src, _ = run
    r = _copy(src, tmp_path / "r")
    ckpt = checkpoint_dirs(r)[-1][1]
    (ckpt / "config.json").write_text("5")
    for args in (["finalize", "--source", ckpt, "--dest", tmp_path / "a"],
                 ["eval", ckpt, "--max-batches", 1, "--seq-len", 32],
                 ["export", ckpt, "--to", "gguf", "--output", tmp_path / "o.gguf"]):
        code, out = _cli(*args)
        assert code == 1 and "config" in out, (args, out)


def probe_executorch_export_of_a_damaged_artifact(tmp_path, run, monkeypatch):
    """A truncated shard, a tampered shard header, a `.bin` payload: ExecuTorch export says which file, exit 1."""
    pytest.importorskip("executorch")
    art = _copy(_artifact(run), tmp_path / "art")
    shard = art / "model.safetensors"
    whole = shard.read_bytes()
    shard.write_bytes(whole[: len(whole) // 2])
    code, out = _cli("export", art, "--to", "executorch", "--output", tmp_path / "o.pte")
    assert code == 1 and "model" in out, out
    header = int.from_bytes(whole[:8], "little")
    for junk in (b"{", b"["):  # not JSON; JSON nested deeper than the parser's recursion
        shard.write_bytes(whole[:8] + junk * header + whole[8 + header:])
        for to, out_file in (("executorch", "o.pte"), ("gguf", "o.gguf")):
            code, out = _cli("export", art, "--to", to, "--output", tmp_path / out_file)
            assert code == 1 and "model.safetensors" in out, (junk, to, out)
    shard.unlink()
    monkeypatch.setenv(PWNED, str(tmp_path / "pwned"))
    torch.save({"model.embed_tokens.weight": Payload()}, art / "pytorch_model.bin")
    code, out = _cli("export", art, "--to", "executorch", "--output", tmp_path / "o.pte")
    assert code == 1 and not (tmp_path / "pwned").exists(), out
    assert not (tmp_path / "o.pte").exists() and not (tmp_path / "o.gguf").exists()


PROBES = [Probe(name.removeprefix("probe_"), fn) for name, fn in sorted(globals().items())
          if name.startswith("probe_") and callable(fn)]


@pytest.mark.parametrize("probe", PROBES, ids=[p.name for p in PROBES])


def test_failure_mode(probe, tmp_path, run, monkeypatch):
    probe.check(tmp_path, run, monkeypatch)


def test_probe_list_matches_the_docs():
    """docs/failure-modes.md lists every probe by name."""
    doc = (Path(__file__).parents[1] / "docs" / "failure-modes.md").read_text()
    listed = set(re.findall(r"`([a-z0-9_]+)`", doc))
    assert {p.name for p in PROBES} <= listed, sorted({p.name for p in PROBES} - listed)
