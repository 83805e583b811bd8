"""What an export reads: a finalized artifact as given, or a float checkpoint finalized on the way with the
recipe `--recipe` names, into a temporary directory beside the output that is removed afterwards.

Called by `forge export`.
"""

import contextlib
import os
import shutil
from pathlib import Path

from forge_qat.errors import ConfigError, InputError
from forge_qat.formats.artifact_meta import ArtifactMeta
from forge_qat.formats.atomic import remove_stale_temporaries
from forge_qat.models import is_quantized_artifact
from forge_qat.qat.registry import Recipe


def artifact_source_size(artifact: Path) -> tuple[int, str]:
    """(bytes, dtype) of the checkpoint `artifact` was finalized from, from its metadata; (0, "") if not recorded."""
    meta = ArtifactMeta.read(artifact)
    return meta.source_size() if meta else (0, "")


def artifact_of(source: Path, recipe: Recipe | None, output: Path) -> contextlib.AbstractContextManager[Path]:
    """`source` itself when it is an artifact; else finalized with `recipe` beside `output`."""
    if not source.exists():
        raise InputError(f"{source} does not exist")
    if is_quantized_artifact(source):
        if recipe:
            raise ConfigError(f"{source} is already an artifact; --recipe converts float checkpoints")
        return contextlib.nullcontext(source)
    if not recipe:
        raise InputError(f"{source} is not a finalized artifact; give one (forge finalize) or add --recipe to "
                         f"convert this checkpoint on the way")
    return _converted(source, recipe, output)


@contextlib.contextmanager
def _converted(source: Path, recipe: Recipe, output: Path):
    from forge_qat.finalize.convert import finalize
    from forge_qat.finalize.job import FinalizeRequest

    # Named as the sweep of temporaries knows it (`.OUT.artifact-PID`): one a killed export left is removed by the
    # next write of OUT.
    tmp = output.with_name(f".{output.name}.artifact-{os.getpid()}")
    remove_stale_temporaries(output.parent, output.name)
    try:
        finalize(FinalizeRequest(source=source, dest=tmp, qat_convert=recipe, streaming=True, overwrite=True))
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
