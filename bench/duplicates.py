"""Duplicate detector, measured: (a) recall on synthetic copies of held-out HAM10000 images hidden among
isic-kaggle + ham10000, per transform; (b) pairs found over isic-kaggle x ham10000 and the isic-kaggle test images
a leak-free evaluation drops, against the READMEs' numbers; (c) a contact sheet of found pairs (and pairs just
below the threshold) for checking precision by eye, written to a local folder that git ignores.

usage: python bench/duplicates.py [--data ../shared/data] [--sheet .cache/duplicates-sheet] [--embed [--embed-size 112]]
No lesion image is ever written into the repository: copies go to a temp folder, the sheet under .cache/.
"""

from __future__ import annotations

import argparse
import csv
import random
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from lesionlab.data import duplicates as dup
from lesionlab.data.sample import Sample

REPO = Path(__file__).resolve().parents[1]


def load(data: Path) -> list[Sample]:
    isic = sorted((data / "isic-kaggle").glob("*/*/*.jpg"))
    ham = sorted((data / "ham10000" / "images").glob("*.jpg"))
    out = [Sample(f"isic-kaggle/{p.relative_to(data / 'isic-kaggle')}", p, 0, source="isic-kaggle") for p in isic]
    out += [Sample(f"ham10000/images/{p.name}", p, 0, source="ham10000") for p in ham]
    return out


def synthetic_recall(
    samples: list[Sample], n: int, embed: bool, embed_size: int, th: dup.Thresholds
) -> dict[str, float]:
    """Recall per transform: a copy counts as found when it is paired with its own original."""
    rng = np.random.default_rng(0)
    ham = [s for s in samples if s.source == "ham10000"]
    held = [ham[i] for i in rng.choice(len(ham), n, replace=False)]
    folder = Path(tempfile.gettempdir()) / "lesionlab-duplicates-synthetic"
    folder.mkdir(exist_ok=True)
    copies, origin = [], {}
    for s in held:
        for kind in dup.TRANSFORMS:
            path = folder / f"{kind}-{s.path.stem}.jpg"
            if not path.exists():  # kept between runs, so their signatures stay cached
                img, quality = dup.synthetic_copy(Image.open(s.path).convert("RGB"), kind, rng)
                img.save(path, quality=quality)
            c = Sample(f"synthetic/{path.name}", path, 0, source="synthetic")
            copies.append(c)
            origin[c.relpath] = (s.relpath, kind)
    pairs = dup.find_duplicates(
        samples + copies,
        embeddings=embed,
        embed_size=embed_size,
        thresholds=th,
        only_pairs_touching=set(origin),
        progress=True,
    )
    found = {(p.a, p.b) for p in pairs}
    hits: dict[str, list[bool]] = {k: [] for k in dup.TRANSFORMS}
    for rel, (o, kind) in origin.items():
        hits[kind].append(tuple(sorted((o, rel))) in found)
    others = sum(1 for p in pairs if not any(x in origin and origin[x][0] in (p.a, p.b) for x in (p.a, p.b)))
    print(f"synthetic: {len(copies)} copies; pairs not copy-original: {others}")
    return {k: float(np.mean(v)) for k, v in hits.items()}


def sheet(pairs: list[dup.DuplicatePair], paths: dict[str, Path], out: Path, title: str) -> None:
    """Side-by-side pairs, 4 per row, numbered, with kind and scores."""
    cell, cols = 128, 4
    rows = (len(pairs) + cols - 1) // cols
    img = Image.new("RGB", (cols * (2 * cell + 16), rows * (cell + 18) + 20), "white")
    d = ImageDraw.Draw(img)
    d.text((4, 4), title, fill="black")
    for n, p in enumerate(pairs):
        x, y = (n % cols) * (2 * cell + 16), 20 + (n // cols) * (cell + 18)
        for k, rel in enumerate((p.a, p.b)):
            img.paste(Image.open(paths[rel]).convert("RGB").resize((cell, cell)), (x + k * cell, y))
        d.text((x, y + cell + 2), f"{n + 1}: t{p.thumb_corr:.3f} {p.view} e{p.embed_cos:.2f}", fill="black")
    out.parent.mkdir(parents=True, exist_ok=True)
    img.save(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    ap.add_argument("--sheet", type=Path, default=REPO / ".cache" / "duplicates-sheet")
    ap.add_argument("--embed", action="store_true", help="also the (optional, off by default) embedding")
    ap.add_argument("--embed-size", type=int, default=112)
    ap.add_argument("--synthetic", type=int, default=200)
    args = ap.parse_args()
    th = dup.Thresholds()
    samples = load(args.data)
    paths = {s.relpath: s.path for s in samples}

    t0 = time.time()
    sig = dup.SearchStats()
    embedder = dup.Embedder(dup.DEFAULT_BACKBONE, args.embed_size) if args.embed else None
    dup.signatures(samples, embedder=embedder, stats=sig)  # timed apart from the search; find_duplicates reuses it
    t_sig = time.time() - t0
    stats = dup.SearchStats()
    low = dup.Thresholds(th.same_photo - 0.01, th.same_lesion - 0.02)  # to show pairs just below the threshold
    t0 = time.time()
    everything = dup.find_duplicates(
        samples, embeddings=args.embed, embed_size=args.embed_size, thresholds=low, stats=stats
    )
    elapsed = time.time() - t0
    pairs = [
        p
        for p in everything
        if p.thumb_corr >= th.same_photo or (p.kind == "same lesion" and p.score >= th.same_lesion)
    ]
    near = [p for p in everything if p not in pairs]
    n = len(samples) - len(stats.bad)
    print(
        f"{len(samples)} images: {sig.cached} cached, {sig.decoded} decoded, {len(sig.bad)} bad "
        f"({t_sig:.1f} s); {stats.candidates} candidate pairs (at {low.same_photo}) of {n * (n - 1) // 2} "
        f"({elapsed:.1f} s search)"
    )

    def src(r: str) -> str:
        return r.split("/")[0] if r.startswith("ham") else "/".join(r.split("/")[:2])

    table: list[tuple[str, str]] = []
    for kind in ("same photo", "same lesion"):
        for a, b in (
            ("isic-kaggle/train", "isic-kaggle/train"),
            ("isic-kaggle/train", "isic-kaggle/test"),
            ("isic-kaggle/test", "isic-kaggle/test"),
            ("ham10000", "isic-kaggle/train"),
            ("ham10000", "isic-kaggle/test"),
            ("ham10000", "ham10000"),
        ):
            k = sum(1 for p in pairs if p.kind == kind and sorted((src(p.a), src(p.b))) == sorted((a, b)))
            table.append((f"pairs {kind}: {a} x {b}", str(k)))
    cross = [p for p in pairs if src(p.a) == "ham10000" and src(p.b) != "ham10000"]
    ham_hit = {p.a for p in cross}
    ham_train = {p.a for p in cross if src(p.b) == "isic-kaggle/train"}
    ham_test = {p.a for p in cross if src(p.b) == "isic-kaggle/test"}
    test_drop = {
        x
        for p in pairs
        for x in (p.a, p.b)
        if src(x) == "isic-kaggle/test" and {src(p.a), src(p.b)} & {"ham10000", "isic-kaggle/train"}
    }
    leaked = (
        {
            f"isic-kaggle/{r.strip()}"
            for r in (args.data / "isic-kaggle" / "test_leaked_from_train.txt").read_text().split()
            if r.strip()
        }
        if (args.data / "isic-kaggle" / "test_leaked_from_train.txt").exists()
        else set()
    )
    with open(args.data / "isic-kaggle" / "near_duplicate_pairs.csv") as f:
        ref = {tuple(sorted((f"isic-kaggle/{r['a']}", f"isic-kaggle/{r['b']}"))) for r in csv.DictReader(f)}
    found = {(p.a, p.b) for p in pairs}
    table += [
        ("HAM images matching isic-kaggle (README 32x32 corr >= 0.985: 154)", str(len(ham_hit))),
        ("... matching isic-kaggle train (README: 131)", str(len(ham_train))),
        ("... matching isic-kaggle test (README: 23)", str(len(ham_test))),
        ("isic-kaggle test images with a match in train or ham10000 (dropped)", f"{len(test_drop)} of 660"),
        ("... of the README's 22 test images leaked from train, found", f"{len(leaked & test_drop)} of {len(leaked)}"),
        ("README near_duplicate_pairs.csv (110 pairs) found", f"{len(ref & found)} of {len(ref)}"),
        ("candidate pairs verified / all pairs", f"{stats.candidates} / {n * (n - 1) // 2}"),
        (f"signatures (s; {sig.decoded} decoded, {sig.cached} cached)", f"{t_sig:.1f}"),
        (f"search with cached signatures, at {low.same_photo} (s)", f"{elapsed:.1f}"),
    ]
    t0 = time.time()
    recall = synthetic_recall(samples, args.synthetic, args.embed, args.embed_size, th)
    table.append(
        (f"synthetic recall run: {len(dup.TRANSFORMS) * args.synthetic} copies (s)", f"{time.time() - t0:.1f}")
    )
    table = [(f"recall on {args.synthetic} synthetic copies: {k}", f"{v:.3f}") for k, v in recall.items()] + table

    rnd = random.Random(0)
    shown = rnd.sample(cross, min(60, len(cross)))
    near_cross = [p for p in near if src(p.a) == "ham10000" and src(p.b) != "ham10000"]
    below = sorted(near_cross, key=lambda p: -p.score)[:20]
    sheet(shown[:30], paths, args.sheet / "found-1.png", "found pairs 1-30 (ham10000 | isic-kaggle)")
    sheet(shown[30:], paths, args.sheet / "found-2.png", "found pairs 31-60 (ham10000 | isic-kaggle)")
    sheet(below, paths, args.sheet / "below.png", f"20 highest cross pairs below same_photo {th.same_photo}")
    with open(args.sheet / "found-pairs.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["a", "b", "kind", "score", "thumb_corr", "embed_cos"])
        w.writerows((p.a, p.b, p.kind, f"{p.score:.4f}", f"{p.thumb_corr:.4f}", f"{p.embed_cos:.4f}") for p in pairs)
    print(f"contact sheets: {args.sheet}/found-1.png, found-2.png, below.png")
    emb = f", same_lesion embedding cos >= {th.same_lesion} ({dup.DEFAULT_BACKBONE} at {args.embed_size} px)"
    print(f"\nthresholds: same_photo view thumbnail corr >= {th.same_photo}{emb if args.embed else ''}\n")
    print("| measure | value |\n|---|---|")
    for name, value in table:
        print(f"| {name} | {value} |")


if __name__ == "__main__":
    main()
