"""Typed errors raised by forge_qat's library code.

The CLI maps every `ForgeError` to a one-line message and a non-zero exit code; anything else is a bug.
"""


class ForgeError(Exception):
    """Base class: a problem the user can fix, with a message that says how."""


class ConfigError(ForgeError):
    """A run configuration key, value or combination is invalid."""


class UnknownRecipeError(ConfigError):
    """A recipe name is not in the registry."""


class InputError(ForgeError):
    """A model directory, data file or checkpoint is missing or malformed."""


class OutputExistsError(ForgeError):
    """An output path exists and may not be overwritten without --overwrite."""


class HardwareError(ForgeError):
    """This machine lacks what a step needs (CUDA, a compute capability, a kernel library)."""


class ConversionError(ForgeError):
    """Converting to real low-bit tensors failed or converted nothing."""


def choices_message(kind: str, value: object, valid: list[str]) -> str:
    """One phrasing for every 'bad name' error: the bad value and all valid ones."""
    return f"unknown {kind} {value!r}; valid {kind}s: {', '.join(valid)}"
