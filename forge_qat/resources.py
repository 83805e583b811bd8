"""Locate the run configs (`recipes/`) and project templates (`templates/`) that ship with forge.

In a wheel they live under `forge_qat/_data/` (see pyproject's force-include); in a source checkout
they are the repository's top-level folders. Called by the CLI and the template renderer.
"""

from pathlib import Path

from forge_qat.errors import InputError, choices_message

_PACKAGE = Path(__file__).resolve().parent


def data_dir(name: str) -> Path:
    """`recipes` or `templates`, wherever this installation keeps them."""
    for candidate in (_PACKAGE / "_data" / name, _PACKAGE.parent / name):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"forge_qat's {name}/ folder is missing from this installation ({_PACKAGE})")


def run_config_path(value: str) -> Path:
    """A YAML path as given, or the name of a run config shipped in recipes/ (`forge train smollm2-135m-qat`)."""
    path = Path(value)
    if path.exists() or path.suffix in (".yaml", ".yml"):
        return path
    shipped = data_dir("recipes") / f"{value}.yaml"
    if shipped.is_file():
        return shipped
    names = sorted(p.stem for p in data_dir("recipes").glob("*.yaml"))
    raise InputError(f"config {value} is not a file; " + choices_message("shipped config", value, names))
