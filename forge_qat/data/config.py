"""The data section of a run configuration: what is read, how it is tokenized, cached and packed.

Composed into `forge_qat.config.TrainConfig`; `options()` turns it into the `DataOptions` that
`forge_qat.data.store.open_token_store` takes (training and `forge data`).
"""

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from forge_qat.config_fields import at_least, one_of, option
from forge_qat.errors import ConfigError

if TYPE_CHECKING:
    from forge_qat.data.build import DataOptions, Progress

ChatLoss = Literal["last", "all"]
Packing = Literal["documents", "causal"]
NO_EVAL = "none"
"""`--eval-data none`: no held-out measurements during training."""


@dataclass(kw_only=True)
class DataConfig:
    train_data: str = option("builtin:python-docs", flat="data", resume_fixed=True, help=(
        "Training data: a .jsonl/.json/.parquet/.txt file, a directory of them, a Dataset.save_to_disk "
        "directory, or builtin:NAME."))
    eval_data: str | None = option("builtin:python-docs-eval",
                                   "Held-out text for periodic eval loss ('none' to skip).")
    chat_column: str | None = option(None, resume_fixed=True, help=(
        "Column holding conversations. Default: 'messages' or 'conversations', whichever a record has; "
        "ShareGPT from/value pairs are understood."))
    chat_loss: ChatLoss = option("last", "Assistant turns learned in chat data: last (the final message) or all.",
                                 resume_fixed=True)
    packing: Packing = option("documents", resume_fixed=True, help=(
        "documents: position ids restart at each packed document, so attention (sdpa, eager, flex, flash) and "
        "loss stay inside it; causal: plain causal attention across the packed documents (faster where "
        "attention then needs a mask, see docs/data.md)."))
    data_cache: str | None = option(None, "Directory of tokenized-data caches. Default: $FORGE_DATA_CACHE, else "
                                          "~/.cache/forge_qat/tokens.")
    data_workers: int | None = option(None, "Processes tokenizing the data. Default: one per CPU core (at most 32).")
    seq_len: int = option(128, "Tokens per training sequence (texts are packed).", resume_fixed=True)

    def __post_init__(self) -> None:
        at_least(self, 1, "seq_len")
        if self.data_workers is not None and self.data_workers < 1:
            raise ConfigError(f"data_workers must be at least 1, got {self.data_workers}")
        one_of(self, "chat_loss", ChatLoss)
        one_of(self, "packing", Packing)

    @property
    def has_eval(self) -> bool:
        return self.eval_data not in (None, NO_EVAL)

    def options(self, *, defer: bool = False, progress: "Progress | None" = None) -> "DataOptions":
        """How the data is tokenized and cached; `defer`: let this machine's first rank build the cache."""
        from forge_qat.data.build import DataOptions  # tokenizers and Arrow: not for the CLI's help
        from forge_qat.data.encode import ChatOptions

        chosen = {}
        if self.data_cache:
            chosen["cache_dir"] = Path(self.data_cache)
        if self.data_workers:
            chosen["workers"] = self.data_workers
        return DataOptions(chat=ChatOptions(self.chat_column, self.chat_loss), defer=defer, progress=progress,
                           **chosen)
