"""Training progress for people, shared by the CLI and the distributed worker (rank 0): a rich progress bar on
a terminal, plain lines when the output is a file or a pipe (a bar redrawn in place reaches a log file only
once, at the end: a cluster job's log would show nothing for hours)."""

import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

PLAIN_EVERY_S = 30.0
"""Without a terminal: a progress line at least this often (seconds) ..."""
PLAIN_LINES = 20
"""... and at least every 1/PLAIN_LINES of the run's steps, plus every eval and the last step."""


def _clock(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


class PlainLines:
    """Decides when a plain progress line is due and writes it: step, loss, eval loss, tokens/s, elapsed, ETA."""

    def __init__(self, total: int, start: int, now: float) -> None:
        self.total, self.start = total, start
        self.every = max(total // PLAIN_LINES, 1)
        self.t0 = self.last_time = now
        self.last_step = start

    def due(self, step: int, now: float, forced: bool) -> bool:
        return forced or step >= self.total or step - self.last_step >= self.every or \
            now - self.last_time >= PLAIN_EVERY_S

    def line(self, step: int, fields: dict[str, str], now: float) -> str:
        elapsed = now - self.t0
        done = step - self.start
        eta = elapsed / done * (self.total - step) if done > 0 else float("nan")
        self.last_step, self.last_time = step, now
        parts = [f"step {step}/{self.total}", f"loss {fields['loss']}{fields['parts']}"]
        if fields["eval"] != "-":
            parts.append(f"eval {fields['eval']}")
        parts += [f"{fields['tps']} tok/s", f"elapsed {_clock(elapsed)}",
                  f"ETA {_clock(eta) if eta == eta else '-'}"]
        return ", ".join(parts)


class RichTrainObserver:
    """A `forge_qat.train.trainer.TrainObserver` showing step, loss, eval loss, tokens/s and time left."""

    def __init__(self, console: Console, clock=time.monotonic) -> None:
        self.plain = not console.is_terminal
        self.clock = clock
        self.progress = Progress(
            TextColumn("[bold]step {task.completed}/{task.total}"), BarColumn(),
            TextColumn("loss {task.fields[loss]}{task.fields[parts]}"), TextColumn("eval {task.fields[eval]}"),
            TextColumn("{task.fields[tps]} tok/s"), TimeElapsedColumn(), TimeRemainingColumn(),
            console=console,
        )
        self.task = None
        self.lines: PlainLines | None = None
        self.fields = {"loss": "-", "eval": "-", "tps": "-", "parts": ""}
        self.data_bar: Progress | None = None
        self.data_last = 0.0

    @property
    def console(self) -> Console:
        return self.progress.console

    def on_data_progress(self, label: str, done_bytes: int, total_bytes: int) -> None:
        """Tokenizing a data set into the cache (shown by whichever process builds it)."""
        if self.plain:
            now = self.clock()
            if done_bytes >= total_bytes or now - self.data_last >= PLAIN_EVERY_S:
                self.data_last = now
                self.console.print(f"tokenizing {label}: {done_bytes / 1e6:,.1f} of {total_bytes / 1e6:,.1f} MB",
                                   highlight=False, soft_wrap=True)
            return
        if self.data_bar is None:
            self.data_bar = Progress(TextColumn(f"[bold]tokenizing {label}"), BarColumn(), DownloadColumn(),
                                     TimeElapsedColumn(), TimeRemainingColumn(), console=self.console)
            self.data_bar.start()
            self.data_task = self.data_bar.add_task("data", total=total_bytes)
        self.data_bar.update(self.data_task, completed=done_bytes)
        if done_bytes >= total_bytes:
            self.data_bar.stop()
            self.data_bar = None

    def on_start(self, total_steps: int, start_step: int) -> None:
        if self.plain:
            self.lines = PlainLines(total_steps, start_step, self.clock())
            where = f"from step {start_step}" if start_step else "from the start"
            self.console.print(f"training {total_steps} steps {where}; a progress line every "
                               f"{self.lines.every} steps or {PLAIN_EVERY_S:.0f} s", highlight=False, soft_wrap=True)
            return
        self.progress.start()
        self.task = self.progress.add_task("train", total=total_steps, completed=start_step, **self.fields)

    def on_step(self, record: dict[str, Any]) -> None:
        fields = {"loss": f"{record['loss']:.4f}", "tps": f"{record['tokens_per_s']:,.0f}", "parts": ""}
        if "kd_loss" in record:  # distillation: the two parts of the loss
            fields["parts"] = f" (lm {record['lm_loss']:.4f}, kd {record['kd_loss']:.4f})"
        if "eval_loss" in record:
            fields["eval"] = f"{record['eval_loss']:.4f}"
        self.fields.update(fields)
        if self.lines is not None:
            now = self.clock()
            if self.lines.due(record["step"], now, forced="eval_loss" in record):
                self.console.print(self.lines.line(record["step"], self.fields, now), highlight=False, soft_wrap=True)
            return
        self.progress.update(self.task, completed=record["step"], **fields)

    def on_checkpoint(self, path: Path) -> None:
        self.console.print(f"checkpoint {path}", highlight=False, soft_wrap=True)

    def on_end(self) -> None:
        if not self.plain:
            self.progress.stop()
