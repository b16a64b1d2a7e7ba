"""Fitting and measuring a run's lesion detector (the refusal of inputs that are not lesion images).

The detector (``ood.LesionDetector``) is fitted on the run's own backbone features of its training
images and thresholded on its validation images, so that about 1% of real lesions are refused. It
is measured on the test lesions against a non-lesion set: the photos scikit-image ships plus
generated noise, flat colours, gradients, shapes and rendered text (``non_lesion.py``). Nothing here
writes into the run folder: evaluation saves the detector and the measurement (``refusal.json``,
``refusal_scores.csv``, per image, so ensembles can combine members without recomputing, and a ``refusal``
block in ``metrics.json``) through ``runs.RunFolder``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lesionlab import files
from lesionlab.data.dataset import Dataset
from lesionlab.data.loading import dataset_from_record
from lesionlab.models.detector import (
    ENSEMBLE_RULE,
    LesionDetector,
    PixelDistance,
    ensemble_refusal_score,
    image_statistics,
)
from lesionlab.refusal.non_lesion import NON_LESION_VERSION, NonLesion, non_lesion_images
from lesionlab.runs import RunError, RunFolder, ScoreRow

MAX_REFUSAL = 0.01
#: Chosen with bench/refusal.py on lite0-frozen: 384-768 all give AUROC >= 0.998; 128 gives 0.97.
N_COMPONENTS = 512
CONFIDENCE = 0.95
PIXEL_STATS_VERSION = 2  # bump when ood.image_statistics changes, to invalidate cached statistics


# ------------------------------------------------------------------ features of a run's images


def _run_weights(run: RunFolder):
    """Frozen runs share the ImageNet feature cache; a fine-tuned run gets cache entries keyed by its model.pt."""
    from lesionlab.models.backbones import ResolvedWeights, file_sha256
    from lesionlab.runs import MODEL

    config = run.config
    w = config.weights
    if config.mode == "frozen":
        sha, source = w["sha256"], w["source"]
    else:
        sha, source = "run-" + file_sha256(run / MODEL), f"run:{run.path.name}"
    return ResolvedWeights(
        config.backbone, source, w["pretrained"], sha, tuple(w["mean"]), tuple(w["std"]), int(w["input_size"])
    )


@dataclass
class SplitFeatures:
    relpaths: list[str]
    x: np.ndarray  # N x D backbone features
    pixels: np.ndarray | None = None  # N x S ood.image_statistics of the same images


def pixel_statistics(dataset: Dataset, input_size: int, progress: bool = True) -> dict[str, np.ndarray]:
    """relpath -> image statistics of every readable file, as the model sees it; cached like features."""
    from lesionlab.data.images import decode_samples
    from lesionlab.training.features import cache_dir

    blob = json.dumps({"v": PIXEL_STATS_VERSION, "size": input_size, "files": dataset.file_list_hash()}, sort_keys=True)
    path = cache_dir() / "pixel_stats" / f"{hashlib.sha256(blob.encode()).hexdigest()[:24]}.npz"
    if path.exists():
        arrays = np.load(path)
        return dict(zip(arrays["relpaths"].tolist(), arrays["stats"]))
    from tqdm.auto import tqdm

    relpaths, stats = [], []
    chunks = range(0, len(dataset.all), 256)  # bounded memory: 256 decoded images at a time
    for i in tqdm(chunks, desc="pixel statistics", disable=not progress, unit="chunk"):
        decoded = decode_samples(dataset.all[i : i + 256], input_size, progress=False)
        relpaths += [s.relpath for s in decoded.samples]
        stats.append(image_statistics(decoded.images))
    table = np.concatenate(stats) if stats else np.zeros((0, 12))
    with files.atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, relpaths=np.array(relpaths), stats=table)
    return dict(zip(relpaths, table))


def run_features(
    run_dir: str | Path, data: str | Path | None = None, progress: bool = True
) -> dict[str, SplitFeatures]:
    """Backbone features of the run's train, val, test and test_dedup images, as the run's own model sees them."""
    from lesionlab.models.classifier import load_model
    from lesionlab.runs import MODEL
    from lesionlab.training.features import load_or_compute

    run = RunFolder(run_dir).require_trained()
    config = run.config
    dataset: Dataset = dataset_from_record(config.data, data, progress)
    model, _ = load_model(run / MODEL)
    table = load_or_compute(dataset, _run_weights(run), skip_bad=True, progress=progress, backbone=model.backbone)
    splits = run.dataset_splits(dataset)
    index = set(table.relpaths)
    stats = pixel_statistics(dataset, config.preprocessing.input_size, progress)
    out = {}
    for name, samples in splits.items():
        rel = [s.relpath for s in samples if s.relpath in index]
        out[name] = SplitFeatures(rel, table.rows(samples)[0], np.array([stats[r] for r in rel]))
    return out


def fit_refusal(
    run_dir: str | Path,
    data: str | Path | None = None,
    max_refusal: float = MAX_REFUSAL,
    n_components: int = N_COMPONENTS,
    progress: bool = True,
    features: dict[str, SplitFeatures] | None = None,
) -> LesionDetector:
    """Fits the lesion detector on train images and thresholds it on validation (the caller saves it).

    Two distances (backbone features, input-pixel statistics), each allowed half of ``max_refusal``: a
    union bound keeps the refusal of validation lesions within ``max_refusal``.
    """
    feats = features or run_features(run_dir, data, progress)
    train, val = feats["train"], feats["val"]
    if len(train.x) < 3 or len(val.x) < 1:
        raise RunError(f"{run_dir}: too few train/validation images to fit the lesion detector")
    use_pixels = train.pixels is not None and len(train.pixels) > train.pixels.shape[1]
    budget = max_refusal / 2 if use_pixels else max_refusal
    detector = LesionDetector.fit(train.x, val.x, max_refusal, n_components)
    detector.threshold = conservative_threshold(detector.feature_score(val.x), budget)
    if use_pixels:
        assert train.pixels is not None and val.pixels is not None  # run_features gives every split statistics
        detector.pixels = PixelDistance.fit(train.pixels)
        detector.pixels.threshold = conservative_threshold(detector.pixels.score(val.pixels), budget)
    return detector


def conservative_threshold(
    val_scores: np.ndarray, max_refusal: float = MAX_REFUSAL, confidence: float = CONFIDENCE
) -> float:
    """The lowest threshold whose validation refusal rate has a one-sided upper confidence bound <= max_refusal.

    The plain 99% quantile of ~500 validation scores refused 2-3% of the test lesions (test images sit
    slightly further from train than validation does); bounding the rate, not matching it, keeps test
    refusals under 1%. With too few validation images for any bound, nothing of validation is refused.
    The threshold sits mid-gap between the last score kept and the first refused (a hair above the
    largest when none is refused): the same image through ONNX Runtime or another batch size differs
    in the last digits and must not flip to refused on the boundary.
    """
    from scipy.stats import beta

    s = np.sort(np.asarray(val_scores, np.float64))[::-1]
    n = len(s)
    allowed = 0  # validation images the threshold may refuse
    while allowed + 1 < n and beta.ppf(confidence, allowed + 2, n - allowed - 1) <= max_refusal:
        allowed += 1
    if allowed == 0:
        return float(s[0] + 1e-4 * max(abs(s[0]), 1.0))
    return float((s[allowed] + s[allowed - 1]) / 2)


# ------------------------------------------------------------------ measuring


def _auroc(lesion_scores: np.ndarray, other_scores: np.ndarray) -> float:
    """How well the distance separates non-lesions (positive) from real lesions; 1.0 = perfectly."""
    from sklearn.metrics import roc_auc_score

    y = np.r_[np.zeros(len(lesion_scores)), np.ones(len(other_scores))]
    return float(roc_auc_score(y, np.r_[lesion_scores, other_scores]))


def non_lesion_features(run_dir: Path, items: list[NonLesion]) -> np.ndarray:
    """Features through the same predictor path that serving uses (resize, crop, normalise, backbone).

    Cached beside the feature cache, keyed by the backbone's weights and the set: every frozen run of
    a backbone shares one entry, a fine-tuned run gets its own.
    """
    from lesionlab.inference.predictor import TorchPredictor
    from lesionlab.training.features import cache_dir, preprocessing

    weights = _run_weights(RunFolder(run_dir))
    blob = json.dumps(
        {
            "v": NON_LESION_VERSION,
            "sha": weights.sha256,
            "pre": preprocessing(weights),
            "names": [f"{it.kind}/{it.name}" for it in items],
        },
        sort_keys=True,
    )
    path = cache_dir() / "non_lesion" / f"{weights.backbone}-{hashlib.sha256(blob.encode()).hexdigest()[:24]}.npy"
    if path.exists():
        return np.load(path)
    predictor = TorchPredictor(run_dir)
    feats = predictor.forward_uint8(predictor.prepare([it.image for it in items]))[1]
    assert feats is not None  # a TorchPredictor always returns the backbone's features
    with files.atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, feats)
    return feats


def non_lesion_pixels(run_dir: Path, items: list[NonLesion]) -> np.ndarray:
    """Image statistics of the non-lesion set, resized and cropped as the predictor does."""
    from lesionlab.data.images import resize_to_input

    size = RunFolder(run_dir).config.preprocessing.input_size
    return image_statistics(np.stack([resize_to_input(it.image, size) for it in items]))


def _rate(refused: np.ndarray) -> dict:
    return {
        "n": len(refused),
        "refused": int(refused.sum()),
        "rate": float(refused.mean()) if len(refused) else float("nan"),
    }


@dataclass
class Measurement:
    """A lesion detector and how it did: ``result`` is refusal.json's content, ``scores`` its per-image rows."""

    detector: LesionDetector | None
    result: dict
    scores: list[ScoreRow]


def measure_refusal(
    run_dir: str | Path,
    data: str | Path | None = None,
    progress: bool = True,
    features: dict[str, SplitFeatures] | None = None,
    refit: bool = False,
) -> Measurement:
    """AUROC (test lesions vs non-lesions) and refusal rates of the run's detector, fitted first when the run has
    none (or ``refit``). Writes nothing."""
    run_dir = RunFolder(run_dir).require_trained().path
    feats = features or run_features(run_dir, data, progress)
    detector = None if refit else LesionDetector.load(run_dir)
    if detector is None:
        detector = fit_refusal(run_dir, data, progress=progress, features=feats)
    items = non_lesion_images()
    other = detector.score(non_lesion_features(run_dir, items), stats=non_lesion_pixels(run_dir, items))
    scores = {name: detector.score(feats[name].x, stats=feats[name].pixels) for name in ("val", "test", "test_dedup")}
    kinds = sorted({it.kind for it in items})
    by_kind = {
        k: _rate(np.array([s > detector.threshold for s, it in zip(other, items) if it.kind == k])) for k in kinds
    }
    accepted = [it.name for s, it in zip(other, items) if s <= detector.threshold]
    result = {
        "method": detector.method,
        "threshold": detector.threshold,
        "pixel_threshold": None if detector.pixels is None else detector.pixels.threshold,
        "max_refusal_on_validation": detector.max_refusal,
        "threshold_rule": f"lowest threshold whose validation refusal rate has a one-sided {CONFIDENCE:.0%} "
        "Clopper-Pearson upper bound <= max_refusal_on_validation"
        + (" / 2, for each of the two distances" if detector.pixels is not None else ""),
        "l2_normalize": detector.normalize,
        "n_components": int(detector.components.shape[1]),
        "n_train": len(feats["train"].x),
        "auroc_test_vs_non_lesion": _auroc(scores["test"], other),
        "lesions": {name: _rate(s > detector.threshold) for name, s in scores.items()},
        "non_lesion": {
            **_rate(other > detector.threshold),
            "by_kind": by_kind,
            "accepted": accepted,
            "natural_photos_source": "scikit-image sample images"
            if by_kind.get("natural")
            else "none (scikit-image not installed)",
        },
    }
    rows = [
        ScoreRow("non_lesion", f"{it.kind}/{it.name}", float(s), bool(s > detector.threshold))
        for s, it in zip(other, items)
    ]
    rows += [
        ScoreRow("test", r, float(v), bool(v > detector.threshold))
        for r, v in zip(feats["test"].relpaths, scores["test"])
    ]
    return Measurement(detector, result, rows)


def summary(result: dict) -> dict:
    """The few refusal numbers that belong in metrics.json (the details stay in refusal.json)."""
    out = {
        "auroc_test_vs_non_lesion": result["auroc_test_vs_non_lesion"],
        **{f"{name}_refused": r["rate"] for name, r in result["lesions"].items()},
        "non_lesion_refused": result["non_lesion"]["rate"],
        "n_non_lesion": result["non_lesion"]["n"],
        "threshold": result["threshold"],
    }
    return out


def report_section(result: dict) -> str:
    """Markdown appended to a run's report.md."""
    nl = result["non_lesion"]
    how = (
        f"Threshold {result['threshold']:.2f}: the lowest whose validation refusal rate is, with 95% "
        f"confidence, at most {result['max_refusal_on_validation']:.0%}."
        if "members" not in result
        else "Each member keeps its own threshold."
    )
    lines = [
        "## Refusal of non-lesion images",
        "",
        f"{result['method']}. {how}",
        "",
        f"- AUROC, test lesions vs {nl['n']} non-lesion images: {result['auroc_test_vs_non_lesion']:.4f}",
        *(
            f"- {name} lesions refused: {r['refused']}/{r['n']} ({r['rate']:.2%})"
            for name, r in result["lesions"].items()
        ),
        f"- non-lesion images refused: {nl['refused']}/{nl['n']} ({nl['rate']:.2%}); by kind: "
        + ", ".join(f"{k} {v['refused']}/{v['n']}" for k, v in nl["by_kind"].items()),
        f"- accepted non-lesion images: {', '.join(nl['accepted']) or 'none'}",
        "",
    ]
    return "\n".join(lines)


# ------------------------------------------------------------------ ensembles


def _read_scores(run_dir: Path) -> dict[tuple[str, str], float] | None:
    """(set, name) -> distance / threshold (> 1 means refused) from a member's refusal_scores.csv."""
    run = RunFolder(run_dir)
    rows = run.refusal_scores()
    if rows is None:
        return None
    threshold = float(run.refusal()["threshold"])
    return {(r.set, r.name): r.score / threshold for r in rows}


def combine_refusal(member_dirs: list[Path]) -> dict | None:
    """An ensemble refuses when the median member refuses (``ood.ensemble_refusal_score``, as
    EnsemblePredictor.analyze does); measured from the members' refusal_scores.csv without recomputing.
    None when a member has not been measured."""
    read = [_read_scores(Path(m)) for m in member_dirs]
    per_member = [p for p in read if p is not None]
    if len(per_member) < len(read):
        return None
    keys = [k for k in per_member[0] if all(k in p for p in per_member[1:])]
    combined = ensemble_refusal_score([[p[k] for k in keys] for p in per_member])
    score = dict(zip(keys, combined.tolist()))
    kind = lambda k: k[1].split("/", 1)[0]
    test = np.array([v for k, v in score.items() if k[0] == "test"])
    other = [(k, v) for k, v in score.items() if k[0] == "non_lesion"]
    nl = np.array([v for _, v in other])
    result = {
        "method": ENSEMBLE_RULE,
        "threshold": 1.0,
        "max_refusal_on_validation": MAX_REFUSAL,
        "members": [str(m) for m in member_dirs],
        "auroc_test_vs_non_lesion": _auroc(test, nl),
        "lesions": {"test": _rate(test > 1.0)},
        "non_lesion": {
            **_rate(nl > 1.0),
            "accepted": [k[1] for k, v in other if v <= 1.0],
            "by_kind": {
                c: _rate(np.array([v > 1.0 for k, v in other if kind(k) == c]))
                for c in sorted({kind(k) for k, _ in other})
            },
        },
    }
    return result
