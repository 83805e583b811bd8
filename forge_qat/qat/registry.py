"""The recipe registry: the one place a QAT recipe name is written.

Training (prepare), finalize (convert), the CLI's choices, `forge recipes`, the docs table and the
Jinja templates' `qat_recipes()` all read `RECIPES`. Adding a recipe is one `Recipe` record, whose
`numerics` names a builder of its torch side in `forge_qat.qat.numerics`.
"""

from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Literal

from forge_qat import hardware
from forge_qat.errors import HardwareError, UnknownRecipeError, choices_message

if TYPE_CHECKING:
    import torch
    from torchao.core.config import AOBaseConfig

    from forge_qat.qat.embeddings import TableQuant
    from forge_qat.qat.fake_quant import LinearQuantizers
    from forge_qat.qat.numerics import ExpertStackConverter, Numerics


def _numerics():
    """`forge_qat.qat.numerics`, imported on first use: this registry imports neither torch nor torchao, so
    that `forge --help`, `forge recipes` and argument errors start in a fraction of a second."""
    from forge_qat.qat import numerics

    return numerics


@dataclass(frozen=True, slots=True)
class Requirement:
    """Something convert needs from the machine, checked at call time (so tests can monkeypatch)."""

    description: str
    is_met: Callable[[], bool]


CUDA = Requirement("a CUDA GPU", lambda: hardware.cuda_available())
SM89 = Requirement("CUDA compute capability 8.9+ (Ada/Hopper)", lambda: hardware.has_cuda_capability(8, 9))
SM90 = Requirement("CUDA compute capability 9.0+ (Hopper)", lambda: hardware.has_cuda_capability(9, 0))
MSLK = Requirement("the mslk kernel package (pip install mslk)", lambda: hardware.has_mslk())


ExpertStacks = Literal["torchao", "intx-unpacked", "ggml"]
"""How convert turns 3-D expert stacks into torchao tensors (`forge_qat.qat.numerics.STACK_CONVERTERS`): torchao's own
parameter-level quantization, or forge's build of the unpacked intx tensor for a whole stack (torchao 0.18's
configs assert 2-D weights), or the llama.cpp type each stack trained in (`llama-cpp-q4-k-m`); loading the last
two needs `import forge_qat.torchao_compat` (an operator torchao lacks)."""

TABLE_KINDS = {"int8": "int8 per row, bfloat16 scales (tied: one grid)"}
"""`Recipe.tables` choices and how `forge recipes` describes them (tests check the wording against the
quantizers `forge_qat.qat.numerics.tables_of` builds)."""


@dataclass(frozen=True, kw_only=True)
class Recipe:
    """One QAT scheme: how to fake-quantize it in training and how to convert it for deployment."""

    name: str
    """kebab-case name used on the command line, in configs and in checkpoint metadata."""
    description: str
    """One line for tables and help."""
    numerics: Callable[["Recipe"], "Numerics"]
    """Builds the torch side (`forge_qat.qat.numerics.Numerics`) of this record; called once, on first use."""
    convert_requires: tuple[Requirement, ...] = ()
    """What the real low-bit kernels of convert need; training (fake quant) runs anywhere."""
    safetensors: bool = True
    """Whether torchao can flatten the converted tensor subclass into safetensors."""
    storage_bits: int = 8
    """Bits each weight value occupies in the artifact (int4 values may be stored unpacked in int8)."""
    group_size: int | None = None
    """in_features must be a multiple of this for a linear layer to be quantized."""
    expert_stacks: ExpertStacks | None = None
    """How convert turns a mixture-of-experts stack into a torchao tensor; None: torchao 0.18 offers this
    recipe no route for 3-D expert weights, and a model with experts is refused before training."""
    learnable_scales: bool = False
    """Whether `--qat-learn-scales` can train this recipe's weight scales: its weights are symmetric
    per-group/per-channel with a fused fake quantizer, and its torchao tensor takes a custom scale."""
    learn_scales_by_default: bool = False
    """Whether a run learns them without `--qat-learn-scales`: where a benchmark showed them to help (int4
    groups: bench/quality.py). Not for int2/int3 (the embedded demo's int2 run recovered 49% of the PTQ gap with
    them, 84% without) nor int8 per-channel (not measured)."""
    artifact_activations: bool = True
    """Whether the torchao artifact quantizes activations as training does. False where torchao has no such
    scheme (llama.cpp's per-block activations): the artifact then runs float activations in transformers,
    and the trained numerics run where the format has them (`forge export --to gguf`)."""
    tables: Literal["int8"] | None = None
    """How the input embedding and output head are quantized (`TABLE_KINDS`; tied ones share the grid); None:
    kept in float."""
    ptq_scales: str = "absmax"
    """How `finalize --ptq` chooses this recipe's weight scales when `--ptq-scales` does not say (a
    `forge_qat.qat.config.SCALE_INITS` rule; only for `learnable_scales` recipes, whose torchao tensor takes a
    chosen scale). extreme for the int4 grids, where it was measured: llama.cpp's perplexity of a fine-tuned
    SmolLM2-135M's llama-cpp-q4-0 PTQ is 12.08 with it against 13.42 with absmax (docs/benchmarks.md). absmax
    elsewhere: on int2's four levels holding the extreme exactly leaves one level for the rest of the group."""
    streams: bool = True
    """Whether finalize can convert this recipe block by block (`--streaming`, ZeRO states); False where a layer's
    numerics depend on its place in the whole model (`layer_quantizers`)."""
    compressed_tensors: Literal["W8A8", "W4A16"] | None = None
    """The compressed-tensors scheme (vLLM, SGLang) that holds this recipe's artifact exactly
    (`forge export --to compressed-tensors`); None: not exported there."""

    @cached_property
    def _torch(self) -> "Numerics":
        return self.numerics(self)

    @property
    def base_config(self) -> "Callable[[], AOBaseConfig]":
        """Builds the torchao PTQ config that `QATConfig(base, step="convert")` applies."""
        return self._torch.base_config

    @property
    def fake_quant(self) -> "LinearQuantizers | None":
        """Fake quantization for prepare when torchao cannot infer it from the base config; None means
        `QATConfig(base, step="prepare")` infers it."""
        return self._torch.fake_quant

    @property
    def layer_quantizers(self):
        """Builds a linear layer's (activation, weight) fake quantizers from its `forge_qat.qat.numerics.LayerSite`
        where they depend on the layer; None: `fake_quant` for every layer."""
        return self._torch.layer_quantizers

    @property
    def embeddings(self) -> "TableQuant | None":
        """The quantizers of the input embedding and output head; None: kept in float."""
        return self._torch.embeddings

    @property
    def convert_dtype(self) -> "torch.dtype | None":
        """The dtype convert's kernels need for weights and activations (bf16 for the CUDA recipes); None: the
        checkpoint's own dtype."""
        return self._torch.convert_dtype

    @property
    def convert_expert_stack(self) -> "ExpertStackConverter | None":
        """Replaces an expert stack by its torchao tensor; None: no route (see `expert_stacks`)."""
        return None if self.expert_stacks is None else _numerics().STACK_CONVERTERS[self.expert_stacks]

    @property
    def stacks_need_compat(self) -> bool:
        """Whether loading an artifact with expert stacks needs `import forge_qat.torchao_compat`."""
        return self.expert_stacks in ("intx-unpacked", "ggml")

    @property
    def convert_device(self) -> "torch.device":
        """Where convert and its verification run: on the GPU when the recipe's kernels are CUDA kernels."""
        import torch

        return torch.device("cuda" if CUDA in self.convert_requires else "cpu")

    @property
    def experts_support(self) -> str:
        """How this recipe treats mixture-of-experts stacks, for tables and `forge recipes`."""
        if self.expert_stacks is None:
            return "no (models with experts are refused)"
        if self.stacks_need_compat:
            return "yes (loading the artifact needs `import forge_qat.torchao_compat`; without it loading fails)"
        return "yes"

    @property
    def embeddings_support(self) -> str:
        """What this recipe does with the input embedding and output head, for tables and `forge recipes`."""
        return "float" if self.tables is None else TABLE_KINDS[self.tables]

    def missing_for_convert(self) -> list[str]:
        """Descriptions of the convert requirements this machine does not meet (empty: can convert)."""
        return [r.description for r in self.convert_requires if not r.is_met()]

    def check_convert_hardware(self) -> None:
        """The one check of "can this machine convert this recipe": raises before anything loads when it lacks
        the recipe's real kernels. Called where a command decides to convert (finalize, `--finalize`, the demo)
        and by `convert_qat` itself."""
        missing = self.missing_for_convert()
        if missing:
            raise HardwareError(f"converting {self.name} needs {' and '.join(missing)}; this machine has not")


RECIPES: dict[str, Recipe] = {
    r.name: r
    for r in (
        Recipe(
            name="int8-dynamic-act-int4-weight",
            ptq_scales="extreme",
            description="int8 per-token dynamic activations, int4 per-group(32) symmetric weights",
            numerics=lambda r: _numerics().intx_dynamic(4),
            storage_bits=8,  # IntxUnpackedToInt8Tensor: int4 values held one per int8
            group_size=32,
            expert_stacks="intx-unpacked",
            learnable_scales=True,
            learn_scales_by_default=True,
        ),
        Recipe(
            name="int8-dynamic-act-int4-weight-bf16-scales",
            ptq_scales="extreme",
            description="the default recipe with bf16 weight scales: the grid GGUF Q4_0 and XNNPACK store exactly",
            numerics=lambda r: _numerics().int4_bf16_scales(r.tables),
            storage_bits=8,
            group_size=32,
            expert_stacks="intx-unpacked",
            learnable_scales=True,  # rounded to bf16 in every forward, as convert stores them
            learn_scales_by_default=True,
        ),
        Recipe(
            name="int8-dynamic-act-int4-weight-int8-embeddings",
            ptq_scales="extreme",
            description="the bf16-scales recipe with int8 per-row embedding and output head: small end to end",
            numerics=lambda r: _numerics().int4_bf16_scales(r.tables),
            tables="int8",
            storage_bits=8,
            group_size=32,
            expert_stacks="intx-unpacked",
            learnable_scales=True,  # rounded to bf16 in every forward, as convert stores them
            learn_scales_by_default=True,
        ),
        Recipe(
            name="llama-cpp-q4-0",
            ptq_scales="extreme",
            description="llama.cpp's Q4_0 numerics: int4 per-group(32) weights, int8 per-block(32) activations "
                        "(Q8_0), int8 embedding and head; for GGUF",
            numerics=lambda r: _numerics().llama_cpp_q4_0(r.tables),
            artifact_activations=False,
            tables="int8",
            storage_bits=8,
            group_size=32,
            expert_stacks="intx-unpacked",
            learnable_scales=True,  # rounded to bf16 in every forward, as convert stores them
            learn_scales_by_default=True,
        ),
        Recipe(
            name="llama-cpp-q4-k-m",
            description="llama.cpp's Q4_K_M mix: each linear in the type llama-quantize gives it (Q4_K, Q6_K, "
                        "Q5_0, Q8_0), its activations as llama.cpp's (Q8_K, Q8_0), int8 embedding and head; for GGUF",
            numerics=lambda r: _numerics().llama_cpp_q4_k_m(r.tables),
            artifact_activations=False,
            tables="int8",
            storage_bits=8,
            group_size=32,
            expert_stacks="ggml",
            streams=False,
        ),
        *(Recipe(
            name=f"int8-dynamic-act-int{bits}-weight",
            description=f"int8 per-token dynamic activations, int{bits} per-group(32) symmetric weights",
            numerics=lambda r, bits=bits: _numerics().intx_dynamic(bits),
            storage_bits=8,  # IntxUnpackedToInt8Tensor: one value per int8
            group_size=32,
            expert_stacks="intx-unpacked",
            learnable_scales=True,
        ) for bits in (3, 2)),
        Recipe(
            name="int8-dynamic-act-int8-weight",
            description="int8 per-token symmetric activations, int8 per-channel weights (fast on x86 CPUs)",
            numerics=lambda r: _numerics().int8_int8(),
            expert_stacks="torchao",
            learnable_scales=True,  # per-row scales on the integer grid (fake_quant._LearnedScaleIntegerGridLinear)
            compressed_tensors="W8A8",
        ),
        *(Recipe(
            name="w4a16" if group == 128 else f"w4a16-g{group}",
            ptq_scales="extreme",
            description=f"int4 per-group({group}) symmetric weights, activations in the model dtype: "
                        f"compressed-tensors W4A16 for vLLM/SGLang; converts on CPU",
            numerics=lambda r, group=group: _numerics().w4a16(group),
            storage_bits=8,  # IntxUnpackedToInt8Tensor: int4 values held one per int8
            group_size=group,
            expert_stacks="intx-unpacked",
            learnable_scales=True,
            compressed_tensors="W4A16",
        ) for group in (128, 64, 32)),
        Recipe(
            name="int4-weight-only",
            description="int4 per-group(128) weights, bf16 activations (CUDA + mslk kernels)",
            numerics=lambda r: _numerics().int4_weight_only(),
            convert_requires=(CUDA, MSLK),
            storage_bits=4,
            group_size=128,
        ),
        Recipe(
            name="float8-dynamic-act-float8-weight",
            description="float8 e4m3 per-row dynamic activations and weights (CUDA sm89+)",
            numerics=lambda r: _numerics().float8_float8(),
            convert_requires=(CUDA, SM89),
            # Float8Tensor quantizes 3-D weights and selects per expert; needs CUDA, so it is covered by
            # the GPU suite (tests/gpu), not on CPU.
            expert_stacks="torchao",
        ),
        Recipe(
            name="float8-dynamic-act-int4-weight",
            description="float8 per-row activations, int4 preshuffled weights (Hopper + mslk)",
            numerics=lambda r: _numerics().float8_int4(),
            convert_requires=(CUDA, SM90, MSLK),
            # Int4PreshuffledTensor is not among torchao's safetensors-flattenable subclasses.
            safetensors=False,
            storage_bits=4,
            group_size=128,
        ),
    )
}

DEFAULT_RECIPE = "int8-dynamic-act-int4-weight"
DEMO_RECIPE = "int8-dynamic-act-int2-weight"
"""`forge demo`'s recipe. With int4 weights PTQ of the tiny preset costs ~0.003 nats of eval loss, too
little for QAT's share of it to be more than noise; 2-bit weights cost ~0.05 and QAT wins most of it
back, the same across seeds (docs/benchmarks.md, "Embedded demo")."""


def recipe_names() -> list[str]:
    return list(RECIPES)


def get_recipe(name: str) -> Recipe:
    """The registry record for `name`, or an error listing every valid name."""
    try:
        return RECIPES[name]
    except KeyError:
        raise UnknownRecipeError(choices_message("recipe", name, recipe_names())) from None
