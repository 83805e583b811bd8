"""`forge_artifact.json`, the metadata forge writes into every finalized artifact: the recipe it was converted
with, where it came from, and the finalize report. Imports no torch.

Written by finalize; read by eval (placement), export (which numerics the artifact holds) and finalize's
`--overwrite` check (forge replaces only its own artifacts).
"""

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from forge_qat import __version__
from forge_qat.errors import InputError
from forge_qat.formats.versioned import check_version, read_json_object

ARTIFACT_META = "forge_artifact.json"
FORMAT_VERSION = 1
"""Version of `forge_artifact.json` this forge writes; files without one are version 1."""


@dataclass(frozen=True, kw_only=True)
class ArtifactMeta:
    """The one reader and writer of `forge_artifact.json`. `report` holds the finalize report's fields (what was
    quantized, sizes, verification), written flat beside the fields named here."""

    recipe: str
    """The registry name of the recipe the artifact was converted with."""
    source: str = ""
    """The checkpoint it was converted from."""
    report: dict[str, Any] = field(default_factory=dict)
    forge_qat_version: str = __version__
    format_version: int = FORMAT_VERSION

    def source_size(self) -> tuple[int, str]:
        """(bytes, dtype name) of the checkpoint the artifact was converted from, as finalize measured it: what an
        export's size is compared with. (0, "") for an artifact whose finalize did not record it (earlier forge
        recorded a `float_bytes` whose dtype it did not name)."""
        size, dtype = self.report.get("source_bytes"), self.report.get("source_dtype")
        if isinstance(size, int) and size > 0 and isinstance(dtype, str) and dtype:
            return size, dtype
        return 0, ""

    def write(self, directory: Path) -> None:
        data = {"format_version": self.format_version, "forge_qat_version": self.forge_qat_version,
                "source": self.source, **self.report, "recipe": self.recipe}
        (directory / ARTIFACT_META).write_text(json.dumps(data, indent=2))

    @classmethod
    def read(cls, directory: Path) -> "ArtifactMeta | None":
        """The metadata of a forge artifact; None where `directory` has none (not forge's, or no artifact); a
        clear InputError for a file that is corrupt, foreign, or from a newer forge."""
        path = directory / ARTIFACT_META
        if not path.is_file():
            return None
        raw = read_json_object(path, "a forge artifact's metadata")
        if not isinstance(raw.get("recipe"), str):
            raise InputError(f"{path} is not a forge artifact's metadata (no recipe name)")
        version = check_version(raw, path, FORMAT_VERSION)
        named = {"recipe", "source", "forge_qat_version", "format_version"}
        return cls(recipe=raw["recipe"], source=str(raw.get("source", "")),
                   forge_qat_version=str(raw.get("forge_qat_version", "")), format_version=version,
                   report={k: v for k, v in raw.items() if k not in named})


def is_forge_artifact(directory: Path) -> bool:
    """Whether `directory` carries forge's artifact metadata (what `--overwrite` may replace)."""
    return (directory / ARTIFACT_META).is_file()
