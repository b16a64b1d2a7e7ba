"""Grad-CAM: where in the image the evidence for the model's answer lies, drawn as a heatmap over the input.

The heatmap is computed on the last convolutional feature map of the timm backbone
(``forward_features``), weighted by the gradient of the logit, so it shows the regions that pushed
the answer, not merely salient ones. It is a coarse (7x7 for 224 px inputs) visual aid for
research, not a segmentation of the lesion.
"""

from __future__ import annotations

import io
import threading
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from lesionlab import runs as rf
from lesionlab.data.images import normalize, resize_to_input
from lesionlab.inference.predictor import (
    DEFAULT_MODEL_DIR,
    ENSEMBLE_FILE,
    Prediction,
    TorchPredictor,
    load_predictor,
    require_operating_point,
)
from lesionlab.models.classifier import LesionClassifier

TARGETS = ("predicted", "malignant", "benign")
ALPHA = 0.45


def gradcam(model: LesionClassifier, x: torch.Tensor, target: str = "predicted") -> np.ndarray:
    """Heatmaps in [0, 1] of the input's size: (N, H, W) for a normalised (N, 3, H, W) batch, (H, W) for one image.

    ``target``: ``malignant`` (evidence for malignant), ``benign`` (evidence against) or ``predicted``
    (whichever side the logit falls on). The model's parameters are not touched, so a shared
    model can explain concurrent requests.
    """
    if target not in TARGETS:
        raise ValueError(f"target must be one of {', '.join(TARGETS)}, got '{target}'")
    single = x.dim() == 3
    x = x.unsqueeze(0) if single else x
    backbone = model.backbone
    if not hasattr(backbone, "forward_features") or not hasattr(backbone, "forward_head"):
        raise TypeError(f"{type(backbone).__name__} has no forward_features/forward_head; Grad-CAM needs a timm model")
    model.eval()
    with torch.no_grad():
        fmap = backbone.forward_features(x)  # N x C x h x w, the last conv block
    fmap = fmap.detach().requires_grad_(True)
    with torch.enable_grad():
        logit = model.head(backbone.forward_head(fmap))
        sign = {"malignant": torch.ones_like(logit), "benign": -torch.ones_like(logit)}.get(
            target, torch.where(logit >= 0, 1.0, -1.0)
        )
        (grad,) = torch.autograd.grad((sign * logit).sum(), fmap)
    weights = grad.mean(dim=(2, 3), keepdim=True)  # one weight per channel: its average pull on the logit
    cam = torch.relu((weights * fmap.detach()).sum(dim=1, keepdim=True))
    cam = F.interpolate(cam, size=x.shape[-2:], mode="bicubic", align_corners=False)[:, 0].clamp_min(0)
    lo = cam.amin(dim=(1, 2), keepdim=True)
    span = cam.amax(dim=(1, 2), keepdim=True) - lo
    cam = torch.where(span > 0, (cam - lo) / span.clamp_min(1e-12), torch.zeros_like(cam))
    out = cam.numpy().astype(np.float32)
    return out[0] if single else out


def blend(image: np.ndarray, heatmap: np.ndarray, alpha: float = ALPHA, cmap: str = "jet") -> Image.Image:
    """The image (uint8 HxWx3) with the colour-mapped heatmap laid over it."""
    import matplotlib

    colours = matplotlib.colormaps[cmap](np.clip(heatmap, 0, 1))[..., :3] * 255.0
    mixed = (1 - alpha) * image.astype(np.float32) + alpha * colours
    return Image.fromarray(np.clip(mixed + 0.5, 0, 255).astype(np.uint8), "RGB")


# ------------------------------------------------------------------ model folders


def explainable_dir(model_dir: str | Path | None) -> Path:
    """The run folder whose PyTorch model is explained: the folder itself, or an ensemble's first member."""
    model_dir = Path(model_dir) if model_dir else DEFAULT_MODEL_DIR
    require_operating_point(model_dir)  # "predicted" means the label at the validation-chosen threshold
    if (model_dir / ENSEMBLE_FILE).exists():
        from lesionlab.ensemble.build import member_dirs

        members = member_dirs(model_dir)
        if not members:
            raise rf.RunError(f"{model_dir / ENSEMBLE_FILE} lists no members")
        model_dir = members[0]
    if not (model_dir / rf.MODEL).exists():
        raise rf.RunError(
            f"{model_dir} has no {rf.MODEL}: Grad-CAM needs the PyTorch checkpoint (an ONNX-only "
            "folder cannot be explained)"
        )
    return model_dir


_lock = threading.Lock()


@lru_cache(maxsize=4)
def _cached_predictor(path: str, mtime_ns: int) -> TorchPredictor:
    return TorchPredictor(path)


def _predictor(run_dir: Path) -> TorchPredictor:
    """One loaded model per folder (reloaded when model.pt changes), shared by every request."""
    with _lock:
        return _cached_predictor(str(run_dir.resolve()), (run_dir / rf.MODEL).stat().st_mtime_ns)


@dataclass
class Explanation:
    heatmap: np.ndarray  # H x W in [0, 1], at the model's input size
    image: np.ndarray  # the model's input, uint8 H x W x 3
    prediction: Prediction  # the model's answer (for an ensemble, the ensemble's, not its first member's)
    target: str  # malignant or benign: whose evidence the heatmap shows
    model_dir: Path

    def overlay(self, alpha: float = ALPHA) -> Image.Image:
        return blend(self.image, self.heatmap, alpha)


def explain_image(model_dir: str | Path | None, image: Image.Image, target: str = "predicted") -> Explanation:
    run_dir = explainable_dir(model_dir)
    predictor = _predictor(run_dir)
    info = predictor.info
    arr = resize_to_input(image.convert("RGB"), info.input_size)
    x = torch.from_numpy(normalize(arr[None], info.mean, info.std))
    answering = predictor
    if model_dir is not None and (Path(model_dir) / ENSEMBLE_FILE).exists():
        answering = load_predictor(model_dir)  # the ensemble answers; its first member is drawn
    prediction = answering.analyze([image])[0]
    if target == "predicted":  # the label at the operating threshold, which need not be the logit's sign
        target = answering.label(prediction.probability)
    heatmap = gradcam(predictor.model, x, target)[0]
    return Explanation(heatmap, arr, prediction, target, run_dir)


def overlay_png(model_dir: str | Path | None, image: Image.Image, target: str = "predicted") -> bytes:
    """PNG bytes of the image at the model's input size with its Grad-CAM heatmap blended in."""
    buf = io.BytesIO()
    explain_image(model_dir, image, target).overlay().save(buf, format="PNG")
    return buf.getvalue()
