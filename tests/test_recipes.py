"""The recipe registry: names, errors, hardware gates, and everything derived from it."""

import json
import re

import pytest
from typer.testing import CliRunner

from forge_qat import hardware
from forge_qat.cli import app
from forge_qat.errors import HardwareError, UnknownRecipeError
from forge_qat.qat.registry import DEFAULT_RECIPE, RECIPES, get_recipe, recipe_names

runner = CliRunner()


def test_names_are_kebab_case_and_default_is_registered():
    assert all(re.fullmatch(r"[a-z0-9]+(-[a-z0-9]+)*", n) for n in RECIPES)
    assert DEFAULT_RECIPE in RECIPES
    assert {"int4-weight-only", "float8-dynamic-act-float8-weight", "float8-dynamic-act-int4-weight",
            "int8-dynamic-act-int8-weight", "int8-dynamic-act-int4-weight"} <= set(RECIPES)


def test_unknown_recipe_lists_valid_names():
    with pytest.raises(UnknownRecipeError) as e:
        get_recipe("int3-magic")
    assert "int3-magic" in str(e.value)
    assert all(name in str(e.value) for name in recipe_names())


def test_every_base_config_builds():
    for recipe in RECIPES.values():
        assert recipe.base_config() is not None


def _describe_tables(tables) -> str:
    """What `Recipe.embeddings_support` must say, derived from the table quantizers themselves."""
    if tables is None:
        return "float"
    w = tables.weight
    scales = f", {str(w.scale_dtype).removeprefix('torch.')} scales" if w.scale_dtype else ""
    return f"int{w.bits} per row{scales} (tied: one grid)"


def test_what_forge_recipes_says_matches_the_quantizers():
    """`forge recipes` reads only the torch-free record; its words agree with the numerics they stand for."""
    for recipe in RECIPES.values():
        assert recipe.embeddings_support == _describe_tables(recipe.embeddings), recipe.name
        assert (recipe.expert_stacks is None) == (recipe.convert_expert_stack is None), recipe.name


@pytest.mark.parametrize("name", ["int4-weight-only", "float8-dynamic-act-float8-weight",
                                  "float8-dynamic-act-int4-weight"])
def test_gpu_recipes_gate_both_ways(name, monkeypatch):
    monkeypatch.setattr(hardware, "cuda_available", lambda: False)
    monkeypatch.setattr(hardware, "has_cuda_capability", lambda major, minor: False)
    with pytest.raises(HardwareError, match="CUDA"):
        get_recipe(name).check_convert_hardware()
    monkeypatch.setattr(hardware, "cuda_available", lambda: True)
    monkeypatch.setattr(hardware, "has_cuda_capability", lambda major, minor: True)
    monkeypatch.setattr(hardware, "has_mslk", lambda: True)
    get_recipe(name).check_convert_hardware()  # no error once every requirement is met
    assert get_recipe(name).missing_for_convert() == []


def test_mslk_is_named_when_missing(monkeypatch):
    monkeypatch.setattr(hardware, "cuda_available", lambda: True)
    monkeypatch.setattr(hardware, "has_cuda_capability", lambda major, minor: True)
    monkeypatch.setattr(hardware, "has_mslk", lambda: False)
    assert get_recipe("int4-weight-only").missing_for_convert() == [get_recipe("int4-weight-only")
                                                                     .convert_requires[1].description]


def test_forge_recipes_json_is_the_registry(monkeypatch):
    monkeypatch.setattr(hardware, "cuda_available", lambda: False)
    result = runner.invoke(app, ["recipes", "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert [r["name"] for r in rows] == recipe_names()
    by_name = {r["name"]: r for r in rows}
    assert by_name["int8-dynamic-act-int4-weight"]["finalize"] is True
    assert by_name["int4-weight-only"]["finalize"] is False
    assert "a CUDA GPU" in by_name["int4-weight-only"]["finalize_needs"]
    assert [r["name"] for r in rows if r["default"]] == [DEFAULT_RECIPE]


def test_forge_recipes_table_shows_every_name():
    result = runner.invoke(app, ["recipes"], terminal_width=200)
    assert result.exit_code == 0
    assert all(name in result.stdout for name in recipe_names())


def test_docs_recipe_table_matches_registry():
    """README's recipe table is generated from the registry (scripts: `python tools/recipe_docs.py`)."""
    import importlib.util
    from pathlib import Path

    tool = Path(__file__).parents[1] / "tools" / "recipe_docs.py"  # a repository tool, not shipped in the wheel
    spec = importlib.util.spec_from_file_location("recipe_docs", tool)
    recipe_docs = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe_docs)
    recipe_table_markdown = recipe_docs.recipe_table_markdown
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    assert recipe_table_markdown() in readme


def test_ptq_scale_rules_are_valid_and_only_where_a_chosen_scale_is_taken():
    """`Recipe.ptq_scales` names a `--ptq-scales` rule; a rule other than absmax only where the recipe's torchao
    tensor takes a chosen scale (else finalize could not honour it); extreme for the int4 grids, as measured."""
    import typing

    from forge_qat.qat.config import SCALE_INITS
    from forge_qat.qat.fake_quant import ScaleInit

    assert set(SCALE_INITS) == set(typing.get_args(ScaleInit))
    for recipe in RECIPES.values():
        assert recipe.ptq_scales in SCALE_INITS, recipe.name
        assert recipe.ptq_scales == "absmax" or recipe.learnable_scales, recipe.name
    assert get_recipe("llama-cpp-q4-0").ptq_scales == get_recipe(DEFAULT_RECIPE).ptq_scales == "extreme"
    assert get_recipe("int8-dynamic-act-int2-weight").ptq_scales == "absmax"
