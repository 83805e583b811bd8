"""DeepSpeed ZeRO training backend: partitioned construction, streamed loading, rank-0 consolidation.

Used by `forge_qat.train.run_training` when the run config asks for DeepSpeed. Under ZeRO-3 no rank
ever holds the whole model: the model is created partitioned (`deepspeed.zero.Init`) without
initialising the weights it is about to overwrite; rank 0 reads the safetensors shards one
partition slice at a time and sends each rank its slice (see `_fill_partition`); QAT
prepare swaps modules around the same partitioned `Parameter` objects before
`deepspeed.initialize`; and float checkpoints are consolidated on rank 0 one parameter at a time
into shards written as they fill.
"""

import contextlib
import dataclasses
import gc
import json
import os
import shutil
from datetime import timedelta
from pathlib import Path
from typing import Any

# forge_qat/distributed/__init__.py, imported before this module, has set DS_ACCELERATOR.
import deepspeed
import torch
import torch.distributed as dist

from forge_qat import checkpoint as ckpt_io
from forge_qat import hardware
from forge_qat.artifact import ShardWriter
from forge_qat.config import TrainConfig
from forge_qat.distill import frozen_teacher, training_loss
from forge_qat.errors import ConfigError, InputError
from forge_qat.fake_quant import SCALE_SUFFIX
from forge_qat.layouts import Layout, model_layout_reader
from forge_qat.models import PRESETS, check_model_dir, load_config, load_model, load_tokenizer, preset_model
from forge_qat.prepare import prepare_for_training
from forge_qat.weights import SafetensorsReader, StateDictSource, tied_aliases

DS_STATE = "deepspeed"
DS_TAG = "state"


def process_group_backend(cuda: bool) -> str:
    """One process group, a backend per device type: NCCL for CUDA tensors (the training collectives
    DeepSpeed issues), gloo for CPU tensors. NCCL alone has no CPU path ("no backend for device type
    cpu"), and forge's own collectives (the streamed load's sends, the loss mean, object broadcasts)
    must work whichever device a tensor is on. On CPU-only machines the mapping names gloo alone."""
    return "cpu:gloo,cuda:nccl" if cuda else "cpu:gloo"


def init_process_group(timeout_s: int) -> tuple[int, int]:
    """Join the job described by the launcher's environment (RANK, WORLD_SIZE, MASTER_ADDR, ...)."""
    cuda = hardware.cuda_available()
    if cuda:  # before the process group: NCCL binds each rank to its device
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend=process_group_backend(cuda), timeout=timedelta(seconds=timeout_s))
    return dist.get_rank(), dist.get_world_size()


# ---- the DeepSpeed config ------------------------------------------------------------------------

def generated_ds_config(cfg: TrainConfig, precision: str, world_size: int) -> dict[str, Any]:
    return {
        "train_micro_batch_size_per_gpu": cfg.batch_size,
        "gradient_accumulation_steps": cfg.grad_accum,
        "train_batch_size": cfg.batch_size * cfg.grad_accum * world_size,
        "gradient_clipping": cfg.max_grad_norm,
        "zero_optimization": {"stage": cfg.zero_stage or 3},
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16"},
        # forge passes torch's AdamW, which ZeRO handles but does not list as "tested".
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
    }


def ds_config(cfg: TrainConfig, precision: str, world_size: int) -> dict[str, Any]:
    """The generated config, or the user's JSON checked against the run config ("auto" defers)."""
    generated = generated_ds_config(cfg, precision, world_size)
    if not cfg.deepspeed_config:
        return generated
    path = Path(cfg.deepspeed_config)
    try:
        user = json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(f"DeepSpeed config {path} does not exist") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"DeepSpeed config {path} is not valid JSON: {e}") from None
    checks = [
        ("train_micro_batch_size_per_gpu", user.get("train_micro_batch_size_per_gpu"), cfg.batch_size, "batch_size"),
        ("gradient_accumulation_steps", user.get("gradient_accumulation_steps"), cfg.grad_accum, "grad_accum"),
        ("zero_optimization.stage", user.get("zero_optimization", {}).get("stage"),
         cfg.zero_stage or None, "zero_stage"),
        ("bf16.enabled", user.get("bf16", {}).get("enabled"), precision == "bf16", f"precision {precision}"),
        ("fp16.enabled", user.get("fp16", {}).get("enabled"), precision == "fp16", f"precision {precision}"),
    ]
    for key, theirs, ours, our_name in checks:
        if theirs not in (None, "auto") and ours is not None and theirs != ours:
            raise ConfigError(f"{path}: {key} is {theirs}, but the run config has {our_name} = {ours}; "
                              f"make them agree or set it to \"auto\" in the JSON")
    _check_partitioning(user.get("zero_optimization", {}), path)
    merged = {**generated, **{k: v for k, v in user.items() if v != "auto"}}
    merged["zero_optimization"] = {**generated["zero_optimization"],
                                   **{k: v for k, v in user.get("zero_optimization", {}).items() if v != "auto"}}
    for section in ("bf16", "fp16"):
        merged[section] = generated[section]
    return merged


def _check_partitioning(zero: dict[str, Any], path: Path) -> None:
    """Refuse ZeRO-3 layouts the streamed loader and the consolidation cannot serve. Both assume that a
    parameter is partitioned over the whole world, rank r holding slice r, and lives on the device:
    hierarchical partitioning (ZeRO++ hpZ, MiCS) partitions over subgroups, and parameter offload keeps
    partitions in host or NVMe buffers that DeepSpeed swaps in and out."""
    refused = []
    if (zero.get("zero_hpz_partition_size") or 1) > 1:
        refused.append(f"zero_hpz_partition_size {zero['zero_hpz_partition_size']} (ZeRO++ hierarchical partitioning)")
    if (zero.get("mics_shard_size") or -1) > 0:
        refused.append(f"mics_shard_size {zero['mics_shard_size']} (MiCS)")
    offload = zero.get("offload_param") or {}
    if offload.get("device") not in (None, "none"):
        refused.append(f"offload_param device {offload['device']!r}")
    if refused:
        raise ConfigError(f"{path}: forge's ZeRO-3 loader and checkpoints need each parameter partitioned over all "
                          f"ranks on the device; this config asks for {'; '.join(refused)}. Remove it (optimizer "
                          f"offload, offload_optimizer, is fine)")


# ---- streamed loading ----------------------------------------------------------------------------

class PartitionedInit(deepspeed.zero.Init):
    """`deepspeed.zero.Init` for a model whose weights are about to be overwritten.

    Stock `Init._zero_init_param` broadcasts every newly built parameter in full from rank 0 before
    partitioning it, so that ranks agree on the random init. Here the init is discarded (weights are
    streamed in next), and that broadcast makes every other rank materialise a full-size receive
    buffer per parameter (measured: +525 MB peak on rank 1 for a 538 MB model, vs +380 MB on rank 0).
    Partitioning without it is exactly what stock Init does minus the broadcast; the streamed load
    then writes every partition (tests/test_distributed.py checks the result bit for bit).
    """

    def _zero_init_param(self, param):
        self._convert_to_deepspeed_param(param)
        param.partition()


def close_process_group() -> None:
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _import_architecture(config) -> None:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    try:
        MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]  # the lazy mapping imports the modeling module
    except KeyError:
        raise InputError(f"transformers has no causal LM class for model type {config.model_type!r}") from None


def _broadcast(obj: Any) -> Any:
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


TRANSFER_CHUNK_BYTES = 4 * 1024**2
"""Rank 0 reads and sends a partition in pieces of this size, so its staging buffer stays small whatever
the tensor (a fused expert stack's partition is tens of MB)."""


def _fill_partition(p: torch.nn.Parameter, name: str, source, rank: int, world: int) -> None:
    """Give every rank its ZeRO-3 partition of `p`, read by rank 0 one chunk at a time.

    Not `GatheredParameters(..., modifier_rank=0)`: that all-gathers the whole tensor on every rank,
    and DeepSpeed's CPU all-gather peaks at twice its size (measured: +227 MB for a 113 MB
    embedding), so a rank would hold its partitions plus two full tensors. A ZeRO-3 partition is a
    contiguous slice of the flattened parameter (rank r holds [r*n, r*n + n) with n = ceil(numel /
    world), zero-padded; `Init._partition_param` in deepspeed/runtime/zero/partition_parameters.py),
    so rank 0 reads each rank's slice straight from the file, chunk by chunk, and sends it; the other
    ranks receive the same chunks in the same order straight into their partition.
    tests/test_distributed.py checks the result bit for bit.
    """
    part = p.ds_tensor
    n, numel = part.numel(), p.ds_numel
    step = max(1, TRANSFER_CHUNK_BYTES // part.element_size())
    chunks = [(a, min(n, a + step)) for a in range(0, n, step)]
    if rank != 0:
        for a, b in chunks:
            dist.recv(part[a:b], src=0)
        return
    # Staged on the partition's device: every rank must send and receive the same device type (under
    # NCCL, CUDA tensors); read_flat copies from the file into it.
    buffer = torch.empty(min(n, step), dtype=part.dtype, device=part.device) if world > 1 else None
    for r in reversed(range(world)):  # rank 0's own slice last, straight into its partition
        for a, b in chunks:
            out = part[a:b] if r == 0 else buffer[:b - a]
            count = max(0, min(b - a, numel - (r * n + a)))
            if count:
                source.read_flat(name, r * n + a, out[:count])
            out[count:].zero_()
            if r:
                dist.send(out, dst=r)


def stream_load_weights(model: torch.nn.Module, source: SafetensorsReader | StateDictSource | None,
                        rank: int) -> Layout | None:
    """Fill a ZeRO-3-partitioned model from rank 0's reader, one parameter at a time (collective).

    The checkpoint may store tensors in another layout than the model (per-expert MoE weights for fused
    stacks): rank 0 reads it through `forge_qat.layouts`, so a fused stack's partition is assembled from
    the per-expert tensors slice by slice and no rank holds a whole stack. Returns the layout on rank 0
    (consolidation writes checkpoints back in it), None elsewhere."""
    params = dict(model.named_parameters())  # tied parameters once, under their first name
    tied = tied_aliases(model)
    buffers = {n for n in model.state_dict() if n not in params and n not in tied}
    problem, reader = None, None
    if rank == 0:
        try:
            reader = model_layout_reader(source, model)
        except InputError as e:
            problem = str(e)
        else:
            available = reader.keys()
            missing = sorted(set(params) - available)
            unexpected = reader.layout.unexpected
            wrong = [f"{k} {reader.shape(k)} vs {list(p.ds_shape)}" for k, p in params.items()
                     if k in available and list(reader.shape(k)) != list(p.ds_shape)]
            if missing or unexpected or wrong:
                problem = (f"the checkpoint does not match the model: missing {missing[:8]}"
                           f"{' ...' if len(missing) > 8 else ''}, unexpected {unexpected[:8]}"
                           + (f", wrong shape {wrong[:4]}" if wrong else ""))
    problem = _broadcast(problem)
    if problem:
        raise InputError(problem)
    world = dist.get_world_size()
    for name, p in params.items():
        _fill_partition(p, name, reader, rank, world)
    for name, buf in model.named_buffers():
        if name in buffers:
            if rank == 0 and name in reader.keys():
                reader.read_flat(name, 0, buf.view(-1))
            dist.broadcast(buf, src=0)
    return reader.layout if reader is not None else None


def _cast_inputs_to_weight_dtype(model: torch.nn.Module) -> None:
    """Under DeepSpeed mixed precision (no autocast) weights are bf16/fp16 but a model may hand a
    fake-quantized layer fp32 activations (e.g. from an fp32 norm): the fake quantizers run in the weight's
    dtype, so activations are cast to match before them (linear layers and MoE expert stacks alike)."""
    from torchao.quantization.qat import FakeQuantizedLinear

    from forge_qat import experts

    def hook(dtype: torch.dtype):
        def cast(module, args):
            x = args[0]
            return (x.to(dtype), *args[1:]) if x.dtype != dtype else None
        return cast

    for module in model.modules():
        if isinstance(module, FakeQuantizedLinear):
            module.register_forward_pre_hook(hook(module.weight.dtype))
        elif experts.is_fake_quantized(module):
            module.register_forward_pre_hook(hook(module.down_proj.dtype))


# ---- the backend ---------------------------------------------------------------------------------

class ZeroBackend:
    """`forge_qat.train.Backend` for DeepSpeed ZeRO (stage 3 partitions parameters too)."""

    def __init__(self, cfg: TrainConfig):
        self.rank, self.world_size = init_process_group(cfg.dist_timeout_s)
        self.local_rank = int(os.environ.get("LOCAL_RANK", self.rank))
        self.cfg = cfg
        self.layout: Layout | None = None
        """How the input checkpoint stores the model's tensors (rank 0): checkpoints are written the same way."""
        self.teacher: torch.nn.Module | None = None

    def build(self, cfg: TrainConfig, res):
        self.ds_config = ds_config(cfg, res.precision, self.world_size)
        if self.ds_config["zero_optimization"]["stage"] != 3:
            # Stages 1 and 2 partition optimizer state and gradients only: every rank holds the model.
            model, tokenizer = load_model(cfg.model, seed=cfg.seed)
            self.teacher = frozen_teacher(model, cfg, res.device)
            if self.rank == 0 and cfg.model not in PRESETS:
                self.layout = model_layout_reader(SafetensorsReader.from_dir(Path(cfg.model)), model).layout
            prepare_for_training(model, cfg, res.recipe)
            self.model = model
            return model, tokenizer
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(res.precision, torch.float32)
        if cfg.model in PRESETS:
            # Every rank builds the same config and tokenizer; rank 0 alone holds the (tiny) seeded
            # float model as the source, so weights equal a single-process run's exactly.
            reference, tokenizer = preset_model(cfg.model, cfg.seed)
            config = reference.config
            source = StateDictSource(reference.state_dict()) if self.rank == 0 else None
            del reference
        else:
            path = Path(cfg.model)
            check_model_dir(path)
            config = load_config(path)
            tokenizer = load_tokenizer(path)
            source = SafetensorsReader(sorted(path.glob("*.safetensors"))) if self.rank == 0 else None
        # Import the architecture's module before zero.Init patches nn.Module subclasses. A class created
        # inside the context has DeepSpeed keep its undecorated __init__ and restore that on exit, which
        # drops what class decorators add: every Qwen3MoeExperts built afterwards in this process (the
        # finalize skeleton) would lack the layout flags transformers' `use_experts_implementation` sets.
        _import_architecture(config)
        model, self.layout = self._partitioned_model(config, dtype, source)
        if cfg.kd_weight and cfg.kd_teacher == "float":
            # The teacher is a second partitioned model filled with the same starting weights and frozen:
            # no rank ever holds it whole; its forward gathers one module at a time, as the student's does.
            teacher, _ = self._partitioned_model(config, dtype, source)
            self.teacher = teacher.requires_grad_(False).eval()
            if res.precision != "fp32":
                _cast_inputs_to_weight_dtype(self.teacher)
        del source
        # Learned scales are chosen from each weight made whole, one layer at a time (a collective).
        prepare_for_training(model, cfg, res.recipe, gather=lambda p: deepspeed.zero.GatheredParameters([p]))
        if res.precision != "fp32":
            _cast_inputs_to_weight_dtype(model)
        self.model = model
        return model, tokenizer

    def _partitioned_model(self, config, dtype: torch.dtype, source) -> tuple[torch.nn.Module, Layout | None]:
        """A model built straight into ZeRO-3 partitions and filled from rank 0's `source` (collective)."""
        from transformers import AutoModelForCausalLM
        from transformers.initialization import no_init_weights

        # No dtype= here: deepspeed 0.19's Init._set_dtype turns any explicit dtype into bf16 on the
        # CPU accelerator (an operator-precedence slip); without one it follows the config's
        # bf16/fp16 flags, which encode the same precision.
        with PartitionedInit(config_dict_or_path=self.ds_config), no_init_weights():
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        # zero.Init builds tied modules with separate parameters; tie before loading so the shared
        # parameter is filled (and later optimised) once, and let the orphan's partition go.
        model.tie_weights()
        gc.collect()
        return model, stream_load_weights(model, source, self.rank)

    def setup(self, model, optimizer, scheduler, cfg: TrainConfig, objective) -> None:
        self.engine, _, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=self.ds_config)
        if objective is not None and objective.teacher is not None and self.ds_config["zero_optimization"][
                "stage"] == 3:
            # Without an optimizer DeepSpeed wraps a stage-3 model in its parameter offload alone: the
            # hooks that gather each module's partitions for its forward and release them after.
            inference = {k: v for k, v in self.ds_config.items() if k not in ("optimizer", "scheduler")}
            self.teacher_engine = deepspeed.initialize(model=objective.teacher, config=inference)[0]
            objective = dataclasses.replace(objective, teacher=self.teacher_engine)
        self.objective = objective

    def micro_step(self, batch, res, grad_accum: int, fake_quant: bool) -> torch.Tensor:
        # batch holds use_cache=False (see forge_qat.data.store.model_inputs)
        loss, losses = training_loss(self.engine, batch, self.objective, fake_quant)
        self.engine.backward(loss)  # DeepSpeed scales by 1/gradient_accumulation_steps itself
        self.engine.step()  # steps the optimizer and scheduler only at accumulation boundaries
        return losses

    def optimizer_step(self, cfg: TrainConfig) -> None:
        pass

    def mean(self, values: torch.Tensor) -> list[float]:
        # On the losses' own device: NCCL for a CUDA tensor, gloo for a CPU one (see init_process_group).
        total = values.detach().to(torch.float64 if values.device.type == "cpu" else torch.float32)
        dist.all_reduce(total)
        return (total / self.world_size).tolist()

    def save(self, out: Path, step: int, tokenizer, meta: dict, keep: int) -> Path | None:
        """DeepSpeed state (for --resume) plus an HF float checkpoint consolidated on rank 0.

        Written under `.checkpoint-N.tmp-PID` (rank 0's PID, shared with every rank), renamed when
        complete; a dead job's temporary is removed by the next run (`checkpoint.remove_stale_temporaries`).
        A failed write on rank 0 (disk full) is the same one-line error as on one process; the launcher
        then stops the other ranks."""
        final = out / f"checkpoint-{step:06d}"
        tmp = out / f".{final.name}.tmp-{_broadcast(os.getpid())}"
        try:
            if self.rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir(parents=True)
            dist.barrier()
            self.engine.save_checkpoint(str(tmp / DS_STATE), tag=DS_TAG,
                                        client_state={"step": step, **ckpt_io.rng_state()})
            consolidate_hf_weights(self.model, tmp if self.rank == 0 else None, self.rank, self.layout)
            if self.rank == 0:
                self.model.config.save_pretrained(tmp)
                if self.model.generation_config is not None:
                    self.model.generation_config.save_pretrained(tmp)
                tokenizer.save_pretrained(tmp)
                ckpt_io.write_checkpoint_meta(tmp, step, meta)
                if final.exists():
                    shutil.rmtree(final)
                os.replace(tmp, final)
                ckpt_io.prune_checkpoints(out, keep)
        except OSError as e:
            if self.rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            raise InputError(f"cannot write checkpoint {final} (disk full or not writable?): "
                             f"{str(e).splitlines()[0][:200]}; the previous checkpoints are intact") from None
        dist.barrier()
        return final if self.rank == 0 else None

    def check_output_dir(self, out: Path) -> None:
        """Rank 0 alone writes the consolidated weights and renames each checkpoint into place, while every
        rank writes its own DeepSpeed state files into it: a checkpoint is complete only where all ranks
        share the run directory. On machines without a shared file system, fail before training."""
        dist.barrier()  # rank 0 has created the directory and its run marker
        seen = [None] * self.world_size
        dist.all_gather_object(seen, _sees_run_dir(out))
        blind = [r for r, ok in enumerate(seen) if not ok]
        if blind:
            raise ConfigError(f"rank(s) {blind} cannot see the run directory {out} that rank 0 created: ZeRO "
                              f"checkpoints need --output-dir on a file system all machines share (rank 0 "
                              f"completes each checkpoint)")

    def finalize(self, ckpt: Path | None, recipe: str, dest: Path) -> Path | None:
        """Convert the live partitioned model, gathered to rank 0 one block at a time; only rank 0
        converts and writes. The artifact equals a streaming finalize of the saved checkpoint."""
        if self.rank != 0:
            follow_gathers(self.model)
            dist.barrier()
            return None
        from forge_qat.finalize import FinalizeRequest, finalize_streaming, plan_finalize

        req = FinalizeRequest(source=ckpt, dest=dest, qat_convert=recipe, overwrite=True)
        report = finalize_streaming(plan_finalize(req), req, LiveGatherReader(self.model))
        dist.barrier()
        return report.dest

    def close(self) -> None:
        """Leave the job together and tear the process group down: exiting with gloo's (or DeepSpeed's
        shared-memory) communication threads still running aborts the process at interpreter shutdown
        ("terminate called without an active exception", SIGABRT), which the launcher would report as a
        failed rank after a successful run."""
        close_process_group()

    def restore(self, ckpt: Path) -> None:
        state_dir = ckpt / DS_STATE
        if not state_dir.is_dir():
            raise InputError(f"--resume: {ckpt} has no DeepSpeed state ({DS_STATE}/)")
        from forge_qat.distributed.zero_checkpoint import deepspeed_checkpoint_globals

        try:
            with ckpt_io.weights_only_loads(deepspeed_checkpoint_globals()):
                _, client = self.engine.load_checkpoint(str(state_dir), tag=DS_TAG)
        except ckpt_io.UNSAFE_PICKLE as e:
            raise InputError(f"--resume: cannot load DeepSpeed state {state_dir} as plain data (corrupt, truncated, "
                             f"or carrying code, which forge never runs): {str(e).splitlines()[0][:200]}") from None
        if client is None:
            raise InputError(f"--resume: DeepSpeed could not load {state_dir}")
        ckpt_io.restore_rng_state(client)


def _sees_run_dir(out: Path) -> bool:
    return (out / ckpt_io.RUN_MARKER).is_file()


class LiveGatherReader:
    """Rank 0's reader over the live ZeRO-3 model: the first read from a block gathers that whole
    block (a collective the other ranks join in `follow_gathers`), later reads are served from it."""

    def __init__(self, model: torch.nn.Module):
        from forge_qat.stream_convert import plan_blocks

        self.model = model
        self.params = dict(model.named_parameters())
        self.buffers = dict(model.named_buffers())
        self.blocks = plan_blocks(model)
        self.block_of = {n: i for i, b in enumerate(self.blocks) for n in b.names}
        self._stash: dict[str, torch.Tensor] = {}

    def keys(self) -> set[str]:
        return set(self.block_of)

    def shape(self, name: str) -> list[int]:
        p = self.params.get(name)
        return list(p.ds_shape) if p is not None else list(self.buffers[name].shape)

    def read_flat(self, name: str, start: int, out: torch.Tensor) -> None:
        if name not in self._stash:
            block = self.blocks[self.block_of[name]]
            self._stash = _gather_block(self.params, self.buffers, block.names, keep=True)
        out.copy_(self._stash[name].reshape(-1)[start:start + out.numel()])


@contextlib.contextmanager
def full_weight(p: torch.nn.Parameter):
    """The whole of parameter `p`, on every rank, as the optimizer holds it: its fp32 master where there
    is one (bf16/fp16 runs keep the module weights in 16 bits; the masters are what the `deepspeed/`
    state and a resumed run continue from), else the gathered module weight (frozen parameters, and
    models before `deepspeed.initialize`). A collective: every rank enters it for the same parameters
    in the same order."""
    from deepspeed.utils import safe_get_full_fp32_param

    has_master = p.requires_grad and (getattr(p, "_z3_optimizer", None) is not None or hasattr(p, "_hp_mapping"))
    master = safe_get_full_fp32_param(p) if has_master else None
    if master is not None:
        yield master.detach()
        return
    with deepspeed.zero.GatheredParameters([p]):
        yield p.data.detach()


def _gather_block(params: dict, buffers: dict, names: list[str], keep: bool) -> dict[str, torch.Tensor]:
    kept = {n: buffers[n] for n in names if n in buffers}
    for n in names:
        if n in params:
            with full_weight(params[n]) as value:  # a collective: every rank enters it, keeping or not
                if keep:
                    kept[n] = value.to("cpu", torch.float32, copy=True)
    return kept


def follow_gathers(model: torch.nn.Module) -> None:
    """What ranks other than 0 do while rank 0 finalizes: join each block's gather, in order."""
    from forge_qat.stream_convert import plan_blocks

    params = dict(model.named_parameters())
    for block in plan_blocks(model):
        _gather_block(params, {}, block.names, keep=False)


def consolidate_hf_weights(model: torch.nn.Module, directory: Path | None, rank: int, layout: Layout | None = None,
                           max_shard_bytes: int = 2 * 1024**3) -> None:
    """Gather each parameter in turn (all ranks) and let rank 0 append it to the current output
    shard, under the checkpoint names and in the layout the model was loaded from (`layout`, rank 0's;
    e.g. a fused expert stack as the per-expert tensors of the input), so stock `from_pretrained` and
    forge read it as they read a single-process checkpoint. Rank 0 never holds more than one parameter
    plus one shard."""
    params = dict(model.named_parameters())
    layout = layout or Layout()
    # Learned weight scales go to their own file (checkpoint.LEARNED_SCALES), as on one process.
    scale_names = {n for n in params if n.endswith(SCALE_SUFFIX)}
    weight_names = [n for n in params if n not in scale_names]
    writer = (ShardWriter(directory, "safetensors", layout.checkpoint_keys(weight_names), max_shard_bytes)
              if rank == 0 else None)
    scales = {}
    for name, p in params.items():
        with full_weight(p) as value:
            if writer and name in scale_names:
                scales[name] = value.to("cpu", torch.float32, copy=True)
            elif writer:
                for key, tensor in layout.checkpoint_tensors(name, value.to("cpu", torch.float32, copy=True)):
                    writer.add(key, tensor)
    if writer:
        writer.close()
        if scales:
            ckpt_io.write_learned_scales(directory, scales)
