"""The `forge` command: thin typer commands over one library function each.

Each command parses options, calls the library, and maps `ForgeError` to a one-line message and its
class's exit code (2 for bad configuration, 1 otherwise; see `forge_qat.errors`). Only this module prints.
"""


from forge_qat.logs import console_logging, quiet_libraries

quiet_libraries()  # before torchao is first imported

import inspect  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import sys  # noqa: E402
from contextlib import contextmanager  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Annotated, Any  # noqa: E402

import typer  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.padding import Padding  # noqa: E402
from rich.table import Table  # noqa: E402

from forge_qat import config as config_mod  # noqa: E402
from forge_qat.config_fields import parse_size  # noqa: E402
from forge_qat.errors import ConfigError, ForgeError, choices_message  # noqa: E402
from forge_qat.heap import map_large_allocations  # noqa: E402
from forge_qat.qat.registry import DEFAULT_RECIPE, DEMO_RECIPE, RECIPES, Recipe, get_recipe, recipe_names  # noqa: E402
from forge_qat.resources import run_config_path  # noqa: E402


class _Command(typer.core.TyperCommand):
    """Plain click help (wrapped to the terminal, at most 80 columns, nothing cut: rich's option tables cut
    long flags and choice lists with an ellipsis at 80 columns), its options grouped by their panel name."""

    def format_options(self, ctx, formatter) -> None:
        groups: dict[str, list] = {}
        for param in self.get_params(ctx):
            record = param.get_help_record(ctx)
            if record is not None:
                kind = "Arguments" if isinstance(param, typer.core.TyperArgument) else "Options"
                groups.setdefault(getattr(param, "rich_help_panel", None) or kind, []).append(record)
        for name, records in groups.items():
            with formatter.section(name):
                formatter.write_dl(records)


app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  rich_markup_mode=None,
                  help="forge_qat: quantization-aware training of causal LMs on torchao.")
console = Console()
err_console = Console(stderr=True)


def _setup_logging() -> None:
    console_logging(err_console)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def _emit(as_json: bool, data: Any, render) -> None:
    """A command's result: JSON on stdout for scripts (`--json`), or rich output for people."""
    if as_json:
        print(json.dumps(data, indent=2))
    else:
        render()


def _fail(e: ForgeError) -> typer.Exit:
    err_console.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
    return typer.Exit(e.exit_code)


@contextmanager
def _reported():
    """A library error inside the block ends the command: its one line on stderr, its class's exit code."""
    try:
        yield
    except ForgeError as e:
        raise _fail(e) from None


def _recipe(name: str | None) -> "Recipe | None":
    """A recipe named on the command line, resolved once, here at the edge, before a command imports torch (a
    typo fails fast); the library takes the `Recipe`."""
    with _reported():
        return None if name is None else get_recipe(name)


# ---- forge recipes ------------------------------------------------------------------------------

def recipe_rows() -> list[dict[str, Any]]:
    rows = []
    for r in RECIPES.values():
        missing = r.missing_for_convert()
        rows.append({"name": r.name, "description": r.description, "default": r.name == DEFAULT_RECIPE,
                     "train": True, "finalize": not missing,
                     "finalize_needs": missing, "safetensors": r.safetensors, "moe_experts": r.experts_support,
                     "embeddings": r.embeddings_support, "learnable_scales": r.learnable_scales})
    return rows


@app.command(cls=_Command)
def recipes(as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False):
    """List QAT recipes and what runs on this machine.

    For each recipe: whether training and finalize run here, and what it quantizes."""
    rows = recipe_rows()

    def render() -> None:
        # One block per recipe rather than a table: the cells are sentences, which a 7-column table squeezes
        # to a few characters (and cuts) below ~200 columns.
        for row in rows:
            console.print(f"[bold]{row['name']}[/]" + (" (default)" if row["default"] else ""), highlight=False)
            finalize = "yes" if row["finalize"] else "no, needs " + ", ".join(row["finalize_needs"])
            for label, value in (("", row["description"]), ("finalize here: ", finalize),
                                 ("MoE experts: ", row["moe_experts"]), ("embeddings: ", row["embeddings"]),
                                 ("learned scales: ", "yes" if row["learnable_scales"] else "no")):
                console.print(Padding(f"{label}{value}", (0, 0, 0, 2)), highlight=False)

    _emit(as_json, rows, render)


# ---- forge init ---------------------------------------------------------------------------------

@app.command(cls=_Command)
def init(
    directory: Annotated[Path, typer.Argument(help="Project directory to create.")],
    template: Annotated[str, typer.Option(help="Project template (an unknown name lists the choices).")] = (
        "qat-finetune"),
    recipe: Annotated[str, typer.Option(help=f"QAT recipe: {', '.join(recipe_names())}.")] = DEFAULT_RECIPE,
    model: Annotated[str, typer.Option(help="Model directory written into the config.")] = "models/base",
    data: Annotated[str, typer.Option(help="Training data written into the config.")] = "data/train.jsonl",
    eval_data: Annotated[str, typer.Option(help="Eval data written into the config.")] = "data/eval.jsonl",
    overwrite: Annotated[bool, typer.Option(
        help="Render into a non-empty directory: writes the template's files only, replacing those forge "
             "rendered there before; other files are left alone.")] = False,
    force: Annotated[bool, typer.Option(
        help="With --overwrite, also replace files at the template's paths that forge did not render or that "
             "were edited since.")] = False,
):
    """Create a ready-to-run project from a Jinja template."""
    from forge_qat.templates import render_project

    _recipe(recipe)
    with _reported():
        files = render_project(directory, template, {
            "project_name": directory.name, "recipe": recipe, "model": model, "data": data,
            "eval_data": eval_data, "output_dir": "runs/" + recipe,
        }, overwrite=overwrite, force=force)
    for f in files:
        console.print(f"wrote {f}")


# ---- forge train --------------------------------------------------------------------------------

def _observer():
    from forge_qat.train.progress import RichTrainObserver

    return RichTrainObserver(err_console)


def _train_command(config: str | None = None, **flags: Any) -> None:
    console_logging(err_console)  # building the config warns (e.g. warmup >= max steps)
    with _reported():  # before torch is imported: configuration errors are fast
        cfg = config_mod.build_config(run_config_path(config) if config else None, **flags)
    from forge_qat.train.entry import train_or_launch

    _setup_logging()
    with _reported():  # a failed rank is a ForgeError too: its own message and exit code
        result = train_or_launch(cfg, _observer())
    if result is None:
        console.print(f"all {cfg.distributed.nproc} rank(s) finished; checkpoints in {cfg.run.output_dir}")
        return
    eval_part = f", eval loss {result.final_eval_loss:.4f}" if result.final_eval_loss is not None else ""
    console.print(f"trained {result.steps} steps: loss {result.final_loss:.4f}{eval_part}; "
                  f"checkpoint {result.checkpoint}")


HELP_PANELS = {"run": "Model, output and checkpoints", "data": "Data", "qat": "Quantization-aware training",
               "lora": "LoRA adapters", "distill": "Distillation", "optim": "Optimisation",
               "distributed": "Distributed (DeepSpeed ZeRO)"}
"""The heading each config section's options are listed under in `forge train --help`."""


def _train_signature() -> inspect.Signature:
    """One typer option per TrainConfig field; None means 'not given' so YAML values survive."""
    from forge_qat.qat.config import LINEAR_SWAPS

    params = [inspect.Parameter("config", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None,
                                annotation=Annotated[str | None, typer.Argument(
                                    help="YAML run config, or the name of one shipped in recipes/.")])]
    for name, o in config_mod.OPTIONS.items():
        flag = "--" + name.replace("_", "-")
        kind = o.type
        decl = (f"{flag}/--no-{flag[2:]}",) if kind is bool and not o.cli_only else (flag,)
        default = ("on" if o.default else "off") if kind is bool else o.default
        default_note = "" if o.default is None or o.cli_only else f" [default: {default}]"
        # choices one per line: click's wrapping would split the recipe names at their hyphens (\b: as written)
        choices = next(("\n\n\b\nChoices:\n" + "\n".join("  " + c for c in s.choices())
                        for s in LINEAR_SWAPS if s.option == name), "")
        option = typer.Option(*decl, help=o.help + default_note + choices, show_default=False,
                              rich_help_panel=HELP_PANELS[o.section])
        params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None,
                                        annotation=Annotated[kind | None, option]))
    return inspect.Signature(params)


def train(**kwargs: Any) -> None:
    """Fine-tune a causal LM with fake quantization.

    With no options: the embedded tiny model on CPython's documentation."""
    _train_command(**kwargs)


train.__signature__ = _train_signature()
app.command(cls=_Command, help=train.__doc__)(train)


# ---- forge finalize -----------------------------------------------------------------------------

def _size(n: int) -> str:
    return f"{n / 1e6:.2f} MB" if n < 1e9 else f"{n / 1e9:.2f} GB"


def _vs_source(size: int, source_bytes: int, source_dtype: str) -> str:
    """"the bfloat16 source 16.06 GB (0.61x)": what an output is compared with, named by the dtype it is in."""
    ratio = size / source_bytes if source_bytes else float("nan")
    return f"the {source_dtype} source {_size(source_bytes)} ({ratio:.2f}x)"


SCALE_SOURCES = {"learned": "learned in training", "mse": "chosen by error (mse search)",
                 "absmax": "absmax (the recipe's quantizer)", "extreme": "extreme (largest weight held exactly)",
                 "llama.cpp": "llama.cpp's (its reference quantizer, per layer type)"}
"""How the finalize report names `FinalizeReport.weight_scales`."""


def print_finalize_report(report) -> None:
    verb = "would convert" if report.dry_run else "converted"
    coverage = report.coverage
    console.print(f"[bold]{report.recipe}[/] ({report.mode.upper()}): {verb} {report.converted} weights "
                  f"({', '.join(f'{k} {v}' for k, v in sorted(report.by_module.items()))}); weight scales: "
                  f"{SCALE_SOURCES[report.weight_scales]}")
    kept = ", ".join(f"{reason} {n:,}" for reason, n in sorted(coverage["kept_float"].items())) or "nothing"
    console.print(f"quantized {coverage['quantized_share']:.1%} of the matmul weights by parameter count "
                  f"({coverage['quantized_params']:,} of {coverage['matmul_params']:,}; MoE experts "
                  f"{coverage['expert_params_quantized']:,}); kept in float: {kept}")
    size_word = "expected size" if report.dry_run else "artifact"
    console.print(f"{size_word} {_size(report.artifact_bytes)} vs "
                  f"{_vs_source(report.artifact_bytes, report.source_bytes, report.source_dtype)}, "
                  f"format {report.format}")
    if not report.dry_run:
        console.print(f"format reason: {report.format_reason}")
        from forge_qat.qat.registry import RECIPES

        recipe = RECIPES.get(report.recipe)
        layout = (" (torchao's unpacked layout: each value in an int8 byte, plus scales; `forge export` packs "
                  "int4 to 4.5 bits in GGUF Q4_0 and ExecuTorch)") if recipe and recipe.storage_bits == 8 else ""
        if report.llama_cpp_types:
            layout = " (Q4_K weights as float values; `forge export --to gguf` writes llama.cpp's block sizes)"
        console.print(f"bits per quantized weight as stored here, incl. scales: {report.bits_per_weight:.2f}{layout}")
        if report.llama_cpp_types:
            types = ", ".join(f"{t} {n:,}" for t, n in report.llama_cpp_types.items())
            console.print(f"linear layers by llama.cpp type (parameters): {types}; Q4_K has no torchao tensor: those "
                          f"weights are stored as the values their blocks decode to, the blocks in "
                          f"forge_blocks/q4_k.safetensors")
        if report.streaming:
            console.print("streamed block by block; shards verified structurally (no full reload)")
        else:
            console.print(f"vs the same checkpoint unquantized, on {report.verification_positions} positions: top-1 "
                          f"next token agrees on {report.top1_agreement:.1%}; max |logit| change "
                          f"{report.max_logit_diff_vs_float:.4f} (its logits' std: {report.float_logit_std:.4f})")
            console.print(f"reloaded artifact matches: max diff {report.reload_max_diff:.1e}")
        if report.lora_merged:
            trained = ("not measured (streaming)" if math.isnan(report.lora_trained_vs_artifact)
                       else f"{report.lora_trained_vs_artifact:.4g}")
            console.print(f"LoRA adapters merged into {report.lora_merged} weights (W + s*BA); max |logit| "
                          f"difference between the model as trained and the artifact: {trained}")
        console.print(f"wrote {report.dest}")


@app.command("finalize", cls=_Command)
def finalize_command(
    source: Annotated[Path, typer.Option(help="Checkpoint directory, or a run directory (its latest checkpoint).")],
    dest: Annotated[Path, typer.Option(help="Artifact directory to write.")],
    qat_convert: Annotated[str | None, typer.Option(
        help=f"Recipe to convert with (default: the one the checkpoint was trained with). "
             f"Choices: {', '.join(recipe_names())}.")] = None,
    ptq: Annotated[str | None, typer.Option(help="Post-training quantization with this recipe (baselines).")] = None,
    ptq_scales: Annotated[str | None, typer.Option(
        help="Post-training quantization's weight scales: extreme (each group's largest weight held exactly: "
             "llama.cpp's Q4_0 rule), mse (least squared error) or absmax. Default: the recipe's "
             "(extreme for int4, absmax otherwise).")] = None,
    format: Annotated[str, typer.Option(help="auto (safetensors where torchao can flatten), safetensors, bin.")]
    = "auto",
    max_shard_size: Annotated[str, typer.Option(help="Largest output shard, e.g. 500MB, 2GB.")] = "2GB",
    streaming: Annotated[bool | None, typer.Option(
        "--streaming/--in-memory",
        help="Convert block by block with bounded memory, or load the whole model (verifies logits after "
             "reloading). Default: streaming when the float weights exceed 2 GB.")] = None,
    dry_run: Annotated[bool, typer.Option(help="Report what would be converted; write nothing.")] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing destination.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
):
    """Convert a checkpoint to a low-bit torchao artifact.

    Real low-bit tensors, written so that stock transformers loads them."""
    convert_with, ptq_with = _recipe(qat_convert), _recipe(ptq)
    with _reported():
        shard_bytes = parse_size(max_shard_size, "--max-shard-size")
    from forge_qat.finalize.convert import finalize
    from forge_qat.finalize.job import FinalizeRequest

    _setup_logging()
    with _reported():
        report = finalize(FinalizeRequest(source=source, dest=dest, qat_convert=convert_with, ptq=ptq_with,
                                          fmt=format, dry_run=dry_run, overwrite=overwrite, streaming=streaming,
                                          max_shard_bytes=shard_bytes, ptq_scales=ptq_scales))
    _emit(as_json, report.to_dict(), lambda: print_finalize_report(report))


# ---- forge data ----------------------------------------------------------------------------------

def _data_command(**flags: Any) -> None:
    from forge_qat.data.store import open_token_store
    from forge_qat.models import load_model_tokenizer

    _setup_logging()
    as_json = flags.pop("as_json")
    with _reported():
        cfg = config_mod.TrainConfig.from_flat(**{k: v for k, v in flags.items() if v is not None})
        tokenizer, _ = load_model_tokenizer(cfg.run.model)
        data = cfg.data
        store = open_token_store(data.train_data, tokenizer, data.seq_len,
                                 data.options(progress=_observer().on_data_progress))
    meta = store.meta
    row = {"data": data.train_data, "cache": str(store.directory), "built": store.built,
           "documents": store.documents, "tokens": store.total_tokens, "learned_tokens": meta["learned_tokens"],
           "seq_len": data.seq_len, "sequences": len(store)}
    _emit(as_json, row, lambda: console.print(
        f"{'tokenized' if store.built else 'already cached'} {data.train_data}: {store.documents:,} documents, "
        f"{store.total_tokens:,} tokens ({meta['learned_tokens'] / max(store.total_tokens, 1):.0%} learned), "
        f"{len(store):,} sequences of {data.seq_len}; cache {store.directory}"))


def _data_signature() -> inspect.Signature:
    names = ("model", "data", "seq_len", "chat_column", "chat_loss", "data_cache", "data_workers")
    params = [p for p in _train_signature().parameters.values() if p.name in names]
    params.append(inspect.Parameter("as_json", inspect.Parameter.KEYWORD_ONLY, default=False, annotation=Annotated[
        bool, typer.Option("--json", help="Machine-readable output.")]))
    return inspect.Signature(params)


def data(**kwargs: Any) -> None:
    """Tokenize a data set into the token cache.

    What `forge train` does first, e.g. once before a cluster job; prints its documents, tokens and
    sequences."""
    _data_command(**kwargs)


data.__signature__ = _data_signature()
app.command(cls=_Command, help=data.__doc__)(data)


# ---- forge eval / compare -------------------------------------------------------------------------

def _results_table(rows: list[dict], title: str) -> Table:
    table = Table(title=title)
    for col in ("model", "kind", "eval loss", "perplexity", "tokens"):
        table.add_column(col)
    for r in rows:
        table.add_row(r.get("label", r["model"]), r["kind"], f"{r['loss']:.4f}", f"{r['perplexity']:.3f}",
                      str(r["tokens"]))
    return table


@app.command("eval", cls=_Command)
def eval_command(
    models: Annotated[list[str], typer.Argument(help="Checkpoints, run directories or finalized artifacts.")],
    data: Annotated[str, typer.Option(help="Held-out data: a .jsonl/.json/.parquet/.txt file, a directory, a "
                                           "Dataset.save_to_disk directory, or builtin:NAME.")]
    = "builtin:python-docs-eval",
    chat_column: Annotated[str | None, typer.Option(help="Column holding conversations (default: 'messages' or "
                                                         "'conversations').")] = None,
    chat_loss: Annotated[str, typer.Option(help="Assistant turns scored in chat data: last or all.")] = "last",
    fake_quant: Annotated[str | None, typer.Option(
        help="Evaluate float checkpoints with this recipe's fake quantization applied.")] = None,
    seq_len: Annotated[int, typer.Option(help="Tokens per evaluated sequence.")] = 128,
    batch_size: Annotated[int, typer.Option(help="Sequences per forward pass.")] = 8,
    max_batches: Annotated[int | None, typer.Option(
        help="Score only the first N batches (training's --eval-batches does the same). Default: all.")] = None,
    packing: Annotated[str, typer.Option(help="documents or causal, as in training (see docs/data.md).")]
    = "documents",
    as_json: Annotated[bool, typer.Option("--json", help="Print results as JSON.")] = False,
):
    """Perplexity of one or more models on held-out text."""
    with _reported():
        for name, value in (("--seq-len", seq_len), ("--batch-size", batch_size), ("--max-batches", max_batches)):
            if value is not None and value < 1:
                raise ConfigError(f"{name} must be at least 1, got {value}")
        if packing not in ("documents", "causal"):
            raise ConfigError(choices_message("packing", packing, ["documents", "causal"]))
    recipe = _recipe(fake_quant)
    from forge_qat.data.build import DataOptions
    from forge_qat.data.encode import ChatOptions
    from forge_qat.eval.models import evaluate_model

    _setup_logging()
    with _reported():
        options = DataOptions(chat=ChatOptions(chat_column, chat_loss))
        results = [evaluate_model(m, data, seq_len=seq_len, batch_size=batch_size, max_batches=max_batches,
                                  fake_quant=recipe, data_options=options, packing=packing).to_dict()
                   for m in models]
    _emit(as_json, results, lambda: console.print(_results_table(results, f"eval on {data}")))


def print_comparison(comparison) -> None:
    console.print(_results_table(comparison.rows(), "float vs PTQ vs QAT"))
    rec, noise = comparison.recovered, comparison.degradation_noise
    if comparison.degradation <= 0:
        console.print("PTQ did not degrade eval loss here, so there is nothing for QAT to recover")
    elif comparison.within_noise:
        console.print(f"PTQ's degradation ({comparison.degradation:.4f} in eval loss) is within the eval set's "
                      f"noise (+-{noise:.4f}, two standard errors over {len(comparison.float_result.sequences)} "
                      f"sequences): a recovered share would measure noise. Evaluate on more held-out text.")
    else:
        console.print(f"QAT recovers {rec:.0%} of the PTQ degradation in eval loss (PTQ degradation "
                      f"{comparison.degradation:.4f} +- {noise:.4f}, two standard errors)")


@app.command("compare", cls=_Command)
def compare_command(
    float_model: Annotated[str, typer.Option("--float", help="The float fine-tuned checkpoint or run directory.")],
    ptq_model: Annotated[str, typer.Option("--ptq", help="The artifact finalized from it with --ptq.")],
    qat_model: Annotated[str, typer.Option("--qat", help="The artifact finalized from the QAT run.")],
    data: Annotated[str, typer.Option(help="Held-out text.")] = "builtin:python-docs-eval",
    plot: Annotated[Path | None, typer.Option(help="Write a PNG of the runs' loss curves here.")] = None,
    runs: Annotated[list[Path] | None, typer.Option(help="Run directories to plot (repeatable).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print results as JSON.")] = False,
):
    """Float vs PTQ vs QAT-converted: what QAT recovers.

    Evaluates the three and reports the share of the PTQ degradation the QAT artifact wins back."""
    from forge_qat.eval.compare import compare
    from forge_qat.eval.plot import check_plot, plot_loss_curves

    _setup_logging()
    with _reported():
        if plot:
            check_plot(plot, runs or [])  # before the three evaluations, not after them
        comparison = compare(float_model, ptq_model, qat_model, data)
        if plot:
            plot_loss_curves({p.name: p for p in runs or []}, plot, finals=comparison.finals(),
                             summary=comparison.summary())
    _emit(as_json, comparison.to_dict(), lambda: print_comparison(comparison))
    if plot and not as_json:
        console.print(f"wrote {plot}")


# ---- forge export ---------------------------------------------------------------------------------

EXPORT_FORMATS = ("gguf", "executorch", "compressed-tensors")


@app.command("export", cls=_Command)
def export_command(
    source: Annotated[Path, typer.Argument(help="A finalized forge artifact, or a float checkpoint / run directory "
                                                "with --recipe (finalized on the way).")],
    to: Annotated[str, typer.Option("--to", help=f"Format: {', '.join(EXPORT_FORMATS)}.")],
    output: Annotated[Path, typer.Option(help="File to write (compressed-tensors: a model directory).")],
    recipe: Annotated[str | None, typer.Option(help="Convert a float checkpoint with this recipe first.")] = None,
    pre_tokenizer: Annotated[str | None, typer.Option(
        help="GGUF: llama.cpp's pre-tokenizer name. Default: recognised from the tokenizer as llama.cpp's converter "
             "does, else the model type's.")] = None,
    max_seq_len: Annotated[int | None, typer.Option(
        help="ExecuTorch: KV-cache length (prompt + generated tokens). Default: the model's, at most 2048.")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output that forge wrote.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
):
    """Write GGUF, .pte or compressed-tensors from an artifact.

    GGUF for llama.cpp, .pte for ExecuTorch, a compressed-tensors model directory for vLLM and SGLang.

    The trained integer grid is written as it is, not re-quantized."""
    from forge_qat.errors import HardwareError

    with _reported():
        if to not in EXPORT_FORMATS:
            raise ConfigError(choices_message("export format", to, list(EXPORT_FORMATS)))
        if max_seq_len is not None and max_seq_len < 3:
            raise ConfigError(f"--max-seq-len must be at least 3 (prompt and generated tokens), got {max_seq_len}")
    convert_with = _recipe(recipe)
    _setup_logging()
    with _reported():
        try:
            if to == "gguf":
                from forge_qat.export import gguf as exporter
                export, options = exporter.export_gguf, {"pre_tokenizer": pre_tokenizer}
            elif to == "compressed-tensors":
                from forge_qat.export import compressed_tensors as exporter
                export, options = exporter.export_compressed_tensors, {}
            else:
                from forge_qat.export import executorch as exporter
                export, options = exporter.export_executorch, {"max_seq_len": max_seq_len}
        except ImportError as e:
            raise HardwareError(f"{to} export needs {e.name}: pip install 'forge-qat[export]'") from None
        from forge_qat.export.source import artifact_of

        exporter.check_destination(output, overwrite)  # before a --recipe finalize, not after it
        with artifact_of(source, convert_with, output) as artifact:
            report = export(artifact, output, overwrite=overwrite, **options)
    printer = {"gguf": _print_export, "executorch": _print_pte, "compressed-tensors": _print_compressed}[to]
    _emit(as_json, report.to_dict(), lambda: printer(report))


def _vs(report) -> str:
    """An export's size against the checkpoint its artifact came from, where the artifact recorded it."""
    return f" vs {_vs_source(report.bytes, report.source_bytes, report.source_dtype)}" if report.source_bytes else ""


def _print_compressed(report) -> None:
    console.print(f"[bold]compressed-tensors[/] {report.scheme} ({report.format}): {report.quantized_linears} "
                  f"quantized linear layers ({report.quantized_params:,} weights, codes and scales copied: "
                  f"{report.inexact} values inexact), {report.float_params:,} float; kept in float: "
                  f"{', '.join(report.ignored) or 'none'}; {_size(report.bytes)}{_vs(report)}")
    for note in report.notes:
        err_console.print(f"[yellow]note:[/] {note}", highlight=False, soft_wrap=True)
    console.print(f"wrote {report.path}")


def _print_pte(report) -> None:
    console.print(f"[bold]ExecuTorch[/] program ({report.recipe}): {report.quantized_linears} quantized linears, "
                  f"{report.delegated_linears} linear ops run by XNNPACK; KV cache {report.max_seq_len} tokens; "
                  f"{_size(report.bytes)}{_vs(report)}")
    for note in report.notes:
        err_console.print(f"[yellow]note:[/] {note}", highlight=False, soft_wrap=True)
    console.print(f"wrote {report.path}" + (f" and {report.tokenizer}" if report.tokenizer else ""))


def _print_export(report) -> None:
    kinds = ", ".join(f"{k} {v}" for k, v in sorted(report.by_type.items()))
    console.print(f"[bold]{report.architecture}[/] GGUF: {report.tensors} tensors ({kinds}); "
                  f"{report.quantized_params:,} quantized weights in {report.total_blocks:,} blocks, "
                  f"{report.float_params:,} float; pre-tokenizer {report.pre_tokenizer}; {_size(report.bytes)}"
                  f"{_vs(report)}")
    exact = "every block holds the trained grid exactly" if not report.rounded_blocks else \
        f"{report.rounded_blocks:,} blocks rounded (see the note)"
    console.print(exact)
    for note in report.notes:
        err_console.print(f"[yellow]note:[/] {note}", highlight=False, soft_wrap=True)
    console.print(f"wrote {report.path}")


# ---- forge demo -----------------------------------------------------------------------------------

@app.command(cls=_Command)
def demo(
    output_dir: Annotated[Path, typer.Option(help="Where the demo's runs and artifacts go.")] = Path("forge-runs/demo"),
    recipe: Annotated[str, typer.Option(help=f"QAT recipe. Choices: {', '.join(recipe_names())}.")]
    = DEMO_RECIPE,
    steps: Annotated[int, typer.Option(help="Training steps per run.")] = 300,
    qat_steps: Annotated[int, typer.Option(help="Final steps of the QAT run with fake quantization on.")] = 100,
    seed: Annotated[int, typer.Option(help="Seed of model init and data order, shared by both runs.")] = 0,
):
    """Float vs PTQ vs QAT on the embedded default, end to end.

    Trains float and QAT, finalizes both, compares them. No downloads."""
    if steps < 1:
        raise _fail(ConfigError(f"--steps must be at least 1, got {steps}"))
    demo_recipe = _recipe(recipe)
    from forge_qat.demo import run_demo

    _setup_logging()
    with _reported():
        result = run_demo(output_dir, recipe=demo_recipe, steps=steps, qat_steps=qat_steps, seed=seed,
                          observer=lambda stage: _observer(),
                          on_stage=lambda s: console.print(f"[bold cyan]{s}"))
    for report in (result.ptq_report, result.qat_report):
        print_finalize_report(report)
    print_comparison(result.comparison)
    console.print(f"loss curves: {result.plot}")


def main() -> None:
    map_large_allocations()  # finalize and export free many mid-sized tensors between ones they keep
    try:
        app()
    except KeyboardInterrupt:
        err_console.print("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
