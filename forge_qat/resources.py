"""Locate the run configs (`recipes/`) and project templates (`templates/`) that ship with forge.

In a wheel they live under `forge_qat/_data/` (see pyproject's force-include); in a source checkout
they are the repository's top-level folders. Called by the CLI and the template renderer.
"""

from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent


def data_dir(name: str) -> Path:
    """`recipes` or `templates`, wherever this installation keeps them."""
    for candidate in (_PACKAGE / "_data" / name, _PACKAGE.parent / name):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"forge_qat's {name}/ folder is missing from this installation ({_PACKAGE})")
