"""The training loop of `forge train`, the same on every engine: setup, step, maybe_eval, maybe_save,
resume, finish.

Called by `forge_qat.train.entry` (the CLI and each rank of a launched job), the demo and the tests. What differs
between one process and DeepSpeed ZeRO is the engine (`forge_qat.train.engine`); model setup is
`forge_qat.train.model_setup`, checkpoints are `forge_qat.train.checkpointing`, eval is `forge_qat.eval.loop`.
Reports progress to an optional `TrainObserver` on rank 0; it never prints.
"""

import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from forge_qat.config import TrainConfig, resume_fixed_names
from forge_qat.data.store import TokenStore, batch_indices, model_inputs, open_token_store
from forge_qat.distill import objective as distill
from forge_qat.errors import ConfigError, ForgeError, InputError, TrainingDivergedError
from forge_qat.eval.loop import mean_loss
from forge_qat.finalize.convert import finalize
from forge_qat.finalize.job import FinalizeRequest
from forge_qat.finalize.live import finalize_live
from forge_qat.formats.atomic import remove_stale_temporaries
from forge_qat.formats.checkpoint import CheckpointMeta, read_checkpoint_meta
from forge_qat.formats.run_dir import (
    METRICS,
    abandon_new_run,
    check_run_dir,
    checkpoint_dirs,
    is_run_dir,
    start_run_dir,
    trim_metrics,
)
from forge_qat.models import load_model_tokenizer
from forge_qat.qat.config import NO_RECIPE
from forge_qat.qat.prepare import reinitialize_learned_scales, set_fake_quant_enabled
from forge_qat.train import tracking
from forge_qat.train.checkpointing import load_weights_into, restore_rng_state, save_checkpoint
from forge_qat.train.engine import Engine
from forge_qat.train.local import LocalEngine
from forge_qat.train.model_setup import TrainingModels, build_models, quantize_expert_parallel_experts
from forge_qat.train.optim import (
    SCALE_LR_RELATIVE,
    Placement,
    build_optimizer,
    build_scheduler,
    resolve_placement,
    scale_learning_rate,
)
from forge_qat.train.scale_watch import ScaleWatch
from forge_qat.train.scale_watch import report as report_scale_movement

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


def make_engine(cfg: TrainConfig, placement: Placement) -> Engine:
    from forge_qat.distributed.launch import launched_by_a_launcher

    launched = int(os.environ["WORLD_SIZE"]) if launched_by_a_launcher() else 1  # torchrun's ranks, or forge's
    if cfg.distributed.data_parallel or (launched > 1 and not cfg.distributed.uses_deepspeed):
        if not cfg.lora.enabled:  # torchrun without --nproc: `DistributedConfig.check_with` never saw the ranks
            raise ConfigError(f"{launched} ranks without DeepSpeed train LoRA adapters only (data parallel): add "
                              f"--zero-stage 3 to train every weight, or --lora-rank R")
        from forge_qat.train.data_parallel import DataParallelEngine

        return DataParallelEngine(cfg.distributed.dist_timeout_s, placement.precision, cfg.optim.grad_accum,
                                  cfg.optim.max_grad_norm)
    if not cfg.distributed.uses_deepspeed:
        return LocalEngine(placement.device, placement.precision, cfg.optim.grad_accum, cfg.optim.max_grad_norm)
    from forge_qat.distributed.config import Batching
    from forge_qat.distributed.zero import ZeroEngine  # loads deepspeed: only for runs that use it

    return ZeroEngine(cfg.distributed, Batching(micro_batch=cfg.optim.batch_size, grad_accum=cfg.optim.grad_accum,
                                                max_grad_norm=cfg.optim.max_grad_norm,
                                                precision=placement.precision))


def run_training(cfg: TrainConfig, observer: TrainObserver | None = None) -> TrainResult:
    """Train as `cfg` says; returns where the final checkpoint is (on rank 0)."""
    return Trainer(cfg, observer).run()


def sees_run_dir(out: Path) -> bool:
    """Whether this rank sees the run directory rank 0 created (tests replace it to simulate a rank without)."""
    return is_run_dir(out)


class Trainer:
    def __init__(self, cfg: TrainConfig, observer: TrainObserver | None = None, engine: Engine | None = None):
        self.cfg = cfg
        self.placement = resolve_placement(cfg)
        if cfg.run.finalize_recipe:
            cfg.run.finalize_recipe.check_convert_hardware()  # before any training, not after it
        self.engine = engine or make_engine(cfg, self.placement)
        self.main = self.engine.rank == 0
        self.observer = observer if self.main else None
        self.out = Path(cfg.run.output_dir)
        self.recipe = cfg.qat.recipe
        self.last_checkpoint: Path | None = None
        self.loss = self.eval_loss = math.nan

    def run(self) -> TrainResult:
        self.setup()
        start = self.resume() if self.cfg.run.resume else 0
        if start >= self.cfg.optim.max_steps:
            raise ConfigError(f"{self.out} is already trained to step {start}; raise --max-steps to continue")
        self.observer and self.observer.on_start(self.cfg.optim.max_steps, start)
        trackers = self._start_trackers() if self.main else None
        metrics = (self.out / METRICS).open("a") if self.main else None
        try:
            for step in range(start, self.cfg.optim.max_steps):
                record = self.step(step)
                self.maybe_eval(record)
                if metrics:
                    metrics.write(json.dumps(record) + "\n")
                    metrics.flush()
                    trackers.log(record)
                self.observer and self.observer.on_step(record)
                if not math.isfinite(record["loss"]):
                    raise TrainingDivergedError(f"loss became {record['loss']} at step {record['step']}; lower "
                                                f"--lr or check the data")
                self.maybe_save(record["step"])
        finally:
            if metrics:
                metrics.close()
                trackers.close()
            self.observer and self.observer.on_end()
        return self.finish()

    # ---- setup ------------------------------------------------------------------------------------

    def setup(self) -> None:
        """Check the run directory, open the data, build and wrap the models; only then may a previous run in
        the directory be replaced."""
        cfg = self.cfg
        if self.main:
            check_run_dir(self.out, resume=cfg.run.resume, overwrite=cfg.run.overwrite)
            self._log_plan()
        # Data first: a bad record fails the run before a large model loads, and tokenizing (long, once per
        # data set) happens before the collectives of building the model start their timeouts.
        self._open_data()
        torch.manual_seed(cfg.run.seed)
        self.models: TrainingModels = build_models(self.engine, cfg)
        student = self.models.student
        student.train()
        self.scale_lr = scale_learning_rate(student, cfg)
        if self.scale_lr is not None and cfg.run.resume and cfg.qat.qat_scale_lr is None:
            self.scale_lr = self._resumed_scale_lr(self.scale_lr)
        elif self.scale_lr is not None:
            log.info("learned scales: peak learning rate %.3g (%s)", self.scale_lr,
                     "--qat-scale-lr" if cfg.qat.qat_scale_lr is not None
                     else f"{SCALE_LR_RELATIVE:.1%} of their median starting value; --qat-scale-lr sets it")
        optimizer = build_optimizer(student, cfg, self.placement.lr, self.scale_lr)
        self.scheduler = build_scheduler(optimizer, cfg)
        self.scale_watch: ScaleWatch | None = None
        if cfg.qat.qat_learn_scales and not cfg.qat.fake_quant_after_steps:
            self.scale_watch = ScaleWatch.begin(student, self.engine.full_tensor)
        self.model = self.engine.wrap(student, optimizer, self.scheduler)
        quantize_expert_parallel_experts(student, cfg)
        teacher = self.engine.wrap_frozen(self.models.teacher) if self.models.teacher is not None else None
        self.objective = distill.objective(cfg.distill, teacher)
        if self.main and not cfg.run.resume:
            start_run_dir(self.out, cfg.to_dict())
        self._check_shared_run_dir()

    def _start_trackers(self) -> tracking.Trackers:
        """The `--report-to` trackers (rank 0). One that cannot start takes back the run directory this start
        made, so the next start is not refused as "holds a forge run"; a resumed run's is left as it was."""
        try:
            return tracking.Trackers(tracking.parse(self.cfg.run.report_to), self.out, self.cfg.to_dict())
        except ForgeError:
            if not self.cfg.run.resume:
                abandon_new_run(self.out)
            raise

    def _resumed_scale_lr(self, computed: float) -> float:
        """The default scale learning rate of a resumed run: the one its checkpoint trained with. Runs written
        before the default became relative (a share of the scales' median) trained their scales at `--lr`, and
        continue so (with a warning) rather than at a learning rate they never had."""
        ckpts = checkpoint_dirs(self.out)
        if not ckpts:
            return computed  # resume() refuses this run directory
        path = ckpts[-1][1]
        meta = read_checkpoint_meta(path)
        recorded = meta.trained_scale_lr if meta else None
        if recorded is not None:
            if self.main:
                log.info("learned scales: peak learning rate %.3g, as the run started", recorded)
            return recorded
        recorded = meta.lr if meta and meta.lr is not None else self.placement.lr
        if self.main:
            log.warning("--resume: %s predates the relative default scale learning rate and trained its scales at "
                        "--lr; they continue at %.3g (a new run would use %.3g)", path, recorded, computed)
        return recorded

    def _log_plan(self) -> None:
        p = self.placement
        log.info("device %s, precision %s, lr %g, QAT recipe %s, %d process(es)", p.device, p.precision, p.lr,
                 self.cfg.qat.recipe_name or "none (float)", self.engine.world_size)
        if self.recipe and (missing := self.recipe.missing_for_convert()):
            log.warning("training %s with fake quantization works here, but finalize will need %s",
                        self.recipe.name, " and ".join(missing))

    def _open_data(self) -> None:
        cfg = self.cfg
        tokenizer, max_positions = load_model_tokenizer(cfg.run.model)
        if max_positions and cfg.data.seq_len > max_positions:
            raise ConfigError(f"seq_len {cfg.data.seq_len} exceeds the model's max_position_embeddings "
                              f"{max_positions}; use --seq-len {max_positions} or less")
        options = cfg.data.options(defer=self.engine.local_rank != 0,
                                   progress=self.observer.on_data_progress if self.observer else None)
        self.train_data = open_token_store(cfg.data.train_data, tokenizer, cfg.data.seq_len, options,
                                           packing=cfg.data.packing)
        self.eval_data: TokenStore | None = None
        if cfg.data.has_eval:
            self.eval_data = open_token_store(cfg.data.eval_data, tokenizer, cfg.data.seq_len, options,
                                              packing=cfg.data.packing)
        if self.main:
            d = self.train_data
            log.info("train data: %d sequences of %d tokens from %d documents (%.0f%% of tokens learned)",
                     len(d), cfg.data.seq_len, d.documents, 100 * d.meta["learned_tokens"] / max(d.total_tokens, 1))

    def _check_shared_run_dir(self) -> None:
        """Rank 0 alone writes the consolidated weights and renames each checkpoint into place, while every rank
        writes its own engine state into it: a checkpoint is complete only where all ranks share the run
        directory. On machines without a shared file system, fail before training."""
        self.engine.barrier()  # rank 0 has created the directory and its run marker
        blind = [r for r, ok in enumerate(self.engine.all_gather(sees_run_dir(self.out))) if not ok]
        if blind:
            raise ConfigError(f"rank(s) {blind} cannot see the run directory {self.out} that rank 0 created: "
                              f"checkpoints need --output-dir on a file system all machines share (rank 0 "
                              f"completes each checkpoint)")

    # ---- the loop ---------------------------------------------------------------------------------

    def step(self, step: int) -> dict[str, Any]:
        """One optimizer step (0-based `step`): grad_accum micro-batches, each rank on its slice of the same
        global batch; the loss terms are summed on the device and read on the host once."""
        cfg, engine = self.cfg, self.engine
        fake_quant = cfg.qat.fake_quant_at(step)
        if self.recipe:
            set_fake_quant_enabled(self.models.student, fake_quant)
        if cfg.qat.qat_learn_scales and step == cfg.qat.fake_quant_after_steps > 0:
            self._start_scales_again(step)
        t0 = time.perf_counter()
        global_batch = cfg.optim.batch_size * engine.world_size
        totals: dict[str, torch.Tensor] = {}
        for micro in range(cfg.optim.grad_accum):
            # Every rank draws the same global micro-batch and trains on its slice, so N ranks see exactly
            # the sequences one process with an N-times larger batch would.
            idx = batch_indices(len(self.train_data), global_batch, cfg.run.seed, step * cfg.optim.grad_accum + micro)
            idx = idx[engine.rank * cfg.optim.batch_size:(engine.rank + 1) * cfg.optim.batch_size]
            batch = model_inputs(self.train_data, idx, self.models.student, self.placement.device)
            with engine.autocast():
                loss, terms = self.objective(self.model, batch, fake_quant)
            engine.backward(loss)
            engine.step()
            for name, value in terms.items():
                totals[name] = totals[name] + value if name in totals else value
        names = sorted(totals)
        means = dict(zip(names, engine.mean(torch.stack([totals[n] for n in names]) / cfg.optim.grad_accum),
                         strict=True))
        elapsed = time.perf_counter() - t0
        self.loss = means.pop("loss")
        tokens = global_batch * cfg.optim.grad_accum * cfg.data.seq_len
        record = {"step": step + 1, "loss": self.loss, "lr": self.scheduler.get_last_lr()[0],
                  "tokens_per_s": tokens / elapsed, "step_time_s": elapsed, **means}
        if self.recipe:
            record["fake_quant"] = fake_quant
        return record

    def _start_scales_again(self, step: int) -> None:
        """Delayed fake quantization starts: the learned scales are chosen from this step's weights."""
        student, engine = self.models.student, self.engine
        layers = reinitialize_learned_scales(student, engine.full_tensor, engine.set_full_tensor,
                                             self.cfg.qat.qat_scale_init)
        self.scale_watch = ScaleWatch.begin(student, engine.full_tensor)
        if self.main:
            log.info("fake quantization starts: learned scales of %d layers chosen from the weights of step %d",
                     layers, step)

    def maybe_eval(self, record: dict[str, Any]) -> None:
        """Held-out loss at the eval cadence and the last step: the same token-weighted loop as `forge eval`."""
        if self.eval_data is None or not self.cfg.run.eval_due(record["step"], self.cfg.optim.max_steps):
            return
        self.eval_loss, _ = mean_loss(self.models.student, self.eval_data, batch_size=self.cfg.optim.batch_size,
                                      device=self.placement.device, max_batches=self.cfg.run.eval_batches,
                                      autocast=self.engine.autocast())
        record["eval_loss"] = self.eval_loss

    def maybe_save(self, done: int) -> None:
        if not self.cfg.run.save_due(done, self.cfg.optim.max_steps):
            return
        movement = None
        if self.scale_watch is not None and done > self.cfg.qat.fake_quant_after_steps:
            movement = {**self.scale_watch.movement(self.models.student, self.engine.full_tensor),
                        "peak_lr": self.scale_lr}
            if self.main:
                report_scale_movement(movement, done, self.scale_lr)
        state = {"scale_watch": self.scale_watch.state()} if self.scale_watch is not None else None
        self.last_checkpoint = save_checkpoint(self.engine, self.models.student, self.out, self.models.tokenizer,
                                               self._checkpoint_meta(done, movement), self.cfg.run.save_total_limit,
                                               self.models.layout, trainer_state=state)
        self.observer and self.last_checkpoint and self.observer.on_checkpoint(self.last_checkpoint)

    def _checkpoint_meta(self, step: int, movement: dict[str, Any] | None) -> CheckpointMeta:
        return CheckpointMeta(step=step, qat_recipe=self.cfg.qat.recipe_name, fp8_recipe=self.cfg.qat.fp8_recipe,
                              precision=self.placement.precision, lr=self.placement.lr,
                              world_size=self.engine.world_size, uses_deepspeed=self.cfg.distributed.uses_deepspeed,
                              train_config=self.cfg.to_dict(), scale_lr=self.scale_lr, data_key=self.train_data.key,
                              learned_scales=movement)

    # ---- resume and finish ------------------------------------------------------------------------

    def resume(self) -> int:
        """Continue from the run's latest checkpoint, refusing one whose settings or data differ; returns its
        step."""
        ckpts = checkpoint_dirs(self.out)
        if not ckpts:
            raise ConfigError(f"--resume: {self.out} has no complete checkpoint yet; start again with --overwrite")
        step, path = ckpts[-1]
        meta = read_checkpoint_meta(path)
        if meta is None:
            raise InputError(f"--resume: {path} has no forge metadata; start a new run from its weights with "
                             f"--model {path}")
        self._check_resumable(path, meta)
        if self.main:
            remove_stale_temporaries(self.out)
        if not self.engine.state_includes_weights:
            load_weights_into(self.models.student, path)
        state = self.engine.load_state(path)
        restore_rng_state(state)
        if state.get("scale_watch") is not None:
            self.scale_watch = ScaleWatch.from_state(state["scale_watch"])
        if self.main:
            trim_metrics(self.out, step)
            log.info("resumed from %s (step %d)", path, step)
        return step

    def _check_resumable(self, path: Path, meta: CheckpointMeta) -> None:
        cfg, recorded = self.cfg, meta.train_config
        if meta.lora is not None and recorded.get("expert_parallel", 1) > 1:  # `ZeroEngine.save_state` says why
            raise InputError(f"--resume: {path} is a checkpoint of LoRA under --expert-parallel, which holds no "
                             f"DeepSpeed state (DeepSpeed cannot save frozen expert-parallel experts): finalize or "
                             f"evaluate it; a LoRA run that must resume runs without --expert-parallel")
        if meta.qat_recipe != cfg.qat.recipe_name:
            raise ConfigError(f"--resume: {path} was trained with QAT recipe {meta.qat_recipe or NO_RECIPE}, "
                              f"this run asks for {cfg.qat.recipe_name or NO_RECIPE}")
        written_by, deepspeed = meta.world_size, cfg.distributed.uses_deepspeed
        if written_by != self.engine.world_size or meta.deepspeed != deepspeed:
            raise ConfigError(
                f"--resume: {path} holds optimizer state for {written_by} process(es)"
                f"{' under DeepSpeed' if meta.deepspeed else ''}; this run has "
                f"{self.engine.world_size}{' under DeepSpeed' if deepspeed else ''}. Resume with the same "
                f"--nproc/--zero-stage, or start a new run from its weights with --model {path}")
        changed = [f"{k} {recorded[k]!r} -> {cfg.get(k)!r}" for k in resume_fixed_names()
                   if k in recorded and recorded[k] != cfg.get(k)]
        if changed:
            raise ConfigError(f"--resume: {path} was trained with other settings ({'; '.join(changed)}); the "
                              f"restored optimizer, schedule and data order would not follow them. Resume with "
                              f"the recorded values (only --max-steps and eval/save frequencies may change), or "
                              f"start a new run from its weights with --model {path}")
        if (meta.data_key or self.train_data.key) != self.train_data.key:
            raise ConfigError(f"--resume: the training data {cfg.data.train_data} (or the tokenizer) changed since "
                              f"{path} was written: its files differ in size or modification time, so the batches "
                              f"would not continue the run. Restore the original files, or start a new run from "
                              f"its weights with --model {path}")

    def finish(self) -> TrainResult:
        """Finalize the last checkpoint when asked, and leave the engine. Under DeepSpeed the live model is gathered
        block by block; under expert parallelism, whose live experts are AutoEP's layers, and on one process,
        rank 0 converts the checkpoint just written (the same fp32 weights, in the transformers layout) once the
        other ranks have left: no collective keeps them waiting through a conversion."""
        recipe = self.cfg.run.finalize_recipe
        live = recipe is not None and self.cfg.distributed.uses_deepspeed and self.cfg.distributed.expert_parallel == 1
        artifact = None
        if live:
            artifact = finalize_live(self.models.student, self.last_checkpoint, recipe,
                                     self.out / f"final-{recipe.name}", self.engine.full_tensor, main=self.main)
            self.engine.barrier()
        self.engine.close()
        if recipe is not None and not live and self.main:
            artifact = finalize(FinalizeRequest(source=self.last_checkpoint, dest=self.out / f"final-{recipe.name}",
                                                qat_convert=recipe, overwrite=True)).dest
        if artifact:
            log.info("finalized %s", artifact)
        return TrainResult(self.out, self.last_checkpoint, self.cfg.optim.max_steps, self.loss,
                           None if self.eval_data is None else self.eval_loss)
