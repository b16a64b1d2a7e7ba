"""Duplicate and same-lesion detection across everything a run trains and evaluates on.

Per image, two signatures, cached on disk by file identity (resolved path, size, mtime):

- **view thumbnails**: regions of the image (*views*, :data:`VIEWS`) squashed to 32x32 RGB (box filter),
  channels centred, unit length (dot product = normalised correlation). Views undo how copies differ: whole;
  centre 75% of width or height (4:3 squashed to a square vs centre-cropped: how ham10000 and isic-kaggle hold
  the same ISIC photos); centre 90/85/80% (re-crops, zoom); 85% crops shifted by 5% on a 3x3 grid (shifts,
  matched against the centred 85%: the whole image would include the moved edge). Whole and centre 85% are the
  **references**; a pair's score is the best correlation of any view of one image, in any of the 8 dihedral
  transforms (they permute a thumbnail), with a reference of the other, both ways round.
- an **embedding** (optional, off: on ham10000 the nearest unrelated image has cosine ~0.94 at the 90th
  percentile, as high as re-cropped copies): a frozen ImageNet backbone's pooled features, unit length.

Not all-pairs: a threshold ``t`` on unit vectors' dot product is a radius ``sqrt(2 - 2t)``; references' PCA
projections (orthogonal: distances only shrink) go into a KD-tree that every view x transform queries by radius.
``same_photo`` 0.975: an image's best score against unrelated ham10000 images has median 0.91, 99th percentile
0.97, max 0.977 (400 images); re-encoded, resized, flipped, turned copies >= 0.99; ham10000 x isic-kaggle copies
mostly >= 0.99 (width 75%). ``"same lesion"``: else embedding cosine >= ``same_lesion``. :func:`duplicate_links`
gives ``load_sources(links=...)``; :func:`duplicate_groups` the connected groups.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
from PIL import Image

if TYPE_CHECKING:
    from sklearn.neighbors import KDTree

from lesionlab.data.images import BadImageError, normalize, open_image
from lesionlab.data.sample import Sample
from lesionlab.files import atomic_path, cache_root

#: Bump when a signature's definition changes: old cache folders are then simply not read.
SIGNATURE_VERSION = 2
THUMB_SIDE = 32
#: name -> crop box (left, top, right, bottom) in fractions of width and height; references first; the order is part
#: of the cached signature (bump SIGNATURE_VERSION).
VIEWS: dict[str, tuple[float, float, float, float]] = {
    "whole": (0.0, 0.0, 1.0, 1.0),
    "centre 85%": (0.075, 0.075, 0.925, 0.925),
    "width 75%": (0.125, 0.0, 0.875, 1.0),
    "height 75%": (0.0, 0.125, 1.0, 0.875),
    "centre 90%": (0.05, 0.05, 0.95, 0.95),
    "centre 80%": (0.1, 0.1, 0.9, 0.9),
    **{  # 85% crops shifted by 5% of the side on a 3x3 grid around the centred one: shifts are rarely along an axis
        f"85% {dy}{dx}".strip(): (0.075 + ox, 0.075 + oy, 0.925 + ox, 0.925 + oy)
        for oy, dy in ((-0.05, "up "), (0.0, ""), (0.05, "down "))
        for ox, dx in ((-0.05, "left"), (0.0, ""), (0.05, "right"))
        if ox or oy
    },
}
N_REFERENCES = 2
VIEW_NAMES = tuple(VIEWS)
#: Images decoded (and embedded) per step; a cache pack is written after each, so an interrupted run keeps them.
CHUNK = 512
DEFAULT_BACKBONE = "mobilenetv2"  # local weights in the shared folder; efficientnet_lite0 is as good, as slow

Kind = Literal["same photo", "same lesion"]


@dataclass(frozen=True)
class Thresholds:
    """``same_photo``: best view x dihedral 32x32 thumbnail correlation; ``same_lesion``: embedding cosine."""

    same_photo: float = 0.975
    same_lesion: float = 0.96


@dataclass(frozen=True)
class DuplicatePair:
    """Two relpaths (``a < b``), their kind, the deciding score (thumbnail correlation or embedding cosine), both
    scores (``nan`` where not computed), and the view (of either image) that gave ``thumb_corr``."""

    a: str
    b: str
    kind: Kind
    score: float
    thumb_corr: float
    embed_cos: float
    view: str = ""


@dataclass
class SearchStats:
    """What :func:`find_duplicates` did: images, cached, decoded, unreadable, candidates checked, pairs found."""

    images: int = 0
    cached: int = 0
    decoded: int = 0
    bad: list[str] = field(default_factory=list)
    candidates: int = 0
    pairs: int = 0


def default_cache() -> Path:
    """``$LESIONLAB_CACHE_DIR/duplicates`` (default ``~/.cache/lesionlab``: ``files.cache_root``)."""
    return cache_root() / "duplicates"


def file_key(path: Path) -> str | None:
    """Identity of a file's content as far as the file system tells (resolved path, size, mtime); None if unreadable."""
    try:
        st = path.stat()
    except OSError:
        return None
    return hashlib.sha1(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()


def thumbnail(img: Image.Image, box: tuple[float, float, float, float] = (0.0, 0.0, 1.0, 1.0)) -> np.ndarray:
    """float32 (3072,): region ``box`` (as in :data:`VIEWS`) squashed to 32x32, channels centred, unit length."""
    (w, h), (x0, y0, x1, y1) = img.size, box  # resize(box=...) box-filters the region straight to 32x32
    a = np.asarray(img.resize((THUMB_SIDE,) * 2, Image.Resampling.BOX, box=(x0 * w, y0 * h, x1 * w, y1 * h)), "f4")
    a = a - a.mean(axis=(0, 1), keepdims=True)  # per channel: a colour cast or exposure change does not count
    norm = float(np.linalg.norm(a))
    return (a / norm if norm > 1e-6 else a).reshape(-1)


def view_thumbnails(img: Image.Image) -> np.ndarray:
    """float32 (len(VIEWS), 32*32*3): the :func:`thumbnail` of each view, references first."""
    return np.stack([thumbnail(img, box) for box in VIEWS.values()])


def dihedral_thumbnails(thumbs: np.ndarray) -> list[np.ndarray]:
    """The 8 dihedral transforms (identity first) of N flat thumbnails, each N x D."""
    t = thumbs.reshape(-1, THUMB_SIDE, THUMB_SIDE, 3)
    rots = [np.rot90(t, k, axes=(1, 2)) for k in range(4)]
    return [np.ascontiguousarray(x).reshape(len(thumbs), -1) for r in rots for x in (r, r[:, :, ::-1])]


class SignatureStore:
    """``pack-*.npz`` files in one folder per configuration: file keys, view thumbnails (N x views x D), embeddings
    (optional), float16. Reading loads every pack; a changed file has a new key, so its old entry is never read."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.entries: dict[str, tuple[np.ndarray, np.ndarray | None]] = {}
        for p in sorted(folder.glob("pack-*.npz")) if folder.is_dir() else []:
            try:
                with np.load(p) as z:  # z[name] reads the member again on every access: once each
                    keys, thumbs = z["keys"], z["thumbs"]
                    emb = z["embeds"] if "embeds" in z.files else None
                for i, k in enumerate(keys):
                    self.entries[str(k)] = (thumbs[i], emb[i] if emb is not None else None)
            except (OSError, ValueError, KeyError):
                continue  # a damaged pack only costs recomputation

    def add(self, keys: list[str], thumbs: np.ndarray, embeds: np.ndarray | None) -> None:
        if not keys:
            return
        name = hashlib.sha1("".join(keys).encode()).hexdigest()[:16]
        arrays: dict[str, np.ndarray] = {"keys": np.asarray(keys), "thumbs": thumbs.astype(np.float16)}
        if embeds is not None:
            arrays["embeds"] = embeds.astype(np.float16)
        with atomic_path(self.folder / f"pack-{name}.npz") as tmp, open(tmp, "wb") as f:
            np.savez(f, **arrays)  # type: ignore[arg-type]  # a file object: np.savez would append ".npz" to the temp name
        for i, k in enumerate(keys):
            self.entries[k] = (arrays["thumbs"][i], arrays["embeds"][i] if embeds is not None else None)


class Embedder:
    """Pooled features of a frozen backbone on the squashed image, unit length."""

    def __init__(self, backbone: str = DEFAULT_BACKBONE, size: int | None = None):
        from lesionlab.models.backbones import build_backbone, resolve_weights

        self.weights = resolve_weights(backbone)
        self.size = size or self.weights.input_size
        self.model = build_backbone(self.weights)
        self.tag = f"{backbone}-{self.weights.sha256[:12]}-{self.size}"

    def __call__(self, images: np.ndarray) -> np.ndarray:
        import torch

        from lesionlab.models.batching import map_batches

        def run(batch: np.ndarray) -> np.ndarray:
            with torch.inference_mode():
                x = torch.from_numpy(normalize(batch, self.weights.mean, self.weights.std))
                return self.model(x).float().numpy()

        f = map_batches(run, images, 32)
        return f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-8)


def signatures(
    samples: Sequence[Sample],
    *,
    embedder: Embedder | None,
    cache: Path | None = None,
    progress: bool = True,
    stats: SearchStats | None = None,
) -> tuple[list[int], np.ndarray, np.ndarray | None]:
    """(indices of the samples that decode, their view thumbnails N x views x 3072, embeddings N x D or None), from
    the cache where the file is unchanged, decoding the rest once and adding them to the cache."""
    from tqdm.auto import tqdm

    stats = stats if stats is not None else SearchStats()
    tag = f"v{SIGNATURE_VERSION}-t{THUMB_SIDE}-views{len(VIEWS)}-" + (embedder.tag if embedder else "noembed")
    store = SignatureStore((cache or default_cache()) / tag)
    keys = [file_key(Path(s.path)) for s in samples]
    todo = [i for i, k in enumerate(keys) if k is not None and k not in store.entries]
    stats.cached += len(samples) - len(todo) - sum(k is None for k in keys)
    stats.bad += [samples[i].relpath for i, k in enumerate(keys) if k is None]
    bar = tqdm(total=len(todo), desc="duplicate signatures", unit="img", disable=not progress or not todo)
    for start in range(0, len(todo), CHUNK):
        done_keys, thumbs, larges = [], [], []
        for i in todo[start : start + CHUNK]:
            try:
                img = open_image(samples[i].path, samples[i].relpath)
            except BadImageError:
                stats.bad.append(samples[i].relpath)
                keys[i] = None
                continue
            thumbs.append(view_thumbnails(img))
            if embedder is not None:
                larges.append(np.asarray(img.resize((embedder.size, embedder.size), Image.Resampling.BICUBIC)))
            done_keys.append(str(keys[i]))
        stats.decoded += len(done_keys)
        embeds = embedder(np.stack(larges)) if embedder is not None and larges else None
        store.add(done_keys, np.stack(thumbs) if thumbs else np.zeros((0, len(VIEWS), 3 * THUMB_SIDE**2)), embeds)
        bar.update(min(CHUNK, len(todo) - start))
    bar.close()
    ok = [i for i, k in enumerate(keys) if k is not None and k in store.entries]
    if not ok:
        return ok, np.zeros((0, len(VIEWS), 3 * THUMB_SIDE**2), np.float32), None
    thumb_arr = np.stack([store.entries[str(keys[i])][0] for i in ok]).astype(np.float32)
    emb = np.stack([np.asarray(store.entries[str(keys[i])][1]) for i in ok]).astype(np.float32) if embedder else None
    return ok, thumb_arr, emb


def _pca_tree(index: np.ndarray, dims: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, KDTree]:
    """(mean, 64 PCA dims, ``index`` projected, KD-tree of its first ``dims``): orthonormal, so no true pair lost."""
    from sklearn.neighbors import KDTree

    fit = index[np.random.default_rng(0).choice(len(index), min(len(index), 4000), replace=False)]
    mean = fit.mean(axis=0)
    basis = np.linalg.svd(fit - mean, full_matrices=False)[2][: min(64, len(fit))]
    proj = (index - mean) @ basis.T
    return mean, basis, proj, KDTree(proj[:, :dims])


def radius_candidates(
    index: np.ndarray, queries: Iterable[tuple[np.ndarray, np.ndarray]], min_dot: float, dims: int = 24
) -> set[tuple[int, int]]:
    """Pairs (query id, index row) whose unit vectors may have a dot product >= ``min_dot``: a superset of the
    true ones, found by a KD-tree radius query in a PCA projection of ``index``. ``queries`` yields (ids, vectors)."""
    radius = float(np.sqrt(max(0.0, 2.0 - 2.0 * min_dot))) + 1e-4  # float16 storage rounding
    mean, basis, _, tree = _pca_tree(index, dims)
    out: set[tuple[int, int]] = set()
    for ids, vecs in queries:
        for q, hits in zip(ids, tree.query_radius(((vecs - mean) @ basis.T)[:, :dims], radius)):
            out.update((int(q), int(h)) for h in hits)
    return out


def view_matches(
    thumbs: np.ndarray, rows: np.ndarray, min_dot: float
) -> tuple[dict[tuple[int, int], tuple[float, int]], int]:
    """(``{(i, j): (score, view)}`` for pairs (i < j, one in ``rows``) whose best view x dihedral of one vs reference
    of the other reaches ``min_dot``, KD-tree hits checked). The tree has 12 PCA dims (5x faster than 24); views
    of ``rows`` query all references and (unless ``rows`` is all) views of all query those of ``rows``."""
    radius = float(np.sqrt(max(0.0, 2.0 - 2.0 * min_dot))) + 1e-4  # float16 storage rounding
    best: dict[tuple[int, int], tuple[float, int]] = {}
    checked, every = 0, np.arange(len(thumbs))
    for qs, rs in [(rows, every)] + ([(every, rows)] if 0 < len(rows) < len(thumbs) else []):
        refs, owner = thumbs[rs, :N_REFERENCES].reshape(-1, thumbs.shape[2]), np.repeat(rs, N_REFERENCES)
        mean, basis, proj, tree = _pca_tree(refs, 12)
        for start in range(0, len(qs), 2048):
            ids = qs[start : start + 2048]
            for v in range(thumbs.shape[1]):
                for t in dihedral_thumbnails(thumbs[ids, v]):
                    pt = (t - mean) @ basis.T
                    hits = tree.query_radius(pt[:, :12], radius)
                    qi = np.repeat(np.arange(len(ids)), [len(h) for h in hits])
                    ri = np.concatenate(hits).astype(int) if len(qi) else qi
                    # pruned in 64 dims first: gathering full 3072-dim rows for every hit was what took the time
                    near = np.einsum("nd,nd->n", d := pt[qi] - proj[ri], d) <= radius**2
                    qi, ri = qi[near], ri[near]
                    dots, checked = np.einsum("nd,nd->n", t[qi], refs[ri]), checked + len(qi)
                    keep = (dots >= min_dot) & (ids[qi] != owner[ri])
                    for a, b, d in zip(ids[qi][keep], owner[ri][keep], dots[keep]):
                        key = (int(min(a, b)), int(max(a, b)))
                        if d > best.get(key, (-2.0, 0))[0]:
                            best[key] = (float(d), v)
    return best, checked


def find_duplicates(
    samples: Sequence[Sample],
    *,
    cache: Path | None = None,
    progress: bool = True,
    thresholds: Thresholds = Thresholds(),  # frozen, so one shared default is safe
    embeddings: bool = False,
    backbone: str = DEFAULT_BACKBONE,
    embed_size: int | None = None,
    only_pairs_touching: set[str] | None = None,
    across_sources: bool = False,
    stats: SearchStats | None = None,
    accept: Callable[[Sample, Sample], bool] | None = None,
) -> list[DuplicatePair]:
    """Every pair of ``samples`` that is the same photo (re-encoded, resized, shifted, re-cropped, squashed vs
    cropped, flipped, turned by 90 degrees) or, with ``embeddings`` (off by default: measured not to separate),
    the same lesion by embedding cosine, sorted by (a, b).

    ``only_pairs_touching``: keep only pairs with at least one relpath in the set (e.g. evaluation images against
    the training pool; the search then queries only from them). ``across_sources``: only pairs whose samples'
    ``source`` differ. ``accept`` filters pairs further. Unreadable images are skipped and listed in
    ``stats.bad``. Signatures are cached under ``cache`` (default :func:`default_cache`); ``embed_size``
    (default: the backbone's input size) trades embedding time for quality.
    """
    stats = stats if stats is not None else SearchStats()
    stats.images += len(samples)
    embedder = Embedder(backbone, embed_size) if embeddings else None
    ok, thumbs, embeds = signatures(samples, embedder=embedder, cache=cache, progress=progress, stats=stats)
    if len(ok) < 2:
        return []
    rows = np.arange(len(ok))
    if only_pairs_touching is not None:
        rows = np.asarray([r for r in rows if samples[ok[r]].relpath in only_pairs_touching], dtype=int)
    matches, checked = view_matches(thumbs, rows, thresholds.same_photo)
    cands = set(matches)
    if embeds is not None:
        cands |= radius_candidates(embeds, [(rows, embeds[rows])], thresholds.same_lesion)
    pairs = np.asarray(sorted({(min(q, r), max(q, r)) for q, r in cands if q != r}), dtype=int).reshape(-1, 2)
    stats.candidates += checked + len(pairs) - len(matches)
    # below same_photo no pair's thumbnail score is computed (nan), so an embedding-only pair is "same lesion"
    corr, view = np.asarray([matches.get((int(i), int(j)), (np.nan, 0)) for i, j in pairs]).reshape(-1, 2).T
    cos = np.einsum("nd,nd->n", embeds[pairs[:, 0]], embeds[pairs[:, 1]]) if embeds is not None else corr * np.nan
    out = []
    for (i, j), c, e, v in zip(pairs, corr, cos, view.astype(int)):
        sa, sb = samples[ok[i]], samples[ok[j]]
        if (across_sources and sa.source == sb.source) or (accept is not None and not accept(sa, sb)):
            continue
        a, b = sorted((sa.relpath, sb.relpath))
        if (photo := bool(c >= thresholds.same_photo)) or e >= thresholds.same_lesion:
            kind: Kind = "same photo" if photo else "same lesion"
            out.append(DuplicatePair(a, b, kind, float(c if photo else e), float(c), float(e), VIEW_NAMES[v]))
    stats.pairs += len(out)
    return sorted(out, key=lambda p: (p.a, p.b))


def duplicate_links(pairs: Iterable[DuplicatePair]) -> list[tuple[str, str]]:
    """``(a, b)`` relpaths to merge into one group, for ``load_sources(links=...)``."""
    return [(p.a, p.b) for p in pairs]


def duplicate_groups(pairs: Iterable[DuplicatePair | tuple[str, str]]) -> list[list[str]]:
    """Connected groups of the pairs (union-find), each sorted, largest first; singletons are not listed."""
    parent: dict[str, str] = {}

    def root(x: str) -> str:
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]  # path halving keeps chains short
            x = parent[x]
        return x

    for p in pairs:
        a, b = (p.a, p.b) if isinstance(p, DuplicatePair) else p
        parent[root(a)] = root(b)
    groups: dict[str, list[str]] = {}
    for x in parent:
        groups.setdefault(root(x), []).append(x)
    return sorted((sorted(g) for g in groups.values()), key=lambda g: (-len(g), g[0]))


#: The copies :func:`synthetic_copy` makes, for measuring recall (tests, bench/duplicates.py).
TRANSFORMS = ("re-encoded", "resized", "shifted", "flipped", "rot90", "re-cropped")


def synthetic_copy(img: Image.Image, kind: str, rng: np.random.Generator) -> tuple[Image.Image, int]:
    """A copy of ``img`` as another source might hold it, and the JPEG quality to save it at: re-encoded (q 60),
    resized (to 70%), shifted by 4% of the side (edges repeated), flipped, turned by 90 degrees, or re-cropped
    to 85% at a random offset and resized back."""
    w, h = img.size
    if kind == "re-encoded":
        return img, 60
    if kind == "resized":
        return img.resize((round(w * 0.7), round(h * 0.7)), Image.Resampling.LANCZOS), 90
    if kind == "shifted":
        dx, dy = round(0.04 * w), round(0.04 * h)
        a = np.asarray(img)[dy:, dx:]
        return Image.fromarray(np.pad(a, ((0, dy), (0, dx), (0, 0)), mode="edge")), 90
    if kind in (turns := {"flipped": Image.Transpose.FLIP_LEFT_RIGHT, "rot90": Image.Transpose.ROTATE_90}):
        return img.transpose(turns[kind]), 90
    if kind == "re-cropped":
        cw, ch = round(0.85 * w), round(0.85 * h)
        x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        return img.crop((x, y, x + cw, y + ch)).resize((w, h), Image.Resampling.BICUBIC), 90
    raise ValueError(f"unknown transform {kind!r}; choose one of {', '.join(TRANSFORMS)}")
