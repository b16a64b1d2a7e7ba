"""Evaluation of a run folder: scores -> calibration and operating point (on validation) -> metrics -> figures.

Temperature and threshold are fitted on validation only; test and test_dedup are scored once with them.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from scipy.special import expit

from lesionlab import files
from lesionlab import runs as rf
from lesionlab.data.loading import dataset_from_record
from lesionlab.evaluation import plots
from lesionlab.evaluation.diagnosis import add_diagnosis_metrics, diagnosis_report, training_priors
from lesionlab.evaluation.metrics import (
    DEFAULT_POLICY,
    DEFAULT_RESAMPLES,
    brier,
    check_policy,
    choose_threshold,
    expected_calibration_error,
    fit_temperature,
    metrics_with_ci,
    reliability_bins,
)
from lesionlab.evaluation.report import run_report
from lesionlab.evaluation.scoring import EVAL_SPLITS, SplitScores, score_run
from lesionlab.inference.diagnoses import model_diagnoses
from lesionlab.runs import FIGURES, HISTORY, PREDICTIONS, OperatingPoint, RunFolder


def summarize(
    scores: dict[str, SplitScores], policy: str = DEFAULT_POLICY, n_resamples: int = DEFAULT_RESAMPLES, seed: int = 0
) -> tuple[dict, dict[str, np.ndarray]]:
    """Fits temperature and threshold on validation; returns metrics.json's content and calibrated probabilities."""
    val = scores["val"]
    temperature = fit_temperature(val.y, val.logits)
    probs = {k: expit(s.logits / temperature) for k, s in scores.items()}
    threshold = choose_threshold(val.y, probs["val"], policy)
    metrics: dict = {
        "threshold": {"policy": policy, "value": threshold, "chosen_on": "val"},
        "calibration": {"temperature": temperature, "method": "temperature scaling on validation", "ece_bins": 15},
    }
    for name in scores:  # val, test, test_dedup and, with several sources, each source's test splits
        s, p = scores[name], probs[name]
        raw = expit(s.logits)
        block = metrics_with_ci(s.y, p, 0.5, n_resamples, seed)
        block["at_threshold"] = metrics_with_ci(s.y, p, threshold, n_resamples, seed)
        metrics[name] = block
        metrics["calibration"][name] = {
            "ece_before": expected_calibration_error(s.y, raw),
            "ece_after": expected_calibration_error(s.y, p),
            "brier_before": brier(s.y, raw),
            "brier_after": brier(s.y, p),
        }
    return metrics, probs


def write_predictions(path: Path, scores: dict[str, SplitScores], probs: dict[str, np.ndarray]) -> None:
    buf = io.StringIO()
    buf.write("split,relpath,label,logit,probability\n")
    for name in scores:  # val, test, test_dedup and, with several sources, each source's test splits
        s = scores[name]
        for r, y, z, p in zip(s.relpaths, s.y, s.logits, probs[name]):
            buf.write(f"{name},{r},{int(y)},{z:.6f},{p:.6f}\n")
    files.atomic_write_text(path, buf.getvalue())


def write_figures(
    out: Path, scores: dict[str, SplitScores], probs: dict[str, np.ndarray], metrics: dict, title: str
) -> None:
    fig = out / FIGURES
    plots.roc({k: (scores[k].y, probs[k]) for k in EVAL_SPLITS}, fig / "roc.png", f"ROC: {title}")
    plots.confusion_matrix(metrics["test"]["confusion"], fig / "confusion.png", "test, threshold 0.5")
    thr = metrics["threshold"]["value"]
    plots.confusion_matrix(
        metrics["test"]["at_threshold"]["confusion"], fig / "confusion_operating.png", f"test, threshold {thr:.3f}"
    )
    test = scores["test"]
    plots.reliability(
        reliability_bins(test.y, expit(test.logits)), reliability_bins(test.y, probs["test"]), fig / "reliability.png"
    )


def fitted_metrics(
    scores: dict[str, SplitScores], policy: str, n_resamples: int, seed: int, tta: bool
) -> tuple[dict, dict[str, np.ndarray]]:
    """``summarize`` plus the TTA flag: metrics.json's content (so far) and the calibrated probabilities."""
    check_policy(policy)
    metrics, probs = summarize(scores, policy, n_resamples, seed)
    metrics["tta"] = tta
    return metrics, probs


def operating_point(metrics: dict, model_id: str) -> OperatingPoint:
    """The operating point that ``summarize`` fitted, as calibration.json records it."""
    return OperatingPoint(
        model_id,
        float(metrics["threshold"]["value"]),
        metrics["threshold"]["policy"],
        float(metrics["calibration"]["temperature"]),
        bool(metrics["tta"]),
    )


def write_evaluation(
    run: RunFolder,
    scores: dict[str, SplitScores],
    probs: dict[str, np.ndarray],
    metrics: dict,
    title: str,
    model_id: str,
    report: str,
) -> None:
    """Everything evaluation leaves in a model folder, metrics.json written once; shared by runs and ensembles.
    The operating point goes last: from then on the folder is servable."""
    write_predictions(run / PREDICTIONS, scores, probs)
    write_figures(run.path, scores, probs, metrics, title)
    run.write_metrics(metrics)
    run.write_operating_point(operating_point(metrics, model_id))
    run.write_report(report)


def evaluate_run(
    run_dir: str | Path,
    data: str | Path | None = None,
    policy: str = DEFAULT_POLICY,
    tta: bool = False,
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
    progress: bool = True,
    non_lesion: Sequence[str | Path] = (),
) -> dict:
    """Scores the run, fits its operating point and lesion detector on validation, measures everything on test,
    and writes metrics.json, calibration.json, predictions.csv, figures, the detector and report.md."""
    from lesionlab.refusal.measure import measure_refusal, report_section, summary

    check_policy(policy)
    run = RunFolder(run_dir).require_trained()
    if run.has(rf.SITE_CALIBRATION):  # refitting on validation would silently undo the site's operating point
        raise rf.RunError(
            f"{run.path} was calibrated on a site's images (site_calibration.json): evaluating it again would "
            "replace that operating point with one fitted on validation. Evaluate the source run, or score this "
            "folder on other sets with `evaluate --only-external --external NAME=PATH`"
        )
    config = run.config
    dataset = dataset_from_record(config.data, data, progress)
    scores = score_run(run.path, data, tta, progress, dataset)
    metrics, probs = fitted_metrics(scores, policy, n_resamples, seed, tta)
    diagnoses, malignant = model_diagnoses(run.path)  # a diagnosis head's classes; () for a binary model
    if diagnoses:  # the decision rule is chosen on validation, with the training split's diagnosis shares
        priors = training_priors([s.diagnosis for s in run.dataset_splits(dataset)["train"]], diagnoses)
        add_diagnosis_metrics(metrics, scores, probs, diagnoses, malignant, n_resamples, seed, priors)
    refusal = measure_refusal(run.path, data, progress, refit=True, non_lesion=non_lesion)  # photos to refuse
    metrics["refusal"] = summary(refusal.result)
    if run.has(HISTORY):
        plots.training_curves(run.history(), run / FIGURES / "training_curves.png", config.title)
    assert refusal.detector is not None  # refit=True always fits one
    refusal.detector.save(run.path)
    run.write_refusal(refusal.result, refusal.scores)
    model_id = f"{config.backbone}-{config.mode}-{config.weights['sha256'][:8]}-{run.path.name}"
    report = run_report(config.raw, metrics) + "\n" + report_section(refusal.result)
    if diagnoses:
        report += "\n" + diagnosis_report(metrics, malignant)
    write_evaluation(run, scores, probs, metrics, config.title, model_id, report)
    return metrics
