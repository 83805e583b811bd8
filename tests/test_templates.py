"""Jinja project templates: strict, sandboxed, recipe choices rendered from the registry."""

import re

import pytest
from jinja2 import UndefinedError
from jinja2.sandbox import SecurityError
from typer.testing import CliRunner

from forge_qat.cli import app
from forge_qat.config import build_config
from forge_qat.errors import ConfigError, OutputExistsError
from forge_qat.qat.registry import DEFAULT_RECIPE, RECIPES, recipe_names
from forge_qat.resources import data_dir
from forge_qat.templates import environment, render_project, template_names

VARS = {"project_name": "p", "recipe": DEFAULT_RECIPE, "model": "m", "data": "d.jsonl", "eval_data": "e.jsonl",
        "output_dir": "runs/x"}
CHOICE_LINE = re.compile(r"^#   ([a-z0-9-]+)( \(default\))?: (.*)$")


@pytest.mark.parametrize("template", template_names())
def test_rendered_recipe_choices_equal_registry(tmp_path, template):
    files = render_project(tmp_path / template, template, VARS)
    config = next(f for f in files if f.name == "forge.yaml")
    rendered = [CHOICE_LINE.match(line) for line in config.read_text().splitlines()]
    choices = [m for m in rendered if m]
    assert [m.group(1) for m in choices] == recipe_names()
    assert [m.group(1) for m in choices if m.group(2)] == [DEFAULT_RECIPE]
    assert all(m.group(3).startswith(RECIPES[m.group(1)].description) for m in choices)
    cfg = build_config(config)  # the rendered config is a valid run config
    assert cfg.qat.recipe_name == DEFAULT_RECIPE


def test_environment_is_strict_and_sandboxed(tmp_path):
    env = environment(tmp_path)
    with pytest.raises(UndefinedError):
        env.from_string("{{ missing }}").render()
    with pytest.raises(SecurityError):
        env.from_string("{{ ''.__class__.__mro__[1].__subclasses__() }}").render()


def test_unknown_template_and_existing_dest(tmp_path):
    with pytest.raises(ConfigError) as e:
        render_project(tmp_path / "x", "no-such-template", VARS)
    assert all(name in str(e.value) for name in template_names())
    dest = tmp_path / "busy"
    dest.mkdir()
    (dest / "mine.txt").write_text("x")
    with pytest.raises(OutputExistsError):
        render_project(dest, template_names()[0], VARS)
    assert [p.name for p in dest.iterdir()] == ["mine.txt"]


def test_cli_init_renders_a_runnable_project(tmp_path):
    result = CliRunner().invoke(app, ["init", str(tmp_path / "proj"), "--template", "qat-finetune",
                                      "--recipe", "int8-dynamic-act-int8-weight"])
    assert result.exit_code == 0, result.output
    cfg = build_config(tmp_path / "proj" / "forge.yaml")
    assert cfg.qat.qat_recipe == "int8-dynamic-act-int8-weight"
    bad = CliRunner().invoke(app, ["init", str(tmp_path / "p2"), "--recipe", "int1"])
    assert bad.exit_code == 2 and DEFAULT_RECIPE in bad.output
    assert not (tmp_path / "p2").exists()


def test_templates_never_spell_a_recipe_name():
    for path in data_dir("templates").rglob("*.j2"):
        text = path.read_text()
        assert not [name for name in recipe_names() if name in text], path
