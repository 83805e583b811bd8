"""Export to compressed-tensors, the format vLLM and SGLang load quantized models from (`forge export --to
compressed-tensors`): a model directory whose weights are the artifact's integer codes and scales, copied, never
re-quantized, and whose config.json carries compressed-tensors' `quantization_config`.

Called by the CLI. Reads the artifact through `forge_qat.formats.artifact.ArtifactReader`, one tensor at a time,
and writes shards through `ShardWriter`, so memory stays one tensor plus one shard whatever the depth.

Schemes written (issue 32, first part):
- W8A8 int8 (`int-quantized`): from `int8-dynamic-act-int8-weight` artifacts (torchao `Int8Tensor`: int8 codes
  (out, in), one float scale per output row, symmetric; activations dynamic, symmetric, per token). Each
  quantized linear is written as compressed-tensors' naive int8 compressor stores it: `<module>.weight` int8
  (out, in) and `<module>.weight_scale` (out, 1), in the artifact's scale dtype. Every other linear layer is
  listed in `ignore`.
Anything else (int4 grids, MoE expert stacks) is refused in one line before anything is written.
"""

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from forge_qat import __version__
from forge_qat.errors import ConfigError
from forge_qat.formats.artifact import DEFAULT_MAX_SHARD_BYTES, ArtifactReader, Entry, ShardWriter
from forge_qat.formats.atomic import atomic_dir, check_output
from forge_qat.models import load_config

MARKER = "forge_export.json"
"""Written into every directory this exporter makes: `--overwrite` replaces only such a directory."""
W8A8 = {
    "targets": ["Linear"],
    "weights": {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel", "dynamic": False},
    "input_activations": {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "token", "dynamic": True},
}
"""compressed-tensors' W8A8 int8 scheme: the numerics of `int8-dynamic-act-int8-weight`."""
COPIED_FILES_SKIPPED = ("config.json", "forge_artifact.json", "model.safetensors.index.json")


@dataclass
class CompressedTensorsReport:
    path: Path
    scheme: str
    format: str
    tensors: int = 0
    quantized_linears: int = 0
    quantized_params: int = 0
    float_params: int = 0
    ignored: list[str] = field(default_factory=list)
    """Linear layers kept in float (compressed-tensors' `ignore`)."""
    inexact: int = 0
    """Values that could not be written exactly as the artifact holds them (0: codes and scales are copied)."""
    bytes: int = 0
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {**self.__dict__, "path": str(self.path)}


def _made_by_forge(path: Path) -> bool:
    return (path / MARKER).is_file()


def check_destination(out: Path, overwrite: bool) -> None:
    """Before any work: `out` may be written (forge replaces only a directory this exporter wrote)."""
    check_output(out, overwrite=overwrite, ours=_made_by_forge, kind="a compressed-tensors model directory",
                 directory=True)


def _check_w8a8(entry: Entry, reader: ArtifactReader) -> None:
    """An `Int8Tensor` weight whose numerics are compressed-tensors' W8A8: 2-D, one scale per row, symmetric
    weights (no zero point, or all zeros), symmetric per-token dynamic activations."""
    data = entry.info.get("_data", {})
    act = data.get("act_quant_kwargs") or {}
    act = act.get("_data", {}) if isinstance(act, dict) else {}
    granularity = (act.get("granularity") or {}).get("_type")
    mapping = (act.get("mapping_type") or {}).get("_data")
    shape = reader.shape(entry)
    problems = []
    if len(shape) != 2:
        problems.append(f"a {len(shape)}-D weight (MoE expert stacks are not exported to compressed-tensors yet)")
    if (granularity, mapping) != ("PerRow", "SYMMETRIC"):
        problems.append(f"activations {granularity} {mapping} (compressed-tensors' W8A8 quantizes them per token, "
                        f"symmetric)")
    if list(data.get("block_size", [])) not in ([1, shape[-1]],):
        problems.append(f"weight blocks {data.get('block_size')} (W8A8 scales each output row)")
    if ArtifactReader.key(entry, "zero_point") in reader.reader.keys() and \
            reader.part(entry, "zero_point").count_nonzero():
        problems.append("asymmetric weights (a nonzero zero point)")
    if problems:
        raise ConfigError(f"{entry.name}: cannot be written as compressed-tensors W8A8 exactly: "
                          f"{'; '.join(problems)}")


def _scheme(reader: ArtifactReader) -> str:
    """The one compressed-tensors scheme every quantized weight of the artifact maps onto exactly, or one clear
    error naming what does not."""
    kinds = {e.kind for e in reader.entries if e.kind != "Tensor"}
    if not kinds:
        raise ConfigError("the artifact holds no quantized weights; compressed-tensors export writes a quantized "
                          "model (finalize the checkpoint with a recipe first)")
    if kinds != {"Int8Tensor"}:
        raise ConfigError(f"the artifact's weights are {', '.join(sorted(kinds))}; compressed-tensors export writes "
                          f"W8A8 int8 from int8-dynamic-act-int8-weight artifacts so far (int4 W4A16 is not built "
                          f"yet): finalize the checkpoint with --qat-convert int8-dynamic-act-int8-weight")
    for entry in reader.entries:
        if entry.kind != "Tensor":
            _check_w8a8(entry, reader)
    return "W8A8"


def _linear_layers(config) -> set[str]:
    """The model's linear layers by module name, from a skeleton built on the meta device (no weights)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return {name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


def export_compressed_tensors(artifact: Path, out: Path, *, overwrite: bool = False,
                              max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> CompressedTensorsReport:
    """Write `artifact` (a forge safetensors artifact) as a compressed-tensors model directory."""
    config = load_config(artifact)
    reader = ArtifactReader(artifact)
    scheme = _scheme(reader)
    check_destination(out, overwrite)
    quantized = [e for e in reader.entries if e.kind != "Tensor"]
    modules = {e.name.rpartition(".")[0] for e in quantized}
    report = CompressedTensorsReport(out, scheme, "int-quantized",
                                     ignored=sorted(_linear_layers(config) - modules))
    names = [n for e in reader.entries
             for n in ((e.name,) if e.kind == "Tensor" else (e.name, e.name.rpartition(".")[0] + ".weight_scale"))]
    with atomic_dir(out) as tmp:
        writer = ShardWriter(tmp, "safetensors", names, max_shard_bytes)
        for entry in reader.entries:
            if entry.kind == "Tensor":
                value = reader.read(entry.name)
                writer.add(entry.name, value)
                report.float_params += value.numel()
            else:
                codes, scale = reader.part(entry, "qdata"), reader.part(entry, "scale")
                writer.add(entry.name, codes)
                writer.add(entry.name.rpartition(".")[0] + ".weight_scale", scale.reshape(codes.shape[0], 1))
                report.quantized_linears += 1
                report.quantized_params += codes.numel()
            report.tensors += 1
        writer.close()
        _write_config(tmp, artifact, report)
        for f in artifact.iterdir():
            if f.is_file() and f.suffix != ".safetensors" and f.name not in COPIED_FILES_SKIPPED:
                shutil.copyfile(f, tmp / f.name)
        (tmp / MARKER).write_text(json.dumps({"format": "compressed-tensors", "scheme": scheme,
                                              "forge_qat": __version__, "source": str(artifact)}, indent=1))
    report.bytes = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    report.notes.append("activations are quantized at run time by the runtime, per token, symmetric, scale "
                        "absmax/127.5, as trained; but compressed-tensors (transformers' loader) rounds x / scale "
                        "where torchao and forge's training round x * (1 / scale), so a code flips where the two "
                        "differ in the last bit (measured on a tiny Llama: logits up to 5e-3 apart). vLLM's int8 "
                        "kernels are not checked yet")
    return report


def _write_config(directory: Path, artifact: Path, report: CompressedTensorsReport) -> None:
    """The artifact's config.json with compressed-tensors' `quantization_config` in place of torchao's."""
    config = json.loads((artifact / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "compressed-tensors",
        "format": report.format,
        "quantization_status": "compressed",
        "config_groups": {"group_0": W8A8},
        "ignore": report.ignored,
    }
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")
