"""Run configuration: YAML keys, flag precedence, contradictory options."""

import pytest

from forge_qat.config import TrainConfig, build_config, load_yaml
from forge_qat.errors import ConfigError, InputError
from forge_qat.qat.registry import DEFAULT_RECIPE


def test_defaults_are_the_embedded_demo():
    cfg = build_config()
    assert cfg.run.model == "tiny-llama" and cfg.data.train_data.startswith("builtin:")
    assert cfg.qat.recipe_name == DEFAULT_RECIPE


def test_flags_override_yaml_override_defaults(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("max_steps: 7\nlr: 1\nqat_recipe: int8-dynamic-act-int8-weight\n")
    cfg = build_config(path, max_steps=9)
    assert (cfg.optim.max_steps, cfg.optim.lr, cfg.qat.qat_recipe) == (9, 1.0, "int8-dynamic-act-int8-weight")
    assert cfg.get("max_steps") == 9 and cfg.to_dict()["data"] == cfg.data.train_data


@pytest.mark.parametrize("text, match", [
    ("max_stepz: 3\n", "max_stepz"),
    ("max_steps: three\n", "max_steps"),
    ("- a list\n", "mapping"),
    ("max_steps: [\n", "not valid YAML"),
])
def test_bad_yaml_names_the_key(tmp_path, text, match):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=match):
        build_config(path)


def test_missing_config_file(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        load_yaml(tmp_path / "none.yaml")


def test_qat_and_fp8_are_mutually_exclusive():
    with pytest.raises(ConfigError) as e:
        build_config(qat_recipe=DEFAULT_RECIPE, fp8_recipe="rowwise")
    assert "--qat-recipe" in str(e.value) and "--fp8-recipe" in str(e.value)
    # fp8 alone turns the default QAT recipe off rather than conflicting with it
    assert build_config(fp8_recipe="rowwise").qat.recipe_name is None


def test_unknown_recipe_and_values():
    with pytest.raises(ConfigError, match="int8-dynamic-act-int4-weight"):
        build_config(qat_recipe="int2-dream")
    with pytest.raises(ConfigError, match="fp8 recipe"):
        build_config(fp8_recipe="blockwise", qat_recipe="none")
    with pytest.raises(ConfigError, match="precision"):
        build_config(precision="fp64")
    with pytest.raises(ConfigError, match="batch_size"):
        build_config(batch_size=0)
    with pytest.raises(ConfigError, match="needs a QAT recipe"):
        build_config(qat_recipe="none", fake_quant_after_steps=3)


def test_shipped_run_configs_are_valid():
    from forge_qat.resources import data_dir

    configs = sorted(data_dir("recipes").glob("*.yaml"))
    assert configs
    for path in configs:
        header = path.read_text().splitlines()[:6]
        assert any("forge train" in line for line in header), f"{path.name} must say how to run it"
        build_config(path)


def test_auto_precision_chooses_bf16_only_where_it_is_native(monkeypatch):
    from forge_qat import hardware
    from forge_qat.train.optim import resolve_placement as resolve

    monkeypatch.setattr(hardware, "cuda_available", lambda: False)
    monkeypatch.setattr(hardware, "bf16_native", lambda: False)
    assert resolve(TrainConfig.from_flat(precision="auto")).precision == "fp32"
    assert resolve(TrainConfig.from_flat(precision="bf16")).precision == "bf16"  # explicit: still allowed, emulated
    monkeypatch.setattr(hardware, "bf16_native", lambda: True)
    assert resolve(TrainConfig.from_flat(precision="auto")).precision == "bf16"


def test_resume_fixed_options_are_field_metadata():
    """The options a resumed run must keep are declared on their fields; every one is a real option, and the
    cadence options that may change on resume are not among them."""
    from forge_qat.config import OPTIONS, resume_fixed_names

    fixed = set(resume_fixed_names())
    assert {"model", "data", "seq_len", "lr", "batch_size", "kd_weight", "qat_learn_scales", "seed"} <= fixed
    assert not fixed & {"max_steps", "eval_every", "save_every", "output_dir", "resume", "overwrite"}
    assert fixed <= set(OPTIONS)
    with pytest.raises(ConfigError, match="unknown option 'max_stepz'"):
        TrainConfig.from_flat(max_stepz=3)
