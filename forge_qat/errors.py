"""Typed errors raised by forge_qat's library code, one class per thing the user must fix.

The CLI (and each rank of a multi-process job) maps every `ForgeError` to its one-line message and the
class's `exit_code`; anything else is a bug and keeps its traceback. Exit codes: 2 when the command line
or run configuration must change, 1 when something outside it (a file, the disk, the machine, the
training itself) is the problem.
"""


class ForgeError(Exception):
    """Base class: a problem the user can fix, with a message that says how."""

    exit_code = 1


class ConfigError(ForgeError):
    """Fix the command line or the run config: a key, value or combination of options is invalid."""

    exit_code = 2


class UnknownRecipeError(ConfigError):
    """Fix the recipe name: it is not in the registry (the message lists the valid ones)."""


class InputError(ForgeError):
    """Fix an input: a model directory, data file or checkpoint is missing, malformed or incomplete."""


class OutputExistsError(ForgeError):
    """Choose another output path, or pass --overwrite where forge may replace what is there."""


class OutputWriteError(ForgeError):
    """Free disk space or fix permissions: an output (checkpoint, artifact, run directory) could not be
    written. Whatever was complete before is intact."""


class HardwareError(ForgeError):
    """Run on other hardware, or choose another recipe/precision: this machine lacks what a step needs (CUDA,
    a compute capability, a kernel library)."""


class ConversionError(ForgeError):
    """Converting to real low-bit tensors failed or converted nothing; the message names the weights."""


class TrainingDivergedError(ForgeError):
    """Training itself failed: the loss became NaN or infinite. Lower the learning rate or check the data;
    the checkpoints written before are intact."""


def choices_message(kind: str, value: object, valid: list[str]) -> str:
    """One phrasing for every 'bad name' error: the bad value and all valid ones."""
    return f"unknown {kind} {value!r}; valid {kind}s: {', '.join(valid)}"


def library_message(e: BaseException, limit: int = 400) -> str:
    """Another library's error as one line of a forge message: its whitespace folded (a wrapped message is
    not cut at its first line break), and, when longer than `limit`, cut after the last whole sentence that fits
    (else at a word) and marked as cut."""
    text = " ".join(str(e).split()) or type(e).__name__
    if len(text) <= limit:
        return text
    head = text[:limit]
    end = head.rfind(". ")
    return (head[:end + 1] if end > limit // 3 else head.rsplit(" ", 1)[0]) + " [...]"
