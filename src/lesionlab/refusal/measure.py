"""Fitting and measuring a run's lesion detector (the refusal of inputs that are not lesion images).

The detector (``ood.LesionDetector``) is fitted on the run's own backbone features of its training
images and thresholded on its validation images, so that about 1% of real lesions are refused. It
is measured on the test lesions against a non-lesion set: the photos scikit-image ships plus
generated noise, flat colours, gradients, shapes and rendered text (``non_lesion.py``). Where clinical or
natural photos are given (``--non-lesion``), it also gets a dermoscopy-vs-photo discriminator fitted on half of
them and measured on the other half (``photos.py``). Nothing here writes into the run folder: evaluation saves
the detector and the measurement (``refusal.json``,
``refusal_scores.csv``, per image, so ensembles can combine members without recomputing, and a ``refusal``
block in ``metrics.json``) through ``runs.RunFolder``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lesionlab import files
from lesionlab.data.dataset import Dataset
from lesionlab.data.loading import dataset_from_record
from lesionlab.data.sample import Sample
from lesionlab.models.dermoscopy import DermoscopyDiscriminator, discriminator_inputs
from lesionlab.models.detector import LesionDetector, PixelDistance, image_statistics
from lesionlab.refusal.combine import combine_refusal as combine_refusal  # re-exported: callers import it here
from lesionlab.refusal.non_lesion import NON_LESION_VERSION, NonLesion, non_lesion_images
from lesionlab.refusal.photos import (
    PhotoInputs,
    PhotoSplit,
    measure_photos,
    photo_inputs,
    recorded_folders,
    split_photos,
)
from lesionlab.refusal.report import auroc as _auroc
from lesionlab.refusal.report import rate as _rate
from lesionlab.refusal.report import report_section as report_section  # re-exported: callers import them from here
from lesionlab.refusal.report import summary as summary
from lesionlab.refusal.report import threshold_rule
from lesionlab.runs import RESIZE_CROP, SPLITS, RunError, RunFolder, ScoreRow

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


def pixel_statistics(
    dataset: Dataset, input_size: int, progress: bool = True, resize: str = RESIZE_CROP
) -> dict[str, np.ndarray]:
    """relpath -> image statistics of every readable file, as the model's predictor hands it to the detector:
    resized by ``resize``, before any colour constancy (``Predictor.prepare``); cached like features."""
    from lesionlab.data.images import RESIZE_MODES, decode_samples
    from lesionlab.training.features import cache_dir

    key = {"v": PIXEL_STATS_VERSION, "size": input_size, "files": dataset.file_list_hash()}
    if RESIZE_MODES.get(resize, resize) != RESIZE_CROP:  # crop keeps the key entries had before resize existed
        key["resize"] = RESIZE_MODES.get(resize, resize)
    blob = json.dumps(key, sort_keys=True)
    path = cache_dir() / "pixel_stats" / f"{hashlib.sha256(blob.encode()).hexdigest()[:24]}.npz"
    if path.exists():
        arrays = np.load(path)
        return dict(zip(arrays["relpaths"].tolist(), arrays["stats"]))
    from tqdm.auto import tqdm

    relpaths, stats = [], []
    chunks = range(0, len(dataset.all), 256)  # bounded memory: 256 decoded images at a time
    for i in tqdm(chunks, desc="pixel statistics", disable=not progress, unit="chunk"):
        decoded = decode_samples(dataset.all[i : i + 256], input_size, progress=False, resize=resize)
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
    pre = config.preprocessing
    table = load_or_compute(
        dataset,
        _run_weights(run),
        skip_bad=True,
        progress=progress,
        backbone=model.backbone,
        resize=pre.resize,
        color_constancy=pre.color_constancy,
    )
    splits = run.dataset_splits(dataset) if run.has(SPLITS) else _recorded_split(run, dataset)
    index = set(table.relpaths)
    stats = pixel_statistics(dataset, pre.input_size, progress, pre.resize)
    out = {}
    for name, samples in splits.items():
        rel = [s.relpath for s in samples if s.relpath in index]
        out[name] = SplitFeatures(rel, table.rows(samples)[0], np.array([stats[r] for r in rel]))
    return out


def _recorded_split(run: RunFolder, dataset: Dataset) -> dict[str, list[Sample]]:
    """A model folder without splits.csv (the bundled model): its train/validation split made again from the seed
    and fraction config.json records, checked against the counts it records."""
    train, data = run.config.train, run.config.data
    splits = dataset.splits(int(train.get("split_seed", 0)), float(train.get("val_fraction", 0.2)))
    counts = (len(splits["train"]), len(splits["val"]))
    if counts != (data.get("n_train"), data.get("n_val")):
        raise RunError(
            f"{run.path} has no {SPLITS}, and the split made again from its seed has {counts[0]} train and "
            f"{counts[1]} validation images where config.json records {data.get('n_train')} and {data.get('n_val')}"
        )
    return splits


def fit_refusal(
    run_dir: str | Path,
    data: str | Path | None = None,
    max_refusal: float = MAX_REFUSAL,
    n_components: int = N_COMPONENTS,
    progress: bool = True,
    features: dict[str, SplitFeatures] | None = None,
    photos: PhotoInputs | None = None,
) -> LesionDetector:
    """Fits the lesion detector on train images and thresholds it on validation (the caller saves it).

    Two distances (backbone features, input-pixel statistics), and with ``photos`` (clinical or natural photos)
    the dermoscopy discriminator, each allowed an equal share of ``max_refusal``: a union bound keeps the
    refusal of validation lesions within ``max_refusal``.
    """
    feats = features or run_features(run_dir, data, progress)
    train, val = feats["train"], feats["val"]
    if len(train.x) < 3 or len(val.x) < 1:
        raise RunError(f"{run_dir}: too few train/validation images to fit the lesion detector")
    use_pixels = train.pixels is not None and len(train.pixels) > train.pixels.shape[1]
    use_photos = photos is not None and len(photos.names) >= 2 and train.pixels is not None
    budget = max_refusal / (1 + use_pixels + use_photos)
    detector = LesionDetector.fit(train.x, val.x, max_refusal, n_components)
    detector.threshold = conservative_threshold(detector.feature_score(val.x), budget)
    if use_pixels:
        assert train.pixels is not None and val.pixels is not None  # run_features gives every split statistics
        detector.pixels = PixelDistance.fit(train.pixels)
        detector.pixels.threshold = conservative_threshold(detector.pixels.score(val.pixels), budget)
    if use_photos:
        assert photos is not None and train.pixels is not None and val.pixels is not None
        lesions = discriminator_inputs(train.x, train.pixels)
        detector.dermoscopy = DermoscopyDiscriminator.fit(lesions, discriminator_inputs(photos.features, photos.stats))
        val_logits = detector.dermoscopy.score(discriminator_inputs(val.x, val.pixels))
        detector.dermoscopy.threshold = conservative_threshold(val_logits, budget)
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


def non_lesion_features(run_dir: Path, items: list[NonLesion]) -> np.ndarray:
    """Features through the same predictor path that serving uses (resize, colour constancy, normalise, backbone).

    Cached beside the feature cache, keyed by the backbone's weights and the set: every frozen run of
    a backbone shares one entry, a fine-tuned run gets its own.
    """
    from lesionlab.inference.predictor import TorchPredictor
    from lesionlab.training.features import cache_dir, cache_preprocessing

    run = RunFolder(run_dir)
    weights, pre = _run_weights(run), run.config.preprocessing
    blob = json.dumps(
        {
            "v": NON_LESION_VERSION,
            "sha": weights.sha256,
            "pre": cache_preprocessing(weights, pre.resize, pre.color_constancy),
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
    """Image statistics of the non-lesion set, resized as the predictor resizes (before colour constancy, as
    ``Predictor.prepare`` hands images to the detector)."""
    pre = RunFolder(run_dir).config.preprocessing
    return image_statistics(np.stack([pre.resized(it.image) for it in items]))


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
    non_lesion: Sequence[str | Path] = (),
) -> Measurement:
    """AUROC (test lesions vs non-lesions) and refusal rates of the run's detector, fitted first when the run has
    none (or ``refit``). Writes nothing.

    ``non_lesion``: folders of clinical or natural photos, each split in two (``photos.split_photos``); a fitted
    detector learns from one half to refuse them, and the other half is measured. Without them, the folders the
    run's detector was fitted with (ood.json) are used again where they still exist."""
    run_dir = RunFolder(run_dir).require_trained().path
    feats = features or run_features(run_dir, data, progress)
    sources = [str(f) for f in non_lesion] or recorded_folders(run_dir)
    split = split_photos(sources) if sources else None
    detector = None if refit else LesionDetector.load(run_dir)
    if detector is None:
        fit_photos = None if split is None else _photos(run_dir, split, held_out=False)
        detector = fit_refusal(run_dir, data, progress=progress, features=feats, photos=fit_photos)
        if detector.dermoscopy is not None and split is not None:
            detector.dermoscopy.negatives = tuple(split.sources)
    items = non_lesion_images()
    other = detector.score(non_lesion_features(run_dir, items), stats=non_lesion_pixels(run_dir, items))
    scores = {name: detector.score(feats[name].x, stats=feats[name].pixels) for name in ("val", "test", "test_dedup")}
    held_out = None if split is None else _photos(run_dir, split, held_out=True)
    photo_block, rows = measure_photos(detector, split, held_out)
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
        "threshold_rule": threshold_rule(CONFIDENCE, detector.pixels is not None, detector.dermoscopy is not None),
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
        "clinical_photos": photo_block,
    }
    rows += [
        ScoreRow("non_lesion", f"{it.kind}/{it.name}", float(s), bool(s > detector.threshold))
        for s, it in zip(other, items)
    ]
    rows += [
        ScoreRow("test", r, float(v), bool(v > detector.threshold))
        for r, v in zip(feats["test"].relpaths, scores["test"])
    ]
    return Measurement(detector, result, rows)


def _photos(run_dir: Path, split: PhotoSplit, held_out: bool) -> PhotoInputs:
    paths = split.held_out if held_out else split.fit
    names = split.record()["held_out_files" if held_out else "fit_files"]
    return photo_inputs(run_dir, _run_weights(RunFolder(run_dir)), paths, names)
