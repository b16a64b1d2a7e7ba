"""A dataset read once as training reads it: backbone feature vectors (frozen) or slots of decoded images in the
image cache (finetune), then split into the training sources of ``sources.py`` for each fold and seed."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lesionlab.data.dataset import Dataset, Sample
from lesionlab.data.image_cache import ImageCache, ImageSpec
from lesionlab.models.backbones import ResolvedWeights
from lesionlab.models.classifier import Diagnoses
from lesionlab.training.features import BadDataError, load_or_compute
from lesionlab.training.sources import VALIDATION_PIXELS, FeatureSource, ImageSource
from lesionlab.training.targets import class_index


@dataclass
class Inputs:
    """A dataset's readable files as training reads them (feature vectors or decoded images), and the others.

    Read once per (backbone, seed); :meth:`source` then picks the rows of a split."""

    mode: str
    weights: ResolvedWeights
    relpaths: list[str]
    arrays: np.ndarray  # frozen: float32 N x D features; finetune: int64 N slots of the images in ``cache``
    bad: list[tuple[str, str]]  # (relpath, reason) of the files that could not be decoded
    cache: ImageCache | None = None  # finetune: where the decoded images are
    workers: int = 0  # finetune: DataLoader worker processes

    def rows(self, samples: list[Sample]) -> tuple[np.ndarray, np.ndarray]:
        index = {r: i for i, r in enumerate(self.relpaths)}
        keep = [s for s in samples if s.relpath in index]
        return self.arrays[[index[s.relpath] for s in keep]], np.array([s.label for s in keep], np.float32)

    def classes(self, samples: list[Sample], diagnoses: Diagnoses) -> np.ndarray:
        """The diagnosis classes of the rows ``rows`` gives (-1: no diagnosis)."""
        readable = set(self.relpaths)
        return class_index([s for s in samples if s.relpath in readable], diagnoses)

    def source(
        self, splits: dict[str, list[Sample]], diagnoses: Diagnoses | None = None, save_memory: bool = False
    ) -> FeatureSource | ImageSource:
        """The training source of ``splits`` (its train and val lists); with ``diagnoses``, a diagnosis head's.
        ``save_memory`` (``--grad-checkpointing``): validation batches of half the pixels, which at large inputs
        would otherwise take more memory than the checkpointed training step."""
        (x_tr, y_tr), (x_va, y_va) = self.rows(splits["train"]), self.rows(splits["val"])
        c_tr = None if diagnoses is None else self.classes(splits["train"], diagnoses)
        c_va = None if diagnoses is None else self.classes(splits["val"], diagnoses)
        if self.mode == "frozen":
            return FeatureSource(x_tr, y_tr, x_va, y_va, c_train=c_tr, c_val=c_va, diagnoses=diagnoses)
        assert self.cache is not None
        return ImageSource(
            self.cache, x_tr, y_tr, x_va, y_va, self.weights, c_train=c_tr, c_val=c_va, diagnoses=diagnoses,
            workers=self.workers, batch_pixels=VALIDATION_PIXELS // (2 if save_memory else 1),
        )  # fmt: skip


def read_inputs(
    dataset: Dataset,
    weights: ResolvedWeights,
    mode: str,
    seed: int,
    skip_bad: bool,
    progress: bool,
    resize: str = "crop",
    color_constancy: str = "none",
    workers: int = 0,
) -> Inputs:
    """Cached features (frozen) or cached decoded images (finetune) of every file, decoded by ``resize`` and
    colour-corrected by ``color_constancy`` (TrainConfig's settings); BadDataError on unreadable files unless
    ``skip_bad``. Finetune images are decoded into the image cache (``data.image_cache``) by ``workers``
    processes, only where it does not hold them already, and colour-corrected there, once, so augmentation starts
    from corrected images (as predictors correct before normalising)."""
    if mode == "frozen":
        table = load_or_compute(
            dataset, weights, seed, skip_bad, progress, resize=resize, color_constancy=color_constancy
        )
        return Inputs(mode, weights, table.relpaths, table.features, table.bad)
    cache = ImageCache(ImageSpec(weights.input_size, resize, color_constancy))
    slots = cache.slots(dataset.all)
    errors = cache.fill(dataset.all, slots, workers, progress)
    if errors and not skip_bad:
        raise BadDataError(errors)
    bad = {e.path for e in errors}
    keep = [i for i, s in enumerate(dataset.all) if s.relpath not in bad]
    relpaths = [dataset.all[i].relpath for i in keep]
    return Inputs(mode, weights, relpaths, slots[keep], [(e.path, e.reason) for e in errors], cache, workers)
