"""Float vs PTQ vs QAT: the share of PTQ's degradation a QAT artifact wins back, with the eval set's noise.

Called by `forge compare` and the demo.
"""

import math
from dataclasses import dataclass

from forge_qat.eval.models import EvalResult, evaluate_model


@dataclass(frozen=True, slots=True)
class Comparison:
    float_result: EvalResult
    ptq_result: EvalResult
    qat_result: EvalResult

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
                (("float fine-tune", self.float_result), ("PTQ of float", self.ptq_result),
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
                "within_noise": self.within_noise, "sequences": len(self.float_result.sequences)}


def compare(float_model: str, ptq_model: str, qat_model: str, data: str, **kw) -> Comparison:
    return Comparison(*(evaluate_model(m, data, **kw) for m in (float_model, ptq_model, qat_model)))
