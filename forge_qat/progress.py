"""The rich progress bar for training, shared by the CLI and the distributed worker (rank 0)."""

from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class RichTrainObserver:
    """A `forge_qat.train.trainer.TrainObserver` showing step, loss, eval loss, tokens/s and time left."""

    def __init__(self, console: Console) -> None:
        self.progress = Progress(
            TextColumn("[bold]step {task.completed}/{task.total}"), BarColumn(),
            TextColumn("loss {task.fields[loss]}{task.fields[parts]}"), TextColumn("eval {task.fields[eval]}"),
            TextColumn("{task.fields[tps]} tok/s"), TimeElapsedColumn(), TimeRemainingColumn(),
            console=console,
        )
        self.task = None
        self.data_bar: Progress | None = None

    def on_data_progress(self, label: str, done_bytes: int, total_bytes: int) -> None:
        """Tokenizing a data set into the cache (shown by whichever process builds it)."""
        if self.data_bar is None:
            self.data_bar = Progress(TextColumn(f"[bold]tokenizing {label}"), BarColumn(), DownloadColumn(),
                                     TimeElapsedColumn(), TimeRemainingColumn(), console=self.progress.console)
            self.data_bar.start()
            self.data_task = self.data_bar.add_task("data", total=total_bytes)
        self.data_bar.update(self.data_task, completed=done_bytes)
        if done_bytes >= total_bytes:
            self.data_bar.stop()
            self.data_bar = None

    def on_start(self, total_steps: int, start_step: int) -> None:
        self.progress.start()
        self.task = self.progress.add_task("train", total=total_steps, completed=start_step,
                                           loss="-", eval="-", tps="-", parts="")

    def on_step(self, record: dict[str, Any]) -> None:
        fields = {"loss": f"{record['loss']:.4f}", "tps": f"{record['tokens_per_s']:,.0f}"}
        if "kd_loss" in record:  # distillation: the two parts of the loss
            fields["parts"] = f" (lm {record['lm_loss']:.4f}, kd {record['kd_loss']:.4f})"
        if "eval_loss" in record:
            fields["eval"] = f"{record['eval_loss']:.4f}"
        self.progress.update(self.task, completed=record["step"], **fields)

    def on_checkpoint(self, path: Path) -> None:
        self.progress.console.print(f"checkpoint {path}")

    def on_end(self) -> None:
        self.progress.stop()
