"""The Q4_K blocks beside an artifact (`forge_blocks/q4_k.safetensors`): llama.cpp's Q4_K has no torchao tensor
(its sub-block offsets d * sc * q - dmin * m fit no affine grid with an integer zero point, and a sub-block whose
scale rounds to 0 holds values no scale times a code gives), so the artifact stores those weights as the values
their blocks decode to, which stock transformers runs, and this file keeps the blocks themselves for `forge export
--to gguf`. One typed owner: finalize writes it, export reads it.

Per weight (named as in the artifact), five tensors: `<name>.q` the 4-bit codes packed two per byte (element 2i in
the low nibble), `.sc` and `.m` the 6-bit sub-block scales and mins (uint8), `.d` and `.dmin` the super-block
scales (float16). In a subdirectory, so neither transformers nor forge's shard readers take it for a shard.
"""

from pathlib import Path

import torch

from forge_qat.errors import InputError

PATH = Path("forge_blocks") / "q4_k.safetensors"
PARTS = ("q", "sc", "m", "d", "dmin")


def write(directory: Path, blocks: dict[str, dict[str, torch.Tensor]]) -> None:
    """`blocks`: per weight name, its parts (`q` unpacked uint8 codes 0..15, the rest as stored)."""
    from safetensors.torch import save_file

    if not blocks:
        return
    tensors = {}
    for name, parts in blocks.items():
        q = parts["q"].to(torch.uint8)
        tensors[f"{name}.q"] = (q[..., 0::2] | (q[..., 1::2] << 4)).contiguous()
        tensors.update({f"{name}.{p}": parts[p].contiguous() for p in PARTS[1:]})
    (directory / PATH.parent).mkdir(exist_ok=True)
    save_file(tensors, directory / PATH, metadata={"format": "forge q4_k blocks", "version": "1"})


def names(directory: Path) -> set[str]:
    """The weights with Q4_K blocks in this artifact (none without the file)."""
    from safetensors import safe_open

    if not (directory / PATH).is_file():
        return set()
    with safe_open(directory / PATH, "pt") as f:
        return {key.rpartition(".")[0] for key in f.keys()}


def read(directory: Path, name: str) -> dict[str, torch.Tensor]:
    """One weight's parts, the codes unpacked to uint8 (rows, cols)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(directory / PATH, "pt") as f:
            parts = {p: f.get_tensor(f"{name}.{p}") for p in PARTS}
    except (OSError, SafetensorError) as e:
        raise InputError(f"{directory / PATH}: cannot read the Q4_K blocks of {name} ({e})") from None
    packed = parts["q"]
    q = torch.stack([packed & 0xF, packed >> 4], dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)
    return {**parts, "q": q}
