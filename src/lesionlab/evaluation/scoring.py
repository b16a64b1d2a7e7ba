"""Scores of one run on its evaluation splits: uncalibrated logits of validation, test and test_dedup.

A frozen run is scored by its head on the cached backbone features (the same numbers as a full forward pass,
without re-running the backbone); anything else through the run's Predictor.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lesionlab.data.dataset import Dataset
from lesionlab.data.loading import dataset_from_record
from lesionlab.inference.diagnoses import diagnosis_probabilities
from lesionlab.runs import MODEL, RunFolder

EVAL_SPLITS = ("val", "test", "test_dedup")


@dataclass
class SplitScores:
    """Per image of a split: relpath, 0/1 label, uncalibrated logit; for a diagnosis model also each image's true
    diagnosis (a taxonomy code, or None) and the (N, K) uncalibrated diagnosis probabilities (malignant ones
    summing to sigmoid(logit); ``inference.diagnoses``)."""

    relpaths: list[str]
    y: np.ndarray
    logits: np.ndarray
    true_diagnoses: list[str | None] | None = None
    diagnosis_probs: np.ndarray | None = None


def _frozen_scores(run: RunFolder, dataset: Dataset, splits, progress: bool) -> dict[str, SplitScores]:
    """The head on cached backbone features: identical to a full forward pass, without re-running the backbone."""
    import torch

    from lesionlab.models.backbones import ResolvedWeights
    from lesionlab.models.classifier import load_model
    from lesionlab.training.features import load_or_compute

    model, _ = load_model(run / MODEL)
    w = run.config.weights
    weights = ResolvedWeights(
        run.config.backbone,
        w["source"],
        w["pretrained"],
        w["sha256"],
        tuple(w["mean"]),
        tuple(w["std"]),
        int(w["input_size"]),
    )
    pre = run.config.preprocessing  # the run's resize and colour constancy, as it was trained
    table = load_or_compute(
        dataset,
        weights,
        skip_bad=True,
        progress=progress,
        backbone=model.backbone,
        resize=pre.resize,
        color_constancy=pre.color_constancy,
    )
    out = {}
    mask = None if model.diagnoses is None else np.array(model.diagnoses.mask)
    for name, samples in splits.items():
        x, y = table.rows(samples)
        with torch.inference_mode():
            binary, z = model.head.outputs(torch.from_numpy(x))
        logits = binary.numpy().astype(np.float64)
        index = set(table.relpaths)
        kept = [s for s in samples if s.relpath in index]
        out[name] = SplitScores([s.relpath for s in kept], y, logits)
        if z is not None and mask is not None:
            out[name].true_diagnoses = [s.diagnosis for s in kept]
            out[name].diagnosis_probs = diagnosis_probabilities(z.numpy(), mask, logits)
    return out


def _image_scores(predictor, splits, progress: bool, tta: bool) -> dict[str, SplitScores]:
    out = {}
    cache: dict[str, float] = {}
    diag: dict[str, np.ndarray] = {}  # a diagnosis model's probabilities per relpath
    for name, samples in splits.items():
        todo = [s for s in samples if s.relpath not in cache]
        decoded = predictor.info.pre.decode(todo, progress)  # the predictor's resize; it corrects colour itself
        if todo:
            scores = predictor.scores_from_uint8(decoded.images, tta)
            for i, (s, z) in enumerate(zip(decoded.samples, scores.logits)):
                cache[s.relpath] = float(z)
                if scores.diagnoses is not None:
                    diag[s.relpath] = scores.diagnoses[i]
        kept = [s for s in samples if s.relpath in cache]
        out[name] = SplitScores(
            [s.relpath for s in kept],
            np.array([s.label for s in kept], np.float32),
            np.array([cache[s.relpath] for s in kept]),
        )
        if predictor.info.diagnoses and all(s.relpath in diag for s in kept):
            out[name].true_diagnoses = [s.diagnosis for s in kept]
            out[name].diagnosis_probs = np.array([diag[s.relpath] for s in kept]).reshape(len(kept), -1)
    return out


def score_run(
    run_dir: str | Path,
    data: str | Path | None = None,
    tta: bool = False,
    progress: bool = True,
    dataset: Dataset | None = None,
) -> dict[str, SplitScores]:
    """Uncalibrated logits of one run on val, test and test_dedup; ``dataset``: the run's data, already read
    (default: read from its record and ``data``)."""
    from lesionlab.inference.predictor import TorchPredictor

    run = RunFolder(run_dir).require_trained()
    dataset = dataset if dataset is not None else dataset_from_record(run.config.data, data, progress)
    splits = {k: v for k, v in run.dataset_splits(dataset).items() if k != "train"}
    if run.config.mode == "frozen" and not tta:
        return _frozen_scores(run, dataset, splits, progress)
    return _image_scores(TorchPredictor(run.path), splits, progress, tta)
