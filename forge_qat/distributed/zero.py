"""`ZeroEngine`: the `forge_qat.train.engine.Engine` of DeepSpeed ZeRO, with partitioned construction and
streamed loading.

Chosen by `forge_qat.train.trainer` when the run config asks for DeepSpeed. Under ZeRO-3 no rank ever holds
the whole model: the model is created partitioned (`deepspeed.zero.Init`) without initialising the weights
it is about to overwrite; rank 0 reads the safetensors shards one partition slice at a time and sends each
rank its slice (see `_fill_partition`); model setup swaps modules around the same partitioned `Parameter`
objects before `wrap` (`deepspeed.initialize`); `full_tensor` gathers one parameter at a time for the
checkpoint writer and the live finalize. Knows nothing of forge's checkpoint format, distillation or
finalize.
"""

import contextlib
import gc
import io
import logging
import os
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from forge_qat import hardware
from forge_qat.distributed import collectives, expert_parallel, use_cpu_accelerator_without_cuda
from forge_qat.distributed.autoep_compat import accept_deepspeed_registry_keys
from forge_qat.distributed.config import Batching, DistributedConfig, ds_config
from forge_qat.errors import InputError
from forge_qat.formats.layouts import model_layout_reader
from forge_qat.formats.safe_load import UNSAFE_PICKLE, weights_only_loads
from forge_qat.formats.weights import TensorReader, tied_aliases, true_shape
from forge_qat.lora import adapters as lora
from forge_qat.models import ModelSource, load_model, weights_reader
from forge_qat.qat.prepare import learned_scale_readers

use_cpu_accelerator_without_cuda()  # DeepSpeed picks its accelerator when first imported
import deepspeed  # noqa: E402

log = logging.getLogger(__name__)

DS_STATE = "deepspeed"
DS_TAG = "state"


def init_process_group(timeout_s: int) -> tuple[int, int]:
    """Join the job described by the launcher's environment (RANK, WORLD_SIZE, MASTER_ADDR, ...)."""
    cuda = hardware.cuda_available()
    collectives.bind_device()
    if not dist.is_initialized():
        # DeepSpeed print()s a line per rank when it builds its CPU shared-memory op: nothing a user acts on
        with contextlib.redirect_stdout(io.StringIO()):
            deepspeed.init_distributed(dist_backend=collectives.process_group_backend(cuda),
                                       timeout=timedelta(seconds=timeout_s))
    return dist.get_rank(), dist.get_world_size()


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


def _import_architecture(config) -> None:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    try:
        MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]  # the lazy mapping imports the modeling module
    except KeyError:
        raise InputError(f"transformers has no causal LM class for model type {config.model_type!r}") from None


TRANSFER_CHUNK_BYTES = 4 * 1024**2
"""Rank 0 reads and sends a partition in pieces of this size, so its staging buffer stays small whatever
the tensor (a fused expert stack's partition is tens of MB)."""


def _fill_partition(p: torch.nn.Parameter, name: str, source: TensorReader | None, rank: int,
                    world: int) -> None:
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


def stream_load_weights(model: torch.nn.Module, source: TensorReader | None, rank: int,
                        skip: frozenset[str] = frozenset()) -> None:
    """Fill a ZeRO-3-partitioned model from rank 0's reader, one parameter at a time (collective). `skip`:
    parameters checked against the checkpoint like the others but filled later by their own reader (the
    expert stacks each expert-parallel rank reads itself).

    The checkpoint may store tensors in another layout than the model (per-expert MoE weights for fused
    stacks): rank 0 reads it through `forge_qat.formats.layouts`, so a fused stack's partition is assembled from
    the per-expert tensors slice by slice and no rank holds a whole stack."""
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
            wrong = [f"{k} {reader.shape(k)} vs {list(true_shape(p))}" for k, p in params.items()
                     if k in available and list(reader.shape(k)) != list(true_shape(p))]
            if missing or unexpected or wrong:
                problem = (f"the checkpoint does not match the model: missing {missing[:8]}"
                           f"{' ...' if len(missing) > 8 else ''}, unexpected {unexpected[:8]}"
                           + (f", wrong shape {wrong[:4]}" if wrong else ""))
    problem = collectives.broadcast(problem)
    if problem:
        raise InputError(problem)
    world = dist.get_world_size()
    for name, p in params.items():
        if name not in skip:
            _fill_partition(p, name, reader, rank, world)
    for name, buf in model.named_buffers():
        if name in buffers:
            if rank == 0 and name in reader.keys():
                reader.read_flat(name, 0, buf.view(-1))
            dist.broadcast(buf, src=0)


# ---- the engine ----------------------------------------------------------------------------------

class ZeroEngine(collectives.RankCollectives):
    """`forge_qat.train.engine.Engine` for DeepSpeed ZeRO (stage 3 partitions parameters too)."""

    state_includes_weights = True
    replicated = False

    def __init__(self, dist_cfg: DistributedConfig, batching: Batching):
        self.rank, self.world_size = init_process_group(dist_cfg.dist_timeout_s)
        self.local_rank = int(os.environ.get("LOCAL_RANK", self.rank))
        self.ranks_on_machine = collectives.local_world_size()
        self.device = torch.device("cuda", torch.cuda.current_device()) if hardware.cuda_available() \
            else torch.device("cpu")
        self.ds_config = ds_config(dist_cfg, batching, self.world_size)
        self.stage3 = self.ds_config["zero_optimization"]["stage"] == 3
        mixed = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(batching.precision, torch.float32)
        # Stage 3 builds weights in the training precision; stages 1 and 2 load fp32 weights that
        # deepspeed.initialize casts (every rank holds the whole model there).
        self.param_dtype = mixed if self.stage3 else torch.float32
        self.engine = None
        self.expert_parallel = dist_cfg.expert_parallel
        self.expert_parallel_section: dict | None = None
        """The DeepSpeed `expert_parallel` section, once the model's architecture has been checked for it."""
        self._frozen_experts: list[str] = []
        """The expert-parallel experts the wrapped model does not train (a LoRA base)."""
        self._experts_reader: TensorReader | None = None
        """The starting checkpoint under the transformers names, for the expert rows this rank reads itself."""
        self._unread: set[int] = set()
        """id() of the models whose experts this rank reads after their wrap (the student; a float teacher)."""

    def materialize(self, source: ModelSource) -> torch.nn.Module:
        if self.expert_parallel > 1:  # before any weight loads
            self.expert_parallel_section = expert_parallel.check_model(source.config, self.expert_parallel,
                                                                       self.world_size)
        if not self.stage3:
            return load_model(source.spec, seed=source.seed)[0]
        # Import the architecture's module before zero.Init patches nn.Module subclasses. A class created
        # inside the context has DeepSpeed keep its undecorated __init__ and restore that on exit, which
        # drops what class decorators add: every Qwen3MoeExperts built afterwards in this process (the
        # finalize skeleton) would lack the layout flags transformers' `use_experts_implementation` sets.
        _import_architecture(source.config)
        return self._partitioned_model(source)

    def _partitioned_model(self, source: ModelSource) -> torch.nn.Module:
        """A model built straight into ZeRO-3 partitions and filled from rank 0's reader (collective); under
        expert parallelism its expert stacks are left for each rank to read after the wrap
        (`forge_qat.distributed.expert_parallel`)."""
        from transformers import AutoModelForCausalLM
        from transformers.initialization import no_init_weights

        # No dtype= here: deepspeed 0.19's Init._set_dtype turns any explicit dtype into bf16 on the
        # CPU accelerator (an operator-precedence slip); without one it follows the config's
        # bf16/fp16 flags, which encode the same precision.
        with PartitionedInit(config_dict_or_path=self.ds_config), no_init_weights():
            model = AutoModelForCausalLM.from_config(source.config, dtype=self.param_dtype)
        # zero.Init builds tied modules with separate parameters; tie before loading so the shared
        # parameter is filled (and later optimised) once, and let the orphan's partition go.
        model.tie_weights()
        deferred = []
        if self.expert_parallel_section is not None:
            deferred = expert_parallel.defer_expert_stacks(model, self._config()["expert_parallel"])
        gc.collect()
        stream_load_weights(model, source.reader, self.rank, skip=frozenset(deferred))
        if deferred:  # every rank reads its own experts' rows, under the model's transformers names
            if self._experts_reader is None:  # the student's and a teacher's: the same source, the same layout
                self._experts_reader = model_layout_reader(weights_reader(source.spec, source.seed), model)
            self._unread.add(id(model))
        return model

    def unread_scales(self, p: torch.nn.Parameter, spec, init) -> torch.Tensor | None:
        """The starting learned scales of an expert stack not read yet (collective; see
        `expert_parallel.unread_scales`), else None."""
        name = getattr(p, expert_parallel.UNREAD, None)
        if name is None:
            return None
        return expert_parallel.unread_scales(self._experts_reader, name, tuple(p.shape), p.dtype, spec, init,
                                             self.rank, self.world_size, self.device).to(self.device)

    def _read_local_experts(self, model: torch.nn.Module) -> None:
        """After AutoEP placed `model`'s experts: this rank reads its own (see `materialize`)."""
        if id(model) in self._unread:
            self._unread.discard(id(model))
            expert_parallel.read_local_experts(model, self._experts_reader, TRANSFER_CHUNK_BYTES)

    def gather(self, p: torch.nn.Parameter):
        return deepspeed.zero.GatheredParameters([p])

    def wrap(self, model, optimizer, scheduler) -> torch.nn.Module:
        if self.stage3:
            for reader, param in learned_scale_readers(model) + lora.readers(model):
                deepspeed.zero.register_external_parameter(reader, param)
        if self.expert_parallel_section is not None:  # after: the experts' readers are AutoEP's, registered below
            expert_parallel.park_expert_modules(model)
        self.engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                                    config=self._config())
        self._read_local_experts(model)
        for reader, param in expert_parallel.unpark_expert_modules(model):
            deepspeed.zero.register_external_parameter(reader, param)
        self._frozen_experts = expert_parallel.frozen_experts(model)
        if self._frozen_experts:
            log.warning("--expert-parallel with frozen experts (LoRA): DeepSpeed %s cannot save frozen expert-parallel "
                        "experts in its ZeRO-3 state, so this run's checkpoints hold the weights and adapters (forge "
                        "finalize, forge eval and transformers read them) but no DeepSpeed state: they cannot be "
                        "resumed", deepspeed.__version__)
        return self.engine

    def _config(self) -> dict:
        """The DeepSpeed config of a wrap: with the `expert_parallel` section under expert parallelism (over a user
        config's own section, its further AutoEP settings kept; `ds_config` checked it), for the student and
        for a frozen teacher alike, so both place the same experts on the same ranks."""
        if self.expert_parallel_section is None:
            return self.ds_config
        accept_deepspeed_registry_keys()
        return {**self.ds_config, "expert_parallel": {**self.ds_config.get("expert_parallel", {}),
                                                      **self.expert_parallel_section}}

    def checkpoint_names(self, model: torch.nn.Module, names: list[str]) -> list[str]:
        """The names a checkpoint writes for the model's `names`: the transformers model's (AutoEP's layers back
        in its layout) under expert parallelism."""
        return expert_parallel.hf_names(model, names) if self.expert_parallel_section else names

    def checkpoint_tensors(self, model: torch.nn.Module, names: list[str], only=None):
        """Whole tensors under `checkpoint_names` (collective), or None where the model's own serve."""
        if self.expert_parallel_section is None:
            return None
        return expert_parallel.hf_full_tensors(model, names, self.full_tensor, only)

    def wrap_frozen(self, model: torch.nn.Module) -> torch.nn.Module:
        if not self.stage3:
            return model.to(self.device)
        # Without an optimizer DeepSpeed wraps a stage-3 model in its parameter offload alone: the hooks that
        # gather each module's partitions for its forward and release them after.
        inference = {k: v for k, v in self._config().items() if k not in ("optimizer", "scheduler")}
        wrapped = deepspeed.initialize(model=model, config=inference)[0]
        self._read_local_experts(model)
        return wrapped

    def autocast(self):
        return contextlib.nullcontext()  # DeepSpeed keeps the weights in the training precision itself

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)  # scales by 1/gradient_accumulation_steps itself

    def step(self) -> None:
        self.engine.step()  # counts micro-batches; steps the optimizer and scheduler at accumulation boundaries

    @contextlib.contextmanager
    def full_tensor(self, p: torch.nn.Parameter) -> Iterator[torch.Tensor]:
        """Its fp32 master where there is one (bf16/fp16 runs keep the module weights in 16 bits; the masters
        are what the DeepSpeed state and a resumed run continue from), else the gathered module weight
        (frozen parameters, and models before `wrap`)."""
        from deepspeed.utils import safe_get_full_fp32_param

        has_master = p.requires_grad and (getattr(p, "_z3_optimizer", None) is not None or hasattr(p, "_hp_mapping"))
        master = safe_get_full_fp32_param(p) if has_master else None
        if master is not None:
            yield master.detach()
            return
        with deepspeed.zero.GatheredParameters([p]):
            yield p.data.detach()

    def set_full_tensor(self, p: torch.nn.Parameter, value: torch.Tensor) -> None:
        """The module's partitions (rank 0's value, re-partitioned on leaving the gather) and the optimizer's
        fp32 master partitions (each rank its own slice of `value`), which the next step copies back."""
        from deepspeed.utils import safe_set_full_fp32_param

        with deepspeed.zero.GatheredParameters([p], modifier_rank=0), torch.no_grad():
            if self.rank == 0 or not self.stage3:  # below stage 3 every rank holds the whole parameter
                p.copy_(value.to(p.device, p.dtype))
        safe_set_full_fp32_param(p, value.to(self.device, torch.float32))

    def save_state(self, directory: Path, client_state: dict[str, Any]) -> None:
        if self._frozen_experts:  # DeepSpeed refuses them (`_save_moe_checkpoint`); said at the wrap
            return
        self.engine.save_checkpoint(str(directory / DS_STATE), tag=DS_TAG, client_state=client_state)

    def load_state(self, directory: Path) -> dict[str, Any]:
        state_dir = directory / DS_STATE
        if not state_dir.is_dir():
            raise InputError(f"--resume: {directory} has no DeepSpeed state ({DS_STATE}/)")
        from forge_qat.distributed.zero_checkpoint import deepspeed_checkpoint_globals

        try:
            with weights_only_loads(deepspeed_checkpoint_globals()):
                _, client = self.engine.load_checkpoint(str(state_dir), tag=DS_TAG)
        except UNSAFE_PICKLE as e:
            raise InputError(f"--resume: cannot load DeepSpeed state {state_dir} as plain data (corrupt, truncated, "
                             f"or carrying code, which forge never runs): {str(e).splitlines()[0][:200]}") from None
        if client is None:
            raise InputError(f"--resume: DeepSpeed could not load {state_dir}")
        return client

    def close(self) -> None:
        """Leave the job together and tear the process group down: exiting with gloo's (or DeepSpeed's
        shared-memory) communication threads still running aborts the process at interpreter shutdown
        ("terminate called without an active exception", SIGABRT), which the launcher would report as a
        failed rank after a successful run.

        Then `torch.nn.functional.linear` is DeepSpeed's again: zero.Init replaced it with ZeRO-3's wrapper for the
        process ("this will persist unless manually reset", deepspeed/runtime/zero/partition_parameters.py), whose
        `weight.t()` torchao's quantized tensors lack, and rank 0 may finalize in this process next."""
        collectives.close()
        from deepspeed.runtime.zero.partition_parameters import InsertPostInitMethodToModuleSubClasses as ZeroInit

        original = getattr(ZeroInit, "linear_bk", None)
        if original is not None:
            torch.nn.functional.linear = original
