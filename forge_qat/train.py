"""The training loop: load, prepare (QAT or float8), train, evaluate, checkpoint, resume.

Called by `forge train` (through `run_training`), the distributed worker and the tests. The loop is
the same on one process and under DeepSpeed ZeRO; what differs (building the model, stepping,
checkpointing) is a `Backend`: `SingleProcess` here, `forge_qat.distributed.zero.ZeroBackend` for
ZeRO. Reports progress to an optional `TrainObserver` on rank 0; it never prints.
"""

import contextlib
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from transformers import get_scheduler

from forge_qat import checkpoint as ckpt_io
from forge_qat import hardware
from forge_qat.config import NO_RECIPE, TrainConfig
from forge_qat.data.build import DataOptions
from forge_qat.data.encode import ChatOptions
from forge_qat.data.store import TokenStore, batch_indices, model_inputs, open_token_store
from forge_qat.distill import Objective, frozen_teacher, make_objective, training_loss
from forge_qat.errors import ConfigError, HardwareError
from forge_qat.models import ModelSource, load_model, load_model_tokenizer
from forge_qat.prepare import check_convert_hardware, learned_scales, prepare_for_training, set_fake_quant_enabled
from forge_qat.recipes import Recipe, get_recipe
from forge_qat.weights import true_shape

log = logging.getLogger(__name__)


class TrainObserver(Protocol):
    def on_data_progress(self, label: str, done_bytes: int, total_bytes: int) -> None: ...
    def on_start(self, total_steps: int, start_step: int) -> None: ...
    def on_step(self, record: dict[str, Any]) -> None: ...
    def on_checkpoint(self, path: Path) -> None: ...
    def on_end(self) -> None: ...


@dataclass(frozen=True, slots=True)
class TrainResult:
    output_dir: Path
    checkpoint: Path | None
    steps: int
    final_loss: float
    final_eval_loss: float | None


@dataclass(frozen=True, slots=True)
class Resolved:
    """Values derived from the config and the machine, decided once and logged."""

    device: torch.device
    precision: str
    lr: float
    qat_recipe: str | None
    recipe: Recipe | None
    """The registry record of `qat_recipe`, resolved once here."""


def resolve(cfg: TrainConfig) -> Resolved:
    device = torch.device("cuda" if hardware.cuda_available() else "cpu")
    precision = cfg.precision
    if precision == "auto":
        precision = "bf16" if hardware.bf16_native() else ("fp16" if device.type == "cuda" else "fp32")
    if precision == "fp16" and device.type != "cuda":
        raise HardwareError("fp16 autocast needs a CUDA device; use --precision bf16 or fp32 on CPU")
    if precision == "bf16" and not hardware.bf16_supported():
        raise HardwareError("this GPU does not support bf16; use --precision fp16 or fp32")
    lr = cfg.lr if cfg.lr is not None else (1e-3 if ModelSource(cfg.model).is_preset else 2e-5)
    if cfg.finalize:
        check_convert_hardware(get_recipe(cfg.finalize))  # before any training, not after it
    name = cfg.active_qat_recipe
    return Resolved(device, precision, lr, name, get_recipe(name) if name else None)


def autocast(res: Resolved):
    if res.precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if res.precision == "bf16" else torch.float16
    return torch.autocast(res.device.type, dtype=dtype)


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig, lr: float) -> torch.optim.Optimizer:
    # model.parameters() yields each Parameter once, so tied or shared parameters appear once here
    # (DeepSpeed would otherwise reject the duplicate). Decay weight matrices only. Learned quantization
    # scales get a group of their own: no decay (it would shrink them towards a grid that clips
    # everything) and their own peak learning rate (--qat-scale-lr; the schedule scales every group alike).
    scales = {id(p) for p in learned_scales(model).values()}
    params = [p for p in model.parameters() if p.requires_grad and id(p) not in scales]
    is_matrix = lambda p: len(true_shape(p)) >= 2
    groups = [
        {"params": [p for p in params if is_matrix(p)], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if not is_matrix(p)], "weight_decay": 0.0},
        {"params": [p for p in model.parameters() if id(p) in scales], "weight_decay": 0.0,
         "lr": cfg.qat_scale_lr or lr},
    ]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=(0.9, 0.95), eps=1e-8)


class Backend(Protocol):
    """What differs between one process and DeepSpeed ZeRO."""

    rank: int
    local_rank: int
    """The rank's index on its machine: local rank 0 tokenizes the data for the machine."""
    world_size: int
    teacher: torch.nn.Module | None
    """The frozen float teacher of `--kd-teacher float`, made by `build` (None otherwise)."""

    def build(self, cfg: TrainConfig, res: Resolved) -> tuple[torch.nn.Module, Any]: ...
    def setup(self, model, optimizer, scheduler, cfg: TrainConfig, objective: Objective | None) -> None: ...
    def micro_step(self, batch: dict[str, torch.Tensor], res: Resolved, grad_accum: int,
                   fake_quant: bool) -> torch.Tensor:
        """Forward and backward of one micro-batch; returns the detached losses (the total, then with
        distillation its LM and KD parts) as one vector, still on the device."""
    def optimizer_step(self, cfg: TrainConfig) -> None: ...
    def mean(self, values: torch.Tensor) -> list[float]:
        """The means over ranks of a per-rank vector, read once on the host."""
    def save(self, out: Path, step: int, tokenizer, meta: dict, keep: int) -> Path | None: ...
    def restore(self, ckpt: Path) -> None: ...
    def check_output_dir(self, out: Path) -> None:
        """Every rank sees the run directory rank 0 made (several machines: a shared file system)."""
    def finalize(self, ckpt: Path, recipe: str, dest: Path) -> Path | None: ...
    def close(self) -> None: ...


class SingleProcess:
    """Plain PyTorch on one device, autocast for mixed precision."""

    rank, local_rank, world_size = 0, 0, 1
    teacher: torch.nn.Module | None = None

    def build(self, cfg: TrainConfig, res: Resolved):
        model, tokenizer = load_model(cfg.model, seed=cfg.seed)
        self.teacher = frozen_teacher(model, cfg, res.device)
        prepare_for_training(model, cfg, res.recipe)
        self.model = model.to(res.device)
        return self.model, tokenizer

    def setup(self, model, optimizer, scheduler, cfg: TrainConfig, objective: Objective | None) -> None:
        self.optimizer, self.scheduler, self.objective = optimizer, scheduler, objective

    def micro_step(self, batch, res: Resolved, grad_accum: int, fake_quant: bool) -> torch.Tensor:
        with autocast(res):
            loss, losses = training_loss(self.model, batch, self.objective, fake_quant)
        (loss / grad_accum).backward()
        return losses

    def optimizer_step(self, cfg: TrainConfig) -> None:
        if cfg.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def mean(self, values: torch.Tensor) -> list[float]:
        return values.tolist()

    def save(self, out: Path, step: int, tokenizer, meta: dict, keep: int) -> Path:
        state = {"step": step, "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                 **ckpt_io.rng_state()}
        return ckpt_io.save_checkpoint(out, step, self.model, tokenizer, meta, state, keep)

    def restore(self, ckpt: Path) -> None:
        ckpt_io.load_weights_into(self.model, ckpt)
        state = ckpt_io.load_trainer_state(ckpt)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        ckpt_io.restore_rng_state(state)

    def check_output_dir(self, out: Path) -> None:
        pass

    def finalize(self, ckpt: Path, recipe: str, dest: Path) -> Path:
        from forge_qat.finalize import FinalizeRequest, finalize

        return finalize(FinalizeRequest(source=ckpt, dest=dest, qat_convert=recipe, overwrite=True)).dest

    def close(self) -> None:
        pass


def make_backend(cfg: TrainConfig) -> Backend:
    if cfg.uses_deepspeed:
        from forge_qat.distributed.zero import ZeroBackend

        return ZeroBackend(cfg)
    return SingleProcess()


def data_options(cfg: TrainConfig, *, defer: bool = False, observer: TrainObserver | None = None) -> DataOptions:
    """How `cfg`'s data is tokenized and cached; `defer`: let this machine's first rank build the cache."""
    chosen = {}
    if cfg.data_cache:
        chosen["cache_dir"] = Path(cfg.data_cache)
    if cfg.data_workers:
        chosen["workers"] = cfg.data_workers
    return DataOptions(chat=ChatOptions(cfg.chat_column, cfg.chat_loss), defer=defer,
                       progress=observer.on_data_progress if observer else None, **chosen)


@torch.no_grad()
def evaluate(model: torch.nn.Module, data: TokenStore, batch_size: int, max_batches: int, res: Resolved) -> float:
    """Mean loss over the first `max_batches` micro-batches of `data`, in a fixed order.

    Every rank evaluates the same batches: under ZeRO-3 each forward is a collective."""
    was_training = model.training
    model.eval()
    losses = []
    for start in range(0, min(len(data), batch_size * max_batches), batch_size):
        indices = torch.arange(start, min(start + batch_size, len(data)))
        with autocast(res):
            losses.append(model(**model_inputs(data, indices, model, res.device)).loss.float().item())
    model.train(was_training)
    return sum(losses) / len(losses)


def run_training(cfg: TrainConfig, observer: TrainObserver | None = None,
                 backend: Backend | None = None) -> TrainResult:
    """Train as `cfg` says; returns where the final checkpoint is (on rank 0)."""
    backend = backend or make_backend(cfg)
    res = resolve(cfg)
    main = backend.rank == 0
    observer = observer if main else None
    out = Path(cfg.output_dir)
    if main:
        ckpt_io.check_run_dir(out, resume=cfg.resume, overwrite=cfg.overwrite)
        log.info("device %s, precision %s, lr %g, QAT recipe %s, %d process(es)", res.device, res.precision,
                 res.lr, res.qat_recipe or "none (float)", backend.world_size)
        if res.recipe and (missing := res.recipe.missing_for_convert()):
            log.warning("training %s with fake quantization works here, but finalize will need %s",
                        res.qat_recipe, " and ".join(missing))

    # Data first: a bad record fails the run before a large model loads, and tokenizing (long, once per
    # data set) happens before the collectives of building the model start their timeouts.
    tokenizer, max_positions = load_model_tokenizer(cfg.model)
    if max_positions and cfg.seq_len > max_positions:
        raise ConfigError(f"seq_len {cfg.seq_len} exceeds the model's max_position_embeddings {max_positions}; "
                          f"use --seq-len {max_positions} or less")
    options = data_options(cfg, defer=backend.local_rank != 0, observer=observer)
    train_data = open_token_store(cfg.data, tokenizer, cfg.seq_len, options, packing=cfg.packing)
    eval_data = open_token_store(cfg.eval_data, tokenizer, cfg.seq_len, options, packing=cfg.packing) \
        if cfg.has_eval else None
    if main:
        log.info("train data: %d sequences of %d tokens from %d documents (%.0f%% of tokens learned)",
                 len(train_data), cfg.seq_len, train_data.documents,
                 100 * train_data.meta["learned_tokens"] / max(train_data.total_tokens, 1))
    torch.manual_seed(cfg.seed)
    model, tokenizer = backend.build(cfg, res)
    model.train()
    optimizer = build_optimizer(model, cfg, res.lr)
    scheduler = get_scheduler(cfg.lr_schedule if cfg.lr_schedule != "constant" else "constant_with_warmup",
                              optimizer, num_warmup_steps=cfg.warmup_steps, num_training_steps=cfg.max_steps)
    backend.setup(model, optimizer, scheduler, cfg, make_objective(cfg, backend.teacher))
    if main and not cfg.resume:
        # Everything the run needs has loaded: only now may a previous run in the directory be replaced.
        ckpt_io.start_run_dir(out, cfg.to_dict())

    backend.check_output_dir(out)
    start_step = _restore(out, backend, cfg, res, train_data.key) if cfg.resume else 0
    if start_step >= cfg.max_steps:
        raise ConfigError(f"{out} is already trained to step {start_step}; raise --max-steps to continue")

    meta = {"qat_recipe": res.qat_recipe, "fp8_recipe": cfg.fp8_recipe, "precision": res.precision,
            "lr": res.lr, "world_size": backend.world_size, "train_config": cfg.to_dict(),
            "data_key": train_data.key}
    global_batch = cfg.batch_size * backend.world_size
    tokens_per_step = global_batch * cfg.grad_accum * cfg.seq_len
    observer and observer.on_start(cfg.max_steps, start_step)
    metrics = (out / ckpt_io.METRICS).open("a") if main else None
    loss = eval_loss = float("nan")
    last_ckpt = None
    try:
        for step in range(start_step, cfg.max_steps):
            fake_quant = bool(res.qat_recipe) and step >= cfg.fake_quant_after_steps
            if res.qat_recipe:
                set_fake_quant_enabled(model, fake_quant)
            t0 = time.perf_counter()
            total = torch.zeros(3 if cfg.kd_weight else 1, device=res.device)  # summed on the device: no
            # host sync per micro-step
            for micro in range(cfg.grad_accum):
                # Every rank draws the same global micro-batch and trains on its slice, so N ranks
                # see exactly the sequences one process with an N-times larger batch would.
                idx = batch_indices(len(train_data), global_batch, cfg.seed, step * cfg.grad_accum + micro)
                idx = idx[backend.rank * cfg.batch_size:(backend.rank + 1) * cfg.batch_size]
                total += backend.micro_step(model_inputs(train_data, idx, model, res.device), res, cfg.grad_accum,
                                            fake_quant)
            backend.optimizer_step(cfg)
            means = backend.mean(total / cfg.grad_accum)
            loss = means[0]
            elapsed = time.perf_counter() - t0
            done = step + 1
            record = {"step": done, "loss": loss, "lr": scheduler.get_last_lr()[0],
                      "tokens_per_s": tokens_per_step / elapsed, "step_time_s": elapsed}
            if cfg.kd_weight:
                record["lm_loss"], record["kd_loss"] = means[1:]
            if res.qat_recipe:
                record["fake_quant"] = step >= cfg.fake_quant_after_steps
            if eval_data is not None and (done == cfg.max_steps or (cfg.eval_every and done % cfg.eval_every == 0)):
                record["eval_loss"] = eval_loss = evaluate(model, eval_data, cfg.batch_size, cfg.eval_batches, res)
            if metrics:
                metrics.write(json.dumps(record) + "\n")
                metrics.flush()
            observer and observer.on_step(record)
            if not math.isfinite(loss):
                raise ConfigError(f"loss became {loss} at step {done}; lower --lr or check the data")
            if done == cfg.max_steps or (cfg.save_every and done % cfg.save_every == 0):
                last_ckpt = backend.save(out, done, tokenizer, meta, cfg.save_total_limit)
                observer and last_ckpt and observer.on_checkpoint(last_ckpt)
    finally:
        if metrics:
            metrics.close()
        observer and observer.on_end()
    if cfg.finalize:
        artifact = backend.finalize(last_ckpt, cfg.finalize, out / f"final-{cfg.finalize}")
        if artifact:
            log.info("finalized %s", artifact)
    backend.close()
    return TrainResult(out, last_ckpt, cfg.max_steps, loss, None if eval_data is None else eval_loss)


RESUME_FIXED = ("model", "data", "chat_column", "chat_loss", "packing", "kd_loss", "kd_weight", "lm_weight",
                "kd_teacher", "kd_temperature", "kd_top_k", "qat_learn_scales", "qat_scale_lr", "seq_len", "batch_size",
                "grad_accum", "lr", "lr_schedule", "warmup_steps", "weight_decay", "max_grad_norm", "seed", "precision",
                "fake_quant_after_steps")
"""Settings a resumed run must share with its checkpoint: the restored optimizer state, LR schedule and
batch order are functions of them."""


def _restore(out: Path, backend: Backend, cfg: TrainConfig, res: Resolved, data_key: str) -> int:
    ckpts = ckpt_io.checkpoint_dirs(out)
    if not ckpts:
        raise ConfigError(f"--resume: {out} has no complete checkpoint yet; start again with --overwrite")
    step, path = ckpts[-1]
    meta = ckpt_io.read_checkpoint_meta(path)
    if meta.get("qat_recipe") != res.qat_recipe:
        raise ConfigError(f"--resume: {path} was trained with QAT recipe {meta.get('qat_recipe') or NO_RECIPE}, "
                          f"this run asks for {res.qat_recipe or NO_RECIPE}")
    written_by = meta.get("world_size", 1)
    if written_by != backend.world_size or bool(meta["train_config"].get("zero_stage")) != cfg.uses_deepspeed:
        raise ConfigError(
            f"--resume: {path} holds optimizer state for {written_by} process(es)"
            f"{' under DeepSpeed' if meta['train_config'].get('zero_stage') else ''}; this run has "
            f"{backend.world_size}{' under DeepSpeed' if cfg.uses_deepspeed else ''}. Resume with the same "
            f"--nproc/--zero-stage, or start a new run from its weights with --model {path}")
    recorded = meta.get("train_config", {})
    changed = [f"{k} {recorded[k]!r} -> {getattr(cfg, k)!r}" for k in RESUME_FIXED
               if k in recorded and recorded[k] != getattr(cfg, k)]
    if changed:
        raise ConfigError(f"--resume: {path} was trained with other settings ({'; '.join(changed)}); the restored "
                          f"optimizer, schedule and data order would not follow them. Resume with the recorded "
                          f"values (only --max-steps and eval/save frequencies may change), or start a new run "
                          f"from its weights with --model {path}")
    if meta.get("data_key", data_key) != data_key:
        raise ConfigError(f"--resume: the training data {cfg.data} (or the tokenizer) changed since {path} was "
                          f"written: its files differ in size or modification time, so the batches would not "
                          f"continue the run. Restore the original files, or start a new run from its weights "
                          f"with --model {path}")
    if backend.rank == 0:
        ckpt_io.remove_stale_temporaries(out)
    backend.restore(path)
    if backend.rank == 0:
        ckpt_io.trim_metrics(out, step)
        log.info("resumed from %s (step %d)", path, step)
    return step
