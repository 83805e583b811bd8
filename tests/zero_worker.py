"""A rank for the distributed tests: forge's worker, optionally made to fail on one rank.

FORGE_TEST_FAIL="RANK:BATCH" makes that rank raise when it draws micro-batch number BATCH, in the
middle of a training step, while the other ranks go on into the step's collectives.
FORGE_TEST_LOAD_ONLY=DIR builds the model through the ZeRO engine (streamed load), consolidates
it into DIR on rank 0 and exits, with no optimizer or training involved.
FORGE_TEST_SKEW_ROUTER=RANK makes every MoE router on that rank send all tokens to experts 0 and 1, so
the other experts get no tokens there while other ranks use them.
FORGE_TEST_BLIND_RANK=RANK makes that rank unable to see the run directory, as on a machine that does not
share the file system.
FORGE_TEST_COUNT_READS=DIR records every read of a safetensors file, as "key start count bytes" lines in
DIR/rank-N.txt (what each rank read of the checkpoint).
FORGE_TEST_HOST_EXPERTS=DIR writes, when training ends, what the rank holds of the offloaded experts into
DIR/rank-N.json: the grids' bytes, and its memory in the shared file (`mapped_bytes`).
"""

import os
import sys

from forge_qat.distributed import worker

if os.environ.get("FORGE_TEST_FAIL"):
    fail_rank, fail_batch = map(int, os.environ["FORGE_TEST_FAIL"].split(":"))
    if int(os.environ["RANK"]) == fail_rank:
        import forge_qat.train.trainer as trainer

        real = trainer.batch_indices

        def failing(n, batch, seed, batch_number):
            if batch_number == fail_batch:
                raise RuntimeError(f"injected failure at micro-batch {batch_number}")
            return real(n, batch, seed, batch_number)

        trainer.batch_indices = failing

if os.environ.get("FORGE_TEST_BLIND_RANK") and int(os.environ["RANK"]) == int(os.environ["FORGE_TEST_BLIND_RANK"]):
    from forge_qat.train import trainer

    trainer.sees_run_dir = lambda out: False  # as on a machine without the shared file system

if os.environ.get("FORGE_TEST_COUNT_READS"):
    from pathlib import Path

    from forge_qat.formats.weights import SafetensorsReader

    real_read = SafetensorsReader.read_flat
    log_path = Path(os.environ["FORGE_TEST_COUNT_READS"]) / f"rank-{os.environ['RANK']}.txt"

    def counted(self, name, start, out):
        real_read(self, name, start, out)
        with open(log_path, "a") as f:  # appended per read: the rank leaves by os._exit
            f.write(f"{name} {start} {out.numel()} {out.numel() * self.dtype(name).itemsize}\n")

    SafetensorsReader.read_flat = counted

if os.environ.get("FORGE_TEST_SKEW_ROUTER") and int(os.environ["RANK"]) == int(os.environ["FORGE_TEST_SKEW_ROUTER"]):
    import torch
    from transformers.models.qwen3_moe import modeling_qwen3_moe

    real_router = modeling_qwen3_moe.Qwen3MoeTopKRouter.forward

    def skewed(self, hidden_states):
        logits, scores, _ = real_router(self, hidden_states)
        chosen = torch.tensor([0, 1]).expand(scores.shape[0], 2)
        return logits, scores, chosen

    modeling_qwen3_moe.Qwen3MoeTopKRouter.forward = skewed

if os.environ.get("FORGE_TEST_HOST_EXPERTS"):
    import json
    from pathlib import Path

    from forge_qat.qat import host_experts, host_store
    from forge_qat.train import trainer

    def mapped_bytes() -> dict[str, int]:
        """This process's memory in the shared experts files (`/proc/self/smaps`): `Rss` (pages it maps), `Pss` (its
        share of them: Rss divided among the processes mapping each page), `Private` (pages only it maps), bytes."""
        totals = {"Rss": 0, "Pss": 0, "Private": 0}
        inside = False
        for line in Path("/proc/self/smaps").read_text().splitlines():
            fields = line.split()
            if fields and "-" in fields[0] and len(fields) >= 5:  # a mapping: range perms offset dev inode path
                inside = len(fields) >= 6 and host_store.PREFIX in fields[5]
            elif inside and fields and fields[0].rstrip(":") in ("Rss", "Pss", "Private_Clean", "Private_Dirty"):
                key = fields[0].rstrip(":")
                totals["Private" if key.startswith("Private") else key] += int(fields[1]) * 1024
        return totals

    real_finish = trainer.Trainer.finish

    def recorded(self):
        held = {"host_bytes": host_experts.host_bytes(self.models.student), **mapped_bytes()}
        out = Path(os.environ["FORGE_TEST_HOST_EXPERTS"]) / f"rank-{os.environ['RANK']}.json"
        out.write_text(json.dumps(held))
        return real_finish(self)

    trainer.Trainer.finish = recorded

if os.environ.get("FORGE_TEST_LOAD_ONLY"):
    import json
    from pathlib import Path

    from forge_qat.config import TrainConfig
    from forge_qat.errors import ForgeError
    from forge_qat.train.checkpointing import write_weights
    from forge_qat.train.model_setup import build_models
    from forge_qat.train.optim import resolve_placement
    from forge_qat.train.trainer import make_engine

    cfg = TrainConfig.from_flat(**json.loads(Path(sys.argv[2]).read_text()))  # argv: ENTRY CONFIG
    engine = make_engine(cfg, resolve_placement(cfg))
    try:
        models = build_models(engine, cfg)
    except ForgeError as e:
        worker.exit_rank(worker._report(str(e), 1))
    out = Path(os.environ["FORGE_TEST_LOAD_ONLY"])
    if engine.rank == 0:
        out.mkdir(parents=True)
    write_weights(out if engine.rank == 0 else None, engine, models.student, models.layout, max_shard_bytes=50_000)
    engine.close()
    worker.exit_rank(0)

worker.exit_rank(worker.main())
