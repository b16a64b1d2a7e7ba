"""The study's classifier: backbone features -> Dense(100, ReLU) -> Dense(1) (a logit; sigmoid = P(malignant))."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from lesionlab.models.backbones import (
    ResolvedWeights,
    build_backbone,
    get_spec,
    num_features,
)

HIDDEN_UNITS = 100


class Head(nn.Module):
    def __init__(self, in_features: int, hidden: int = HIDDEN_UNITS, dropout: float = 0.0):
        super().__init__()
        self.net = nn.Sequential(nn.Dropout(dropout), nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, 1))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net(features).squeeze(-1)


class LesionClassifier(nn.Module):
    """Outputs logits; probabilities (and temperature scaling) are the predictor's business."""

    def __init__(self, backbone: nn.Module, head: Head):
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)


def build_model(
    weights: ResolvedWeights, seed: int = 0, hidden: int = HIDDEN_UNITS, dropout: float = 0.0
) -> LesionClassifier:
    backbone = build_backbone(weights, seed)
    torch.manual_seed(seed + 1)  # head init independent of how many draws the backbone took
    return LesionClassifier(backbone, Head(num_features(backbone), hidden, dropout))


def save_model(model: LesionClassifier, path: Path, meta: dict) -> None:
    """A self-contained checkpoint: tensors plus the few facts needed to rebuild the module."""
    from lesionlab.files import atomic_save_torch

    atomic_save_torch({"state_dict": model.state_dict(), "meta": meta}, path)


def load_model(path: Path) -> tuple[LesionClassifier, dict]:
    """Rebuilds the architecture from timm (no weights download) and loads the checkpoint."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    meta = ckpt["meta"]
    spec = get_spec(meta["backbone"])
    weights = ResolvedWeights(spec.name, "checkpoint", True, "", spec.mean, spec.std, spec.input_size)
    model = build_model(weights, hidden=int(meta.get("hidden", HIDDEN_UNITS)), dropout=float(meta.get("dropout", 0)))
    model.load_state_dict(ckpt["state_dict"])
    return model.eval(), meta
