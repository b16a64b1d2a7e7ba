"""Typed views of the run folder's files: config.json, the operating point, splits.csv and refusal_scores.csv."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from lesionlab.data.images import (
    RESIZE_CROP,  # ``Preprocessing.resize`` values: TrainConfig.resize "crop" and "squash"
    RESIZE_SQUASH,
    DecodedSet,
    color_constancy,
    decode_samples,
    normalize,
    resize_to_input,
)
from lesionlab.data.sample import Sample
from lesionlab.runs.names import RUN_KIND

__all__ = ["RESIZE_CROP", "RESIZE_SQUASH", "OperatingPoint", "Preprocessing", "RunConfig", "ScoreRow", "SplitRow"]


@dataclass(frozen=True)
class Preprocessing:
    """Everything that turns a file into the network's input (preprocess.json, config.json "preprocessing").

    In order: decode to RGB; ``resize`` to ``input_size`` (RESIZE_CROP or RESIZE_SQUASH); ``color_constancy``
    ("none" or "shades-of-gray") on the uint8 input; scale, normalise with ``mean``/``std``; NCHW.

    The methods below are those steps, and every consumer (training, frozen features, evaluation, predictors,
    serving, ONNX export) builds its input through them: :meth:`resized` / :meth:`decode` (step 1: the uint8
    input the lesion detector's pixel statistics read), :meth:`corrected` (step 2) and :meth:`network_input`
    (steps 2 to 4)."""

    input_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    resize: str = RESIZE_CROP
    channels: str = "RGB"
    layout: str = "NCHW"
    scale: str = "1/255"
    color_constancy: str = "none"

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Preprocessing:
        keep = {k: d[k] for k in ("resize", "channels", "layout", "scale", "color_constancy") if k in d}
        return cls(int(d["input_size"]), tuple(d["mean"]), tuple(d["std"]), **keep)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(mean=list(self.mean), std=list(self.std))
        return d

    def resized(self, image: Image.Image) -> np.ndarray:
        """Step 1 of one RGB image: uint8 S x S x 3 at ``input_size``, by ``resize``."""
        return resize_to_input(image, self.input_size, self.resize)

    def decode(self, samples: list[Sample], progress: bool = True) -> DecodedSet:
        """Step 1 of files (unreadable ones collected, not raised): uint8 N x S x S x 3, before colour constancy."""
        return decode_samples(samples, self.input_size, progress, resize=self.resize)

    def corrected(self, batch_hwc: np.ndarray) -> np.ndarray:
        """Step 2: ``color_constancy`` on uint8 N x S x S x 3 (the batch itself when it is "none")."""
        return color_constancy(batch_hwc, self.color_constancy)

    def network_input(self, batch_hwc: np.ndarray) -> np.ndarray:
        """Steps 2 to 4 of a uint8 N x S x S x 3 batch (step 1's output): float32 N x 3 x S x S."""
        return normalize(self.corrected(batch_hwc), self.mean, self.std)


@dataclass(frozen=True)
class OperatingPoint:
    """Temperature and threshold fitted on validation, and whether they were fitted on TTA scores."""

    model_id: str
    threshold: float
    policy: str
    temperature: float = 1.0
    tta: bool = False

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], default_id: str = "") -> OperatingPoint:
        return cls(
            d.get("model_id") or default_id,
            float(d["threshold"]),
            d.get("policy") or d.get("threshold_policy") or "fixed:0.5",
            float(d.get("temperature", 1.0)),
            bool(d.get("tta", False)),
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class RunConfig:
    """``config.json``, migrated to the current schema; ``raw`` holds all of it."""

    raw: dict[str, Any] = field(repr=False)

    @property
    def kind(self) -> str:
        return str(self.raw.get("kind", RUN_KIND))

    @property
    def backbone(self) -> str:
        return str(self.raw["backbone"])

    @property
    def mode(self) -> str:
        return str(self.raw["mode"])

    @property
    def title(self) -> str:
        return f"{self.backbone} ({self.mode})"

    @property
    def weights(self) -> dict[str, Any]:
        return dict(self.raw.get("weights", {}))

    @property
    def preprocessing(self) -> Preprocessing:
        return Preprocessing.from_dict(self.raw["preprocessing"])

    @property
    def data(self) -> dict[str, Any]:
        return dict(self.raw.get("data", {}))

    @property
    def sources(self) -> list[dict[str, Any]]:
        """config.json's data sources (``name``, ``root``, ``format``, ``spec``, ``counts`` per split and class). A
        run of one folder from before multi-source training records none: that folder then, without counts."""
        if self.data.get("sources"):
            return [dict(s) for s in self.data["sources"]]
        root = Path(str(self.data.get("root", "")))
        return [{"name": root.name or None, "root": str(root), "format": "folder"}]

    @property
    def data_root(self) -> Path:
        return Path(self.raw["data"]["root"])

    @property
    def classes(self) -> tuple[str, str]:
        a, b = self.raw["data"]["classes"]
        return str(a), str(b)

    @property
    def train(self) -> dict[str, Any]:
        return dict(self.raw.get("train", {}))

    @property
    def val_folds(self) -> list[int]:
        """The validation folds of a run (one, or two for an inner run of a nested cross-fit)."""
        d = self.data
        return sorted({int(d.get("fold", 0))} | ({int(d["also_val_fold"])} if "also_val_fold" in d else set()))


@dataclass(frozen=True)
class SplitRow:
    """One line of splits.csv. ``members`` (cross-fit ensembles only): the members that held the image out."""

    relpath: str
    label: int
    split: str
    members: str = ""


@dataclass(frozen=True)
class ScoreRow:
    """One line of refusal_scores.csv: an image of a set (test, non_lesion), its detector score, refused or not."""

    set: str
    name: str
    score: float
    refused: bool
