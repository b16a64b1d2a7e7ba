"""Grad-CAM: where in the image the evidence for the model's answer lies, drawn as a heatmap over the input.

The heatmap is computed on the last convolutional feature map of the timm backbone
(``forward_features``), weighted by the gradient of the logit, so it shows the regions that pushed
the answer, not merely salient ones. It is a coarse (7x7 for 224 px inputs) visual aid for
research, not a segmentation of the lesion.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, cast

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from lesionlab import runs as rf
from lesionlab.inference.loading import DEFAULT_MODEL_DIR, load_predictor
from lesionlab.inference.predictor import Prediction, Predictor, TorchPredictor
from lesionlab.models.classifier import LesionClassifier

TARGETS = ("predicted", "malignant", "benign")
ALPHA = 0.45


class _TimmBackbone(Protocol):
    """The two halves of a timm model's forward pass that Grad-CAM splits it into."""

    def forward_features(self, x: torch.Tensor) -> torch.Tensor: ...

    def forward_head(self, x: torch.Tensor) -> torch.Tensor: ...


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
    if not hasattr(model.backbone, "forward_features") or not hasattr(model.backbone, "forward_head"):
        name = type(model.backbone).__name__
        raise TypeError(f"{name} has no forward_features/forward_head; Grad-CAM needs a timm model")
    backbone = cast(_TimmBackbone, model.backbone)  # checked just above
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
    folder = rf.RunFolder(model_dir if model_dir else DEFAULT_MODEL_DIR)
    folder.require_operating_point()  # "predicted" means the label at the validation-chosen threshold
    model_dir = folder.path
    if folder.is_ensemble:
        members = folder.members()
        if not members:
            raise rf.RunError(f"{folder / rf.ENSEMBLE} lists no members")
        model_dir = members[0]
    if not (model_dir / rf.MODEL).exists():
        raise rf.RunError(
            f"{model_dir} has no {rf.MODEL}: Grad-CAM needs the PyTorch checkpoint (an ONNX-only "
            "folder cannot be explained)"
        )
    return model_dir


@dataclass
class Explanation:
    heatmap: np.ndarray  # H x W in [0, 1], at the model's input size
    image: np.ndarray  # the model's input, uint8 H x W x 3
    prediction: Prediction  # the model's answer (for an ensemble, the ensemble's, not its first member's)
    target: str  # malignant or benign: whose evidence the heatmap shows
    model_dir: Path

    def overlay(self, alpha: float = ALPHA) -> Image.Image:
        return blend(self.image, self.heatmap, alpha)


def _drawn_network(predictor: Predictor, run_dir: Path) -> TorchPredictor | None:
    """The already loaded PyTorch network of ``run_dir`` inside ``predictor`` (itself, or an ensemble's first
    member), or None when it runs elsewhere (e.g. on ONNX Runtime)."""
    members: list[Predictor] = getattr(predictor, "members", [])
    for candidate in [predictor, *members[:1]]:
        if isinstance(candidate, TorchPredictor) and Path(candidate.info.path).resolve() == run_dir.resolve():
            return candidate
    return None


class Explainer:
    """Grad-CAM for one model folder, built once and then shared by every request (thread-safe: ``gradcam``
    leaves the network untouched).

    ``network`` is the PyTorch model drawn (the folder's, or an ensemble's first member's: ``explainable_dir``)
    and ``answering`` the predictor whose answer is explained. Pass the predictor already loaded (a service's):
    it answers, and its own PyTorch network is drawn when it has the right one, so nothing is loaded twice.
    Without it, the folder is loaded here (an ensemble: every member). Raises RunError when the folder cannot be
    explained (no operating point, no model.pt).
    """

    def __init__(self, model_dir: str | Path | None, predictor: Predictor | None = None):
        self.model_dir = Path(model_dir) if model_dir else DEFAULT_MODEL_DIR
        self.run_dir = explainable_dir(self.model_dir)
        if predictor is None and not rf.RunFolder(self.model_dir).is_ensemble:
            predictor = TorchPredictor(self.run_dir)  # a single run: the drawn network answers too
        self.answering = predictor if predictor is not None else load_predictor(self.model_dir)
        self.network = _drawn_network(self.answering, self.run_dir) or TorchPredictor(self.run_dir)

    def explain(self, image: Image.Image, target: str = "predicted") -> Explanation:
        """The heatmap of the evidence for ``target`` (``predicted``: the label the answering predictor gives at
        its operating threshold, which need not be the logit's sign), with that predictor's answer."""
        prediction = self.answering.analyze([image])[0]
        if target == "predicted":
            target = self.answering.label(prediction.probability)
        arr, heatmap = self._draw(image, target)
        return Explanation(heatmap, arr, prediction, target, self.run_dir)

    def overlay_png(self, image: Image.Image, target: str = "predicted") -> bytes:
        """PNG bytes of the image at the model's input size with its Grad-CAM heatmap blended in.

        With ``target`` benign or malignant (a service passes the label it served) no answer is computed."""
        if target == "predicted":
            overlay = self.explain(image, target).overlay()
        else:
            overlay = blend(*self._draw(image, target))
        buf = io.BytesIO()
        overlay.save(buf, format="PNG")
        return buf.getvalue()

    def _draw(self, image: Image.Image, target: str) -> tuple[np.ndarray, np.ndarray]:
        """(the network's uint8 input, resized as it resizes but before any colour constancy, so the overlay shows
        the photo; its heatmap for ``target``, drawn on the input the network reads)."""
        pre = self.network.info.pre
        arr = pre.resized(image.convert("RGB"))
        x = torch.from_numpy(pre.network_input(arr[None]))
        return arr, gradcam(self.network.model, x, target)[0]


def explain_image(model_dir: str | Path | None, image: Image.Image, target: str = "predicted") -> Explanation:
    """One explanation, loading the folder for it (the CLI's one image); a server keeps an Explainer instead."""
    return Explainer(model_dir).explain(image, target)


def overlay_png(model_dir: str | Path | None, image: Image.Image, target: str = "predicted") -> bytes:
    """PNG bytes of one explanation, loading the folder for it; a server keeps an Explainer instead."""
    return Explainer(model_dir).overlay_png(image, target)
