"""Finetune's image augmentation and input normalisation, applied per batch after the image source.

``TrainConfig.augment`` names it: ``none``, ``dermoscopy`` (flips, 90-degree turns, a random resized crop, mild
colour jitter) or ``dermoscopy`` plus extras joined by ``+`` (``dermoscopy+shortcuts+color``):

- ``shortcuts``: artefacts that travel with the class in ISIC images, drawn on both classes alike so they stop
  predicting it: ruler-like tick marks along an edge, purple/blue skin-marker strokes round the lesion and the
  dark corners of a dermatoscope's round field of view (each with probability ``SHORTCUT_P``).
- ``color``: stronger colour changes than dermoscopy's jitter: per-channel gains (an illuminant change), hue,
  saturation, brightness and contrast, one draw per image.
- ``aspect``: one side stretched by up to 4/3 before the crop (600x450 originals squashed to a square, or
  not, differ by that much); on top of the crop's own aspect change of up to 1.25.

Every draw comes from torch's global generator (the loop seeds it per epoch), so a run is repeatable; without
extras the draws and the output are the ones ``dermoscopy`` always gave.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from lesionlab.training.augment_names import augment_parts

SHORTCUT_P = 0.3  # per image and per artefact: the share of training images that get a ruler (ink, dark corners)
ASPECT = 4 / 3


def augment_batch(images: torch.Tensor, size: int, augment: str = "dermoscopy") -> torch.Tensor:
    """Dermoscopy has no up or down: flips, 90-degree turns, a random resized crop, mild colour jitter; then
    ``augment``'s extras (see the module docstring).

    uint8 NxCxHxW in, uint8 NxCx``size``x``size`` out; the draws come from torch's global generator."""
    from torchvision.transforms import v2

    extras = augment_parts(augment)
    if augment == "none":
        return images
    crop = v2.RandomResizedCrop(size, scale=(0.6, 1.0), ratio=(0.8, 1.25), antialias=True)
    jitter = v2.ColorJitter(0.15, 0.15, 0.1, 0.02)
    out = []
    for img in images:  # per image: v2 would share one draw across a batched tensor
        if "aspect" in extras:
            img = stretch(img)
        img = crop(img)
        if torch.rand(1) < 0.5:
            img = img.flip(-1)
        if torch.rand(1) < 0.5:
            img = img.flip(-2)
        img = torch.rot90(img, int(torch.randint(0, 4, (1,))), dims=(-2, -1))
        out.append(jitter(img))
    batch = torch.stack(out)
    if "shortcuts" not in extras and "color" not in extras:
        return batch
    x = batch.float()
    if "shortcuts" in extras:
        x = add_shortcuts(x)
    if "color" in extras:
        x = strong_color(x)
    return x.round_().clamp_(0, 255).to(torch.uint8)


def stretch(img: torch.Tensor) -> torch.Tensor:
    """One CxHxW image with one side stretched by a factor log-uniform in [1, ASPECT] (which side: a coin)."""
    from torchvision.transforms.v2 import functional as F

    r = math.exp((2 * float(torch.rand(1)) - 1) * math.log(ASPECT))
    h, w = img.shape[-2:]
    new = [h, round(w * r)] if r >= 1 else [round(h / r), w]
    return F.resize(img, new, antialias=True)


# ------------------------------------------------------------------ batched extras, float NxCxHxW in 0..255


# each artefact's random parameters: uniform in [lo, hi), lengths in units of the image's longer side
RULER = {
    "edge": (0, 4),  # top, bottom, left, right
    "margin": (0, 0.06),  # from the edge to the base line
    "spacing": (0.025, 0.06),  # between ticks
    "thick": (0.004, 0.01),  # of the lines (at least a pixel)
    "start": (0, 0.5),  # along the edge
    "length": (0.3, 1),
    "tick": (0.025, 0.05),  # every fifth tick twice as long
    "opacity": (0.6, 1),
    "tone": (0, 1),  # below 0.7: dark (grey 0-20), else white (235-255)
    "grey": (0, 20),
}
INK = {
    "cy": (0.35, 0.65),  # the arc's centre
    "cx": (0.35, 0.65),
    "radius": (0.22, 0.46),
    "width": (0.008, 0.03),
    "start": (0, 2 * math.pi),
    "span": (0.5 * math.pi, 2 * math.pi),
    "wobble": (0, 0.03),  # radius * (1 + ...) of three waves round the turn
    "phase": (0, 2 * math.pi),
    "opacity": (0.45, 0.85),
    "blue": (0, 1),  # 0: purple (115, 55, 150), 1: blue (45, 70, 165)
    "dr": (-10, 10),  # per-channel shade
    "dg": (-10, 10),
    "db": (-10, 10),
}
VIGNETTE = {
    "dy": (-0.06, 0.06),  # the field of view's centre, off the image's
    "dx": (-0.06, 0.06),
    "radius": (0.45, 0.68),
    "rim": (0.005, 0.06),  # the soft edge's width
    "floor": (0, 0.2),  # the gain outside
}


def _draws(n: int, keep: torch.Tensor, ranges: dict[str, tuple[float, float]]) -> dict[str, torch.Tensor]:
    """One uniform draw per image and range (all ``n`` drawn, whichever are kept, so the generator advances the
    same), returned for the ``keep`` rows shaped to broadcast over K x H x W."""
    u = torch.rand(n, len(ranges))[keep]
    return {k: (lo + (hi - lo) * u[:, i]).view(-1, 1, 1) for i, (k, (lo, hi)) in enumerate(ranges.items())}


def _grid(h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel-centre coordinates in units of the longer side: (1 x H x 1, 1 x 1 x W)."""
    side = float(max(h, w))
    y = ((torch.arange(h, dtype=torch.float32) + 0.5) / side).view(1, h, 1)
    x = ((torch.arange(w, dtype=torch.float32) + 0.5) / side).view(1, 1, w)
    return y, x


def add_shortcuts(x: torch.Tensor, p: float = SHORTCUT_P) -> torch.Tensor:
    """Ruler marks, then ink strokes, then dark corners, each on a share ``p`` of the images (and computed only
    for those); ``x`` is changed in place and returned."""
    n, _, h, w = x.shape
    for draw in (ruler_mask, ink_mask):
        keep = torch.rand(n) < p
        alpha, colour = draw(n, h, w, keep)
        for a, c, i in zip(alpha, colour, keep.nonzero().flatten().tolist()):
            x[i].lerp_(c.view(3, 1, 1).expand_as(x[i]), a)
    keep = torch.rand(n) < p
    for g, i in zip(vignette_gain(n, h, w, keep), keep.nonzero().flatten().tolist()):
        x[i].mul_(g)
    return x


def ruler_mask(n: int, h: int, w: int, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(opacity K x H x W, colour K x 3) of a ruler along an edge of each ``keep`` image (``RULER``).

    Drawn as a strip along the top edge (only as deep as a ruler reaches), then turned onto its edge."""
    d = _draws(n, keep, RULER)
    side = max(h, w)
    rows = min(h, w, math.ceil((RULER["margin"][1] + 2 * RULER["tick"][1]) * side) + 1)
    depth = ((torch.arange(rows, dtype=torch.float32) + 0.5) / side).view(1, rows, 1) - d["margin"]
    pos = ((torch.arange(side, dtype=torch.float32) + 0.5) / side).view(1, 1, side) - d["start"]
    thick, tick_len = d["thick"].clamp_min(1.0 / side), d["tick"]
    long = torch.remainder(torch.floor(pos / d["spacing"]), 5) == 0
    tick = (torch.remainder(pos, d["spacing"]) < thick) & (depth < torch.where(long, 2 * tick_len, tick_len))
    strips = ((tick | (depth < thick)) & (depth >= 0) & (pos >= 0) & (pos <= d["length"])).float() * d["opacity"]
    alpha = torch.zeros(len(strips), h, w)
    for i, edge in enumerate(d["edge"].flatten().floor().int().tolist()):  # top, bottom, left, right
        if edge == 0:
            alpha[i, :rows] = strips[i, :, :w]
        elif edge == 1:
            alpha[i, h - rows :] = strips[i, :, :w].flip(0)
        elif edge == 2:
            alpha[i, :, :rows] = strips[i, :, :h].T
        else:
            alpha[i, :, w - rows :] = strips[i, :, :h].T.flip(1)
    colour = torch.where(d["tone"] < 0.7, 0.0, 235.0) + d["grey"]
    return alpha, colour.view(-1, 1).expand(-1, 3)


def ink_mask(n: int, h: int, w: int, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(opacity, colour) of a skin-marker stroke on each ``keep`` image: a wobbly arc round a point near the
    centre, a quarter to a whole turn, purple to blue (``INK``)."""
    d = _draws(n, keep, INK)
    y, xx = _grid(h, w)
    dy, dx = y - d["cy"] * h / max(h, w), xx - d["cx"] * w / max(h, w)
    angle = torch.remainder(torch.atan2(dy, dx) - d["start"], 2 * math.pi)
    wave = d["radius"] * (1 + d["wobble"] * torch.sin(3 * angle + d["phase"]))
    off = (torch.sqrt(dy * dy + dx * dx) - wave).abs() - d["width"] / 2
    alpha = (1 - off * max(h, w)).clamp(0, 1) * (angle <= d["span"]).float() * d["opacity"]  # one-pixel soft edge
    m = d["blue"].view(-1, 1)
    shade = torch.cat([d["dr"], d["dg"], d["db"]], dim=1).view(-1, 3)
    colour = torch.tensor([115.0, 55.0, 150.0]) * (1 - m) + torch.tensor([45.0, 70.0, 165.0]) * m + shade
    return alpha, colour


def vignette_gain(n: int, h: int, w: int, keep: torch.Tensor) -> torch.Tensor:
    """K x H x W gain of each ``keep`` image: 1 inside a round field of view, falling over a soft rim to a dark
    floor outside it, as a dermatoscope's lens leaves the corners (``VIGNETTE``)."""
    d = _draws(n, keep, VIGNETTE)
    y, xx = _grid(h, w)
    r = torch.sqrt((y - d["dy"] - h / max(h, w) / 2) ** 2 + (xx - d["dx"] - w / max(h, w) / 2) ** 2)
    return 1 - ((r - d["radius"]) / d["rim"]).clamp(0, 1) * (1 - d["floor"])


# luminance / chroma (YIQ): saturation scales the chroma plane, hue turns it
_YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])


def strong_color(x: torch.Tensor) -> torch.Tensor:
    """Per image: channel gains in [0.85, 1.18] (an illuminant), hue turned by up to 0.06 of the circle,
    saturation x0.6-1.4, brightness x0.7-1.3 and contrast x0.7-1.3 about the mean luminance; all one affine map
    of the colours, so one pass over the pixels."""
    n = len(x)
    gains = torch.exp((2 * torch.rand(n, 3) - 1) * 0.165)
    theta = (2 * torch.rand(n) - 1) * 0.06 * 2 * math.pi
    sat = 0.6 + 0.8 * torch.rand(n)
    bright = 0.7 + 0.6 * torch.rand(n)
    contrast = (0.7 + 0.6 * torch.rand(n)).view(n, 1, 1)
    c, s = torch.cos(theta) * sat, torch.sin(theta) * sat
    turn = torch.zeros(n, 3, 3)
    turn[:, 0, 0] = 1
    turn[:, 1, 1], turn[:, 1, 2], turn[:, 2, 1], turn[:, 2, 2] = c, -s, s, c
    m = torch.linalg.inv(_YIQ) @ turn @ _YIQ @ torch.diag_embed(gains) * bright.view(n, 1, 1)
    flat = x.reshape(n, 3, -1)
    # contrast about the mean luminance of the mapped image, which is linear in the input's channel means
    mean_y = _YIQ[0].view(1, 1, 3) @ m @ flat.mean(dim=2, keepdim=True)  # n x 1 x 1
    out = torch.baddbmm((1 - contrast) * mean_y, contrast * m, flat)
    return out.view_as(x)


def to_input(images_uint8: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 NxCxHxW -> normalised float32, on the images' device."""
    m = torch.tensor(mean, device=images_uint8.device).view(1, 3, 1, 1)
    s = torch.tensor(std, device=images_uint8.device).view(1, 3, 1, 1)
    return (images_uint8.float() / 255.0 - m) / s
