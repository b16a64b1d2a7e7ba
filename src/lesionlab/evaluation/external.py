"""External evaluation: a finished run scored on datasets it never saw (other clinics, other cameras).

Nothing is fitted here: the run's temperature and operating threshold (chosen on its own validation split) are
applied as they are, so the numbers say how the model travels. Per set the block holds AUC, sensitivity and
specificity at the run's threshold and at 0.5, ECE, each with a 95% stratified-bootstrap CI; the refusal rate;
and breakdowns by source and by diagnosis (which benign diagnoses get flagged, which malignant ones are missed);
for a diagnosis model, balanced multi-class accuracy and recall per diagnosis, under the decision rule the run chose
on validation (``evaluation.diagnosis``).

Metrics cover every scored image, a refused one at its probability: a refusal is a separate answer that a
deployment may or may not honour, and leaving the refused out would make a model look better by refusing its
hard cases. The refused are counted apart (``n_refused``, ``refusal_rate`` and per breakdown row).

``evaluate_external`` writes the blocks into metrics.json under ``"external": {NAME: block}`` and an
``## External evaluation`` section into report.md, replacing earlier results of the same set.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from scipy.stats import beta

from lesionlab.data.images import BadImageError, open_sample, opened_batches
from lesionlab.data.sample import Sample
from lesionlab.errors import LesionlabError
from lesionlab.evaluation.diagnosis import block_lines, diagnosis_metrics
from lesionlab.evaluation.metrics import expected_calibration_error, metrics_with_ci
from lesionlab.evaluation.per_image import write_external_predictions
from lesionlab.evaluation.report import DISCLAIMER, cell, fmt
from lesionlab.runs import REPORT, RunFolder

if TYPE_CHECKING:
    from lesionlab.inference.predictor import Predictor

SECTION = "## External evaluation"
NONE = "(none)"
ECE_BINS = 15


class ExternalError(LesionlabError):
    """An external set that cannot be evaluated: empty, an unreadable image, or a run folder we must not write."""


@dataclass
class ExternalScores:
    """One set scored by one predictor, aligned by index. ``probabilities`` are calibrated P(malignant)
    (the run's temperature), ``refused`` the lesion detector's verdicts (all False without a detector);
    ``skipped`` lists ``(relpath, reason)`` of images left out under ``skip_bad``."""

    relpaths: list[str]
    probabilities: np.ndarray
    labels: np.ndarray
    diagnoses: list[str]
    sources: list[str]
    refused: np.ndarray
    tta: bool = False
    skipped: list[tuple[str, str]] = field(default_factory=list)
    diagnosis_probs: np.ndarray | None = None  # a diagnosis model's calibrated (N, K), in ``diagnosis_names`` order
    diagnosis_names: tuple[str, ...] = ()


def score_external(
    predictor: Predictor,
    samples: Sequence[Sample],
    tta: bool | None = None,
    batch_size: int = 32,
    progress: bool = True,
    skip_bad: bool = False,
) -> ExternalScores:
    """Scores ``samples`` with ``predictor.analyze`` in batches of ``batch_size`` decoded images (only one batch
    of images is held in memory). ``tta`` None: as the run's operating point was fitted.

    An unreadable image raises ExternalError naming it, unless ``skip_bad``: then it is left out and listed in
    ``skipped``. Raises ExternalError for an empty set or one where no image could be read."""
    if not samples:
        raise ExternalError("the external set holds no images")
    kept: list[Sample] = []
    probs: list[float] = []
    refused: list[bool] = []
    skipped: list[tuple[str, str]] = []
    names, diag = predictor.info.diagnoses, []
    for batch in opened_batches(samples, open_sample, batch_size, "external", progress):
        opened = []
        for s, x in batch:
            if not isinstance(x, BadImageError):
                opened.append((s, x))
            elif skip_bad:
                skipped.append((s.relpath, x.reason))
            else:
                raise ExternalError(
                    f"external image {s.relpath} ({s.path}) cannot be read: {x.reason}; "
                    "fix or remove it, or skip unreadable images (skip_bad)"
                )
        for (s, _), p in zip(opened, predictor.analyze([x for _, x in opened], tta=tta) if opened else []):
            kept.append(s)
            probs.append(p.probability)
            refused.append(bool(p.refused))
            diag += [[p.diagnoses[n] for n in names]] if p.diagnoses else []
    if not kept:
        raise ExternalError(f"none of the {len(samples)} external images could be read (e.g. {skipped[0][0]})")
    return ExternalScores(
        relpaths=[s.relpath for s in kept],
        probabilities=np.asarray(probs, np.float64),
        labels=np.asarray([s.label for s in kept], np.int64),
        diagnoses=[s.diagnosis or NONE for s in kept],
        sources=[s.source or NONE for s in kept],
        refused=np.asarray(refused, bool),
        tta=predictor.use_tta(tta),
        skipped=skipped,
        diagnosis_probs=np.asarray(diag) if names and len(diag) == len(kept) else None,
        diagnosis_names=names,
    )


# ------------------------------------------------------------------ metrics


def proportion(count: int, n: int, confidence: float = 0.95) -> dict[str, Any]:
    """``{"count", "n", "value", "ci95"}``: count / n with its two-sided Clopper-Pearson (exact binomial) interval,
    which always contains the point value and stays inside [0, 1] even at 0 or n hits. ``value`` is NaN for n=0."""
    if n == 0:
        return {"count": 0, "n": 0, "value": float("nan"), "ci95": [float("nan"), float("nan")]}
    a = (1 - confidence) / 2
    lo = 0.0 if count == 0 else float(beta.ppf(a, count, n - count + 1))
    hi = 1.0 if count == n else float(beta.ppf(1 - a, count + 1, n - count))
    return {"count": int(count), "n": int(n), "value": count / n, "ci95": [lo, hi]}


def _ece_block(y: np.ndarray, p: np.ndarray, n_resamples: int, seed: int) -> dict[str, Any]:
    """ECE with a percentile CI from the same stratified bootstrap as ``bootstrap_ci`` (class counts kept)."""
    rng = np.random.default_rng(seed)
    pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    draws = []
    for _ in range(n_resamples):
        idx = np.concatenate([rng.choice(c, len(c)) if len(c) else c for c in (pos, neg)])
        draws.append(expected_calibration_error(y[idx], p[idx], ECE_BINS))
    value = expected_calibration_error(y, p, ECE_BINS)
    ci = [float(np.percentile(draws, 2.5)), float(np.percentile(draws, 97.5))] if draws else [value, value]
    return {"value": value, "ci95": ci, "bins": ECE_BINS}


def _at(y: np.ndarray, p: np.ndarray, threshold: float, n_resamples: int, seed: int) -> dict[str, Any]:
    """metrics_with_ci's block when both classes are present. A single-class set has no AUC, and of sensitivity
    and specificity only the one of its class: the block then holds ``auc: None``, the defined rate (and
    accuracy, equal to it) with an exact binomial CI, ``confusion`` and a ``note`` saying what is undefined."""
    n_pos = int(y.sum())
    if 0 < n_pos < len(y):
        block = metrics_with_ci(y, p, threshold, n_resamples, seed)
        block["sensitivity"] = block["recall"]  # the screening name, beside metrics.py's
        return block
    pred = p >= threshold
    if n_pos:
        rate, present, absent = proportion(int(pred.sum()), len(y)), "malignant", "specificity"
        key = "sensitivity"
    else:
        rate, present, absent = proportion(int((~pred).sum()), len(y)), "benign", "sensitivity"
        key = "specificity"
    rate = {"value": rate["value"], "ci95": rate["ci95"]}
    tn, fp = int(((y == 0) & ~pred).sum()), int(((y == 0) & pred).sum())
    fn, tp = int(((y == 1) & ~pred).sum()), int(((y == 1) & pred).sum())
    out: dict[str, Any] = {key: rate, "accuracy": dict(rate), "auc": None}
    if key == "sensitivity":
        out["recall"] = dict(rate)
    out.update(confusion=[[tn, fp], [fn, tp]], threshold=float(threshold), n=len(y))
    out["note"] = f"single-class set (only {present} images): AUC and {absent} are undefined"
    return out


def _summary(
    y: np.ndarray, p: np.ndarray, refused: np.ndarray, threshold: float, n_resamples: int, seed: int
) -> dict[str, Any]:
    n_refused = int(refused.sum())
    out: dict[str, Any] = {
        "n": len(y),
        "n_malignant": int(y.sum()),
        "n_benign": int(len(y) - y.sum()),
        "n_refused": n_refused,
        "refused_malignant": int((refused & (y == 1)).sum()),
        "refusal_rate": {k: v for k, v in proportion(n_refused, len(y)).items() if k in ("value", "ci95")},
        "at_threshold": _at(y, p, threshold, n_resamples, seed),
        "at_0.5": _at(y, p, 0.5, n_resamples, seed),
        "ece": _ece_block(y, p, n_resamples, seed),
    }
    if not 0 < out["n_malignant"] < len(y):
        out["note"] = out["at_threshold"]["note"]
    return out


def _diagnosis_row(y: np.ndarray, p: np.ndarray, refused: np.ndarray, threshold: float) -> dict[str, Any]:
    """Counts of one diagnosis: ``flagged`` among its benign images (P >= threshold), ``missed`` among its
    malignant ones (P < threshold), at the run's threshold and at 0.5; rates with Clopper-Pearson CIs. A
    diagnosis is normally one class; one holding both (an unmapped code) gets both counts."""
    row: dict[str, Any] = {
        "n": len(y),
        "n_malignant": int(y.sum()),
        "n_benign": int(len(y) - y.sum()),
        "n_refused": int(refused.sum()),
        "class": "malignant" if y.all() else "benign" if not y.any() else "mixed",
        "mean_probability": float(p.mean()),
    }
    for key, t in (("at_threshold", threshold), ("at_0.5", 0.5)):
        counts: dict[str, Any] = {}
        if row["n_benign"]:
            counts["flagged"] = proportion(int((p[y == 0] >= t).sum()), row["n_benign"])
        if row["n_malignant"]:
            counts["missed"] = proportion(int((p[y == 1] < t).sum()), row["n_malignant"])
        row[key] = counts
    return row


def external_metrics(
    scores: ExternalScores,
    threshold: float,
    n_resamples: int = 1000,
    seed: int = 0,
    decision: Mapping[str, Any] | None = None,
) -> dict:
    """The metrics.json block of one external set. Keys: ``n``, ``n_malignant``, ``n_benign``, ``n_refused``,
    ``refused_malignant``, ``refusal_rate``, ``threshold``, ``at_threshold`` and ``at_0.5`` (metrics_with_ci's
    shape, plus ``sensitivity`` = recall; for a single-class set see ``_at``: AUC None and a ``note``), ``ece``,
    ``by_source`` (the same summary per source), ``by_diagnosis`` (per diagnosis: counts, flagged / missed
    with CIs), ``tta`` and ``skipped``. Every rate is ``{"value", "ci95"}``; ``note`` appears only when the set
    is single-class."""
    y, p, refused = scores.labels.astype(int), scores.probabilities, scores.refused.astype(bool)
    block = _summary(y, p, refused, threshold, n_resamples, seed)
    block["threshold"] = float(threshold)
    block["tta"] = scores.tta
    sources = np.asarray(scores.sources)
    by_source = {}
    for src in sorted(set(scores.sources)):
        m = sources == src
        # one source: its row is the whole set; do not pay for the bootstrap twice
        by_source[src] = (
            {k: block[k] for k in block if k not in ("threshold", "tta")}
            if m.all()
            else _summary(y[m], p[m], refused[m], threshold, n_resamples, seed)
        )
    block["by_source"] = by_source
    diagnoses = np.asarray(scores.diagnoses)
    rows = {
        d: _diagnosis_row(y[diagnoses == d], p[diagnoses == d], refused[diagnoses == d], threshold)
        for d in set(scores.diagnoses)
    }
    # malignant diagnoses first, then by size: the rows a reader looks for first
    order = sorted(rows, key=lambda d: (-rows[d]["n_malignant"] / rows[d]["n"], -rows[d]["n"], d))
    block["by_diagnosis"] = {d: rows[d] for d in order}
    block["skipped"] = [{"relpath": r, "reason": why} for r, why in scores.skipped]
    if scores.diagnosis_probs is not None:  # a diagnosis model: balanced multi-class accuracy (ISIC 2018 Task 3)
        truth = [None if d == NONE else d for d in scores.diagnoses]
        diag = diagnosis_metrics(truth, scores.diagnosis_probs, scores.diagnosis_names, n_resamples, seed, decision)
        block.update({"diagnosis": diag} if diag else {})
    block["n_resamples"], block["seed"] = int(n_resamples), int(seed)
    return block


# ------------------------------------------------------------------ markdown


def _rate_cell(r: Mapping[str, Any] | None) -> str:
    return "" if r is None else f"{r['count']}/{r['n']} = {fmt(r)}"


def report_section(name: str, block: Mapping[str, Any]) -> str:
    """Markdown for one external set: a ``### name`` heading, the metric table (value [95% CI]), the table by
    source when there are several, and the table by diagnosis."""
    thr = block["threshold"]
    at_t, at_h = block["at_threshold"], block["at_0.5"]
    lines = [
        f"### {name}",
        "",
        f"n = {block['n']} ({block['n_malignant']} malignant, {block['n_benign']} benign); "
        f"{block['n_refused']} refused as non-lesions ({block['refused_malignant']} of them malignant), "
        f"counted in every metric at their probability; TTA {'on' if block.get('tta') else 'off'}.",
        "",
    ]
    if block.get("note"):
        lines += [f"**Note:** {block['note']}.", ""]
    if block.get("skipped"):
        lines += [f"{len(block['skipped'])} unreadable images were left out.", ""]
    lines += [
        f"| metric | at the run's threshold {thr:.4f} | at 0.5 |",
        "|---|---|---|",
        f"| AUC | {cell(at_t.get('auc'))} | |",
        f"| sensitivity | {cell(at_t.get('sensitivity'))} | {cell(at_h.get('sensitivity'))} |",
        f"| specificity | {cell(at_t.get('specificity'))} | {cell(at_h.get('specificity'))} |",
        f"| confusion [[tn, fp], [fn, tp]] | {at_t['confusion']} | {at_h['confusion']} |",
        f"| ECE ({block['ece'].get('bins', ECE_BINS)} bins) | {cell(block['ece'])} | |",
        f"| refusal rate | {cell(block['refusal_rate'])} ({block['n_refused']}/{block['n']}) | |",
        "",
    ]
    if len(block.get("by_source", {})) > 1:
        lines += [
            f"By source (threshold {thr:.4f}):",
            "",
            "| source | n | malignant | refused | AUC | sensitivity | specificity |",
            "|---|---|---|---|---|---|---|",
        ]
        for src, b in block["by_source"].items():
            a = b["at_threshold"]
            lines.append(
                f"| {src} | {b['n']} | {b['n_malignant']} | {b['n_refused']} | {cell(a.get('auc'))} | "
                f"{cell(a.get('sensitivity'))} | {cell(a.get('specificity'))} |"
            )
        lines.append("")
    lines += [
        "By diagnosis: benign images flagged malignant, malignant images missed (95% Clopper-Pearson CIs):",
        "",
        f"| diagnosis | class | n | refused | error | at {thr:.4f} | at 0.5 |",
        "|---|---|---|---|---|---|---|",
    ]
    for d, r in block["by_diagnosis"].items():
        for kind in ("flagged", "missed"):  # a diagnosis of one class has one of the two; a mixed one both
            if kind in r["at_threshold"]:
                lines.append(
                    f"| {d} | {r['class']} | {r['n']} | {r['n_refused']} | {kind} | "
                    f"{_rate_cell(r['at_threshold'][kind])} | {_rate_cell(r['at_0.5'][kind])} |"
                )
    if block.get("diagnosis"):
        lines += ["", *block_lines(block["diagnosis"])]
    return "\n".join(lines) + "\n"


def external_report(external: Mapping[str, Mapping[str, Any]]) -> str:
    """The whole ``## External evaluation`` section: every set of metrics.json's ``external``, in name order."""
    lines = [
        SECTION,
        "",
        "Datasets the run never saw, scored with its own temperature and operating threshold (nothing fitted on "
        "them). 95% CIs: stratified bootstrap for AUC, sensitivity, specificity and ECE; exact binomial for rates.",
        "",
    ]
    return "\n".join(lines) + "\n".join(report_section(k, external[k]) for k in sorted(external))


def replace_section(report: str, section: str) -> str:
    """``report`` with its ``## External evaluation`` section (up to the next level-2 heading) replaced by
    ``section``, or ``section`` appended when there is none; running twice gives one section."""
    lines = report.splitlines()
    start = next((i for i, line in enumerate(lines) if line.strip() == SECTION), None)
    if start is None:
        head = report.rstrip("\n")
        return (head + "\n\n" if head else "") + section.rstrip("\n") + "\n"
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    before, after = "\n".join(lines[:start]).rstrip("\n"), "\n".join(lines[end:])
    out = (before + "\n\n" if before else "") + section.rstrip("\n") + "\n"
    return out + ("\n" + after.rstrip("\n") + "\n" if after else "")


# ------------------------------------------------------------------ a run folder


def evaluate_external(
    run_dir: str | Path,
    sets: Mapping[str, Sequence[Sample]],
    tta: bool | None = None,
    n_resamples: int = 1000,
    seed: int = 0,
    batch_size: int = 32,
    progress: bool = True,
    skip_bad: bool = False,
    backend: str = "auto",
) -> dict[str, dict]:
    """Scores each named set with the run's predictor (loaded once; an ensemble folder works the same way) at its
    operating threshold, writes its per-image scores to external_predictions.csv (``evaluation.per_image``), sets
    metrics.json["external"][name] (other keys and other sets kept) and rewrites
    report.md's ``## External evaluation`` section from all of metrics.json's external sets. Returns the new
    blocks by name. Raises ExternalError for no sets or the bundled model's package folder (copy it first),
    RunError for a folder without an operating point."""
    # imported here: the module's metrics and markdown need no model runtime (the bench and reports import it)
    from lesionlab.inference.loading import DEFAULT_MODEL_DIR, load_predictor

    if not sets:
        raise ExternalError("no external sets given; pass --external NAME=PATH")
    run = RunFolder(run_dir)
    if run.path.resolve() == DEFAULT_MODEL_DIR.resolve():
        raise ExternalError(f"{run.path} is the bundled model inside the package; copy it and evaluate the copy")
    predictor = load_predictor(run.path, backend=backend)
    threshold = float(predictor.info.threshold)
    metrics = run.metrics()
    decision = metrics.get("diagnosis_decision")  # chosen on validation; a run evaluated before: argmax
    blocks, scored = {}, {}
    for name, samples in sets.items():
        scored[name] = score_external(predictor, samples, tta, batch_size, progress, skip_bad)
        blocks[name] = external_metrics(scored[name], threshold, n_resamples, seed, decision)
    write_external_predictions(run.path, scored)
    metrics["external"] = {**metrics.get("external", {}), **blocks}
    run.write_metrics(metrics)
    report = (run / REPORT).read_text() if run.has(REPORT) else f"# lesionlab run {run.path.name}\n\n> {DISCLAIMER}\n"
    run.write_report(replace_section(report, external_report(metrics["external"])))
    return blocks
