"""The run configuration of `forge train`: one section per feature, one flat name per option.

Each feature owns its section, `<feature>/config.py`, and validates it (`train.config.RunConfig`/`OptimConfig`,
`data.config.DataConfig`, `qat.config.QatConfig`, `lora.config.LoraConfig`, `distill.config.DistillConfig`,
`distributed.config.DistributedConfig`; none imports torch, so the CLI's help needs none); a rule that spans two
sections lives with the feature that needs it (`DistillConfig.check_with`). Users see flat names only: the
CLI builds one `--kebab-case` option per field, YAML files and recorded run configs use the snake_case
names, so a new option is one field in its section. Which options a resumed run must keep is field
metadata (`resume_fixed`), read by `resume_fixed_names`.
"""

import dataclasses
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from forge_qat.data.config import DataConfig
from forge_qat.distill.config import DistillConfig
from forge_qat.distributed.config import DistributedConfig
from forge_qat.errors import ConfigError, InputError, choices_message
from forge_qat.formats.run_dir import RunRecord
from forge_qat.lora.config import LoraConfig
from forge_qat.qat.config import QatConfig
from forge_qat.train.config import OptimConfig, RunConfig

SECTIONS: dict[str, type] = {"run": RunConfig, "data": DataConfig, "qat": QatConfig, "lora": LoraConfig,
                             "distill": DistillConfig, "optim": OptimConfig, "distributed": DistributedConfig}
"""Section attribute of `TrainConfig` -> its dataclass, in the order the CLI lists their options."""


@dataclass(frozen=True, slots=True)
class Option:
    """One flat option: its user-facing name, the section holding it and the field there."""

    name: str
    section: str
    field: dataclasses.Field

    @property
    def help(self) -> str:
        return self.field.metadata["help"]

    @property
    def cli_only(self) -> bool:
        return self.field.metadata.get("cli_only", False)

    @property
    def resume_fixed(self) -> bool:
        return self.field.metadata.get("resume_fixed", False)

    @property
    def default(self) -> Any:
        return self.field.default

    @property
    def type(self) -> type:
        """The scalar type the option holds (Optional and Literal unwrapped), for YAML checks and the CLI."""
        hint = typing.get_type_hints(SECTIONS[self.section])[self.field.name]
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
            hint = args[0]
        return str if typing.get_origin(hint) is Literal else hint


OPTIONS: dict[str, Option] = {
    f.metadata.get("flat", f.name): Option(f.metadata.get("flat", f.name), section, f)
    for section, cls in SECTIONS.items() for f in dataclasses.fields(cls) if f.init  # init=False: derived, not options
}


def resume_fixed_names() -> list[str]:
    """Options a resumed run must share with its checkpoint: the restored optimizer state, LR schedule and
    batch order are functions of them."""
    return [name for name, o in OPTIONS.items() if o.resume_fixed]


@dataclass(kw_only=True)
class TrainConfig:
    run: RunConfig = dataclasses.field(default_factory=RunConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    qat: QatConfig = dataclasses.field(default_factory=QatConfig)
    lora: LoraConfig = dataclasses.field(default_factory=LoraConfig)
    distill: DistillConfig = dataclasses.field(default_factory=DistillConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    distributed: DistributedConfig = dataclasses.field(default_factory=DistributedConfig)

    def __post_init__(self) -> None:
        self.distill.check_with(self.qat)
        self.distributed.check_with(self.qat, lora=self.lora.enabled)
        self.lora.check_with(self.qat, self.distill, self.distributed, preset=not Path(self.run.model).is_dir())

    @classmethod
    def from_flat(cls, **values: Any) -> "TrainConfig":
        """From flat option names (flags, YAML keys, a recorded run config); unknown names are errors."""
        per_section: dict[str, dict[str, Any]] = {s: {} for s in SECTIONS}
        for name, value in values.items():
            if name not in OPTIONS:
                raise ConfigError(choices_message("option", name, sorted(OPTIONS)))
            o = OPTIONS[name]
            per_section[o.section][o.field.name] = value
        return cls(**{s: SECTIONS[s](**kw) for s, kw in per_section.items()})

    def get(self, name: str) -> Any:
        """An option's value by its flat name."""
        o = OPTIONS[name]
        return getattr(getattr(self, o.section), o.field.name)

    def to_dict(self) -> dict[str, Any]:
        """Every option by flat name: what a run directory and its checkpoints record."""
        return {name: self.get(name) for name in OPTIONS}


def _check_value(key: str, value: Any, o: Option, source: str) -> Any:
    expected = o.type
    if value is None and o.default is None:
        return None
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if expected is float and isinstance(value, str):
        # YAML 1.1 (PyYAML) reads exponents without a dot, like 1e-3, as strings.
        try:
            return float(value)
        except ValueError:
            pass
    if (expected is int and isinstance(value, bool)) or not isinstance(value, expected):
        raise ConfigError(f"{source}: key {key!r} must be {expected.__name__}, got {value!r}")
    return value


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a run config; unknown keys and wrongly typed values are errors naming the key."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"config file {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must hold a mapping of option names to values")
    known = {name: o for name, o in OPTIONS.items() if not o.cli_only}
    values = {}
    for key, value in raw.items():
        name = str(key).replace("-", "_")
        if name not in known:
            raise ConfigError(f"{path}: {choices_message('key', key, sorted(known))}")
        values[name] = _check_value(key, value, known[name], str(path))
    return values


def build_config(yaml_path: str | Path | None = None, **overrides: Any) -> TrainConfig:
    """Defaults < YAML file < explicit overrides (None means 'not given').

    `--resume` without a YAML file continues the run with the configuration it recorded in its
    output directory, so `forge train --resume --output-dir RUN` needs nothing else."""
    values = load_yaml(yaml_path) if yaml_path else {}
    if overrides.get("resume") and not yaml_path:
        values = resumed_options(Path(overrides.get("output_dir") or OPTIONS["output_dir"].default))
    values.update({k: v for k, v in overrides.items() if v is not None})
    return TrainConfig.from_flat(**values)


def resumed_options(output_dir: Path) -> dict[str, Any]:
    """The options a run directory was started with (`forge_run.json`, minus the one-off flags)."""
    recorded = RunRecord.read(output_dir).config
    return {k: v for k, v in recorded.items() if k in OPTIONS and not OPTIONS[k].cli_only}
