"""Binary screening metrics with stratified-bootstrap CIs, operating points and calibration.

Everything here takes plain arrays (labels 0/1, probabilities of malignant) and returns plain
numbers, so evaluation, sweeps and ensembles share one definition of each metric.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from lesionlab.errors import LesionlabError

# scipy and scikit-learn are imported where they are used: the service and the command line read this module's
# names (METRICS, the policy parser) and start a second or two sooner without them.

METRICS = ("accuracy", "precision", "recall", "specificity", "f1", "auc")
DEFAULT_RESAMPLES = 1000
DEFAULT_POLICY = "sensitivity:0.95"


def _rates(y: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    tp = float(np.sum((pred == 1) & (y == 1)))
    tn = float(np.sum((pred == 0) & (y == 0)))
    fp = float(np.sum((pred == 1) & (y == 0)))
    fn = float(np.sum((pred == 0) & (y == 1)))
    div = lambda a, b: a / b if b else 0.0
    precision, recall = div(tp, tp + fp), div(tp, tp + fn)
    return {
        "accuracy": div(tp + tn, len(y)),
        "precision": precision,
        "recall": recall,
        "specificity": div(tn, tn + fp),
        "f1": div(2 * precision * recall, precision + recall),
    }


def point_metrics(y: np.ndarray, prob: np.ndarray, threshold: float = 0.5) -> dict[str, float]:
    from sklearn.metrics import roc_auc_score

    y = np.asarray(y).astype(int)
    pred = (np.asarray(prob) >= threshold).astype(int)
    out = _rates(y, pred)
    out["auc"] = float(roc_auc_score(y, prob)) if 0 < y.sum() < len(y) else float("nan")
    return out


def confusion(y: np.ndarray, prob: np.ndarray, threshold: float = 0.5) -> list[list[int]]:
    """[[tn, fp], [fn, tp]]."""
    y = np.asarray(y).astype(int)
    pred = (np.asarray(prob) >= threshold).astype(int)
    return [
        [int(np.sum((y == 0) & (pred == 0))), int(np.sum((y == 0) & (pred == 1)))],
        [int(np.sum((y == 1) & (pred == 0))), int(np.sum((y == 1) & (pred == 1)))],
    ]


def _rank_auc(scores: np.ndarray, n_pos: int) -> float:
    """Mann-Whitney AUC for scores ordered positives first (ties count one half); equals roc_auc_score."""
    from scipy.stats import rankdata

    ranks = rankdata(scores)
    n_neg = len(scores) - n_pos
    return float((ranks[:n_pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def bootstrap_ci(
    y: np.ndarray,
    prob: np.ndarray,
    threshold: float = 0.5,
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
    alpha: float = 0.05,
) -> dict[str, list[float]]:
    """Percentile CIs from a stratified bootstrap: each resample keeps the class counts of the sample."""
    y = np.asarray(y).astype(int)
    prob = np.asarray(prob, dtype=np.float64)
    rng = np.random.default_rng(seed)
    pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    draws: dict[str, list[float]] = {m: [] for m in METRICS}
    pred = (prob >= threshold).astype(int)
    for _ in range(n_resamples):
        idx = np.concatenate([rng.choice(pos, len(pos)), rng.choice(neg, len(neg))])
        for k, v in _rates(y[idx], pred[idx]).items():
            draws[k].append(v)
        draws["auc"].append(_rank_auc(prob[idx], len(pos)) if len(pos) and len(neg) else float("nan"))
    lo, hi = 100 * alpha / 2, 100 * (1 - alpha / 2)
    return {k: [float(np.nanpercentile(v, lo)), float(np.nanpercentile(v, hi))] for k, v in draws.items()}


def metrics_with_ci(
    y: np.ndarray, prob: np.ndarray, threshold: float = 0.5, n_resamples: int = DEFAULT_RESAMPLES, seed: int = 0
) -> dict:
    """``{metric: {"value", "ci95"}}`` plus ``confusion`` and ``n``; the shape of metrics.json's blocks."""
    point = point_metrics(y, prob, threshold)
    ci = bootstrap_ci(y, prob, threshold, n_resamples, seed)
    out: dict = {k: {"value": point[k], "ci95": ci[k]} for k in METRICS}
    out["confusion"] = confusion(y, prob, threshold)
    out["threshold"] = float(threshold)
    out["n"] = len(y)
    return out


# ------------------------------------------------------------------ operating point


PAIRED = ("auc", "sensitivity", "specificity")


def paired_differences(
    y: np.ndarray,
    before: np.ndarray,
    after: np.ndarray,
    thresholds: tuple[float, float],
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
    alpha: float = 0.05,
) -> dict[str, dict[str, Any]] | None:
    """``after - before`` of AUC, and of sensitivity and specificity each at its own model's threshold, on the same
    images, with percentile CIs from one stratified bootstrap that resamples the same images for both models.

    The honest test of a change: two models scored on one set have CIs that overlap by construction (they share
    the set's sampling noise), while the paired difference's CI excludes 0 only where the change is real. None for
    a set of one class."""
    y = np.asarray(y).astype(int)
    scores = [np.asarray(before, dtype=np.float64), np.asarray(after, dtype=np.float64)]
    flagged = [s >= t for s, t in zip(scores, thresholds)]
    pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    if not len(pos) or not len(neg):
        return None

    n_pos = len(pos)

    def diff(idx: np.ndarray) -> np.ndarray:
        """idx: the positives' indices first, then the negatives' (as _rank_auc reads scores, as resampled)."""
        rows = [[_rank_auc(s[idx], n_pos), f[idx[:n_pos]].mean(), (~f[idx[n_pos:]]).mean()]
                for s, f in zip(scores, flagged)]  # fmt: skip
        return np.subtract(rows[1], rows[0])

    rng = np.random.default_rng(seed)
    draws = np.array(
        [diff(np.concatenate([rng.choice(pos, len(pos)), rng.choice(neg, len(neg))])) for _ in range(n_resamples)]
    )
    point = diff(np.concatenate([pos, neg]))
    lo, hi = np.percentile(draws, [100 * alpha / 2, 100 * (1 - alpha / 2)], axis=0)
    return {k: {"value": float(point[i]), "ci95": [float(lo[i]), float(hi[i])]} for i, k in enumerate(PAIRED)}


def _gap_midpoint(thr: np.ndarray, i: int) -> float:
    """Middle of the gap below distinct score thr[i] (roc_curve lists scores in decreasing order)."""
    return float(thr[i]) if i + 1 >= len(thr) else float((thr[i] + thr[i + 1]) / 2)


class PolicyError(LesionlabError):
    """A threshold policy that is misspelt, out of range, or cannot be met on this validation set."""


POLICY_HELP = "use fixed:0.5, youden, sensitivity:0.95 or sensitivity-lcb:0.95"


def check_policy(policy: str) -> str:
    """Raises PolicyError for a policy ``choose_threshold`` would not accept, before any work is done."""
    kind, sep, arg = policy.partition(":")
    if kind == "youden" and not sep:
        return policy
    if kind not in ("fixed", "sensitivity", "sensitivity-lcb"):
        raise PolicyError(f"unknown threshold policy '{policy}'; {POLICY_HELP}")
    try:
        value = float(arg)
    except ValueError:
        raise PolicyError(f"threshold policy '{policy}' needs a number after '{kind}:'; {POLICY_HELP}") from None
    # A fixed threshold of 0 or 1 labels every image the same; a sensitivity of 1 is reachable, its bound is not.
    ok = 0 < value <= 1 if kind == "sensitivity" else 0 < value < 1
    if not ok:
        interval = "(0, 1]" if kind == "sensitivity" else "(0, 1)"
        raise PolicyError(f"threshold policy '{policy}': the value must lie in {interval}; {POLICY_HELP}")
    return policy


def choose_threshold(y: np.ndarray, prob: np.ndarray, policy: str = DEFAULT_POLICY) -> float:
    """``fixed:T`` | ``youden`` | ``sensitivity:S`` (the highest threshold whose sensitivity is >= S) |
    ``sensitivity-lcb:S`` (the highest threshold at which the one-sided 95% Clopper-Pearson lower bound of the
    sensitivity is >= S: a point estimate of exactly S on validation leaves about even odds of falling below S
    on new images; the bound buys a margin that shrinks as validation holds more positives).

    Every threshold between the chosen score and the next lower validation score gives the same validation
    counts; the midpoint of that gap is returned, not its edge, so that a new image scoring just below
    the last validation positive kept is not lost to a threshold sitting exactly on that positive.
    """
    check_policy(policy)
    kind, _, arg = policy.partition(":")
    if kind == "fixed":
        return float(arg)
    n_pos = int(np.sum(np.asarray(y) == 1))
    if n_pos == 0 or n_pos == len(y):
        raise PolicyError(
            f"policy '{policy}' needs validation images of both classes, got {n_pos} positive of "
            f"{len(y)}; use fixed:0.5 or a larger validation split"
        )
    from sklearn.metrics import roc_curve

    fpr, tpr, thr = roc_curve(y, prob, drop_intermediate=False)
    thr = np.clip(thr, 0.0, 1.0)  # sklearn puts +inf first
    if kind == "youden":
        return _gap_midpoint(thr, int(np.argmax(tpr - fpr)))
    if kind == "sensitivity":
        ok = np.flatnonzero(tpr >= float(arg))
        return _gap_midpoint(thr, int(ok[0]))
    if kind == "sensitivity-lcb":
        target = float(arg)
        ok = np.flatnonzero(sensitivity_lower_bound(np.round(tpr * n_pos), n_pos) >= target)
        if not len(ok):
            raise PolicyError(
                f"with {n_pos} validation positives no threshold gives a 95% lower bound of the "
                f"sensitivity >= {target}; use sensitivity:{target} or a larger validation set"
            )
        return _gap_midpoint(thr, int(ok[0]))
    raise AssertionError(policy)  # check_policy admits nothing else


def sensitivity_lower_bound(hits: np.ndarray, n: int, confidence: float = 0.95) -> np.ndarray:
    """One-sided Clopper-Pearson lower bound of hits / n (exact binomial; 0 where hits is 0)."""
    from scipy.stats import beta

    hits = np.asarray(hits, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        lower = beta.ppf(1 - confidence, hits, n - hits + 1)
    return np.where(hits > 0, np.nan_to_num(lower), 0.0)


# ------------------------------------------------------------------ calibration


def fit_temperature(y: np.ndarray, logits: np.ndarray) -> float:
    """Temperature T minimising validation log-loss of sigmoid(logit / T); T > 1 softens over-confidence."""
    from scipy.optimize import minimize_scalar
    from scipy.special import expit

    y = np.asarray(y, dtype=np.float64)
    z = np.asarray(logits, dtype=np.float64)

    def nll(log_t: float) -> float:
        p = np.clip(expit(z / np.exp(log_t)), 1e-12, 1 - 1e-12)
        return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))

    res = minimize_scalar(nll, bounds=(np.log(0.05), np.log(20.0)), method="bounded")
    return float(np.exp(res.x))


def expected_calibration_error(y: np.ndarray, prob: np.ndarray, n_bins: int = 15) -> float:
    """ECE with equal-width bins on P(malignant): sum over bins of |freq - mean prob| weighted by bin size."""
    y = np.asarray(y, dtype=np.float64)
    prob = np.asarray(prob, dtype=np.float64)
    bins = np.minimum((prob * n_bins).astype(int), n_bins - 1)
    ece = 0.0
    for b in range(n_bins):
        m = bins == b
        if m.any():
            ece += m.mean() * abs(y[m].mean() - prob[m].mean())
    return float(ece)


def brier(y: np.ndarray, prob: np.ndarray) -> float:
    return float(np.mean((np.asarray(prob) - np.asarray(y)) ** 2))


def reliability_bins(y: np.ndarray, prob: np.ndarray, n_bins: int = 15) -> list[dict]:
    bins = np.minimum((np.asarray(prob) * n_bins).astype(int), n_bins - 1)
    out = []
    for b in range(n_bins):
        m = bins == b
        if m.any():
            out.append(
                {
                    "bin": b,
                    "n": int(m.sum()),
                    "mean_prob": float(prob[m].mean()),
                    "freq": float(np.asarray(y)[m].mean()),
                }
            )
    return out
