"""Field helpers shared by the run-configuration sections (`forge_qat.config` composes them), and the parsing of
option values the CLI takes as text (sizes).

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


_SIZE_UNITS = {"KB": 1e3, "MB": 1e6, "GB": 1e9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "B": 1}


def parse_size(text: str, flag: str) -> int:
    """A byte size written like 500MB, 2GB or 1GiB; a ConfigError naming `flag` otherwise."""
    t = text.strip().upper()
    for unit, factor in sorted(_SIZE_UNITS.items(), key=lambda kv: -len(kv[0])):
        if t.endswith(unit):
            try:
                value = float(t[: -len(unit)]) * factor
            except ValueError:
                break
            if math.isfinite(value) and value >= 1:
                return int(value)
            break
    raise ConfigError(f"{flag} {text!r} is not a positive finite size; write it like 500MB or 2GB")
