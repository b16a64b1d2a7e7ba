"""Clinical or natural photos given as negatives for the lesion detector's dermoscopy discriminator.

``--non-lesion PATH`` (repeatable) names folders of such photos, read recursively. Each folder is split in two,
seeded and stratified by sub-folder (SD-198's diagnosis folders: every diagnosis on both sides): the
discriminator is fitted on one half and its refusal rate measured on the other, so the rate is one for photos it
never saw. Features are computed through the same predictor path that serving uses, and cached.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lesionlab import files
from lesionlab.errors import LesionlabError
from lesionlab.models.backbones import ResolvedWeights
from lesionlab.models.detector import LesionDetector, image_statistics
from lesionlab.refusal.report import rate
from lesionlab.runs import OOD_META, RunFolder, ScoreRow

SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
SPLIT_SEED = 0
#: Share of each sub-folder held out for measuring (rounded down, so a sub-folder of one photo is fitted on).
HELD_OUT = 0.5
PHOTOS_VERSION = 1  # bump when the inputs computed here change, to invalidate the cache


class PhotoError(LesionlabError):
    """A --non-lesion folder that does not exist or holds no images."""


@dataclass
class PhotoSplit:
    """The photos of the given folders: ``fit`` for fitting, ``held_out`` for measuring (absolute paths)."""

    sources: list[str]
    fit: list[Path]
    held_out: list[Path]
    seed: int = SPLIT_SEED

    def record(self) -> dict:
        """What refusal.json says about the photos: the folders, the seed and both halves' files."""
        return {
            "sources": self.sources,
            "split": f"each folder split by sub-folder, {HELD_OUT:.0%} held out (seed {self.seed})",
            "seed": self.seed,
            "fit_files": [_name(p, self.sources) for p in self.fit],
            "held_out_files": [_name(p, self.sources) for p in self.held_out],
        }


def split_photos(folders: Sequence[str | Path], seed: int = SPLIT_SEED) -> PhotoSplit:
    """Every image file under ``folders`` (recursive, sorted), split per sub-folder into fit and held-out halves."""
    rng = np.random.default_rng(seed)
    fit: list[Path] = []
    held_out: list[Path] = []
    sources = []
    for folder in folders:
        root = Path(folder).expanduser().resolve()
        if not root.is_dir():
            raise PhotoError(f"--non-lesion {folder}: no such folder")
        found = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in SUFFIXES)
        if not found:
            raise PhotoError(f"--non-lesion {folder}: no images ({', '.join(SUFFIXES)}) in it or below it")
        sources.append(str(root))
        for parent in sorted({p.parent for p in found}):
            group = [p for p in found if p.parent == parent]
            order = rng.permutation(len(group))
            k = int(len(group) * HELD_OUT)
            held_out += [group[i] for i in sorted(order[:k])]
            fit += [group[i] for i in sorted(order[k:])]
    return PhotoSplit(sources, fit, held_out, seed)


def _name(path: Path, sources: Sequence[str]) -> str:
    """A photo's name in records: its path under its folder, after the folder's own name."""
    for s in sources:
        if path.is_relative_to(s):
            return f"{Path(s).name}/{path.relative_to(s).as_posix()}"
    return path.as_posix()


@dataclass
class PhotoInputs:
    """What the detector reads of each photo: its backbone features and ``image_statistics``."""

    names: list[str]
    features: np.ndarray
    stats: np.ndarray


def photo_inputs(
    run_dir: str | Path, weights: ResolvedWeights, paths: Sequence[Path], names: Sequence[str]
) -> PhotoInputs:
    """Through the run's own predictor (resize, colour constancy, normalise, backbone), as serving reads them;
    cached beside the feature cache, keyed by the network's ``weights`` (``measure.run_weights``), the
    preprocessing and the files (path, size, modification time)."""
    from lesionlab.data.images import open_image
    from lesionlab.inference.predictor import TorchPredictor
    from lesionlab.training.features import cache_dir, cache_preprocessing

    pre = RunFolder(run_dir).config.preprocessing
    listing = [f"{p}\t{p.stat().st_size}\t{int(p.stat().st_mtime)}" for p in paths]
    key = {
        "v": PHOTOS_VERSION,
        "sha": weights.sha256,
        "pre": cache_preprocessing(weights, pre.resize, pre.color_constancy),
        "files": listing,
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    path = cache_dir() / "photos" / f"{weights.backbone}-{digest}.npz"
    if path.exists():
        a = np.load(path)
        return PhotoInputs(list(names), a["features"], a["stats"])
    predictor = TorchPredictor(run_dir)
    feats, stats = [], []
    for i in range(0, len(paths), 64):  # bounded memory: 64 decoded photos at a time
        batch = predictor.prepare([open_image(p) for p in paths[i : i + 64]])
        f = predictor.forward_uint8(batch)[1]
        assert f is not None  # a TorchPredictor always returns the backbone's features
        feats.append(f)
        stats.append(image_statistics(batch))
    out = PhotoInputs(list(names), np.concatenate(feats), np.concatenate(stats))
    with files.atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.savez(fh, features=out.features, stats=out.stats)
    return out


def recorded_folders(run_dir: Path) -> list[str]:
    """The photo folders the run's detector was fitted with (ood.json), when every one of them is still there."""
    run = RunFolder(run_dir)
    folders = run.read_json(OOD_META).get("dermoscopy_negatives") if run.has(OOD_META) else None
    return list(folders) if folders and all(Path(f).is_dir() for f in folders) else []


def measure_photos(
    detector: LesionDetector, split: PhotoSplit | None, held_out: PhotoInputs | None
) -> tuple[dict, list[ScoreRow]]:
    """refusal.json's ``clinical_photos`` block (the held-out half's refusal rate, both halves' files) and the
    held-out photos' score rows."""
    fitted = detector.dermoscopy is not None
    block: dict = {"dermoscopy_discriminator": fitted}
    if split is None or held_out is None:
        block["note"] = (
            "no clinical or natural photos were given (--non-lesion): the detector was not taught to tell "
            "dermoscopy from clinical photos, and accepts most of them"
        )
        return block, []
    score = detector.score(held_out.features, stats=held_out.stats)
    refused = score > detector.threshold
    if detector.dermoscopy is not None:
        block |= {"threshold": detector.dermoscopy.threshold, "n_fit": len(split.fit)}
    else:
        block["note"] = "this detector has no dermoscopy discriminator: the held-out half measured as it is"
    block |= {
        "held_out": rate(refused),
        "held_out_accepted": [n for n, r in zip(held_out.names, refused) if not r],
        **split.record(),
    }
    rows = [ScoreRow("photo", n, float(v), bool(r)) for n, v, r in zip(held_out.names, score, refused)]
    return block, rows
