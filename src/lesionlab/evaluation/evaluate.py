"""Evaluation of a run folder: scores -> calibration and operating point (on validation) -> metrics -> figures.

Temperature and threshold are fitted on validation only; test and test_dedup are scored once with them.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.special import expit

from lesionlab import files
from lesionlab import runs as rf
from lesionlab.data.dataset import Dataset, Sample, load_dataset
from lesionlab.data.images import decode_samples
from lesionlab.evaluation import plots
from lesionlab.evaluation.metrics import (
    DEFAULT_POLICY,
    DEFAULT_RESAMPLES,
    brier,
    choose_threshold,
    expected_calibration_error,
    fit_temperature,
    metrics_with_ci,
    reliability_bins,
)
from lesionlab.evaluation.report import run_report

EVAL_SPLITS = ("val", "test", "test_dedup")


@dataclass
class SplitScores:
    relpaths: list[str]
    y: np.ndarray
    logits: np.ndarray


def run_splits(run_dir: Path, dataset: Dataset) -> dict[str, list[Sample]]:
    """Validation as recorded at training time (splits.csv); test and test_dedup from the data folder."""
    by_rel = {s.relpath: s for s in dataset.train}
    val_rel = []
    with open(run_dir / "splits.csv", newline="") as f:
        val_rel = [r["relpath"] for r in csv.DictReader(f) if r["split"] == "val"]
    missing = [r for r in val_rel if r not in by_rel]
    if missing:
        raise rf.RunError(
            f"{len(missing)} validation files of this run are not in {dataset.root} "
            f"(e.g. {missing[0]}); pass the --data the run was trained on"
        )
    splits = dataset.splits()
    return {"val": [by_rel[r] for r in val_rel], "test": splits["test"], "test_dedup": splits["test_dedup"]}


def _frozen_scores(run_dir: Path, config: dict, dataset: Dataset, splits, progress: bool) -> dict[str, SplitScores]:
    """The head on cached backbone features: identical to a full forward pass, without re-running the backbone."""
    import torch

    from lesionlab.models.backbones import ResolvedWeights
    from lesionlab.models.classifier import load_model
    from lesionlab.training.features import load_or_compute

    model, _ = load_model(run_dir / rf.MODEL)
    w = config["weights"]
    weights = ResolvedWeights(
        config["backbone"],
        w["source"],
        w["pretrained"],
        w["sha256"],
        tuple(w["mean"]),
        tuple(w["std"]),
        int(w["input_size"]),
    )
    table = load_or_compute(dataset, weights, skip_bad=True, progress=progress, backbone=model.backbone)
    out = {}
    for name, samples in splits.items():
        x, y = table.rows(samples)
        with torch.inference_mode():
            logits = model.head(torch.from_numpy(x)).numpy().astype(np.float64)
        index = set(table.relpaths)
        out[name] = SplitScores([s.relpath for s in samples if s.relpath in index], y, logits)
    return out


def _image_scores(predictor, splits, progress: bool, tta: bool) -> dict[str, SplitScores]:
    out = {}
    cache: dict[str, float] = {}
    for name, samples in splits.items():
        todo = [s for s in samples if s.relpath not in cache]
        decoded = decode_samples(todo, predictor.info.input_size, progress)
        if todo:
            for s, z in zip(decoded.samples, predictor.logits_from_uint8(decoded.images, tta)):
                cache[s.relpath] = float(z)
        kept = [s for s in samples if s.relpath in cache]
        out[name] = SplitScores(
            [s.relpath for s in kept],
            np.array([s.label for s in kept], np.float32),
            np.array([cache[s.relpath] for s in kept]),
        )
    return out


def score_run(
    run_dir: str | Path, data: str | Path | None = None, tta: bool = False, progress: bool = True
) -> dict[str, SplitScores]:
    """Uncalibrated logits of one run on val, test and test_dedup."""
    from lesionlab.inference.predictor import TorchPredictor

    run_dir = rf.require_run(run_dir)
    config = files.read_json(run_dir / rf.CONFIG)
    dataset = load_dataset(data or config["data"]["root"], tuple(config["data"]["classes"]))
    splits = run_splits(run_dir, dataset)
    if config["mode"] == "frozen" and not tta:
        return _frozen_scores(run_dir, config, dataset, splits, progress)
    return _image_scores(TorchPredictor(run_dir), splits, progress, tta)


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
    for name in EVAL_SPLITS:
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
    for name in EVAL_SPLITS:
        s = scores[name]
        for r, y, z, p in zip(s.relpaths, s.y, s.logits, probs[name]):
            buf.write(f"{name},{r},{int(y)},{z:.6f},{p:.6f}\n")
    files.atomic_write_text(path, buf.getvalue())


def write_figures(
    out: Path, scores: dict[str, SplitScores], probs: dict[str, np.ndarray], metrics: dict, title: str
) -> None:
    fig = out / rf.FIGURES
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


def write_evaluation(
    out: Path,
    scores: dict[str, SplitScores],
    policy: str,
    n_resamples: int,
    seed: int,
    title: str,
    model_id: str,
    tta: bool,
) -> dict:
    """Everything evaluation leaves in a model folder; shared by single runs and ensembles."""
    metrics, probs = summarize(scores, policy, n_resamples, seed)
    metrics["tta"] = tta
    files.atomic_write_json(out / rf.METRICS, metrics)
    operating_point = {
        "model_id": model_id,
        "temperature": metrics["calibration"]["temperature"],
        "threshold": metrics["threshold"]["value"],
        "policy": policy,
        "tta": tta,
    }
    files.atomic_write_json(out / rf.CALIBRATION, operating_point)
    _refresh_export(out, operating_point)
    write_predictions(out / rf.PREDICTIONS, scores, probs)
    write_figures(out, scores, probs, metrics, title)
    return metrics


def _refresh_export(out: Path, operating_point: dict) -> None:
    """An exported model's preprocess.json carries the operating point for other runtimes; keep it current."""
    from lesionlab.inference.predictor import PREPROCESS_FILE

    path = out / PREPROCESS_FILE
    if path.exists():
        spec = files.read_json(path)
        spec.update(
            model_id=operating_point["model_id"],
            threshold=float(operating_point["threshold"]),
            threshold_policy=operating_point["policy"],
            temperature=float(operating_point["temperature"]),
            tta=operating_point["tta"],
        )
        files.atomic_write_json(path, spec)


def evaluate_run(
    run_dir: str | Path,
    data: str | Path | None = None,
    policy: str = DEFAULT_POLICY,
    tta: bool = False,
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
    progress: bool = True,
) -> dict:
    run_dir = Path(run_dir)
    scores = score_run(run_dir, data, tta, progress)
    config = files.read_json(run_dir / rf.CONFIG)
    model_id = f"{config['backbone']}-{config['mode']}-{config['weights']['sha256'][:8]}-{run_dir.name}"
    metrics = write_evaluation(
        run_dir, scores, policy, n_resamples, seed, f"{config['backbone']} ({config['mode']})", model_id, tta
    )
    history_path = run_dir / rf.HISTORY
    if history_path.exists():
        with open(history_path, newline="") as f:
            plots.training_curves(
                list(csv.DictReader(f)),
                run_dir / rf.FIGURES / "training_curves.png",
                f"{config['backbone']} ({config['mode']})",
            )
    from lesionlab.refusal.measure import measure_refusal, report_section, summary

    refusal = measure_refusal(run_dir, data, progress, refit=True)  # fits ood.npz, adds metrics["refusal"]
    metrics["refusal"] = summary(refusal)
    files.atomic_write_text(run_dir / rf.REPORT, run_report(config, metrics) + "\n" + report_section(refusal))
    return metrics
