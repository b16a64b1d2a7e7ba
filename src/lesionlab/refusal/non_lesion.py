"""The non-lesion set a lesion detector is measured against: the photos scikit-image ships, plus generated
noise, flat colours, gradients, shapes and rendered text. Deterministic for a seed."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from lesionlab.data.images import to_rgb

NON_LESION_VERSION = 1  # bump when the generated set changes, to invalidate cached features
#: Photos and scientific images bundled in scikit-image's wheel (no download needed).
SKIMAGE_IMAGES = (
    "astronaut",
    "brick",
    "camera",
    "cat",
    "checkerboard",
    "clock",
    "coffee",
    "coins",
    "colorwheel",
    "grass",
    "gravel",
    "horse",
    "hubble_deep_field",
    "immunohistochemistry",
    "logo",
    "microaneurysms",
    "moon",
    "page",
    "retina",
    "rocket",
    "text",
    "stereo_motorcycle",
    "cell",
)


@dataclass
class NonLesion:
    kind: str  # natural | noise | flat | gradient | shapes | text
    name: str
    image: Image.Image


def _skimage_photos() -> list[NonLesion]:
    """Photos and scientific images shipped inside scikit-image, plus a zoomed crop of each colour photo."""
    try:
        import skimage.data as skd
    except ImportError:
        return []
    out = []
    for name in SKIMAGE_IMAGES:
        try:
            arr = getattr(skd, name)()
        except Exception:  # a sample that needs a download in this skimage version
            continue
        arr = np.asarray(arr[0] if isinstance(arr, tuple) else arr)  # stereo_motorcycle: (left, right, disparity)
        if arr.dtype == bool:
            arr = arr.astype(np.uint8) * 255
        img = to_rgb(Image.fromarray(arr))
        out.append(NonLesion("natural", name, img))
        if arr.ndim == 3 and min(img.size) >= 256:
            w, h = img.size
            s = min(w, h) // 2
            out.append(
                NonLesion("natural", f"{name}-crop", img.crop(((w - s) // 2, (h - s) // 2, (w + s) // 2, (h + s) // 2)))
            )
    return out


def _noise(rng: np.random.Generator, size: int) -> list[NonLesion]:
    out = []
    for i in range(4):
        out.append(NonLesion("noise", f"uniform-{i}", Image.fromarray(rng.integers(0, 256, (size, size, 3), np.uint8))))
        g = np.clip(rng.normal(128, 40, (size, size, 3)), 0, 255).astype(np.uint8)
        out.append(NonLesion("noise", f"gaussian-{i}", Image.fromarray(g)))
        low = rng.integers(0, 256, (8, 8, 3), np.uint8)  # smooth blotches: closer to skin texture than white noise
        out.append(
            NonLesion("noise", f"blotches-{i}", Image.fromarray(low).resize((size, size), Image.Resampling.BICUBIC))
        )
        sp = np.full((size, size, 3), 128, np.uint8)
        mask = rng.random((size, size))
        sp[mask < 0.05], sp[mask > 0.95] = 0, 255
        out.append(NonLesion("noise", f"salt-pepper-{i}", Image.fromarray(sp)))
    return out


#: Black, white, greys, primaries and a few skin tones (a flat skin-coloured image is still not a lesion).
FLAT_COLOURS = [
    (0, 0, 0),
    (255, 255, 255),
    (128, 128, 128),
    (64, 64, 64),
    (200, 200, 200),
    (255, 0, 0),
    (0, 255, 0),
    (0, 0, 255),
    (255, 255, 0),
    (0, 255, 255),
    (255, 0, 255),
    (241, 194, 125),
    (224, 172, 105),
    (198, 134, 66),
    (141, 85, 36),
    (255, 219, 172),
    (180, 120, 120),
    (120, 60, 40),
]


def _flat_and_gradients(rng: np.random.Generator, size: int) -> list[NonLesion]:
    out = [
        NonLesion("flat", "flat-{:02x}{:02x}{:02x}".format(*c), Image.new("RGB", (size, size), c)) for c in FLAT_COLOURS
    ]
    t = np.linspace(0, 1, size, dtype=np.float32)
    yy, xx = np.meshgrid(t, t, indexing="ij")
    radial = np.sqrt((xx - 0.5) ** 2 + (yy - 0.5) ** 2) / 0.71
    ramps: list[np.ndarray] = [xx, yy, (xx + yy) / 2, radial, 1 - radial]
    for i, ramp in enumerate(ramps):
        for j in range(2):
            a, b = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
            arr = (a[None, None] * (1 - ramp[..., None]) + b[None, None] * ramp[..., None]).astype(np.uint8)
            out.append(NonLesion("gradient", f"gradient-{i}-{j}", Image.fromarray(arr)))
    return out


def _shapes(rng: np.random.Generator, size: int) -> list[NonLesion]:
    out = []
    for i in range(8):
        img = Image.new("RGB", (size, size), tuple(int(v) for v in rng.integers(0, 256, 3)))
        d = ImageDraw.Draw(img)
        for _ in range(int(rng.integers(1, 6))):
            x0, y0 = (int(v) for v in rng.integers(0, size - 20, 2))
            x1, y1 = x0 + int(rng.integers(20, size)), y0 + int(rng.integers(20, size))
            fill = tuple(int(v) for v in rng.integers(0, 256, 3))
            (d.ellipse if rng.random() < 0.5 else d.rectangle)((x0, y0, x1, y1), fill=fill)
        out.append(NonLesion("shapes", f"shapes-{i}", img))
    for step in (8, 16, 28, 56):
        arr = ((np.indices((size, size)).sum(0) // step) % 2 * 255).astype(np.uint8)
        out.append(NonLesion("shapes", f"checker-{step}", Image.fromarray(arr).convert("RGB")))
    return out


TEXTS = (
    "lesionlab",
    "The quick brown fox jumps over the lazy dog",
    "Invoice #2024-117  Total: 42.00 EUR",
    "def main():\n    return 0",
    "SKIN CANCER",
    "0123456789",
    "Lorem ipsum dolor sit amet,\nconsectetur adipiscing elit",
    "Hello, world!",
    "benign? malignant?",
    "ERROR 422",
)


def _text(rng: np.random.Generator, size: int) -> list[NonLesion]:
    out = []
    for i, text in enumerate(TEXTS):
        for font_size in (18, 40):
            dark = rng.random() < 0.5
            bg = (20, 20, 30) if dark else (250, 250, 245)
            fg = (
                tuple(int(v) for v in rng.integers(180, 256, 3))
                if dark
                else tuple(int(v) for v in rng.integers(0, 80, 3))
            )
            img = Image.new("RGB", (size, size), bg)
            d = ImageDraw.Draw(img)
            font = ImageFont.load_default(font_size)
            y = 10
            while y < size - font_size:  # fill the page, as a photo of a document would
                d.multiline_text((8, y), text, fill=fg, font=font)
                y += (text.count("\n") + 1) * int(font_size * 1.3) + 6
            out.append(NonLesion("text", f"text-{i}-{font_size}px", img))
    return out


def non_lesion_images(size: int = 256, seed: int = 0) -> list[NonLesion]:
    """About 140 images that are not dermoscopic lesion photos; deterministic for a seed."""
    rng = np.random.default_rng(seed)
    return (
        _skimage_photos() + _noise(rng, size) + _flat_and_gradients(rng, size) + _shapes(rng, size) + _text(rng, size)
    )
