"""Float vs PTQ vs QAT: the share of PTQ's degradation a QAT artifact wins back, with the eval set's noise.

Called by `forge compare` and the demo.
"""

import logging
import math
from dataclasses import dataclass
from pathlib import Path

from forge_qat.errors import InputError
from forge_qat.eval.models import EvalResult, evaluate_model
from forge_qat.formats.artifact_meta import ArtifactMeta
from forge_qat.formats.run_dir import resolve_checkpoint
from forge_qat.models import is_quantized_artifact, load_config, load_tokenizer

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Comparison:
    float_result: EvalResult
    ptq_result: EvalResult
    qat_result: EvalResult
    ptq_scales: str = "absmax"
    """Where the PTQ artifact's weight scales come from (`FinalizeReport.weight_scales`: mse, chosen by error,
    or absmax): the better PTQ's scales, the less a QAT run has to recover."""

    @property
    def degradation(self) -> float:
        """PTQ's eval loss minus the float model's."""
        return self.ptq_result.loss - self.float_result.loss

    @property
    def degradation_noise(self) -> float:
        """Two standard errors of `degradation` as a token-weighted mean over the eval sequences, paired by
        sequence (both models scored the same text): how much of it another sample of held-out text of this
        size could move. NaN when the results carry no per-sequence losses."""
        f, q = self.float_result.sequences, self.ptq_result.sequences
        if len(f) != len(q) or len(f) < 2:
            return math.nan
        tokens = sum(t for _, t in f)
        diff = [(lq - lf, t) for (lf, t), (lq, _) in zip(f, q, strict=True)]
        mean = sum(d for d, _ in diff) / tokens
        # the ratio estimator's variance: residuals d_i - mean * t_i over sequences
        var = sum((d - mean * t) ** 2 for d, t in diff) * len(diff) / (len(diff) - 1)
        return 2 * math.sqrt(var) / tokens

    @property
    def within_noise(self) -> bool:
        """PTQ's degradation is not distinguishable from the eval set's sampling noise."""
        return self.degradation <= self.degradation_noise

    @property
    def recovered(self) -> float:
        """Fraction of the PTQ degradation (in eval loss) that QAT recovers: 1 = all, 0 = none."""
        degradation = self.ptq_result.loss - self.float_result.loss
        if degradation <= 0:
            return math.nan
        return (self.ptq_result.loss - self.qat_result.loss) / degradation

    def rows(self) -> list[dict]:
        return [dict(label=label, **r.to_dict()) for label, r in
                (("float fine-tune", self.float_result), (f"PTQ of float ({self.ptq_scales} scales)", self.ptq_result),
                 ("QAT converted", self.qat_result))]

    def finals(self) -> dict[str, float]:
        """Eval loss by label, for a plot."""
        return {"float": self.float_result.loss, "PTQ": self.ptq_result.loss,
                "QAT\nconverted": self.qat_result.loss}

    def summary(self) -> str:
        """One line: what QAT recovered of PTQ's degradation, or why no share is meaningful."""
        if self.degradation <= 0:
            return "PTQ did not degrade eval loss"
        if self.within_noise:
            return f"PTQ gap {self.degradation:.4f} within noise (+-{self.degradation_noise:.4f})"
        return f"QAT recovers {self.recovered:.0%} of the PTQ gap ({self.degradation:.4f})"

    def to_dict(self) -> dict:
        return {"rows": self.rows(), "qat_recovers_fraction_of_ptq_degradation": self.recovered,
                "ptq_degradation": self.degradation, "ptq_degradation_noise": self.degradation_noise,
                "within_noise": self.within_noise, "sequences": len(self.float_result.sequences),
                "ptq_weight_scales": self.ptq_scales}


def compare(float_model: str, ptq_model: str, qat_model: str, data: str, **kw) -> Comparison:
    ptq = check_one_model(float_model, ptq_model, qat_model)
    # artifacts written before forge recorded it chose their PTQ scales by absmax
    return Comparison(*(evaluate_model(m, data, **kw) for m in (float_model, ptq_model, qat_model)),
                      ptq_scales=ptq.report.get("weight_scales", "absmax"))


ARCHITECTURE_KEYS = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim", "num_experts", "num_local_experts",
                     "moe_intermediate_size", "num_experts_per_tok", "tie_word_embeddings")
"""The config fields two models must share to be one model in three forms."""


def check_one_model(float_model: str, ptq_model: str, qat_model: str) -> ArtifactMeta:
    """A recovered share means something only for one model in three forms: the float fine-tune, its PTQ
    artifact, and the QAT artifact, of one architecture and tokenizer, both artifacts of one recipe. Anything
    else is refused before evaluating, naming what differs. Returns the PTQ artifact's metadata."""
    paths = {"--float": _model_path(float_model), "--ptq": _model_path(ptq_model), "--qat": _model_path(qat_model)}
    if is_quantized_artifact(paths["--float"]):
        raise InputError(f"--float {float_model} is a quantized artifact; give the float fine-tuned checkpoint (or "
                         f"run directory) the PTQ artifact was made from")
    metas = {}
    for flag in ("--ptq", "--qat"):
        meta = ArtifactMeta.read(paths[flag]) if paths[flag].is_dir() else None
        if meta is None or not is_quantized_artifact(paths[flag]):
            raise InputError(f"{flag} {paths[flag]} is not a forge artifact (no forge_artifact.json): compare takes "
                             f"the artifacts `forge finalize` wrote")
        metas[flag] = meta
    if metas["--ptq"].recipe != metas["--qat"].recipe:
        raise InputError(f"the PTQ artifact was converted with {metas['--ptq'].recipe}, the QAT one with "
                         f"{metas['--qat'].recipe}: compare one recipe's PTQ and QAT")
    if paths["--ptq"].resolve() == paths["--qat"].resolve() or metas["--ptq"].report.get("mode") == "qat":
        raise InputError(f"--ptq {paths['--ptq']} is the QAT-trained model's artifact: give the artifact of "
                         f"`forge finalize --ptq {metas['--ptq'].recipe}` of the float fine-tune")
    if metas["--qat"].report.get("mode") == "ptq":
        raise InputError(f"--qat {paths['--qat']} is a post-training quantization (its checkpoint was not QAT-trained "
                         f"with {metas['--qat'].recipe}): give the artifact finalized from the QAT run")
    configs = {flag: load_config(path) for flag, path in paths.items()}
    for key in ARCHITECTURE_KEYS:
        values = {flag: getattr(cfg, key, None) for flag, cfg in configs.items()}
        if len(set(map(repr, values.values()))) > 1:
            raise InputError(f"the three models are not one model: {key} is "
                             + ", ".join(f"{v!r} ({flag})" for flag, v in values.items()))
    vocabularies = {flag: load_tokenizer(path).get_vocab() for flag, path in paths.items()}
    if not vocabularies["--float"] == vocabularies["--ptq"] == vocabularies["--qat"]:
        raise InputError("the three models' tokenizers differ: their losses are over different tokens")
    source = Path(metas["--ptq"].source)
    if source.exists() and paths["--float"].exists() and source.resolve() != paths["--float"].resolve():
        log.warning("the PTQ artifact was converted from %s, not from --float %s", source, paths["--float"])
    return metas["--ptq"]


def _model_path(spec: str) -> Path:
    path = Path(spec)
    if not path.exists():
        raise InputError(f"{spec} does not exist")
    return resolve_checkpoint(path)
