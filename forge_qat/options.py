"""Field helpers shared by the run-configuration sections (`forge_qat.config` composes them).

Each feature declares its own section dataclass with these: the help text the CLI shows, whether a
resumed run must keep the value (`resume_fixed`), and the flat `--flag` / YAML name when it differs from
the field's own name. Imports nothing heavy, so sections stay cheap to import.
"""

import math
import typing
from dataclasses import field
from typing import Any

from forge_qat.errors import ConfigError, choices_message


def option(default: Any, help: str, *, resume_fixed: bool = False, flat: str | None = None,
           cli_only: bool = False) -> Any:
    """A config field. `resume_fixed`: a resumed run must share the value with its checkpoint (the restored
    optimizer state, schedule or batch order depend on it). `flat`: the option's name in flags and YAML
    when it is not the field's name. `cli_only`: a flag, never read from YAML or recorded."""
    meta = {"help": help, "resume_fixed": resume_fixed, "cli_only": cli_only}
    if flat:
        meta["flat"] = flat
    return field(default=default, metadata=meta)


def at_least(section: Any, minimum: int, *names: str) -> None:
    for name in names:
        value = getattr(section, name)
        if value < minimum:
            raise ConfigError(f"{name} must be {'at least 1' if minimum == 1 else '0 or more'}, got {value}")


def finite_at_least_zero(section: Any, *names: str, note: str = "") -> None:
    for name in names:
        value = getattr(section, name)
        if not (math.isfinite(value) and value >= 0):
            raise ConfigError(f"{name} must be a finite number >= 0{note}, got {value}")


def positive_finite(name: str, value: float | None) -> None:
    if value is not None and not (math.isfinite(value) and value > 0):
        raise ConfigError(f"{name} must be a positive finite number, got {value}")


def one_of(section: Any, name: str, choices: Any, label: str | None = None) -> None:
    """`choices`: a `Literal[...]` type or a sequence of names."""
    valid = list(typing.get_args(choices) or choices)
    if getattr(section, name) not in valid:
        raise ConfigError(choices_message(label or name.replace("_", " "), getattr(section, name), valid))
