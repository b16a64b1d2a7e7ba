"""The study's classifier: backbone features -> Dense(100, ReLU) -> Dense(1) (a logit; sigmoid = P(malignant)).

A diagnosis head (``--target diagnosis``) ends in Dense(K) instead, one logit per diagnosis, and still answers one
binary logit per image: logsumexp over the malignant diagnoses minus logsumexp over the benign ones, so that
sigmoid(logit) is the sum of the softmax over the malignant diagnoses and everything downstream of the logit
(temperature, threshold, refusal, ensembles, export) is the same for both heads.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lesionlab.errors import LesionlabError
from lesionlab.models.backbones import (
    ResolvedWeights,
    build_backbone,
    get_spec,
    num_features,
)

HIDDEN_UNITS = 100


@dataclass(frozen=True)
class Diagnoses:
    """The classes of a diagnosis head, in output order (taxonomy codes), and which of them are malignant."""

    names: tuple[str, ...]
    malignant: tuple[str, ...]

    def __post_init__(self) -> None:
        if not set(self.malignant) <= set(self.names):
            raise ValueError(f"malignant diagnoses {self.malignant} are not all among {self.names}")
        if not self.malignant or len(self.malignant) == len(self.names):
            raise ValueError(f"a diagnosis head needs benign and malignant classes, got {self.names}")

    @property
    def mask(self) -> tuple[bool, ...]:
        return tuple(n in self.malignant for n in self.names)

    def to_meta(self) -> dict[str, Any]:
        return {"diagnoses": list(self.names), "malignant_diagnoses": list(self.malignant)}

    @classmethod
    def from_meta(cls, meta: Mapping[str, Any]) -> Diagnoses | None:
        """From model.pt's meta or config.json's model block; None for a binary model (no ``diagnoses``)."""
        names = meta.get("diagnoses")
        return cls(tuple(names), tuple(meta.get("malignant_diagnoses", ()))) if names else None


class Head(nn.Module):
    """Dense(hidden, ReLU) -> Dense(1), or Dense(K) with ``diagnoses``; ``forward`` is the binary logit either way."""

    malignant_index: torch.Tensor
    benign_index: torch.Tensor

    def __init__(
        self, in_features: int, hidden: int = HIDDEN_UNITS, dropout: float = 0.0, diagnoses: Diagnoses | None = None
    ):
        super().__init__()
        outputs = len(diagnoses.names) if diagnoses else 1
        self.net = nn.Sequential(
            nn.Dropout(dropout), nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, outputs)
        )
        self.diagnoses = diagnoses
        mask = torch.tensor(diagnoses.mask if diagnoses else (), dtype=torch.bool)
        # index buffers, not saved: the checkpoint's meta says which diagnoses are malignant
        self.register_buffer("malignant_index", torch.nonzero(mask).flatten(), persistent=False)
        self.register_buffer("benign_index", torch.nonzero(~mask).flatten(), persistent=False)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.outputs(features)[0]

    def outputs(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(binary logit (N,), diagnosis logits (N, K) or None for a binary head), from one pass."""
        out = self.net(features)
        if self.diagnoses is None:
            return out.squeeze(-1), None
        return binary_logit(out, self.malignant_index, self.benign_index), out

    def diagnosis_logits(self, features: torch.Tensor) -> torch.Tensor:
        """The K diagnosis logits (softmax: P(diagnosis)); ValueError for a binary head."""
        if self.diagnoses is None:
            raise ValueError("this model has a binary head (trained with --target binary): no diagnosis logits")
        return self.net(features)


def binary_logit(z: torch.Tensor, malignant: torch.Tensor, benign: torch.Tensor) -> torch.Tensor:
    """log(P(malignant) / P(benign)) of diagnosis logits ``z`` (N, K): sigmoid of it = the malignant softmax sum."""
    return torch.logsumexp(z.index_select(-1, malignant), -1) - torch.logsumexp(z.index_select(-1, benign), -1)


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

    def outputs(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(binary logit, diagnosis logits or None), from one pass."""
        return self.head.outputs(self.backbone(x))

    def diagnosis_logits(self, x: torch.Tensor) -> torch.Tensor:
        """The K diagnosis logits of a diagnosis model (``diagnoses.names`` order)."""
        return self.head.diagnosis_logits(self.backbone(x))

    @property
    def diagnoses(self) -> Diagnoses | None:
        return self.head.diagnoses


def build_model(
    weights: ResolvedWeights,
    seed: int = 0,
    hidden: int = HIDDEN_UNITS,
    dropout: float = 0.0,
    diagnoses: Diagnoses | None = None,
) -> LesionClassifier:
    backbone = build_backbone(weights, seed)
    torch.manual_seed(seed + 1)  # head init independent of how many draws the backbone took
    return LesionClassifier(backbone, Head(num_features(backbone), hidden, dropout, diagnoses))


class CheckpointingError(LesionlabError):
    """The backbone cannot recompute its activations (``--grad-checkpointing``)."""


def set_grad_checkpointing(backbone: nn.Module) -> None:
    """Makes ``backbone`` (a timm model) keep only each block's input in training and recompute the block in the
    backward pass (timm's ``set_grad_checkpointing``): about half the activation memory for one more forward pass,
    the same gradients. Exact where BatchNorm is frozen, as in fine-tuning (a recomputed BatchNorm in training mode
    would update its running statistics twice). CheckpointingError for a backbone timm cannot checkpoint (VGG)."""
    enable = getattr(backbone, "set_grad_checkpointing", None)
    if enable is None:
        raise CheckpointingError(f"{type(backbone).__name__} has no gradient checkpointing")
    try:
        enable(True)
    except (AssertionError, NotImplementedError) as e:  # timm asserts where a model does not support it
        raise CheckpointingError(f"{type(backbone).__name__} does not support gradient checkpointing: {e}") from None


def save_model(model: LesionClassifier, path: Path, meta: dict) -> None:
    """A self-contained checkpoint: tensors plus the few facts needed to rebuild the module; CPU tensors, so that a
    model trained on a GPU loads on a machine without one."""
    from lesionlab.files import atomic_save_torch

    atomic_save_torch({"state_dict": cpu_state_dict(model), "meta": meta}, path)


def cpu_state_dict(module: nn.Module) -> dict[str, Any]:
    """``module.state_dict()`` with every tensor on the CPU (the same object when they already are)."""
    state = module.state_dict()
    if all(v.device.type == "cpu" for v in state.values()):
        return state
    out = type(state)((k, v.cpu()) for k, v in state.items())
    out._metadata = getattr(state, "_metadata", None)  # type: ignore[attr-defined]  # load_state_dict reads it
    return out


def load_model(path: Path) -> tuple[LesionClassifier, dict]:
    """Rebuilds the architecture from timm (no weights download), with the head its meta names (``diagnoses``:
    a diagnosis head; none, as in every checkpoint before them: binary), and loads the checkpoint."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    meta = ckpt["meta"]
    spec = get_spec(meta["backbone"])
    weights = ResolvedWeights(spec.name, "checkpoint", True, "", spec.mean, spec.std, spec.input_size)
    hidden, dropout = int(meta.get("hidden", HIDDEN_UNITS)), float(meta.get("dropout", 0))
    model = build_model(weights, hidden=hidden, dropout=dropout, diagnoses=Diagnoses.from_meta(meta))
    model.load_state_dict(ckpt["state_dict"])
    return model.eval(), meta
