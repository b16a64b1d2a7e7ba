"""Safe image decoding: a file or bytes in, an upright RGB image (or a clear reason why not) out; resizing
to the network's input (crop or squash), colour constancy and normalisation."""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from lesionlab.data.sample import Sample
from lesionlab.errors import LesionlabError

MIN_SIDE = 32
#: 64 megapixels: a 48 MP phone photo passes, a decompression bomb does not.
DEFAULT_MAX_PIXELS = 64_000_000
#: Formats we decode; anything else is refused rather than handed to an exotic Pillow plugin.
SAFE_FORMATS = ("JPEG", "PNG", "BMP", "GIF", "TIFF", "WEBP")  # JPEG also opens MPO phone photos

#: How an image reaches the input size, as preprocess.json and config.json name it (``runs.Preprocessing.resize``).
RESIZE_CROP = "shorter-side-bicubic+center-crop"
RESIZE_SQUASH = "squash-bicubic"
#: TrainConfig.resize's words for them; :func:`resize_to_input` takes either spelling.
RESIZE_MODES = {"crop": RESIZE_CROP, "squash": RESIZE_SQUASH}
#: ``runs.Preprocessing.color_constancy`` (and TrainConfig.color_constancy) values.
COLOR_CONSTANCY = ("none", "shades-of-gray")
SHADES_OF_GRAY_P = 6


class BadImageError(LesionlabError):
    """One image cannot be used; ``reason`` says why and ``status`` maps it to HTTP."""

    def __init__(self, path: str, reason: str, status: int = 415):
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason
        self.status = status


def open_image(
    source: str | Path | bytes, name: str | None = None, max_pixels: int = DEFAULT_MAX_PIXELS, min_side: int = MIN_SIDE
) -> Image.Image:
    """Decodes a file or bytes into an upright RGB image, or raises ``BadImageError`` saying why."""
    label = name or (str(source) if not isinstance(source, bytes) else "<image>")
    if isinstance(source, bytes):
        if not source:
            raise BadImageError(label, "empty (0 bytes)", 400)
        fp: io.BytesIO | Path = io.BytesIO(source)
    else:
        path = Path(source)
        if not path.is_file():
            raise BadImageError(label, "file not found", 404)
        if path.stat().st_size == 0:
            raise BadImageError(label, "empty file (0 bytes)", 415)
        fp = path
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img: Image.Image = Image.open(fp, formats=SAFE_FORMATS)
            w, h = img.size
            if w * h > max_pixels:
                raise BadImageError(label, f"{w}x{h} pixels exceeds the cap of {max_pixels:,} pixels", 413)
            img.load()
    except BadImageError:
        raise
    except (UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        if isinstance(e, UnidentifiedImageError):
            raise BadImageError(label, f"not an image in a supported format ({', '.join(SAFE_FORMATS)})") from None
        raise BadImageError(
            label, f"image exceeds the cap of {max_pixels:,} pixels (decompression-bomb guard: {e})", 413
        ) from None
    except (OSError, SyntaxError, ValueError) as e:
        raise BadImageError(label, f"corrupt or truncated image ({e})") from None
    if min(img.size) < min_side:
        raise BadImageError(
            label, f"too small ({img.size[0]}x{img.size[1]}); need at least {min_side}x{min_side} pixels", 422
        )
    img = ImageOps.exif_transpose(img)
    return to_rgb(img)


def to_rgb(img: Image.Image) -> Image.Image:
    """Flattens transparency onto white (a lesion photo has no meaningful alpha) and drops palettes."""
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, rgba).convert("RGB")
    if img.mode.startswith("I;16") or img.mode in ("I", "F"):
        img = _to_8bit(img)
    return img.convert("RGB")


def _to_8bit(img: Image.Image) -> Image.Image:
    """Rescales 16-bit, 32-bit and float greyscale to "L": ``convert`` would clip them, mostly to white.

    I;16*: /257. I: clipped to 0..65535, then /257 unless it already fits 0..255. F: [0,1] x 255 when its
    maximum is at most 1, else clipped to 0..255 (NaN counts as 0).
    """
    a = np.asarray(img).astype(np.float64)
    if img.mode == "F":
        a = np.nan_to_num(a, nan=0.0, posinf=255.0, neginf=0.0)
        a = np.clip(a, 0, 1) * 255 if a.max(initial=0) <= 1 else np.clip(a, 0, 255)
    else:
        a = np.clip(a, 0, 65535)
        if img.mode.startswith("I;16") or a.max(initial=0) > 255:
            a = a / 257
    return Image.fromarray(np.round(a).astype(np.uint8), "L")


def resize_to_input(img: Image.Image, size: int, mode: str = RESIZE_CROP) -> np.ndarray:
    """uint8 ``size`` x ``size`` x 3. ``mode`` RESIZE_CROP ("crop"): shorter side to ``size``, then a centre crop
    (the aspect kept); RESIZE_SQUASH ("squash"): the whole image to the square, bicubic (the aspect ignored, as
    the study's 224x224 files were made from 600x450 originals). Square images are simply resized either way.

    Crop resamples only the source region under the crop (Pillow's ``box``), so a 200000x32 strip costs what a
    square does instead of gigabytes; on photos this matches resizing the whole image and cropping to within
    two grey levels (Pillow rounds between its two passes, and may order them differently).
    """
    mode = RESIZE_MODES.get(mode, mode)
    if mode == RESIZE_SQUASH:
        if img.size == (size, size):
            return np.asarray(img, dtype=np.uint8)
        return np.asarray(img.resize((size, size), Image.Resampling.BICUBIC, reducing_gap=None), dtype=np.uint8)
    if mode != RESIZE_CROP:
        raise ValueError(f"resize must be one of {', '.join([*RESIZE_MODES, *RESIZE_MODES.values()])}, got '{mode}'")
    w, h = img.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    left, top = (nw - size) // 2, (nh - size) // 2
    if (nw, nh) == (w, h):
        return np.asarray(img.crop((left, top, left + size, top + size)), dtype=np.uint8)
    sx, sy = w / nw, h / nh
    box = (left * sx, top * sy, (left + size) * sx, (top + size) * sy)
    img = img.resize((size, size), Image.Resampling.BICUBIC, box=box, reducing_gap=None)
    return np.asarray(img, dtype=np.uint8)


def shades_of_gray(images: np.ndarray, p: float = SHADES_OF_GRAY_P, chunk: int = 32) -> np.ndarray:
    """Shades of Gray colour constancy (Finlayson & Trezzi 2004) of uint8 images, N x H x W x 3 or one H x W x 3.

    Per image, the illuminant of channel c is its Minkowski p-norm mean, e_c = (mean over pixels of I_c^p)^(1/p)
    with I in [0, 1] (p = 1: grey world; p -> inf: max-RGB); channel c is multiplied by mean(e) / e_c, so the
    illuminant becomes grey while the mean of the three estimates (the image's brightness) stays; rounded and
    clipped back to uint8. A channel that is all zero stays zero; a grey image comes back unchanged; a rotated
    or flipped image gets the same correction (so TTA views commute with it).

    Exact and fast on uint8: the p-th powers are a float32 table of the 256 levels weighted by each channel's
    histogram, and the correction a per-image, per-channel 256-entry table; ``chunk`` images at a time bound
    the index arrays.
    """
    batch = np.asarray(images, dtype=np.uint8)
    single = batch.ndim == 3
    batch = batch[None] if single else batch
    levels = np.arange(256, dtype=np.float32)
    powers = (levels / np.float32(255)) ** np.float32(p)
    out = np.empty_like(batch)
    for i in range(0, len(batch), chunk):
        part = batch[i : i + chunk]
        n = len(part)
        # one bincount over all images and channels: value v of channel c of image j counts in bin 768 j + 256 c + v
        index = part.reshape(n, -1, 3) + (np.arange(n, dtype=np.intp)[:, None, None] * 768 + np.arange(3) * 256)
        hist = np.bincount(index.ravel(), minlength=n * 768).reshape(n, 3, 256).astype(np.float32)
        e = (hist @ powers / np.float32(index.shape[1])) ** np.float32(1 / p)  # N x 3 illuminant
        gain = e.mean(axis=1, keepdims=True) / np.maximum(e, np.float32(1e-6))
        table = np.clip(np.rint(levels * gain[:, :, None]), 0, 255).astype(np.uint8)  # N x 3 x 256
        out[i : i + chunk] = table.reshape(-1)[index].reshape(part.shape)
    return out[0] if single else out


def color_constancy(images: np.ndarray, method: str) -> np.ndarray:
    """``method`` of COLOR_CONSTANCY on uint8 images (N x H x W x 3): "none" returns them as they are."""
    if method == "none":
        return images
    if method == "shades-of-gray":
        return shades_of_gray(images)
    raise ValueError(f"color_constancy must be one of {', '.join(COLOR_CONSTANCY)}, got '{method}'")


def normalize(batch_hwc: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """uint8 NxHxWx3 -> float32 Nx3xHxW, scaled to [0,1] then standardised."""
    # float32 throughout; annotated np.ndarray as numpy's stubs wrongly infer complex128 for the line below
    x: np.ndarray = batch_hwc.astype(np.float32) / 255.0
    x = (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


@dataclass
class DecodedSet:
    images: np.ndarray  # uint8 NxHxWx3
    samples: list[Sample]
    bad: list[BadImageError]


def decode_samples(
    samples: list[Sample],
    size: int,
    progress: bool = True,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    resize: str = RESIZE_CROP,
) -> DecodedSet:
    """Decodes every sample once, to ``size`` by ``resize`` (:func:`resize_to_input`); collects the bad ones
    instead of stopping at the first."""
    from tqdm.auto import tqdm

    good, arrays, bad = [], [], []
    for s in tqdm(samples, desc=f"decode {size}px", disable=not progress, unit="img"):
        try:
            arrays.append(resize_to_input(open_image(s.path, s.relpath, max_pixels), size, resize))
            good.append(s)
        except BadImageError as e:
            bad.append(e)
    images = np.stack(arrays) if arrays else np.zeros((0, size, size, 3), np.uint8)
    return DecodedSet(images, good, bad)


T = TypeVar("T")


def opened_batches(
    items: Sequence[T],
    open_one: Callable[[T], Image.Image],
    batch_size: int = 32,
    desc: str = "score",
    progress: bool = True,
) -> Iterator[list[tuple[T, Image.Image | BadImageError]]]:
    """``items`` in batches of ``batch_size``, each with its decoded image or the BadImageError it raised, in
    order: only one batch of images is held, whatever the number of files, under one progress bar. What a bad
    image means (an error, a skipped row, an answer of its own) is the caller's to say."""
    from tqdm.auto import tqdm

    bar = tqdm(total=len(items), desc=desc, unit="img", disable=not progress)
    try:
        for start in range(0, len(items), batch_size):
            batch: list[tuple[T, Image.Image | BadImageError]] = []
            for item in items[start : start + batch_size]:
                try:
                    batch.append((item, open_one(item)))
                except BadImageError as e:
                    batch.append((item, e))
            yield batch
            bar.update(len(batch))
    finally:
        bar.close()


def open_sample(s: Sample) -> Image.Image:
    return open_image(s.path, s.relpath)


def describe_bad(bad: list[BadImageError], limit: int = 20) -> str:
    lines = [f"  {e.path}: {e.reason}" for e in bad[:limit]]
    if len(bad) > limit:
        lines.append(f"  ... and {len(bad) - limit} more")
    return "\n".join(lines)
