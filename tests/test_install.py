"""Packaging: a non-editable wheel carries the templates and run configs, and `forge` runs anywhere."""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]


def test_wheel_ships_templates_and_run_configs(tmp_path):
    pytest.importorskip("hatchling")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path), str(ROOT)], check=True)
    wheel, = tmp_path.glob("forge_qat-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for folder in ("templates", "recipes"):
        shipped = {p.relative_to(ROOT / folder).as_posix() for p in (ROOT / folder).rglob("*") if p.is_file()}
        assert shipped and {f"forge_qat/_data/{folder}/{s}" for s in shipped} <= names
    modules = {p.relative_to(ROOT).as_posix() for p in (ROOT / "forge_qat").rglob("*.py")}
    assert modules <= names, sorted(modules - names)  # every stage's package, e.g. forge_qat/formats/
    assert not [n for n in names if "recipe_docs" in n or n.startswith("tools/")]  # repository tools stay out


def test_installed_forge_runs_from_any_directory(tmp_path):
    forge = shutil.which("forge")
    if forge is None:
        pytest.skip("forge is not installed in this environment")
    done = subprocess.run([forge, "init", "proj", "--template", "tiny-demo"], cwd=tmp_path,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "proj" / "forge.yaml").is_file()
    bad = subprocess.run([forge, "train", "--qat-recipe", "nope"], cwd=tmp_path, capture_output=True, text=True)
    assert bad.returncode == 2 and "valid qat recipes" in bad.stderr
