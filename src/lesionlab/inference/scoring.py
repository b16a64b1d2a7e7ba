"""Scoring image files in batches: decode, analyze, one answer per file (or why it could not be read)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lesionlab.data.images import BadImageError, open_image, opened_batches
from lesionlab.inference.predictor import Predictor


def score_files(
    predictor: Predictor, paths: Sequence[Path], tta: bool | None = None, batch_size: int = 32, progress: bool = True
) -> list[dict[str, Any]]:
    """Per path, ``{probability, label, threshold, refused, reason, ood_score}`` (and ``diagnoses`` for a diagnosis
    model) or ``{error}``; in order. Decoded ``batch_size`` at a time, so memory stays bounded whatever the
    number of files."""
    out: list[dict[str, Any]] = []
    for batch in opened_batches(paths, lambda p: open_image(p, str(p)), batch_size, "predict", progress):
        decoded = [x for _, x in batch if not isinstance(x, BadImageError)]
        predictions = iter(predictor.analyze(decoded, tta) if decoded else [])
        for _, x in batch:
            if isinstance(x, BadImageError):
                out.append({"error": x.reason})
                continue
            pred = next(predictions)
            a = {
                "probability": round(pred.probability, 6),
                "label": pred.label,
                "threshold": predictor.info.threshold,
                "refused": pred.refused,
                "reason": pred.reason,
                "ood_score": None if pred.ood_score is None else round(pred.ood_score, 3),
            }
            if pred.diagnoses is not None:  # a diagnosis model: P(diagnosis), malignant ones summing to P
                a["diagnoses"] = {d: round(q, 6) for d, q in pred.diagnoses.items()}
            out.append(a)
    return out
