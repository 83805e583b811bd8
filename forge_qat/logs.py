"""Quieting what libraries log that no user can act on; shared by the CLI, each rank of a multi-process job
and the benchmarks. Imports nothing heavy: it must run before torchao is first imported.
"""

import logging

NOISY_LOGGERS = ("torchao", "torch.utils._pytree", "torchao.kernel.intmm")
"""torchao logs load failures of its CUDA-only extensions at import time (expected on CPU); torch's pytree
warns once per Enum torchao registers."""


def quiet_libraries(*extra: str) -> None:
    """Show only errors from the noisy library loggers (and `extra` ones)."""
    for name in (*NOISY_LOGGERS, *extra):
        logging.getLogger(name).setLevel(logging.ERROR)


class _PlainFormatter(logging.Formatter):
    """Log lines for a file or a pipe: the message, prefixed by the level from warnings up."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        return text if record.levelno < logging.WARNING else f"{record.levelname.lower()}: {text}"


def console_logging(console, fmt: str = "%(message)s", level: int = logging.INFO) -> None:
    """Route logging to `console` (a rich Console on stderr): rich's handler on a terminal; whole plain lines
    when the output is a file or a pipe, which rich would otherwise cut at 80 columns. forge's own logger
    at `level`, every other library at warnings."""
    import sys

    console.soft_wrap = not console.is_terminal
    if console.is_terminal:
        from rich.logging import RichHandler

        handler: logging.Handler = RichHandler(console=console, show_path=False, show_time=False)
        handler.setFormatter(logging.Formatter(fmt))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(_PlainFormatter(fmt))
    logging.basicConfig(level=logging.WARNING, handlers=[handler], force=True)
    logging.getLogger("forge_qat").setLevel(level)
