"""Always-valid comparison of two arms: a normal-mixture confidence sequence on the difference of means.

The learner looks at the canary again and again as lists arrive, and stops the moment it is sure.
A fixed-sample test (t-test, a 95% interval) read at every look rejects far more often than 5%
under the null; a *confidence sequence* is a sequence of intervals that holds at every look at
once: P(the true difference leaves the interval at any time) <= alpha.

Which one. Per-list outcomes (online NDCG@k, hits@k: each in [0, 1]) of arm A (n_a lists) and arm
B (n_b), with plug-in variances; V = var_a / n_a + var_b / n_b is the variance of the difference of
the means and I = 1 / V its information. Under the CLT, (mean_a - mean_b - delta) * I behaves as a
Brownian motion in information time, and the mixture martingale over a N(0, tau^2) prior on the
effect (Robbins' normal mixture) gives, by Ville's inequality, the time-uniform interval

    diff +- sqrt( V (V + tau^2) / tau^2 * (2 log(1 / alpha) + log((V + tau^2) / V)) ).

That is the mixture SPRT of Johari, Koomen, Pekelis & Walsh ("Always valid inference", 2017/2022)
written as an interval, and with plug-in variances it is the asymptotic confidence sequence of
Waudby-Smith, Arbour, Sinha, Kennedy & Ramdas ("Time-uniform central limit theory and asymptotic
confidence sequences", 2021/2024), which proves the coverage holds asymptotically. Why this one:
- valid under any number of looks, at any times (the learner's tick), with no sample size planned;
- the arms may have unequal shares (a 10% canary against an 80% main arm): only V matters;
- closed form, O(1) per look from running sums, and it is what production A/B platforms use;
- the outcomes are bounded, so the CLT behind it is tame; a betting (exact, non-asymptotic)
  sequence would be valid at every n but is wider at these sample sizes and costs more per look.
tau sets where the test is most powerful (an effect of about tau is detected fastest); it does
not affect validity. It must not be chosen from the data being tested: the learner takes it from
the main arm's mean *before* the canary started (see learner.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Moments:
    """Running sums of one arm's per-list outcomes."""

    n: int = 0
    total: float = 0.0
    squares: float = 0.0

    @staticmethod
    def of(values: list[float]) -> Moments:
        return Moments(len(values), float(sum(values)), float(sum(v * v for v in values)))

    @property
    def mean(self) -> float:
        return self.total / self.n if self.n else 0.0

    @property
    def variance(self) -> float:
        """Sample variance (n - 1), floored so that an arm with identical outcomes so far still has
        some spread (0 variance would make the interval collapse on a handful of lists)."""
        if self.n < 2:
            return math.inf
        var = (self.squares - self.total * self.total / self.n) / (self.n - 1)
        return max(var, 0.25 / self.n)


@dataclass(frozen=True)
class Interval:
    """mean(A) - mean(B) with its always-valid (1 - alpha) interval [low, high]."""

    n_a: int
    n_b: int
    mean_a: float
    mean_b: float
    low: float
    high: float

    @property
    def diff(self) -> float:
        return self.mean_a - self.mean_b

    @property
    def gain(self) -> bool:
        """A is better than B: the whole interval is above 0."""
        return self.low > 0.0

    @property
    def loss(self) -> bool:
        """A is worse than B: the whole interval is below 0."""
        return self.high < 0.0

    def as_dict(self) -> dict[str, float | int]:
        return {"n_a": self.n_a, "n_b": self.n_b, "mean_a": round(self.mean_a, 5), "mean_b": round(self.mean_b, 5),
                "diff": round(self.diff, 5), "low": round(self.low, 5), "high": round(self.high, 5)}


def half_width(variance: float, tau: float, alpha: float) -> float:
    """The normal-mixture boundary for a difference of means with variance `variance` (V above)."""
    if not math.isfinite(variance) or variance <= 0.0:
        return math.inf
    t2 = tau * tau
    return math.sqrt(variance * (variance + t2) / t2 * (2.0 * math.log(1.0 / alpha) + math.log((variance + t2) / variance)))


def compare(a: Moments, b: Moments, *, tau: float, alpha: float) -> Interval:
    """The confidence sequence of mean(a) - mean(b) at this look (infinite width below 2 lists per arm)."""
    if not (0.0 < alpha < 1.0) or tau <= 0.0:
        raise ValueError("alpha must be in (0, 1) and tau > 0")
    variance = a.variance / a.n + b.variance / b.n if a.n >= 2 and b.n >= 2 else math.inf
    width = half_width(variance, tau, alpha)
    diff = a.mean - b.mean
    return Interval(a.n, b.n, a.mean, b.mean, diff - width, diff + width)
