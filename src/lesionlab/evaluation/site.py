"""Site calibration on arrays: a model's temperature and threshold re-fitted on a clinic's own labelled sample,
and what a sample of that size can say about sensitivity.

A model's operating point is fitted on its validation split; on another clinic's camera and population the same
threshold can give a quite different sensitivity and specificity (docs/results.md, external evaluation). The
network stays; ``fit_site`` refits the temperature (log-loss on the sample's raw logits) and the threshold (any
policy of ``metrics.choose_threshold``) on the site's sample. ``sample_report`` says what the sample supports:
a one-sided 95% Clopper-Pearson lower bound of the sensitivity needs enough malignant images
(``sensitivity-lcb:0.95`` needs at least 59, all caught), so a sample too small for its policy is refused by
``check_sample`` with the number needed and the policies it does support.

Plain arrays in, plain numbers out: ``evaluation.calibrate`` (a model folder) and bench/site_calibration.py
(cached logits, many draws) share one definition of the fit.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy.special import expit

from lesionlab.errors import LesionlabError
from lesionlab.evaluation.external import proportion
from lesionlab.evaluation.metrics import (
    brier,
    check_policy,
    choose_threshold,
    expected_calibration_error,
    fit_temperature,
    sensitivity_lower_bound,
)

#: the confidence of ``sensitivity-lcb``'s one-sided bound (metrics.sensitivity_lower_bound's default)
CONFIDENCE = 0.95
SECTION = "## Site calibration"


class SiteError(LesionlabError):
    """A site sample that cannot calibrate a model: empty, one class only, or too small for its policy."""


@dataclass(frozen=True)
class SiteFit:
    """The operating point fitted on a site sample, and the sample's size."""

    policy: str
    temperature: float
    threshold: float
    n: int
    n_malignant: int

    @property
    def n_benign(self) -> int:
        return self.n - self.n_malignant

    def probabilities(self, logits: np.ndarray) -> np.ndarray:
        return expit(np.asarray(logits, np.float64) / self.temperature)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "n_benign": self.n_benign}


def min_positives(target: float, confidence: float = CONFIDENCE) -> int:
    """The fewest malignant images whose one-sided Clopper-Pearson lower bound reaches ``target`` with none missed:
    the bound of P hits in P is (1 - confidence) ** (1 / P), so P >= log(1 - confidence) / log(target)."""
    p = max(1, math.ceil(math.log(1 - confidence) / math.log(target)))
    while (1 - confidence) ** (1 / p) < target:  # guard the float ceiling on both sides
        p += 1
    while p > 1 and (1 - confidence) ** (1 / (p - 1)) >= target:
        p -= 1
    return p


def best_bound(n_malignant: int, confidence: float = CONFIDENCE) -> float:
    """The highest sensitivity that ``n_malignant`` malignant images can certify (one-sided lower bound at
    ``confidence``), reached only when none of them is missed; 0 without malignant images."""
    return (1 - confidence) ** (1 / n_malignant) if n_malignant else 0.0


def _lcb_target(policy: str) -> float | None:
    kind, _, arg = policy.partition(":")
    return float(arg) if kind == "sensitivity-lcb" else None


def check_sample(y: np.ndarray, policy: str, name: str = "the site sample") -> None:
    """SiteError unless the sample has both classes and, for ``sensitivity-lcb:X``, enough malignant images for
    the bound to reach X at all; the message says how many are needed and which policies the sample supports."""
    check_policy(policy)
    y = np.asarray(y).astype(int)
    n_pos = int(y.sum())
    if not len(y):
        raise SiteError(f"{name} holds no images")
    if n_pos == 0 or n_pos == len(y):
        raise SiteError(
            f"{name} needs benign and malignant images to calibrate on; it has {n_pos} malignant of {len(y)}"
        )
    target = _lcb_target(policy)
    if target is None:
        return
    need = min_positives(target)
    if n_pos < need:
        best = math.floor(best_bound(n_pos) * 100) / 100
        lower = f", or a lower target: with {n_pos} the highest is sensitivity-lcb:{best:.2f}" if best > 0 else ""
        raise SiteError(
            f"{policy} needs at least {need} malignant images in {name} (a {CONFIDENCE:.0%} lower bound of {target} "
            f"is reached only with {need} malignant images and none missed); it has {n_pos}. Label "
            f"{need - n_pos} more malignant images, use sensitivity:{target} (the sample's point estimate, no "
            f"margin){lower}"
        )


def fit_site(y: np.ndarray, logits: np.ndarray, policy: str, name: str = "the site sample") -> SiteFit:
    """Temperature (log-loss on the sample's raw logits), then the policy's threshold on the calibrated
    probabilities. SiteError (``check_sample``) for a sample that cannot support the policy."""
    y = np.asarray(y).astype(int)
    z = np.asarray(logits, np.float64)
    check_sample(y, policy, name)
    temperature = fit_temperature(y, z)
    threshold = choose_threshold(y, expit(z / temperature), policy)
    return SiteFit(policy, float(temperature), float(threshold), len(y), int(y.sum()))


def rates(y: np.ndarray, prob: np.ndarray, threshold: float) -> dict[str, Any]:
    """Sensitivity and specificity at ``threshold`` as ``{count, n, value, ci95}`` (two-sided Clopper-Pearson), the
    one-sided 95% lower bound of the sensitivity, and ``[[tn, fp], [fn, tp]]``."""
    y = np.asarray(y).astype(int)
    pred = np.asarray(prob) >= threshold
    tp, fn = int((pred & (y == 1)).sum()), int((~pred & (y == 1)).sum())
    tn, fp = int((~pred & (y == 0)).sum()), int((pred & (y == 0)).sum())
    n_pos = tp + fn
    return {
        "threshold": float(threshold),
        "sensitivity": proportion(tp, n_pos),
        "specificity": proportion(tn, tn + fp),
        "sensitivity_lower_bound": float(sensitivity_lower_bound(np.array([tp]), n_pos, CONFIDENCE)[0]),
        "confusion": [[tn, fp], [fn, tp]],
    }


def sample_report(
    y: np.ndarray, logits: np.ndarray, fit: SiteFit, before_temperature: float, before_threshold: float
) -> dict[str, Any]:
    """What the sample says, in sample: the fitted operating point's and the model's own (``before_*``) rates,
    calibration before and after, and what a sample of this size can certify about sensitivity."""
    y = np.asarray(y).astype(int)
    z = np.asarray(logits, np.float64)
    before, after = expit(z / before_temperature), fit.probabilities(z)
    target = _lcb_target(fit.policy)
    kind, _, arg = fit.policy.partition(":")
    wanted = target if target is not None else float(arg) if kind == "sensitivity" else None
    out: dict[str, Any] = {
        "fit": fit.to_dict(),
        "at_site_threshold": rates(y, after, fit.threshold),
        "at_model_threshold": {**rates(y, before, before_threshold), "temperature": float(before_temperature)},
        "calibration": {
            "ece_before": expected_calibration_error(y, before),
            "ece_after": expected_calibration_error(y, after),
            "brier_before": brier(y, before),
            "brier_after": brier(y, after),
        },
        "achievable": {
            "confidence": CONFIDENCE,
            "best_sensitivity_bound": best_bound(fit.n_malignant),
            "note": f"the highest sensitivity {fit.n_malignant} malignant images can certify ({CONFIDENCE:.0%} "
            "one-sided Clopper-Pearson lower bound), reached only with none missed",
        },
        "warnings": [],
    }
    if wanted is not None:
        need = min_positives(wanted)
        out["achievable"].update(target=wanted, malignant_needed_for_bound=need)
        if target is None and fit.n_malignant < need:
            out["warnings"].append(
                f"{fit.policy} is met on the sample itself, but {fit.n_malignant} malignant images cannot certify "
                f"it: at best the {CONFIDENCE:.0%} lower bound is {best_bound(fit.n_malignant):.3f}; "
                f"sensitivity-lcb:{wanted} would need {need}. Expect new images' sensitivity to fall below "
                f"{wanted} about as often as above"
            )
    return out


# ------------------------------------------------------------------ markdown


def _rate(r: Mapping[str, Any]) -> str:
    lo, hi = r["ci95"]
    return f"{r['count']}/{r['n']} = {r['value']:.3f} [{lo:.3f}, {hi:.3f}]"


def report_section(record: Mapping[str, Any]) -> str:
    """The ``## Site calibration`` section of report.md (and of a model card) for site_calibration.json's content."""
    rep, src = record["sample_report"], record["source"]
    fit, a, b = rep["fit"], rep["at_site_threshold"], rep["at_model_threshold"]
    cal, ach = rep["calibration"], rep["achievable"]
    lines = [
        SECTION,
        "",
        f"This folder is `{src['path']}` with its operating point re-fitted on a site sample: "
        f"**{record['site']['name']}** (`{record['site']['spec']}`), {fit['n']} images ({fit['n_malignant']} "
        f"malignant, {fit['n_benign']} benign; file list sha256 `{record['site']['file_list_sha256'][:16]}`), "
        f"scored {'with' if record['tta'] else 'without'} TTA. Policy `{fit['policy']}`: temperature "
        f"{fit['temperature']:.4f}, threshold {fit['threshold']:.4f} (the source's: {src['temperature']:.4f}, "
        f"{src['threshold']:.4f}, `{src['policy']}`). Sections above this one, if any, are the source's evaluation "
        "at its own operating point; this folder predicts at the site's.",
        "",
        "On the site sample itself (in sample: the numbers the fit was made on, not a measurement on new images; "
        "95% Clopper-Pearson CIs):",
        "",
        "| | site operating point | source operating point |",
        "|---|---|---|",
        f"| threshold | {a['threshold']:.4f} | {b['threshold']:.4f} |",
        f"| sensitivity | {_rate(a['sensitivity'])} | {_rate(b['sensitivity'])} |",
        f"| sensitivity, 95% lower bound | {a['sensitivity_lower_bound']:.3f} | {b['sensitivity_lower_bound']:.3f} |",
        f"| specificity | {_rate(a['specificity'])} | {_rate(b['specificity'])} |",
        f"| confusion [[tn, fp], [fn, tp]] | {a['confusion']} | {b['confusion']} |",
        f"| ECE / Brier | {cal['ece_after']:.3f} / {cal['brier_after']:.3f} | "
        f"{cal['ece_before']:.3f} / {cal['brier_before']:.3f} |",
        "",
        f"What this sample can certify: with {fit['n_malignant']} malignant images the highest sensitivity it can "
        f"show at {ach['confidence']:.0%} confidence is {ach['best_sensitivity_bound']:.3f} (none missed)"
        + (
            f"; a bound of {ach['target']} needs {ach['malignant_needed_for_bound']} malignant images."
            if "target" in ach
            else "."
        ),
        "",
    ]
    lines += [f"**Warning:** {w}." for w in rep["warnings"]] + ([""] if rep["warnings"] else [])
    return "\n".join(lines)


def with_section(text: str, section: str) -> str:
    """``text`` with its ``## Site calibration`` section (up to the next level-2 heading) replaced by ``section``,
    or ``section`` appended; calibrating a calibrated folder again leaves one section."""
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.strip() == SECTION), None)
    if start is not None:
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        lines = lines[:start] + lines[end:]
    head = "\n".join(lines).rstrip("\n")
    return (head + "\n\n" if head else "") + section.rstrip("\n") + "\n"
