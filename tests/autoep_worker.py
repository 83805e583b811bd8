"""A rank for the AutoEP tests: a tiny MoE converted by DeepSpeed's AutoEP under ZeRO-3 on gloo, one forward
against the unconverted model, one optimizer step. Writes what it saw to OUT/rank-N.json.

argv: ENTRY (the launcher's, unused) OUT. FORGE_TEST_AUTOEP_ARCH: qwen3_moe or mixtral;
FORGE_TEST_AUTOEP_COMPAT=0 converts without forge's registry compat (to show why it exists).
"""

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from forge_qat.distributed import use_cpu_accelerator_without_cuda  # noqa: E402

use_cpu_accelerator_without_cuda()

import deepspeed  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from conftest import tiny_moe  # noqa: E402

from forge_qat.distributed.autoep_compat import accept_deepspeed_registry_keys  # noqa: E402
from forge_qat.distributed.worker import exit_rank  # noqa: E402


def main() -> dict:
    arch = os.environ["FORGE_TEST_AUTOEP_ARCH"]
    deepspeed.init_distributed(dist_backend="gloo")
    torch.manual_seed(0)
    model, _ = tiny_moe(arch)
    reference = type(model)(model.config)
    reference.load_state_dict(model.state_dict())
    if os.environ.get("FORGE_TEST_AUTOEP_COMPAT", "1") == "1":
        accept_deepspeed_registry_keys()
    config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
              "zero_optimization": {"stage": 3}, "zero_allow_untested_optimizer": True, "steps_per_print": 2**31 - 1,
              "expert_parallel": {"enabled": True, "autoep_size": 2, "preset_model": arch}}
    try:
        engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-3),
                                          config=config)
    except Exception as e:  # the failure the compat exists for, reported to the test
        return {"error": f"{type(e).__name__}: {e}"}
    layer = engine.module.model.layers[0].mlp
    x = torch.randint(0, model.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(1))
    loss = engine(input_ids=x, labels=x).loss
    with torch.no_grad():
        want = reference(input_ids=x, labels=x).loss
    engine.backward(loss)
    engine.step()
    return {"layer": type(layer).__name__, "local_experts": int(layer.experts.w1.ds_shape[0]),
            "experts": model.config.num_local_experts if hasattr(model.config, "num_local_experts")
            else model.config.num_experts, "loss": loss.item(), "reference": want.item()}


if __name__ == "__main__":
    result = main()
    out = Path(sys.argv[2])
    (out / f"rank-{dist.get_rank()}.json").write_text(json.dumps(result))
    exit_rank(0)
