"""The distributed section of a run configuration, and the DeepSpeed config generated from it.

Composed into `forge_qat.config.TrainConfig`; `ds_config` is read by the ZeRO engine
(`forge_qat.distributed.zero`). Imports no deepspeed: validating a config must not start it.
"""

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from forge_qat.config_fields import option
from forge_qat.errors import ConfigError, InputError


@dataclass(kw_only=True)
class DistributedConfig:
    nproc: int = option(1, "Processes to launch on this machine (each a rank); >1 needs --zero-stage, or a LoRA "
                           "run (--lora-rank), which then runs data parallel without DeepSpeed.")
    zero_stage: int = option(0, "DeepSpeed ZeRO stage (0: no DeepSpeed, 1, 2 or 3).")
    deepspeed_config: str | None = option(None, "DeepSpeed JSON to use instead of the generated one.")
    dist_timeout_s: int = option(300, "Collective timeout: a hung or dead rank fails the job after this.")
    expert_parallel: int = option(1, "Expert-parallel size E under ZeRO-3 (DeepSpeed AutoEP): each rank reads, holds "
                                     "and fake-quantizes E-th of every MoE layer's experts, tokens travel to them "
                                     "(1: ZeRO-3 alone). E divides the ranks and the experts.",
                                  resume_fixed=True)

    def __post_init__(self) -> None:
        if self.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"zero_stage must be 0, 1, 2 or 3, got {self.zero_stage}")
        if self.nproc < 1 or self.dist_timeout_s < 1:
            raise ConfigError("nproc and dist_timeout_s must be at least 1")
        if self.expert_parallel < 1:
            raise ConfigError(f"--expert-parallel must be at least 1, got {self.expert_parallel}")
        if self.expert_parallel > 1:
            if self.zero_stage not in (0, 3) or not self.uses_deepspeed:  # 0 with a user config: checked there
                raise ConfigError(f"--expert-parallel {self.expert_parallel} runs with ZeRO-3 for the dense part: add "
                                  f"--zero-stage 3 (this run has stage {self.zero_stage})")
            if self.nproc > 1 and self.nproc % self.expert_parallel:
                raise ConfigError(f"--expert-parallel {self.expert_parallel} must divide --nproc {self.nproc}")

    def check_with(self, qat, lora: bool) -> None:
        """Several ranks without DeepSpeed only for LoRA runs (data parallel); what expert parallelism does not cover
        yet, refused before any work (issue 31 lists them)."""
        if self.nproc > 1 and not self.uses_deepspeed and not lora:
            raise ConfigError(f"--nproc {self.nproc} trains every weight under DeepSpeed: add --zero-stage 3 (or "
                              f"--deepspeed-config), or train LoRA adapters (--lora-rank R), which runs data "
                              f"parallel without it")
        if self.expert_parallel == 1:
            return
        missing = [(qat.qat_learn_scales and qat.fake_quant_after_steps > 0,
                    "learned scales chosen again when delayed fake quantization starts (--fake-quant-after-steps; "
                    "or add --no-qat-learn-scales)"),
                   (qat.fp8_recipe is not None, "float8 training")]
        refused = [what for on, what in missing if on]
        if refused:
            raise ConfigError(f"--expert-parallel {self.expert_parallel} does not run with {'; '.join(refused)} "
                              f"yet (QAT with learned scales, LoRA-QAT and distillation do)")

    @property
    def uses_deepspeed(self) -> bool:
        return bool(self.zero_stage or self.deepspeed_config)

    @property
    def data_parallel(self) -> bool:
        """Several ranks without DeepSpeed: a LoRA run on `forge_qat.train.data_parallel` (checked by `check_with`)."""
        return self.nproc > 1 and not self.uses_deepspeed

    @property
    def launches(self) -> bool:
        """Whether `forge train` starts ranks through the launcher (DeepSpeed runs always do, even of one rank)."""
        return self.uses_deepspeed or self.nproc > 1


@dataclass(frozen=True, kw_only=True, slots=True)
class Batching:
    """What DeepSpeed must agree with the trainer on."""

    micro_batch: int
    grad_accum: int
    max_grad_norm: float
    precision: str


def generated_ds_config(dist: DistributedConfig, b: Batching, world_size: int) -> dict[str, Any]:
    return {
        "train_micro_batch_size_per_gpu": b.micro_batch,
        "gradient_accumulation_steps": b.grad_accum,
        "train_batch_size": b.micro_batch * b.grad_accum * world_size,
        "gradient_clipping": b.max_grad_norm,
        "zero_optimization": {"stage": dist.zero_stage or 3},
        "bf16": {"enabled": b.precision == "bf16"},
        "fp16": {"enabled": b.precision == "fp16"},
        # forge passes torch's AdamW, which ZeRO handles but does not list as "tested".
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
    }


def ds_config(dist: DistributedConfig, b: Batching, world_size: int) -> dict[str, Any]:
    """The generated config, or the user's JSON checked against the run config ("auto" defers)."""
    generated = generated_ds_config(dist, b, world_size)
    if not dist.deepspeed_config:
        return generated
    path = Path(dist.deepspeed_config)
    try:
        user = json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(f"DeepSpeed config {path} does not exist") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"DeepSpeed config {path} is not valid JSON: {e}") from None
    checks = [
        ("train_micro_batch_size_per_gpu", user.get("train_micro_batch_size_per_gpu"), b.micro_batch, "batch_size"),
        ("gradient_accumulation_steps", user.get("gradient_accumulation_steps"), b.grad_accum, "grad_accum"),
        ("zero_optimization.stage", user.get("zero_optimization", {}).get("stage"),
         dist.zero_stage or None, "zero_stage"),
        ("bf16.enabled", user.get("bf16", {}).get("enabled"), b.precision == "bf16", f"precision {b.precision}"),
        ("fp16.enabled", user.get("fp16", {}).get("enabled"), b.precision == "fp16", f"precision {b.precision}"),
    ]
    for key, theirs, ours, our_name in checks:
        if theirs not in (None, "auto") and ours is not None and theirs != ours:
            raise ConfigError(f"{path}: {key} is {theirs}, but the run config has {our_name} = {ours}; "
                              f"make them agree or set it to \"auto\" in the JSON")
    _check_partitioning(user.get("zero_optimization", {}), path)
    theirs = user.get("expert_parallel") or {}
    if theirs.get("enabled") and theirs.get("autoep_size") not in ("auto", dist.expert_parallel):
        raise ConfigError(f"{path}: expert_parallel.autoep_size is {theirs.get('autoep_size')!r}, but the run config "
                          f"has --expert-parallel {dist.expert_parallel}: give the size as --expert-parallel (forge "
                          f"installs the experts' fake quantization after AutoEP's conversion only then)")
    if dist.expert_parallel > 1 and user.get("zero_optimization", {}).get("stage", 3) != 3:
        raise ConfigError(f"{path}: zero_optimization.stage is {user['zero_optimization']['stage']}; "
                          f"--expert-parallel {dist.expert_parallel} runs with ZeRO-3 for the dense part")
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
