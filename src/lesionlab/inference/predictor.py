"""One contract for every consumer (CLI, service, evaluation, ensembles): images in, P(malignant) out.

A predictor owns its preprocessing, its calibration temperature and its operating threshold, all
read from the model folder, so every caller gets the same numbers for the same image. This module holds the
contract and the single networks (PyTorch, ONNX Runtime); ``inference.ensemble`` the ensemble of them and
``inference.loading`` the choice of which to build for a folder (``load_predictor``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from scipy.special import expit

from lesionlab import runs as rf
from lesionlab.data.images import RESIZE_CROP
from lesionlab.inference.diagnoses import diagnosis_probabilities, model_diagnoses, regroup
from lesionlab.models.batching import map_batches
from lesionlab.models.detector import LesionDetector

LABELS = ("benign", "malignant")


@dataclass
class ModelInfo:
    """What a predictor is and how it reads an image. For an ensemble, ``members`` holds each member's info:
    members may differ in input size, normalisation, resize and colour constancy, and each prepares its own input
    (see ``preprocessing``)."""

    model_id: str
    backbone: str
    input_size: int  # the uint8 input size; an ensemble's is its largest member's, so no member upsamples
    mean: tuple[float, ...]  # an ensemble's: its members' when they all agree, else () (see ``preprocessing``)
    std: tuple[float, ...]
    threshold: float = 0.5
    threshold_policy: str = "fixed:0.5"
    temperature: float = 1.0
    tta: bool = False  # the threshold and temperature were fitted on TTA logits: predict with TTA by default
    path: str = ""
    runtime: str = ""
    extra: dict = field(default_factory=dict)
    members: list[ModelInfo] = field(default_factory=list)
    # runs.Preprocessing's resize and colour constancy; an ensemble's: its members' when they all agree, else
    # RESIZE_CROP (how its own ``prepare`` resizes a batch handed to it) and "mixed" (each member corrects its own)
    resize: str = RESIZE_CROP
    color_constancy: str = "none"
    # a diagnosis head's classes in output order and the malignant ones; () for a binary model (or an ensemble
    # whose members do not share them)
    diagnoses: tuple[str, ...] = ()
    malignant_diagnoses: tuple[str, ...] = ()

    @property
    def malignant_mask(self) -> np.ndarray:
        """K bools: which of ``diagnoses`` are malignant."""
        return np.array([d in self.malignant_diagnoses for d in self.diagnoses], bool)

    @property
    def pre(self) -> rf.Preprocessing:
        """A single network's preprocessing, whose methods build its input (``runs.Preprocessing``)."""
        return rf.Preprocessing(
            self.input_size, self.mean, self.std, resize=self.resize, color_constancy=self.color_constancy
        )

    @property
    def preprocessing(self) -> list[dict]:
        """How each network's input is built, one entry per network: the model itself, or every member of an
        ensemble in order (nested ensembles flattened)."""
        if self.members:
            return [entry for m in self.members for entry in m.preprocessing]
        return [
            {
                "model_id": self.model_id,
                "backbone": self.backbone,
                "input_size": self.input_size,
                "mean": list(self.mean),
                "std": list(self.std),
                "resize": self.resize,
                "color_constancy": self.color_constancy,
            }
        ]

    @property
    def uniform_preprocessing(self) -> bool:
        """True when every network reads the same input size, normalisation, resize and colour constancy (always,
        for a single model)."""
        keys = ("input_size", "resize", "color_constancy")
        return len({(*(d[k] for k in keys), tuple(d["mean"]), tuple(d["std"])) for d in self.preprocessing}) == 1


def tta_views(batch_hwc: np.ndarray) -> list[np.ndarray]:
    """Dermoscopy has no canonical orientation: the 8 flips/rotations of the square input.

    The first view is the batch itself (no rotation, no flip): its features feed the lesion detector."""
    views = []
    for k in range(4):
        r = np.rot90(batch_hwc, k, axes=(1, 2))
        views += [r, r[:, :, ::-1]]
    return [np.ascontiguousarray(v) for v in views]


#: What every scoring method accepts: PIL images (any size), or a uint8 N x H x W x 3 batch.
Images = Sequence[Image.Image] | np.ndarray
#: What a network's ``_forward`` gives for a batch: (logits (N,), backbone features (N, D) or None), and for a
#: diagnosis head its (N, K) diagnosis logits third.
Forward = tuple[Any, ...]  # of 2 or 3 items: arrays, the features possibly None


@dataclass
class Prediction:
    """One image's answer. ``label`` is benign, malignant or not_a_lesion (refused). ``diagnoses`` (a diagnosis
    model only, else None): P(diagnosis) per class, the malignant ones summing to ``probability``."""

    probability: float
    label: str
    threshold: float
    logit: float
    refused: bool = False
    ood_score: float | None = None
    reason: str | None = None
    diagnoses: dict[str, float] | None = None

    def to_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items()}


@dataclass
class Scores:
    """What ``Predictor._score`` computes for a batch, before calibration and labels."""

    logits: np.ndarray  # uncalibrated float64 (N,): P(malignant) = sigmoid(logit / temperature)
    ood: np.ndarray | None = None  # lesion-detector score per image; refused above ``refusal_threshold``
    why: list[str] | None = None  # per image, the reason given when it is refused
    # a diagnosis model's (N, K) probabilities in ``info.diagnoses`` order, uncalibrated: the malignant ones sum
    # to sigmoid(logits) (``inference.diagnoses``); None for a binary model
    diagnoses: np.ndarray | None = None


class Predictor:
    """The contract every consumer (CLI, service, evaluation, ensembles) uses.

    ``predict_proba(images, tta=None)`` gives calibrated P(malignant) and ``analyze(images, tta=None)`` one
    :class:`Prediction` per image (labels at the operating threshold, refusals); ``tta=None`` means as the
    operating point was fitted. Both go through one scoring hook, ``_score``, which a single network
    implements with its ``_forward`` (a normalised float32 NCHW batch -> (logits, backbone features or
    None), and a diagnosis head's logits third: :data:`Forward`) over :func:`map_batches`, and an ensemble by
    combining its members' scores. A diagnosis model's ``Prediction.diagnoses`` come with the same calls.
    ``predict``, ``predict_logits``, ``logits_from_uint8`` and ``forward_uint8`` are the older names.
    """

    info: ModelInfo
    detector: LesionDetector | None = None
    batch_size = 32

    # ------------------------------------------------------------ what subclasses provide

    def _forward(self, x: np.ndarray) -> Forward:
        raise NotImplementedError

    def _score(self, images: Images, tta: bool, with_ood: bool) -> Scores:
        """The one scoring path of a single network: TTA costs 8 passes, the identity view's features
        feeding the lesion detector (``with_ood``), and no TTA costs one (per ``batch_size`` images)."""
        batch = self.prepare(images)
        logits, feats, z = self._forward_views(batch, tta)
        diag = None if z is None else diagnosis_probabilities(z, self.info.malignant_mask, logits)
        if not with_ood or self.detector is None or feats is None:
            return Scores(logits, diagnoses=diag)
        ood, why = self.detector.explain(feats, batch)  # "not a dermoscopic image" for a clinical photo
        return Scores(logits, ood, why, diag)

    # ------------------------------------------------------------ the contract

    def predict_proba(self, images: Images, tta: bool | None = None) -> np.ndarray:
        """Calibrated P(malignant) = sigmoid(logit / temperature), one per image (float64, shape (N,))."""
        return expit(self.predict_logits(images, tta) / self.info.temperature)

    def analyze(self, images: Images, tta: bool | None = None) -> list[Prediction]:
        """Probabilities, labels and, when the model has a lesion detector, refusals; one per image."""
        if not len(images):
            return []
        scores = self._score(images, self.use_tta(tta), with_ood=True)
        probs = expit(scores.logits / self.info.temperature)
        diag = None if scores.diagnoses is None else regroup(scores.diagnoses, self.info.malignant_mask, probs)
        limit = self.refusal_threshold
        out = []
        for i, (z, p) in enumerate(zip(scores.logits, probs)):
            pred = Prediction(float(p), self.label(float(p)), self.info.threshold, float(z))
            if diag is not None:  # calibrated: the malignant diagnoses sum to the probability
                pred.diagnoses = {d: float(q) for d, q in zip(self.info.diagnoses, diag[i])}
            if scores.ood is not None and limit is not None:
                pred.ood_score = float(scores.ood[i])
                if scores.ood[i] > limit:
                    pred.refused, pred.label = True, "not_a_lesion"
                    pred.reason = scores.why[i] if scores.why else None
            out.append(pred)
        return out

    def use_tta(self, tta: bool | None) -> bool:
        """None: as the operating point was fitted (its threshold belongs to those scores)."""
        return self.info.tta if tta is None else bool(tta)

    def label(self, probability: float) -> str:
        return LABELS[int(probability >= self.info.threshold)]

    @property
    def refuses_non_lesions(self) -> bool:
        return self.detector is not None

    @property
    def refusal_threshold(self) -> float | None:
        """An image whose ``ood_score`` is above this is refused; None without a lesion detector."""
        return None if self.detector is None else float(self.detector.threshold)

    def prepare(self, images: Images) -> np.ndarray:
        """uint8 N x S x S x 3 at ``info.input_size`` S, before colour constancy (what the lesion detector's pixel
        statistics read): PIL images are resized by ``info.resize`` (crop: shorter side, centre crop; squash: the
        whole image); a uint8 batch already at S passes through untouched, one at another size is resized image by
        image the same way (a second resampling: pass the PIL images when you have them)."""
        size = self.info.input_size
        if isinstance(images, np.ndarray):
            if images.shape[1:3] == (size, size):
                return images
            images = [Image.fromarray(im) for im in images]
        if not len(images):
            return np.zeros((0, size, size, 3), np.uint8)
        pre = self.info.pre
        return np.stack([pre.resized(im) for im in images])

    # ------------------------------------------------------------ older names, kept for their callers

    def predict(self, images: Images, tta: bool | None = None) -> np.ndarray:
        """``predict_proba``."""
        return self.predict_proba(images, tta)

    def predict_logits(self, images: Images, tta: bool | None = None) -> np.ndarray:
        """Uncalibrated logits (float64, shape (N,)); ``tta`` None: as fitted."""
        if not len(images):
            return np.zeros(0)
        # through logits_from_uint8, so that a caller wrapping it sees every scoring call
        return self.logits_from_uint8(images, self.use_tta(tta))

    def logits_from_uint8(self, batch_hwc: Images, tta: bool = False) -> np.ndarray:
        """Uncalibrated logits of a uint8 batch (any size; PIL images too); with ``tta``, the mean over the 8
        dihedral views. ``tta`` defaults to False here: evaluation scores raw logits to fit the operating point."""
        return self._score(batch_hwc, bool(tta), with_ood=False).logits

    def scores_from_uint8(self, batch_hwc: Images, tta: bool = False) -> Scores:
        """``logits_from_uint8``'s scores with, for a diagnosis model, its uncalibrated diagnosis probabilities."""
        return self._score(batch_hwc, bool(tta), with_ood=False)

    def forward_uint8(self, batch_hwc: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """(float64 logits, backbone features or None) of one network, without TTA (a single network only: an
        ensemble has no one feature space, and raises NotImplementedError)."""
        logits, feats, _ = self._forward_views(self.prepare(batch_hwc), tta=False)
        return logits, feats

    # ------------------------------------------------------------ the forward path

    def _forward_uint8_batch(self, batch_hwc: np.ndarray) -> Forward:
        """``_forward`` of a uint8 batch at the input size: colour constancy (when the model has it), then
        normalisation (``runs.Preprocessing.network_input``); so every TTA view is corrected the same way."""
        return self._forward(self.info.pre.network_input(batch_hwc))

    def _forward_views(self, batch: np.ndarray, tta: bool) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        """(float64 logits, features of the batch itself, diagnosis logits or None) with the logits (both kinds)
        averaged over the 8 views under ``tta``; one ``_forward`` per view and ``batch_size`` images. ``batch`` is
        at the input size. ``_forward`` may return a third item, a diagnosis head's (N, K) logits."""
        views = tta_views(batch) if tta else [batch]
        nothing: Forward = (np.zeros(0), None)  # an empty batch: the model is not run
        outs = [map_batches(self._forward_uint8_batch, v, self.batch_size, empty=nothing) for v in views]
        logits = [np.asarray(o[0], np.float64) for o in outs]
        feats = outs[0][1]  # the first view is the batch itself: its features are the detector's
        diag = [np.asarray(o[2], np.float64) for o in outs if len(o) > 2 and o[2] is not None]
        z = None if len(diag) != len(outs) else diag[0] if len(diag) == 1 else np.mean(diag, axis=0)
        return (logits[0] if len(logits) == 1 else np.mean(logits, axis=0)), feats, z


def operating_point_or_default(model_dir: Path) -> rf.OperatingPoint:
    """The folder's operating point (``RunFolder.operating_point``), else threshold 0.5 at temperature 1: raw
    scoring during evaluation needs none (``load_predictor`` refuses a folder without one)."""
    return rf.RunFolder(model_dir).operating_point() or rf.OperatingPoint(model_dir.name, 0.5, "fixed:0.5")


def _info(model_dir: Path, runtime: str) -> ModelInfo:
    """A single network's info: preprocessing from config.json, else from preprocess.json (an exported model)."""
    folder = rf.RunFolder(model_dir)
    if folder.has(rf.CONFIG):
        pre, backbone = folder.config.preprocessing, folder.config.backbone
    else:
        spec = folder.read_json(rf.PREPROCESS)
        pre, backbone = rf.Preprocessing.from_dict(spec), spec.get("backbone", "unknown")
    op = operating_point_or_default(model_dir)
    return ModelInfo(
        model_id=op.model_id,
        backbone=backbone,
        input_size=pre.input_size,
        mean=pre.mean,
        std=pre.std,
        threshold=op.threshold,
        threshold_policy=op.policy,
        temperature=op.temperature,
        tta=op.tta,
        path=str(model_dir),
        runtime=runtime,
        resize=pre.resize,
        color_constancy=pre.color_constancy,
    )


class TorchPredictor(Predictor):
    def __init__(self, model_dir: str | Path, num_threads: int | None = None):
        import torch

        from lesionlab.models.classifier import load_model

        model_dir = Path(model_dir)
        if num_threads:
            torch.set_num_threads(num_threads)
        self.model, self.meta = load_model(model_dir / rf.MODEL)
        self.model.to(memory_format=torch.channels_last)  # oneDNN's fast CPU kernels, about 2x
        self.info = _info(model_dir, "pytorch")
        if self.model.diagnoses is not None:  # the checkpoint's own classes
            self.info.diagnoses, self.info.malignant_diagnoses = (
                self.model.diagnoses.names,
                self.model.diagnoses.malignant,
            )
        self.detector = LesionDetector.load(model_dir)

    def _forward(self, x: np.ndarray) -> Forward:
        """(logits, features), and a diagnosis head's (N, K) logits third."""
        import torch

        with torch.inference_mode():
            feats = self.model.backbone(torch.from_numpy(x).contiguous(memory_format=torch.channels_last))
            logits, z = self.model.head.outputs(feats)
            return (logits.numpy(), feats.numpy()) + (() if z is None else (z.numpy(),))


def onnx_session(path: str | Path, num_threads: int | None = None):
    """The one ONNX Runtime set-up, for serving and for export's parity and int8 checks alike (so a check
    runs the model as it will be served): all graph optimisations, CPU provider, ``num_threads`` intra-op
    threads (None: onnxruntime's default)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if num_threads:
        opts.intra_op_num_threads = num_threads
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


class OnnxPredictor(Predictor):
    def __init__(self, model_dir: str | Path, num_threads: int | None = None):
        model_dir = Path(model_dir)
        self.session = onnx_session(model_dir / rf.ONNX, num_threads)
        self.input_name = self.session.get_inputs()[0].name
        self.info = _info(model_dir, "onnxruntime")
        self.info.diagnoses, self.info.malignant_diagnoses = model_diagnoses(model_dir)
        self.detector = LesionDetector.load(model_dir)

    def _forward(self, x: np.ndarray) -> Forward:
        """(logits, features or None), and the diagnosis logits third when the graph has them (model.onnx's
        third output)."""
        outs = self.session.run(None, {self.input_name: x})
        base = (outs[0].reshape(-1), (outs[1] if len(outs) > 1 else None))
        return base + ((outs[2],) if len(outs) > 2 and self.info.diagnoses else ())
