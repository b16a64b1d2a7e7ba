"""One contract for every consumer (CLI, service, evaluation, ensembles): images in, P(malignant) out.

A predictor owns its preprocessing, its calibration temperature and its operating threshold, all
read from the model folder, so every caller gets the same numbers for the same image.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from scipy.special import expit

from lesionlab import files
from lesionlab import runs as rf
from lesionlab.data.images import normalize, resize_to_input
from lesionlab.models.detector import LesionDetector, ensemble_refusal_score

LABELS = ("benign", "malignant")
ONNX_FILE = "model.onnx"
PREPROCESS_FILE = "preprocess.json"
ENSEMBLE_FILE = "ensemble.json"
DEFAULT_MODEL_DIR = Path(__file__).resolve().parents[1] / "default_model"
BACKENDS = ("auto", "onnx", "torch")


@dataclass
class ModelInfo:
    model_id: str
    backbone: str
    input_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    threshold: float = 0.5
    threshold_policy: str = "fixed:0.5"
    temperature: float = 1.0
    tta: bool = False  # the threshold and temperature were fitted on TTA logits: predict with TTA by default
    path: str = ""
    runtime: str = ""
    extra: dict = field(default_factory=dict)


def tta_views(batch_hwc: np.ndarray) -> list[np.ndarray]:
    """Dermoscopy has no canonical orientation: the 8 flips/rotations of the square input."""
    views = []
    for k in range(4):
        r = np.rot90(batch_hwc, k, axes=(1, 2))
        views += [r, r[:, :, ::-1]]
    return [np.ascontiguousarray(v) for v in views]


@dataclass
class Prediction:
    """One image's answer. ``label`` is benign, malignant or not_a_lesion (refused)."""

    probability: float
    label: str
    threshold: float
    logit: float
    refused: bool = False
    ood_score: float | None = None
    reason: str | None = None

    def to_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items()}


class Predictor:
    """Subclasses implement ``_forward``: a normalised float32 NCHW batch -> (logits, backbone features)."""

    info: ModelInfo
    detector: LesionDetector | None = None
    batch_size = 32

    def _forward(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        raise NotImplementedError

    def _logits(self, x: np.ndarray) -> np.ndarray:
        return self._forward(x)[0]

    @property
    def refuses_non_lesions(self) -> bool:
        return self.detector is not None

    @property
    def refusal_threshold(self) -> float | None:
        """An image whose ``ood_score`` is above this is refused; None without a lesion detector."""
        return None if self.detector is None else float(self.detector.threshold)

    def prepare(self, images: Sequence[Image.Image]) -> np.ndarray:
        return np.stack([resize_to_input(im, self.info.input_size) for im in images])

    def logits_from_uint8(self, batch_hwc: np.ndarray, tta: bool = False) -> np.ndarray:
        """Uncalibrated logits; with ``tta``, the mean logit over the 8 dihedral views."""
        if tta:
            return np.mean([self.logits_from_uint8(v) for v in tta_views(batch_hwc)], axis=0)
        out = [
            self._logits(normalize(batch_hwc[i : i + self.batch_size], self.info.mean, self.info.std))
            for i in range(0, len(batch_hwc), self.batch_size)
        ]
        return np.concatenate(out).astype(np.float64) if out else np.zeros(0)

    def use_tta(self, tta: bool | None) -> bool:
        """None: as the operating point was fitted (its threshold belongs to those scores)."""
        return self.info.tta if tta is None else bool(tta)

    def predict_logits(self, images: Sequence[Image.Image], tta: bool | None = None) -> np.ndarray:
        if not images:
            return np.zeros(0)
        return self.logits_from_uint8(self.prepare(images), self.use_tta(tta))

    def predict(self, images: Sequence[Image.Image], tta: bool | None = None) -> np.ndarray:
        """Calibrated P(malignant) = sigmoid(logit / temperature)."""
        return expit(self.predict_logits(images, tta) / self.info.temperature)

    def label(self, probability: float) -> str:
        return LABELS[int(probability >= self.info.threshold)]

    def forward_uint8(self, batch_hwc: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        outs = [
            self._forward(normalize(batch_hwc[i : i + self.batch_size], self.info.mean, self.info.std))
            for i in range(0, len(batch_hwc), self.batch_size)
        ]
        logits = np.concatenate([o[0] for o in outs]).astype(np.float64)
        feats = None if outs[0][1] is None else np.concatenate([o[1] for o in outs])
        return logits, feats

    def analyze(self, images: Sequence[Image.Image], tta: bool | None = None) -> list[Prediction]:
        """Probabilities, labels and, when the model folder has a lesion detector, refusals."""
        if not images:
            return []
        batch = self.prepare(images)
        logits, feats = self.forward_uint8(batch)
        if self.use_tta(tta):
            logits = self.logits_from_uint8(batch, tta=True)
        probs = expit(logits / self.info.temperature)
        scores = self.detector.score(feats, batch) if self.detector is not None and feats is not None else None
        out = []
        for i, (z, p) in enumerate(zip(logits, probs)):
            pred = Prediction(float(p), self.label(float(p)), self.info.threshold, float(z))
            if scores is not None:
                pred.ood_score = float(scores[i])
                if scores[i] > self.detector.threshold:
                    pred.refused, pred.label = True, "not_a_lesion"
                    pred.reason = (
                        f"does not look like a dermoscopic lesion image (score {scores[i]:.1f} "
                        f"> {self.detector.threshold:.1f})"
                    )
            out.append(pred)
        return out


def _read_operating_point(model_dir: Path) -> dict:
    """calibration.json (written by evaluate), else the copy in preprocess.json (a folder holding only the
    exported model); {} when neither exists (raw scoring during evaluation needs no operating point)."""
    path = model_dir / rf.CALIBRATION
    if path.exists():
        return files.read_json(path)
    pre = model_dir / PREPROCESS_FILE
    if pre.exists():
        spec = files.read_json(pre)
        if "threshold" in spec:
            return {
                "model_id": spec.get("model_id"),
                "threshold": spec["threshold"],
                "tta": spec.get("tta", False),
                "policy": spec.get("threshold_policy"),
                "temperature": spec.get("temperature", 1.0),
            }
    return {}


def require_operating_point(model_dir: Path) -> None:
    """A model without its validation-chosen threshold would silently label at 0.5: refuse to load it."""
    if not _read_operating_point(model_dir):
        raise rf.RunError(
            f"{model_dir} has no operating point ({rf.CALIBRATION}): it was trained with --no-eval "
            f"or its evaluation failed; run `lesionlab evaluate {model_dir}` first"
        )


def _info(model_dir: Path, runtime: str) -> ModelInfo:
    pre_path = model_dir / PREPROCESS_FILE
    if (model_dir / rf.CONFIG).exists():
        cfg = files.read_json(model_dir / rf.CONFIG)
        pre, backbone = cfg["preprocessing"], cfg["backbone"]
    else:
        pre = files.read_json(pre_path)
        backbone = pre.get("backbone", "unknown")
    op = _read_operating_point(model_dir)
    return ModelInfo(
        model_id=op.get("model_id") or model_dir.name,
        backbone=backbone,
        input_size=int(pre["input_size"]),
        mean=tuple(pre["mean"]),
        std=tuple(pre["std"]),
        threshold=float(op.get("threshold", 0.5)),
        threshold_policy=op.get("policy") or "fixed:0.5",
        temperature=float(op.get("temperature", 1.0)),
        tta=bool(op.get("tta", False)),
        path=str(model_dir),
        runtime=runtime,
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
        self.detector = LesionDetector.load(model_dir)

    def _forward(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        import torch

        with torch.inference_mode():
            feats = self.model.backbone(torch.from_numpy(x).contiguous(memory_format=torch.channels_last))
            return self.model.head(feats).numpy(), feats.numpy()


class OnnxPredictor(Predictor):
    def __init__(self, model_dir: str | Path, num_threads: int | None = None):
        import onnxruntime as ort

        model_dir = Path(model_dir)
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if num_threads:
            opts.intra_op_num_threads = num_threads
        self.session = ort.InferenceSession(str(model_dir / ONNX_FILE), opts, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name
        self.info = _info(model_dir, "onnxruntime")
        self.detector = LesionDetector.load(model_dir)

    def _forward(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        outs = self.session.run(None, {self.input_name: x})
        return outs[0].reshape(-1), (outs[1] if len(outs) > 1 else None)


class EnsemblePredictor(Predictor):
    """Mean of the members' calibrated probabilities; threshold from the ensemble's own calibration.json."""

    def __init__(self, model_dir: str | Path, backend: str = "auto", num_threads: int | None = None):
        model_dir = Path(model_dir)
        spec = files.read_json(model_dir / ENSEMBLE_FILE)
        self.members = [load_predictor(_member_path(model_dir, m), backend, num_threads) for m in spec["members"]]
        op = _read_operating_point(model_dir)
        first = self.members[0].info
        self.info = ModelInfo(
            model_id=op.get("model_id") or model_dir.name,
            backbone="ensemble(" + ",".join(m.info.backbone for m in self.members) + ")",
            input_size=first.input_size,
            mean=first.mean,
            std=first.std,
            threshold=float(op.get("threshold", 0.5)),
            threshold_policy=op.get("policy") or "fixed:0.5",
            temperature=float(op.get("temperature", 1.0)),
            tta=bool(op.get("tta", False)),
            path=str(model_dir),
            runtime="+".join(sorted({m.info.runtime for m in self.members})),
        )

    def predict_logits(self, images: Sequence[Image.Image], tta: bool | None = None) -> np.ndarray:
        """The logit of the mean of the members' calibrated probabilities (TTA as the ensemble was fitted)."""
        tta = self.use_tta(tta)
        return mean_probability_logit([m.predict(images, tta) for m in self.members])

    def logits_from_uint8(self, batch_hwc: np.ndarray, tta: bool = False) -> np.ndarray:
        raise TypeError("ensemble members may differ in input size; call predict() with images")

    @property
    def refuses_non_lesions(self) -> bool:
        return any(m.refuses_non_lesions for m in self.members)

    @property
    def refusal_threshold(self) -> float | None:
        """``ood_score`` is the median member's distance / threshold, so the threshold is 1."""
        return 1.0 if self.refuses_non_lesions else None

    def analyze(self, images: Sequence[Image.Image], tta: bool | None = None) -> list[Prediction]:
        """Mean of member probabilities; refused when the median member's lesion detector refuses
        (``ood.ensemble_refusal_score``); ``ood_score`` is then that median of distance / threshold."""
        if not images:
            return []
        tta = self.use_tta(tta)
        per_member = [m.analyze(images, tta) for m in self.members]
        logits = mean_probability_logit([[p.probability for p in preds] for preds in per_member])
        probs = expit(logits / self.info.temperature)
        judges = [
            (m.refusal_threshold, preds)
            for m, preds in zip(self.members, per_member)
            if m.refusal_threshold is not None and all(p.ood_score is not None for p in preds)
        ]
        combined = ensemble_refusal_score([[p.ood_score / t for p in preds] for t, preds in judges]) if judges else None
        out = []
        for i, (z, p) in enumerate(zip(logits, probs)):
            pred = Prediction(float(p), self.label(float(p)), self.info.threshold, float(z))
            if combined is not None:
                pred.ood_score = float(combined[i])
                if combined[i] > 1.0:
                    n_refusing = sum(preds[i].refused for _, preds in judges)
                    pred.refused, pred.label = True, "not_a_lesion"
                    pred.reason = (
                        f"does not look like a dermoscopic lesion image ({n_refusing} of {len(judges)} "
                        f"members' detectors refuse; median score/threshold {combined[i]:.2f} > 1)"
                    )
            out.append(pred)
        return out


def mean_probability_logit(member_probs: Sequence[np.ndarray]) -> np.ndarray:
    p = np.clip(np.mean(member_probs, axis=0), 1e-7, 1 - 1e-7)
    return np.log(p / (1 - p))


def _member_path(ensemble_dir: Path, member: str) -> Path:
    p = Path(member)
    return p if p.is_absolute() else (ensemble_dir / p).resolve()


def load_predictor(
    model_dir: str | Path | None = None, backend: str = "auto", num_threads: int | None = None
) -> Predictor:
    """``auto`` prefers ONNX Runtime when the folder has model.onnx; ``None`` means the bundled default."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got '{backend}'")
    model_dir = Path(model_dir) if model_dir else DEFAULT_MODEL_DIR
    if not model_dir.is_dir():
        raise rf.RunError(f"model folder {model_dir} does not exist")
    require_operating_point(model_dir)
    if (model_dir / ENSEMBLE_FILE).exists():
        return EnsemblePredictor(model_dir, backend, num_threads)
    has_onnx = (model_dir / ONNX_FILE).exists()
    if backend == "onnx" or (backend == "auto" and has_onnx):
        if not has_onnx:
            raise rf.RunError(f"{model_dir} has no {ONNX_FILE}; run `lesionlab export {model_dir}` first")
        return OnnxPredictor(model_dir, num_threads)
    if not (model_dir / rf.MODEL).exists():
        raise rf.RunError(f"{model_dir} holds neither {rf.MODEL} nor {ONNX_FILE}; is it a lesionlab run folder?")
    return TorchPredictor(model_dir, num_threads)
