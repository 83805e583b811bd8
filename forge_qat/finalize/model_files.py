"""The files that make an artifact's shards a model stock transformers loads: config.json with the torchao
`quantization_config` (and the experts implementation that runs quantized expert stacks), the generation
config, the tokenizer; and forge's own metadata (`forge_artifact.json`).

Called by every finalize route once the shards are written.
"""

from pathlib import Path

from torchao.quantization import FqnToConfig
from transformers import TorchAoConfig

from forge_qat.finalize.report import FinalizeReport
from forge_qat.formats.artifact_meta import ArtifactMeta
from forge_qat.qat.coverage import Coverage
from forge_qat.qat.embeddings import torchao_config
from forge_qat.qat.registry import Recipe
from forge_qat.torchao_compat import EXPERTS_IMPLEMENTATION


def write_model_files(directory: Path, config, generation_config, tokenizer, recipe: Recipe,
                      coverage: Coverage, stored_as_values: list[str] = ()) -> None:
    """`stored_as_values`: quantized weights the artifact holds as the values their grid decodes to (Q4_K), which
    transformers must load as plain weights."""
    not_converted = sorted(name.rpartition(".")[0] for name in [*coverage.kept, *stored_as_values]
                           if name.endswith(".weight"))
    quant_type = recipe.base_config()
    if coverage.tables:
        # Per-module configs (the linears by a pattern of their names: torchao deprecates "_default"), and the
        # flag that makes transformers' torchao loader take embeddings at all.
        linears = "|".join(sorted({name.rpartition(".")[2] for name in coverage.linears}))
        quant_type = FqnToConfig({**{name: torchao_config(recipe.embeddings) for name in coverage.tables},
                                  **({f"re:(.*\\.)?({linears})": quant_type} if linears else {})})
    config.quantization_config = TorchAoConfig(quant_type=quant_type, modules_to_not_convert=not_converted,
                                               include_input_output_embeddings=bool(coverage.tables))
    if coverage.experts:
        # A public config field (`PreTrainedConfig.__init__` reads it back): the eager expert loop selects one
        # expert's torchao tensor at a time; the default grouped_mm would call ops torchao does not implement.
        # Stacks whose tensor lacks that select in torchao name the module that adds it instead, so that stock
        # transformers refuses them at load, naming the import, rather than failing at the first forward.
        config.experts_implementation = (EXPERTS_IMPLEMENTATION if recipe.stacks_need_compat
                                         else "eager")
    config.save_pretrained(directory)
    if generation_config is not None:
        generation_config.save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def write_artifact_meta(directory: Path, checkpoint: Path, report: FinalizeReport) -> None:
    ArtifactMeta(recipe=report.recipe, source=str(checkpoint), report=report.to_dict()).write(directory)
