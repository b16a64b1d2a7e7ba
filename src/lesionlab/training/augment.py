"""Finetune's image augmentation and input normalisation, applied per batch after the image source."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def augment_batch(images: torch.Tensor, size: int) -> torch.Tensor:
    """Dermoscopy has no up or down: flips, 90-degree turns, a random resized crop, mild colour jitter.

    uint8 NxCxHxW in, uint8 NxCx``size``x``size`` out; the draws come from torch's global generator."""
    from torchvision.transforms import v2

    crop = v2.RandomResizedCrop(size, scale=(0.6, 1.0), ratio=(0.8, 1.25), antialias=True)
    jitter = v2.ColorJitter(0.15, 0.15, 0.1, 0.02)
    out = []
    for img in images:  # per image: v2 would share one draw across a batched tensor
        img = crop(img)
        if torch.rand(1) < 0.5:
            img = img.flip(-1)
        if torch.rand(1) < 0.5:
            img = img.flip(-2)
        img = torch.rot90(img, int(torch.randint(0, 4, (1,))), dims=(-2, -1))
        out.append(jitter(img))
    return torch.stack(out)


def to_input(images_uint8: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 NxCxHxW -> normalised float."""
    m = torch.tensor(mean).view(1, 3, 1, 1)
    s = torch.tensor(std).view(1, 3, 1, 1)
    return (images_uint8.float() / 255.0 - m) / s
