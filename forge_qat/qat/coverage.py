"""What a recipe quantizes in a model, counted by parameters: the one plan prepare, finalize and the
reports share.

Called by `forge_qat.qat.prepare` (which layers and expert stacks to fake-quantize, and whether the run
would do anything useful), finalize (what to convert, the report) and the dry run. A model's matmul
weights are its `nn.Linear` weights, its MoE expert stacks, its routers and any GPT-2 style `Conv1D`
weights; each is either quantized by the recipe or kept in float for a stated reason. Works on real,
meta-device and ZeRO-3-partitioned models alike (sizes come from the true shapes).
"""

from collections import Counter
from dataclasses import dataclass, field

import torch

from forge_qat.errors import ConfigError
from forge_qat.formats.weights import true_shape
from forge_qat.qat import experts as experts_mod

# Output heads stay in float unless the recipe quantizes embedding tables (`Recipe.embeddings`): they are
# usually tied to the input embedding, which a linear-only recipe must not quantize.
OUTPUT_HEAD_NAMES = ("lm_head",)

OUTPUT_HEAD = "output head"
TIED_TABLE = "embedding table (tied with the output head)"
"""The reason an output head that is the input embedding's Parameter is kept: one table, counted once."""
ROUTER = "router"
MISFIT = "group-size misfit"
CONV1D = "Conv1D"
NO_EXPERT_ROUTE = "experts (no route for this recipe)"
UNRECOGNISED = "unrecognised 3-D weights"
TABLE_TYPE = "embedding of an unsupported type"


def _numel(p: torch.Tensor) -> int:
    return getattr(p, "ds_numel", None) or p.numel()


def _is_conv1d(module: torch.nn.Module) -> bool:
    # transformers.pytorch_utils.Conv1D (GPT-2 and relatives): a linear layer stored (in, out).
    return type(module).__name__ == "Conv1D" and isinstance(getattr(module, "weight", None), torch.Tensor)


@dataclass
class Coverage:
    """The recipe's plan for one model."""

    recipe: str
    linears: dict[str, torch.nn.Linear] = field(default_factory=dict)
    """Linear layers to quantize, by module name."""
    experts: dict[str, list[str]] = field(default_factory=dict)
    """Experts modules to quantize, by module name: the stacks (parameter names) to quantize in each."""
    tables: dict[str, torch.nn.Module] = field(default_factory=dict)
    """Input embeddings and output heads to quantize (`Recipe.embeddings`), by module name; a tied pair is
    both here and counted once in `quantized`."""
    quantized: dict[str, int] = field(default_factory=dict)
    """Matmul weights the recipe quantizes: parameter name -> number of elements."""
    kept: dict[str, tuple[str, int]] = field(default_factory=dict)
    """Matmul weights kept in float: parameter name -> (reason, number of elements)."""

    @property
    def quantized_numel(self) -> int:
        return sum(self.quantized.values())

    @property
    def matmul_numel(self) -> int:
        return self.quantized_numel + sum(n for _, n in self.kept.values())

    @property
    def share(self) -> float:
        return self.quantized_numel / self.matmul_numel if self.matmul_numel else 0.0

    def kept_by_reason(self) -> dict[str, int]:
        totals: Counter[str] = Counter()
        for reason, n in self.kept.values():
            totals[reason] += n
        return dict(totals)

    def expert_numel(self) -> int:
        return sum(n for name, n in self.quantized.items() if name.rpartition(".")[0] in self.experts)

    def table_numel(self) -> int:
        return sum(n for name, n in self.quantized.items() if name.rpartition(".")[0] in self.tables)

    def _tables_text(self) -> str:
        kinds = sorted({"input embedding" if isinstance(m, torch.nn.Embedding) else "output head"
                        for m in self.tables.values()})
        tied = len(self.tables) > sum(1 for n in self.quantized if n.rpartition(".")[0] in self.tables)
        return " and ".join(kinds) + (" (tied)" if tied else "")

    def describe(self) -> str:
        """One line for logs and reports."""
        parts = [f"{self.recipe} quantizes {self.share:.1%} of the matmul weights by parameter count "
                 f"({_count(self.quantized_numel)} of {_count(self.matmul_numel)}): {len(self.linears)} linear "
                 f"layers"]
        if self.experts:
            stacks = sum(len(v) for v in self.experts.values())
            parts[0] += f", {stacks} expert stacks in {len(self.experts)} MoE layers ({_count(self.expert_numel())})"
        if self.tables:
            parts[0] += f", {self._tables_text()} ({_count(self.table_numel())})"
        kept = self.kept_by_reason()
        if kept:
            parts.append("kept in float: " + ", ".join(f"{reason} {_count(n)}" for reason, n in sorted(kept.items())))
        return "; ".join(parts)

    def to_dict(self) -> dict:
        return {"recipe": self.recipe, "quantized_params": self.quantized_numel, "matmul_params": self.matmul_numel,
                "quantized_share": self.share, "expert_params_quantized": self.expert_numel(),
                "linear_layers": len(self.linears), "expert_stacks": sum(len(v) for v in self.experts.values()),
                "tables": sorted(self.tables), "table_params_quantized": self.table_numel(),
                "kept_float": self.kept_by_reason(),
                "kept_float_examples": {r: [n for n, (rr, _) in self.kept.items() if rr == r][:5]
                                        for r in self.kept_by_reason()}}


def _count(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def plan(model: torch.nn.Module, recipe) -> Coverage:
    """Decide, for every matmul weight of `model`, whether `recipe` quantizes it."""
    coverage = Coverage(recipe.name)
    modules = dict(model.named_modules())
    expert_modules = {n: m for n, m in modules.items() if experts_mod.is_experts(m)}
    moe_blocks = {n.rpartition(".")[0]: experts_mod.num_experts(m) for n, m in expert_modules.items()}
    fits = lambda in_features: not recipe.group_size or in_features % recipe.group_size == 0  # noqa: E731
    tables = recipe.embeddings is not None
    input_table = _input_table(model)
    for name, module in modules.items():
        parent, _, last = name.rpartition(".")
        if tables and isinstance(module, torch.nn.Embedding):
            if type(module) is torch.nn.Embedding:
                _plan_table(coverage, name, module)
            else:
                coverage.kept[f"{name}.weight"] = (TABLE_TYPE, _numel(module.weight))
        elif name in expert_modules:
            for proj in experts_mod.projections(module):
                pname = f"{name}.{proj.weight}"
                numel = _numel(getattr(module, proj.weight))
                if recipe.convert_expert_stack is None:
                    coverage.kept[pname] = (NO_EXPERT_ROUTE, numel)
                elif not fits(proj.in_features):
                    coverage.kept[pname] = (MISFIT, numel)
                else:
                    coverage.quantized[pname] = numel
                    coverage.experts.setdefault(name, []).append(proj.weight)
        elif isinstance(module, torch.nn.Linear):
            pname = f"{name}.weight"
            if last in OUTPUT_HEAD_NAMES and tables:
                _plan_table(coverage, name, module)
            elif last in OUTPUT_HEAD_NAMES:
                tied = input_table is not None and module.weight is input_table
                coverage.kept[pname] = (TIED_TABLE if tied else OUTPUT_HEAD, _numel(module.weight))
            elif parent in moe_blocks and (module.out_features == moe_blocks[parent] or last.endswith("gate")):
                coverage.kept[pname] = (ROUTER, _numel(module.weight))
            elif not fits(module.in_features):
                coverage.kept[pname] = (MISFIT, _numel(module.weight))
            else:
                coverage.quantized[pname] = _numel(module.weight)
                coverage.linears[name] = module
        elif _is_conv1d(module):
            coverage.kept[f"{name}.weight"] = (CONV1D, _numel(module.weight))
        elif parent in moe_blocks and isinstance(module._parameters.get("weight"), torch.Tensor) \
                and len(true_shape(module.weight)) == 2:
            coverage.kept[f"{name}.weight"] = (ROUTER, _numel(module.weight))  # a TopKRouter's (experts, hidden)
        elif not isinstance(module, torch.nn.modules.conv._ConvNd):
            # Stacked weights of an experts class forge does not recognise: never left in float silently.
            for pname, p in module.named_parameters(recurse=False):
                if len(true_shape(p)) == 3:
                    coverage.kept[f"{name}.{pname}" if name else pname] = (UNRECOGNISED, _numel(p))
    return coverage


def _input_table(model: torch.nn.Module) -> torch.Tensor | None:
    """The input embedding's weight, to tell a tied output head (the same Parameter) from its own matrix."""
    get = getattr(model, "get_input_embeddings", None)
    try:
        embedding = get() if get else None
    except (NotImplementedError, AttributeError):  # a bare module or a model without the accessor
        return None
    return getattr(embedding, "weight", None)


def _plan_table(coverage: Coverage, name: str, module: torch.nn.Module) -> None:
    """An embedding or head the recipe quantizes; the second of a tied pair (the same Parameter) is converted
    with the first, so it is not counted again."""
    if not any(m.weight is module.weight for m in coverage.tables.values()):
        coverage.quantized[f"{name}.weight"] = _numel(module.weight)
    coverage.tables[name] = module


def check_useful(coverage: Coverage, recipe) -> None:
    """Refuse, before any training or conversion, a plan that would leave quantizable weights silently
    in float or quantize nothing."""
    kept = coverage.kept_by_reason()
    if CONV1D in kept:
        examples = [n for n, (r, _) in coverage.kept.items() if r == CONV1D][:3]
        raise ConfigError(f"this model has GPT-2 style Conv1D layers ({_count(kept[CONV1D])} weights, e.g. "
                          f"{', '.join(examples)}), which forge does not quantize: forge supports nn.Linear layers "
                          f"and MoE expert stacks (Llama, Qwen2/3, Qwen3-MoE, Mistral, Mixtral, Gemma, Phi-3, ...)")
    if UNRECOGNISED in kept:
        examples = [n for n, (r, _) in coverage.kept.items() if r == UNRECOGNISED][:3]
        raise ConfigError(f"this model has 3-D weights ({_count(kept[UNRECOGNISED])}, e.g. {', '.join(examples)}) in "
                          f"modules that are not transformers experts modules (`@use_experts_implementation`); forge "
                          f"would leave them in float, so it refuses")
    if TABLE_TYPE in kept:
        examples = [n for n, (r, _) in coverage.kept.items() if r == TABLE_TYPE][:3]
        raise ConfigError(f"recipe {recipe.name} quantizes embeddings, and this model's ({', '.join(examples)}) are "
                          f"not plain nn.Embedding layers (e.g. scaled embeddings), which forge does not quantize; "
                          f"choose a recipe that keeps embeddings in float")
    if NO_EXPERT_ROUTE in kept:
        from forge_qat.qat.registry import RECIPES

        usable = [r.name for r in RECIPES.values() if r.convert_expert_stack is not None]
        raise ConfigError(f"recipe {recipe.name} has no torchao route for mixture-of-experts stacks "
                          f"({_count(kept[NO_EXPERT_ROUTE])} expert weights here would stay float); use one of: "
                          f"{', '.join(usable)}")
    if not coverage.quantized:
        raise ConfigError(f"recipe {recipe.name} would quantize none of this model's matmul weights "
                          f"({'; '.join(f'{r}: {_count(n)}' for r, n in sorted(kept.items())) or 'none found'})")
