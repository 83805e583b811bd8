"""Render Jinja project templates (`forge init`) in a strict, sandboxed environment.

Templates choose; Python computes: the environment exposes `qat_recipes()`, read from the registry,
so a template never spells a recipe name. Called by the CLI's `init` command.
"""

from pathlib import Path
from typing import Any

from jinja2 import FileSystemLoader, StrictUndefined, TemplateError
from jinja2.sandbox import SandboxedEnvironment

from forge_qat.checkpoint import atomic_dir
from forge_qat.errors import ConfigError, OutputExistsError, choices_message
from forge_qat.recipes import DEFAULT_RECIPE, RECIPES
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
    return env


def render_project(dest: Path, template: str, variables: dict[str, Any], overwrite: bool = False) -> list[Path]:
    """Render every `*.j2` file of `template` into `dest` (suffix dropped); returns the files written."""
    if template not in template_names():
        raise ConfigError(choices_message("template", template, template_names()))
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())) and not overwrite:
        raise OutputExistsError(f"{dest} exists and is not empty; pass --overwrite to render into it anyway")
    root = data_dir("templates") / template
    env = environment(root)
    sources = sorted(p.relative_to(root) for p in root.rglob(f"*{SUFFIX}"))
    written = []
    with atomic_dir(dest) as tmp:
        for rel in sources:
            try:
                text = env.get_template(rel.as_posix()).render(**variables)
            except TemplateError as e:
                raise ConfigError(f"template {template}/{rel}: {e}") from None
            out = tmp / rel.with_suffix("")
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(text)
            written.append(dest / rel.with_suffix(""))
    return written
