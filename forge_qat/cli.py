"""The `forge` command: thin typer commands over one library function each.

Each command parses options, calls the library, and maps `ForgeError` to a one-line message and a
non-zero exit code (2 for bad configuration, 1 otherwise). Only this module prints.
"""

import logging

# torchao logs load failures of its CUDA-only extensions at import time; on CPU they are expected.
for _noisy in ("torchao", "torch.utils._pytree", "torchao.kernel.intmm"):
    logging.getLogger(_noisy).setLevel(logging.ERROR)

import inspect  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Annotated, Any  # noqa: E402

import typer  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.logging import RichHandler  # noqa: E402
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn  # noqa: E402
from rich.table import Table  # noqa: E402

from forge_qat import config as config_mod  # noqa: E402
from forge_qat.errors import ConfigError, ForgeError  # noqa: E402
from forge_qat.recipes import DEFAULT_RECIPE, RECIPES, recipe_names  # noqa: E402

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="forge_qat: quantization-aware training of causal LMs on torchao.")
console = Console()
err_console = Console(stderr=True)


def _setup_logging() -> None:
    handler = RichHandler(console=err_console, show_path=False, show_time=False)
    logging.basicConfig(level=logging.WARNING, handlers=[handler], format="%(message)s", force=True)
    logging.getLogger("forge_qat").setLevel(logging.INFO)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def _fail(e: ForgeError) -> typer.Exit:
    err_console.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
    return typer.Exit(2 if isinstance(e, ConfigError) else 1)


# ---- forge recipes ------------------------------------------------------------------------------

def recipe_rows() -> list[dict[str, Any]]:
    rows = []
    for r in RECIPES.values():
        missing = r.missing_for_convert()
        rows.append({"name": r.name, "description": r.description, "default": r.name == DEFAULT_RECIPE,
                     "train": True, "finalize": not missing,
                     "finalize_needs": missing, "safetensors": r.safetensors})
    return rows


@app.command()
def recipes(as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False):
    """List QAT recipes and whether training and finalize can run on this machine."""
    rows = recipe_rows()
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    table = Table(title="QAT recipes")
    table.add_column("recipe", no_wrap=True)
    table.add_column("description")
    table.add_column("train here")
    table.add_column("finalize here")
    for row in rows:
        name = row["name"] + (" (default)" if row["default"] else "")
        finalize = "yes" if row["finalize"] else "no: needs " + ", ".join(row["finalize_needs"])
        table.add_row(name, row["description"], "yes", finalize)
    console.print(table)


# ---- forge init ---------------------------------------------------------------------------------

@app.command()
def init(
    directory: Annotated[Path, typer.Argument(help="Project directory to create.")],
    template: Annotated[str, typer.Option(help="Project template (an unknown name lists the choices).")] = (
        "qat-finetune"),
    recipe: Annotated[str, typer.Option(help=f"QAT recipe: {', '.join(recipe_names())}.")] = DEFAULT_RECIPE,
    model: Annotated[str, typer.Option(help="Model directory written into the config.")] = "models/base",
    data: Annotated[str, typer.Option(help="Training data written into the config.")] = "data/train.jsonl",
    eval_data: Annotated[str, typer.Option(help="Eval data written into the config.")] = "data/eval.jsonl",
    overwrite: Annotated[bool, typer.Option(help="Render into a non-empty directory.")] = False,
):
    """Create a ready-to-run project from a Jinja template."""
    from forge_qat.recipes import get_recipe
    from forge_qat.templates import render_project

    try:
        get_recipe(recipe)
        files = render_project(directory, template, {
            "project_name": directory.name, "recipe": recipe, "model": model, "data": data,
            "eval_data": eval_data, "output_dir": "runs/" + recipe,
        }, overwrite=overwrite)
    except ForgeError as e:
        raise _fail(e) from None
    for f in files:
        console.print(f"wrote {f}")


# ---- forge train --------------------------------------------------------------------------------

class _RichTrainObserver:
    def __init__(self) -> None:
        self.progress = Progress(
            TextColumn("[bold]step {task.completed}/{task.total}"), BarColumn(),
            TextColumn("loss {task.fields[loss]}"), TextColumn("eval {task.fields[eval]}"),
            TextColumn("{task.fields[tps]} tok/s"), TimeElapsedColumn(), TimeRemainingColumn(),
            console=err_console,
        )
        self.task = None

    def on_start(self, total_steps: int, start_step: int) -> None:
        self.progress.start()
        self.task = self.progress.add_task("train", total=total_steps, completed=start_step,
                                           loss="-", eval="-", tps="-")

    def on_step(self, record: dict[str, Any]) -> None:
        fields = {"loss": f"{record['loss']:.4f}", "tps": f"{record['tokens_per_s']:,.0f}"}
        if "eval_loss" in record:
            fields["eval"] = f"{record['eval_loss']:.4f}"
        self.progress.update(self.task, completed=record["step"], **fields)

    def on_checkpoint(self, path: Path) -> None:
        self.progress.console.print(f"checkpoint {path}")

    def stop(self) -> None:
        self.progress.stop()


def _config_path(value: str | None) -> Path | None:
    """A YAML path, or the name of a run config shipped in recipes/."""
    if value is None:
        return None
    path = Path(value)
    if path.exists() or path.suffix in (".yaml", ".yml"):
        return path
    from forge_qat.resources import data_dir

    shipped = data_dir("recipes") / f"{value}.yaml"
    if shipped.is_file():
        return shipped
    from forge_qat.errors import InputError, choices_message

    names = sorted(p.stem for p in data_dir("recipes").glob("*.yaml"))
    raise InputError(f"config {value} is not a file; " + choices_message("shipped config", value, names))


def _train_command(config: str | None = None, **flags: Any) -> None:
    from forge_qat.train import run_training

    _setup_logging()
    observer = _RichTrainObserver()
    try:
        cfg = config_mod.build_config(_config_path(config), **flags)
        result = run_training(cfg, observer)
    except ForgeError as e:
        raise _fail(e) from None
    finally:
        observer.stop()
    eval_part = f", eval loss {result.final_eval_loss:.4f}" if result.final_eval_loss is not None else ""
    console.print(f"trained {result.steps} steps: loss {result.final_loss:.4f}{eval_part}; "
                  f"checkpoint {result.checkpoint}")


def _train_signature() -> inspect.Signature:
    """One typer option per TrainConfig field; None means 'not given' so YAML values survive."""
    from forge_qat.prepare import LINEAR_SWAPS

    params = [inspect.Parameter("config", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None,
                                annotation=Annotated[str | None, typer.Argument(
                                    help="YAML run config, or the name of one shipped in recipes/.")])]
    for f in config_mod.fields_for_cli():
        flag = "--" + f.name.replace("_", "-")
        kind = config_mod.field_type(f)
        decl = (f"{flag}/--no-{flag[2:]}",) if kind is bool and not f.metadata.get("cli_only") else (flag,)
        default_note = "" if f.default is None or kind is bool else f" [default: {f.default}]"
        choices = next((" Choices: " + ", ".join(s.choices()) + "." for s in LINEAR_SWAPS if s.option == f.name), "")
        option = typer.Option(*decl, help=f.metadata["help"] + choices + default_note, show_default=False)
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=None,
                                        annotation=Annotated[kind | None, option]))
    return inspect.Signature(params)


def train(**kwargs: Any) -> None:
    """Fine-tune a causal LM with fake quantization (defaults: the embedded tiny demo)."""
    _train_command(**kwargs)


train.__signature__ = _train_signature()
app.command(help=train.__doc__)(train)


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        err_console.print("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
