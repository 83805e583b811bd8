"""The JSON metadata files forge writes (run marker, checkpoint and artifact metadata): read as one JSON object
with a `format_version`, each failure one InputError naming the file.

Called by their owners in `forge_qat.formats`.
"""

import json
from pathlib import Path
from typing import Any

from forge_qat import __version__
from forge_qat.errors import InputError


def read_json_object(path: Path, what: str, hint: str = "") -> dict[str, Any]:
    """The object in `path`; `what` names the file's kind in the error ("a forge checkpoint's metadata")."""
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise InputError(f"{path} is corrupt ({str(e).splitlines()[0][:160]}){hint}") from None
    if not isinstance(raw, dict):
        raise InputError(f"{path} is not {what} (a JSON object was expected){hint}")
    return raw


def check_version(raw: dict[str, Any], path: Path | None, supported: int) -> int:
    """The file's format version (files written before versions were recorded are version 1); a file from a
    newer forge that this one cannot read is refused, naming the fix."""
    version = raw.get("format_version", 1)
    if not isinstance(version, int) or isinstance(version, bool) or version > supported:
        raise InputError(f"{path} has format version {version!r}; this forge_qat ({__version__}) reads version "
                         f"{supported} or older: upgrade forge_qat")
    return version
