"""Fitting and measuring a run's lesion detector (the refusal of inputs that are not lesion images).

The detector (``ood.LesionDetector``) is fitted on the run's own backbone features of its training
images and thresholded on its validation images, so that about 1% of real lesions are refused. It
is measured on the test lesions against a non-lesion set: the photos scikit-image ships plus
generated noise, flat colours, gradients, shapes and rendered text. Everything is written into the
run folder: ``ood.npz``/``ood.json`` (used by every predictor), ``refusal.json``,
``refusal_scores.csv`` (per image, so ensembles can combine members without recomputing) and a
``refusal`` block in ``metrics.json``.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from lesionlab import files
from lesionlab import runs as rf
from lesionlab.data.dataset import Dataset, load_dataset
from lesionlab.data.images import to_rgb
from lesionlab.models.detector import (
    ENSEMBLE_RULE,
    LesionDetector,
    PixelDistance,
    ensemble_refusal_score,
    image_statistics,
)

REFUSAL_FILE = "refusal.json"
SCORES_FILE = "refusal_scores.csv"
MAX_REFUSAL = 0.01
#: Chosen with bench/refusal.py on lite0-frozen: 384-768 all give AUROC >= 0.998; 128 gives 0.97.
N_COMPONENTS = 512
CONFIDENCE = 0.95
NON_LESION_VERSION = 1  # bump when the generated set changes, to invalidate cached features
PIXEL_STATS_VERSION = 2  # bump when ood.image_statistics changes, to invalidate cached statistics
#: Photos and scientific images bundled in scikit-image's wheel (no download needed).
SKIMAGE_IMAGES = (
    "astronaut",
    "brick",
    "camera",
    "cat",
    "checkerboard",
    "clock",
    "coffee",
    "coins",
    "colorwheel",
    "grass",
    "gravel",
    "horse",
    "hubble_deep_field",
    "immunohistochemistry",
    "logo",
    "microaneurysms",
    "moon",
    "page",
    "retina",
    "rocket",
    "text",
    "stereo_motorcycle",
    "cell",
)


# ------------------------------------------------------------------ features of a run's images


def _run_weights(run_dir: Path, config: dict):
    """Frozen runs share the ImageNet feature cache; a fine-tuned run gets cache entries keyed by its model.pt."""
    from lesionlab.models.backbones import ResolvedWeights, file_sha256

    w = config["weights"]
    if config["mode"] == "frozen":
        sha, source = w["sha256"], w["source"]
    else:
        sha, source = "run-" + file_sha256(run_dir / rf.MODEL), f"run:{run_dir.name}"
    return ResolvedWeights(
        config["backbone"], source, w["pretrained"], sha, tuple(w["mean"]), tuple(w["std"]), int(w["input_size"])
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
    from lesionlab.evaluation.evaluate import run_splits
    from lesionlab.models.classifier import load_model
    from lesionlab.training.features import load_or_compute

    run_dir = rf.require_run(run_dir)
    config = files.read_json(run_dir / rf.CONFIG)
    dataset: Dataset = load_dataset(data or config["data"]["root"], tuple(config["data"]["classes"]))
    model, _ = load_model(run_dir / rf.MODEL)
    table = load_or_compute(
        dataset, _run_weights(run_dir, config), skip_bad=True, progress=progress, backbone=model.backbone
    )
    splits = run_splits(run_dir, dataset)
    with open(run_dir / "splits.csv", newline="") as f:
        train_rel = {r["relpath"] for r in csv.DictReader(f) if r["split"] == "train"}
    splits["train"] = [s for s in dataset.train if s.relpath in train_rel]
    index = set(table.relpaths)
    stats = pixel_statistics(dataset, int(config["weights"]["input_size"]), progress)
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
    """Fits the lesion detector on train images, thresholds it on validation and saves it into the run folder.

    Two distances (backbone features, input-pixel statistics), each allowed half of ``max_refusal``: a
    union bound keeps the refusal of validation lesions within ``max_refusal``.
    """
    feats = features or run_features(run_dir, data, progress)
    train, val = feats["train"], feats["val"]
    if len(train.x) < 3 or len(val.x) < 1:
        raise rf.RunError(f"{run_dir}: too few train/validation images to fit the lesion detector")
    use_pixels = train.pixels is not None and len(train.pixels) > train.pixels.shape[1]
    budget = max_refusal / 2 if use_pixels else max_refusal
    detector = LesionDetector.fit(train.x, val.x, max_refusal, n_components)
    detector.threshold = conservative_threshold(detector.feature_score(val.x), budget)
    if use_pixels:
        detector.pixels = PixelDistance.fit(train.pixels)
        detector.pixels.threshold = conservative_threshold(detector.pixels.score(val.pixels), budget)
    detector.save(Path(run_dir))
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


# ------------------------------------------------------------------ the non-lesion set


@dataclass
class NonLesion:
    kind: str  # natural | noise | flat | gradient | shapes | text
    name: str
    image: Image.Image


def _skimage_photos() -> list[NonLesion]:
    """Photos and scientific images shipped inside scikit-image, plus a zoomed crop of each colour photo."""
    try:
        import skimage.data as skd
    except ImportError:
        return []
    out = []
    for name in SKIMAGE_IMAGES:
        try:
            arr = getattr(skd, name)()
        except Exception:  # a sample that needs a download in this skimage version
            continue
        arr = np.asarray(arr[0] if isinstance(arr, tuple) else arr)  # stereo_motorcycle: (left, right, disparity)
        if arr.dtype == bool:
            arr = arr.astype(np.uint8) * 255
        img = to_rgb(Image.fromarray(arr))
        out.append(NonLesion("natural", name, img))
        if arr.ndim == 3 and min(img.size) >= 256:
            w, h = img.size
            s = min(w, h) // 2
            out.append(
                NonLesion("natural", f"{name}-crop", img.crop(((w - s) // 2, (h - s) // 2, (w + s) // 2, (h + s) // 2)))
            )
    return out


def _noise(rng: np.random.Generator, size: int) -> list[NonLesion]:
    out = []
    for i in range(4):
        out.append(NonLesion("noise", f"uniform-{i}", Image.fromarray(rng.integers(0, 256, (size, size, 3), np.uint8))))
        g = np.clip(rng.normal(128, 40, (size, size, 3)), 0, 255).astype(np.uint8)
        out.append(NonLesion("noise", f"gaussian-{i}", Image.fromarray(g)))
        low = rng.integers(0, 256, (8, 8, 3), np.uint8)  # smooth blotches: closer to skin texture than white noise
        out.append(NonLesion("noise", f"blotches-{i}", Image.fromarray(low).resize((size, size), Image.BICUBIC)))
        sp = np.full((size, size, 3), 128, np.uint8)
        mask = rng.random((size, size))
        sp[mask < 0.05], sp[mask > 0.95] = 0, 255
        out.append(NonLesion("noise", f"salt-pepper-{i}", Image.fromarray(sp)))
    return out


#: Black, white, greys, primaries and a few skin tones (a flat skin-coloured image is still not a lesion).
FLAT_COLOURS = [
    (0, 0, 0),
    (255, 255, 255),
    (128, 128, 128),
    (64, 64, 64),
    (200, 200, 200),
    (255, 0, 0),
    (0, 255, 0),
    (0, 0, 255),
    (255, 255, 0),
    (0, 255, 255),
    (255, 0, 255),
    (241, 194, 125),
    (224, 172, 105),
    (198, 134, 66),
    (141, 85, 36),
    (255, 219, 172),
    (180, 120, 120),
    (120, 60, 40),
]


def _flat_and_gradients(rng: np.random.Generator, size: int) -> list[NonLesion]:
    out = [
        NonLesion("flat", "flat-{:02x}{:02x}{:02x}".format(*c), Image.new("RGB", (size, size), c)) for c in FLAT_COLOURS
    ]
    t = np.linspace(0, 1, size, dtype=np.float32)
    yy, xx = np.meshgrid(t, t, indexing="ij")
    radial = np.sqrt((xx - 0.5) ** 2 + (yy - 0.5) ** 2) / 0.71
    for i, ramp in enumerate([xx, yy, (xx + yy) / 2, radial, 1 - radial]):
        for j in range(2):
            a, b = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
            arr = (a[None, None] * (1 - ramp[..., None]) + b[None, None] * ramp[..., None]).astype(np.uint8)
            out.append(NonLesion("gradient", f"gradient-{i}-{j}", Image.fromarray(arr)))
    return out


def _shapes(rng: np.random.Generator, size: int) -> list[NonLesion]:
    out = []
    for i in range(8):
        img = Image.new("RGB", (size, size), tuple(int(v) for v in rng.integers(0, 256, 3)))
        d = ImageDraw.Draw(img)
        for _ in range(int(rng.integers(1, 6))):
            x0, y0 = (int(v) for v in rng.integers(0, size - 20, 2))
            x1, y1 = x0 + int(rng.integers(20, size)), y0 + int(rng.integers(20, size))
            fill = tuple(int(v) for v in rng.integers(0, 256, 3))
            (d.ellipse if rng.random() < 0.5 else d.rectangle)((x0, y0, x1, y1), fill=fill)
        out.append(NonLesion("shapes", f"shapes-{i}", img))
    for i, step in enumerate((8, 16, 28, 56)):
        arr = ((np.indices((size, size)).sum(0) // step) % 2 * 255).astype(np.uint8)
        out.append(NonLesion("shapes", f"checker-{step}", Image.fromarray(arr).convert("RGB")))
    return out


TEXTS = (
    "lesionlab",
    "The quick brown fox jumps over the lazy dog",
    "Invoice #2024-117  Total: 42.00 EUR",
    "def main():\n    return 0",
    "SKIN CANCER",
    "0123456789",
    "Lorem ipsum dolor sit amet,\nconsectetur adipiscing elit",
    "Hello, world!",
    "benign? malignant?",
    "ERROR 422",
)


def _text(rng: np.random.Generator, size: int) -> list[NonLesion]:
    out = []
    for i, text in enumerate(TEXTS):
        for j, font_size in enumerate((18, 40)):
            dark = rng.random() < 0.5
            bg = (20, 20, 30) if dark else (250, 250, 245)
            fg = (
                tuple(int(v) for v in rng.integers(180, 256, 3))
                if dark
                else tuple(int(v) for v in rng.integers(0, 80, 3))
            )
            img = Image.new("RGB", (size, size), bg)
            d = ImageDraw.Draw(img)
            font = ImageFont.load_default(font_size)
            y = 10
            while y < size - font_size:  # fill the page, as a photo of a document would
                d.multiline_text((8, y), text, fill=fg, font=font)
                y += (text.count("\n") + 1) * int(font_size * 1.3) + 6
            out.append(NonLesion("text", f"text-{i}-{font_size}px", img))
    return out


def non_lesion_images(size: int = 256, seed: int = 0) -> list[NonLesion]:
    """About 140 images that are not dermoscopic lesion photos; deterministic for a seed."""
    rng = np.random.default_rng(seed)
    return (
        _skimage_photos() + _noise(rng, size) + _flat_and_gradients(rng, size) + _shapes(rng, size) + _text(rng, size)
    )


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

    run_dir = Path(run_dir)
    weights = _run_weights(run_dir, files.read_json(run_dir / rf.CONFIG))
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
    with files.atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, feats)
    return feats


def non_lesion_pixels(run_dir: Path, items: list[NonLesion]) -> np.ndarray:
    """Image statistics of the non-lesion set, resized and cropped as the predictor does."""
    from lesionlab.data.images import resize_to_input

    size = int(files.read_json(Path(run_dir) / rf.CONFIG)["weights"]["input_size"])
    return image_statistics(np.stack([resize_to_input(it.image, size) for it in items]))


def _rate(refused: np.ndarray) -> dict:
    return {
        "n": len(refused),
        "refused": int(refused.sum()),
        "rate": float(refused.mean()) if len(refused) else float("nan"),
    }


def _write_scores(path: Path, rows: list[tuple[str, str, float, bool]]) -> None:
    buf = io.StringIO()
    buf.write("set,name,score,refused\n")
    for s, name, score, refused in rows:
        buf.write(f"{s},{name},{score:.4f},{int(refused)}\n")
    files.atomic_write_text(path, buf.getvalue())


def measure_refusal(
    run_dir: str | Path,
    data: str | Path | None = None,
    progress: bool = True,
    features: dict[str, SplitFeatures] | None = None,
    refit: bool = False,
) -> dict:
    """AUROC (test lesions vs non-lesions) and refusal rates; writes refusal.json, refusal_scores.csv and
    a ``refusal`` block into metrics.json. Fits the detector first when the run has none (or ``refit``)."""
    run_dir = rf.require_run(run_dir)
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
        ("non_lesion", f"{it.kind}/{it.name}", float(s), bool(s > detector.threshold)) for s, it in zip(other, items)
    ]
    rows += [
        ("test", r, float(v), bool(v > detector.threshold)) for r, v in zip(feats["test"].relpaths, scores["test"])
    ]
    _write_scores(run_dir / SCORES_FILE, rows)
    files.atomic_write_json(run_dir / REFUSAL_FILE, result)
    metrics_path = run_dir / rf.METRICS
    if metrics_path.exists():
        metrics = files.read_json(metrics_path)
        metrics["refusal"] = summary(result)
        files.atomic_write_json(metrics_path, metrics)
    return result


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
    path, meta = run_dir / SCORES_FILE, run_dir / REFUSAL_FILE
    if not path.exists() or not meta.exists():
        return None
    threshold = float(files.read_json(meta)["threshold"])
    with open(path, newline="") as f:
        return {(r["set"], r["name"]): float(r["score"]) / threshold for r in csv.DictReader(f)}


def combine_refusal(member_dirs: list[Path], out: Path | None = None) -> dict | None:
    """An ensemble refuses when the median member refuses (``ood.ensemble_refusal_score``, as
    EnsemblePredictor.analyze does); measured from the members' refusal_scores.csv without recomputing.
    None when a member has not been measured."""
    per_member = [_read_scores(Path(m)) for m in member_dirs]
    if any(p is None for p in per_member):
        return None
    keys = [k for k in per_member[0] if all(k in p for p in per_member[1:])]
    combined = ensemble_refusal_score([[p[k] for k in keys] for p in per_member])  # type: ignore[index]
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
    if out is not None:
        files.atomic_write_json(Path(out) / REFUSAL_FILE, result)
    return result
