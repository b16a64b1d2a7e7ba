"""Duplicate detection: synthetic copies of real images are found, different lesions are not, the search is not
all-pairs, and the signature cache is used and invalidated by a changed file."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lesionlab.data import duplicates as dup
from lesionlab.data.sample import Sample

# distinct lesions of isic-kaggle test (none is in its near_duplicate_pairs.csv)
ORIGINALS = ["test/benign/1.jpg", "test/benign/10.jpg", "test/malignant/1.jpg", "test/malignant/1003.jpg"]


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    # the default cache may hold a big dataset's signatures, and every search reads all of its packs
    monkeypatch.setenv("LESIONLAB_CACHE_DIR", str(tmp_path / "lesionlab-cache"))


def _sample(path: Path, relpath: str | None = None, source: str = "") -> Sample:
    return Sample(relpath or path.name, path, 0, source=source)


@pytest.fixture
def originals(shared_data: Path) -> list[Sample]:
    return [_sample(shared_data / r, r, "isic-kaggle") for r in ORIGINALS]


def _copies(originals: list[Sample], kinds: tuple[str, ...], folder: Path) -> list[Sample]:
    rng = np.random.default_rng(0)
    out = []
    for s in originals:
        for kind in kinds:
            img, quality = dup.synthetic_copy(Image.open(s.path).convert("RGB"), kind, rng)
            path = folder / f"{Path(s.relpath).stem}-{s.relpath.split('/')[1]}-{kind}.jpg"
            img.save(path, quality=quality)
            out.append(_sample(path, f"copies/{path.name}", "copies"))
    return out


def _found(pairs: list[dup.DuplicatePair], a: str, b: str) -> dup.DuplicatePair | None:
    return next((p for p in pairs if {p.a, p.b} == {a, b}), None)


def test_pixel_copies_found_without_embeddings(originals, tmp_path):
    kinds = ("re-encoded", "resized", "flipped", "rot90")
    copies = _copies(originals, kinds, tmp_path)
    pairs = dup.find_duplicates(originals + copies, embeddings=False, progress=False)
    for n, c in enumerate(copies):
        p = _found(pairs, originals[n // len(kinds)].relpath, c.relpath)
        assert p is not None and p.kind == "same photo", c.relpath
    # different lesions are not matched: every pair links an original with its own copies
    origin = {c.relpath: originals[n // len(kinds)].relpath for n, c in enumerate(copies)}
    assert all(origin.get(p.a, p.a) == origin.get(p.b, p.b) for p in pairs)
    assert not any(_found(pairs, a.relpath, b.relpath) for a in originals for b in originals if a != b)


def _reframed(img: Image.Image, kind: str) -> Image.Image:
    """Copies that differ by the framing the views undo: a 5% diagonal shift (edges repeated), an 85% re-crop at an
    offset, a centre zoom to 80%, and the same 4:3 photo centre-cropped to a square where the original is squashed
    to one (ham10000 vs isic-kaggle)."""
    w, h = img.size
    if kind == "shift 5%":
        d = round(0.05 * w)
        return Image.fromarray(np.pad(np.asarray(img)[d:, d:], ((0, d), (0, d), (0, 0)), mode="edge"))
    if kind == "re-crop 85%":
        box = (round(0.125 * w), round(0.025 * h), round(0.975 * w), round(0.875 * h))
        return img.crop(box).resize((w, h), Image.Resampling.BICUBIC)
    if kind == "zoom 80%":
        return img.crop((round(0.1 * w), round(0.1 * h), round(0.9 * w), round(0.9 * h))).resize((w, h))
    wide = img.resize((round(w * 4 / 3), h), Image.Resampling.BICUBIC)  # the 4:3 photo `img` is a squash of
    x = (wide.width - h) // 2
    return wide.crop((x, 0, x + h, h))


def test_shift_and_recrop_found_across_sources(originals, tmp_path):
    # found by the geometric views of the thumbnail: no embedding needed
    kinds = ("shift 5%", "re-crop 85%", "zoom 80%", "centre-cropped 4:3")
    copies = []
    for s in originals:
        for kind in kinds:
            path = tmp_path / f"{Path(s.relpath).stem}-{s.relpath.split('/')[1]}-{kind}.jpg"
            _reframed(Image.open(s.path).convert("RGB"), kind).save(path, quality=90)
            copies.append(_sample(path, f"copies/{path.name}", "copies"))
    pairs = dup.find_duplicates(originals + copies, embeddings=False, progress=False, across_sources=True)
    for n, c in enumerate(copies):
        p = _found(pairs, originals[n // len(kinds)].relpath, c.relpath)
        assert p is not None and p.kind == "same photo", (c.relpath, pairs)
    assert len(pairs) == len(copies)  # nothing else, and nothing within a source


def test_random_shift_and_recrop_mostly_found(originals, tmp_path):
    # synthetic_copy's 4% shift and 85% re-crop at a random offset fall between the views' 5% grid; a fine-textured
    # 32x32 thumbnail loses ~0.04 correlation per 2 px of misalignment, so not all pass (bench: recall per kind)
    copies = _copies(originals, ("shifted", "re-cropped"), tmp_path)
    pairs = dup.find_duplicates(originals + copies, embeddings=False, progress=False)
    found = [_found(pairs, originals[n // 2].relpath, c.relpath) is not None for n, c in enumerate(copies)]
    assert sum(found[0::2]) >= 3 and sum(found[1::2]) >= 1, found
    assert len(pairs) == sum(found)


def test_only_pairs_touching(originals, tmp_path):
    copies = _copies(originals[:2], ("flipped",), tmp_path)
    pairs = dup.find_duplicates(
        originals + copies, embeddings=False, progress=False, only_pairs_touching={copies[0].relpath}
    )
    assert [(p.a, p.b) for p in pairs] == [tuple(sorted((originals[0].relpath, copies[0].relpath)))]


def _blobs(folder: Path, n: int, rng: np.random.Generator) -> list[Sample]:
    """Smooth random images (low-frequency noise), pairwise different."""
    out = []
    for i in range(n):
        low = rng.normal(size=(6, 6, 3))
        a = np.asarray(Image.fromarray(((low - low.min()) / np.ptp(low) * 255).astype(np.uint8)).resize((64, 64)))
        path = folder / f"blob{i:03d}.png"
        Image.fromarray(a).save(path)
        out.append(_sample(path))
    return out


def test_search_is_not_all_pairs(tmp_path):
    rng = np.random.default_rng(1)
    samples = _blobs(tmp_path, 300, rng)
    for s in samples[:5]:  # five turned copies hidden among them
        path = tmp_path / f"copy-{s.relpath}"
        Image.open(s.path).transpose(Image.Transpose.ROTATE_270).save(path)
        samples.append(_sample(path))
    stats = dup.SearchStats()
    pairs = dup.find_duplicates(samples, embeddings=False, progress=False, stats=stats)
    n = len(samples)
    assert stats.candidates < 0.01 * n * (n - 1) * len(dup.VIEWS) * 8 * dup.N_REFERENCES  # of all checks, both ways
    assert {(p.a, p.b) for p in pairs} == {(f"blob{i:03d}.png", f"copy-blob{i:03d}.png") for i in range(5)}


def test_cache_used_then_invalidated(tmp_path, monkeypatch):
    rng = np.random.default_rng(2)
    samples = _blobs(tmp_path, 6, rng)
    cache = tmp_path / "cache"
    first = dup.SearchStats()
    pairs = dup.find_duplicates(samples, embeddings=False, progress=False, cache=cache, stats=first)
    assert (first.decoded, first.cached) == (6, 0)

    def no_decode(*args, **kwargs):
        raise AssertionError("decoded although cached")

    with monkeypatch.context() as m:
        m.setattr(dup, "open_image", no_decode)
        second = dup.SearchStats()
        assert dup.find_duplicates(samples, embeddings=False, progress=False, cache=cache, stats=second) == pairs
        assert (second.decoded, second.cached) == (0, 6)

    # samples[1] becomes a copy of samples[0]: a changed file (new size and mtime) is decoded again
    Image.open(samples[0].path).transpose(Image.Transpose.FLIP_TOP_BOTTOM).save(samples[1].path)
    st = samples[1].path.stat()
    os.utime(samples[1].path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    third = dup.SearchStats()
    pairs = dup.find_duplicates(samples, embeddings=False, progress=False, cache=cache, stats=third)
    assert (third.decoded, third.cached) == (1, 5)
    assert [(p.a, p.b, p.kind) for p in pairs] == [("blob000.png", "blob001.png", "same photo")]


def test_unreadable_skipped_and_groups(tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not a jpeg")
    stats = dup.SearchStats()
    assert dup.find_duplicates([_sample(bad)], embeddings=False, progress=False, stats=stats) == []
    assert stats.bad == ["bad.jpg"]
    groups = dup.duplicate_groups([("a", "b"), ("c", "d"), ("b", "e")])
    assert groups == [["a", "b", "e"], ["c", "d"]]
    p = dup.DuplicatePair("x", "y", "same photo", 1.0, 1.0, float("nan"))
    assert dup.duplicate_links([p]) == [("x", "y")]
