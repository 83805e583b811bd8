"""Render Jinja project templates (`forge init`) in a strict, sandboxed environment.

Templates choose; Python computes: the environment exposes `qat_recipes()`, read from the registry,
so a template never spells a recipe name. Called by the CLI's `init` command.
"""

import hashlib
import json
from pathlib import Path
from typing import Any

from jinja2 import FileSystemLoader, StrictUndefined, TemplateError
from jinja2.sandbox import SandboxedEnvironment

from forge_qat.errors import ConfigError, OutputExistsError, choices_message
from forge_qat.formats.atomic import atomic_file
from forge_qat.qat.registry import DEFAULT_RECIPE, RECIPES
from forge_qat.resources import data_dir

SUFFIX = ".j2"


def qat_recipes() -> list[dict[str, Any]]:
    """Registry records as plain data for templates."""
    return [
        {"name": r.name, "description": r.description, "default": r.name == DEFAULT_RECIPE,
         "convert_requires": [q.description for q in r.convert_requires], "safetensors": r.safetensors}
        for r in RECIPES.values()
    ]


def template_names() -> list[str]:
    return sorted(p.name for p in data_dir("templates").iterdir() if p.is_dir())


def environment(template_dir: Path) -> SandboxedEnvironment:
    env = SandboxedEnvironment(loader=FileSystemLoader(template_dir), undefined=StrictUndefined,
                               keep_trailing_newline=True, trim_blocks=True, lstrip_blocks=True)
    env.globals["qat_recipes"] = qat_recipes
    # Values go into YAML: as a quoted scalar (a JSON string is one), so `#`, `yes`, `: ` or a newline in a
    # value stay part of it instead of truncating or injecting keys; comment text stays on its line.
    env.filters["yaml"] = lambda value: json.dumps(value)
    env.filters["comment"] = lambda value: " ".join(str(value).split())
    return env


MANIFEST = ".forge-init.json"
"""Written into a rendered project: each file forge rendered and the hash of what it wrote."""


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def render_project(dest: Path, template: str, variables: dict[str, Any], overwrite: bool = False,
                   force: bool = False) -> list[Path]:
    """Render every `*.j2` file of `template` into `dest` (suffix dropped); returns the files written.

    Only the template's files are written; nothing else in `dest` is touched. With `overwrite`, a file
    forge rendered earlier and nobody edited since (per `MANIFEST`) is replaced; any other existing file
    at a template path is an error listing them, unless `force`. All files are rendered before the
    first is written."""
    if template not in template_names():
        raise ConfigError(choices_message("template", template, template_names()))
    if dest.exists() and not dest.is_dir():
        raise OutputExistsError(f"{dest} exists and is a file")
    if dest.is_dir() and any(dest.iterdir()) and not overwrite:
        raise OutputExistsError(f"{dest} exists and is not empty; pass --overwrite to render the template's files "
                                f"into it (other files are left alone)")
    root = data_dir("templates") / template
    env = environment(root)
    rendered = {}
    for rel in sorted(p.relative_to(root) for p in root.rglob(f"*{SUFFIX}")):
        try:
            rendered[rel.with_suffix("")] = env.get_template(rel.as_posix()).render(**variables)
        except TemplateError as e:
            raise ConfigError(f"template {template}/{rel}: {e}") from None
    manifest_path = dest / MANIFEST
    try:
        manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    except json.JSONDecodeError:
        manifest = {}
    foreign = [rel.as_posix() for rel in rendered if (dest / rel).exists()
               and manifest.get(rel.as_posix()) != (_digest(dest / rel) if (dest / rel).is_file() else None)]
    if foreign and not force:
        raise OutputExistsError(f"{dest} already has {', '.join(foreign)}, which forge did not render (or which were "
                                f"edited since); move them away, or pass --force to replace them")
    written = []
    for rel, text in rendered.items():
        out = dest / rel
        with atomic_file(out) as tmp:
            tmp.write_text(text)
        manifest[rel.as_posix()] = _digest(out)
        written.append(out)
    with atomic_file(manifest_path) as tmp:
        tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True))
    return written
