"""Clinical-photo refusal benchmark: the lesion detector of a model folder before and after it learns to refuse
clinical (non-dermoscopic) photos, measured through the served predictor.

Usage:
  cp -r src/lesionlab/default_model /tmp/bundled && chmod -R u+w /tmp/bundled
  python bench/clinical_refusal.py /tmp/bundled --non-lesion ../shared/data/clinical-sd198/images --refit \\
      --set isic-kaggle-test=../shared/data/isic-kaggle?split=test \\
      --set isic2018-task3-test=../shared/data/isic2018-task3-test --set ph2=../shared/data/ph2

MODEL_DIR is changed in place by --refit (ood.npz, ood.json, refusal.json, refusal_scores.csv, metrics.json's
refusal block, as ``lesionlab refusal MODEL_DIR --non-lesion ...`` writes them): pass a copy, never
src/lesionlab/default_model. The photos are split as the fit splits them (``refusal.photos.split_photos``), and
only the held-out half is measured. Each set is scored once by the served predictor (ONNX Runtime where the
folder has model.onnx); the old and the new detector then judge the same features and pixels, as
``Predictor.analyze`` does. ``NAME=SPEC?split=test`` keeps the rows a source marks as its test split.
``--sweep`` also prints the discriminator's refusal rates for a few settings (inputs, C), fitted on the fit half
and thresholded on validation lesions, from cached features (no served predictor).
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import numpy as np
from scipy.special import expit

from lesionlab.data.images import open_image
from lesionlab.data.sources import load_external
from lesionlab.inference.loading import load_predictor
from lesionlab.models.dermoscopy import DermoscopyDiscriminator, discriminator_inputs
from lesionlab.models.detector import LesionDetector
from lesionlab.refusal import measure
from lesionlab.refusal.photos import split_photos
from lesionlab.runs import RunFolder

BATCH = 64


def judge(predictor, detectors: dict[str, LesionDetector | None], paths: list[Path]) -> dict:
    """Refusals of each detector and the labels the model gives, over ``paths`` in batches."""
    refused: dict[str, list[bool]] = {k: [] for k in detectors}
    malignant: list[bool] = []
    reasons: list[str] = []
    info = predictor.info
    for i in range(0, len(paths), BATCH):
        batch = predictor.prepare([open_image(p) for p in paths[i : i + BATCH]])
        logits, feats = predictor.forward_uint8(batch)
        malignant += list(expit(logits / info.temperature) >= info.threshold)
        for name, det in detectors.items():
            if det is None:
                refused[name] += [False] * len(batch)
                continue
            score, why = det.explain(feats, batch)
            refused[name] += list(score > det.threshold)
            if name == "new":
                reasons += [w for w, s in zip(why, score) if s > det.threshold]
    out = {k: np.array(v, bool) for k, v in refused.items()}
    clinical = sum(r.startswith("not a dermoscopic image") for r in reasons)
    return {"refused": out, "malignant": np.array(malignant, bool), "clinical_reason": clinical}


def set_paths(spec: str) -> list[Path]:
    split = None
    if "?split=" in spec:
        spec, split = spec.split("?split=", 1)
    return [s.path for s in load_external(spec).test if split is None or s.split == split]


def sweep(model_dir: Path, folders: list[str]) -> None:
    """The discriminator's settings, from cached features: which inputs, which C."""
    feats = measure.run_features(model_dir, progress=False)
    photos = split_photos(folders)
    fit = measure._photos(model_dir, photos, held_out=False)
    held = measure._photos(model_dir, photos, held_out=True)
    rows = {
        "features": lambda f, s: discriminator_inputs(f, s)[:, : f.shape[1]],
        "features+stats": discriminator_inputs,
        "stats": lambda f, s: np.asarray(s, np.float64),
    }
    tr, va, te = feats["train"], feats["val"], feats["test"]
    budget = measure.MAX_REFUSAL / 3
    print(f"\nsweep: fit on {len(fit.names)} photos, measured on {len(held.names)} held-out ones")
    for name, make in rows.items():
        for c in (1e-4, 1e-3, 1e-2, 1e-1, 1.0):
            d = DermoscopyDiscriminator.fit(make(tr.x, tr.pixels), make(fit.features, fit.stats), c)
            t = measure.conservative_threshold(d.score(make(va.x, va.pixels)), budget)
            held_rate = float((d.score(make(held.features, held.stats)) > t).mean())
            test_rate = float((d.score(make(te.x, te.pixels)) > t).mean())
            rates = f"held-out photos refused {held_rate:7.2%}   test lesions refused {test_rate:6.2%}"
            print(f"  {name:15s} C={c:<7g} {rates}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir", type=Path, help="A copy of a model folder (changed in place by --refit).")
    ap.add_argument("--non-lesion", action="append", default=[], help="Folder of clinical photos (repeatable).")
    ap.add_argument("--set", action="append", default=[], help="NAME=SPEC of a set of dermoscopic lesions.")
    ap.add_argument("--refit", action="store_true", help="Refit the detector with the photos, then compare.")
    ap.add_argument("--sweep", action="store_true", help="Also print the discriminator's settings sweep.")
    args = ap.parse_args(argv)
    if Path(args.model_dir).resolve() == (Path(measure.__file__).parents[1] / "default_model").resolve():
        ap.error("pass a copy of the bundled model, not the bundled model itself")
    folders = [str(f) for f in args.non_lesion]
    predictor = load_predictor(args.model_dir)
    old = copy.deepcopy(predictor.detector)
    t0 = time.perf_counter()
    if args.refit:
        m = measure.measure_refusal(args.model_dir, progress=False, refit=True, non_lesion=folders)
        assert m.detector is not None
        m.detector.save(args.model_dir)
        run = RunFolder(args.model_dir)
        run.write_refusal(m.result, m.scores)
        if run.has("metrics.json"):
            run.write_metrics({**run.metrics(), "refusal": measure.summary(m.result)})
        print(f"refitted in {time.perf_counter() - t0:.0f}s: {m.result['method']}")
    new = LesionDetector.load(args.model_dir)
    detectors = {"old": old, "new": new}
    sets = {}
    if folders:
        sets["photos held out"] = split_photos(folders).held_out
    for item in args.set:
        name, _, spec = item.partition("=")
        sets[name] = set_paths(spec)
    print(f"model: {args.model_dir} ({predictor.info.runtime}); photos: {', '.join(folders) or 'none'}")
    print(f"{'set':>22} {'n':>5}  {'old detector refused':>22}  {'new detector refused':>22}  labelled malignant*")
    for name, paths in sets.items():
        t = time.perf_counter()
        r = judge(predictor, detectors, paths)
        n = len(paths)
        cells = [f"{int(r['refused'][k].sum()):5d} ({r['refused'][k].mean():6.2%})" for k in ("old", "new")]
        mal = ", ".join(f"{int((r['malignant'] & ~r['refused'][k]).sum())}/{n} ({k})" for k in ("old", "new"))
        print(f"{name:>22} {n:5d}  {cells[0]:>22}  {cells[1]:>22}  {mal}   [{time.perf_counter() - t:.0f}s]")
        if name == "photos held out":
            why = f"{r['clinical_reason']}/{int(r['refused']['new'].sum())}"
            print(f"{'':>22}        new detector's reason 'not a dermoscopic image': {why}")
    print("* accepted and labelled malignant, of all images in the set")
    if args.sweep and folders:
        sweep(args.model_dir, folders)
    return 0


if __name__ == "__main__":
    sys.exit(main())
