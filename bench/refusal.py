"""Refusal benchmark: how well the lesion detector separates real lesions from non-lesion images.

Usage: python bench/refusal.py [RUN_DIR ...] [--sweep] [--write]

For each run: the backbone features of its train/val/test images (feature cache), the features of the
non-lesion set, then the detector for each setting of the sweep (PCA dimensions, L2-normalised
features or raw) with its AUROC (test lesions vs non-lesions), test-lesion refusal and non-lesion refusal.
``--write`` fits the default detector into the run folder and writes refusal.json and the metrics block.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from lesionlab.models.detector import LesionDetector
from lesionlab.refusal import measure as refusal
from lesionlab.runs import RunFolder

SWEEP = [(k, True) for k in (64, 128, 256, 384, 512, 640, 768)] + [(k, False) for k in (128, 512)]


def evaluate_setting(feats: dict, other: np.ndarray, n_components: int, normalize: bool = True) -> dict:
    det = LesionDetector.fit(feats["train"].x, feats["val"].x, refusal.MAX_REFUSAL, n_components, normalize)
    det.threshold = refusal.conservative_threshold(det.score(feats["val"].x))
    test = det.score(feats["test"].x)
    nl = det.score(other)
    return {
        "n_components": n_components,
        "l2_normalize": normalize,
        "auroc": refusal._auroc(test, nl),
        "test_refused": float((test > det.threshold).mean()),
        "non_lesion_refused": float((nl > det.threshold).mean()),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="*", type=Path, default=[Path("runs/lite0-frozen")])
    ap.add_argument("--sweep", action="store_true", help="Try several PCA dimensions.")
    ap.add_argument("--write", action="store_true", help="Fit and measure the default detector into the run.")
    args = ap.parse_args(argv)
    out = {}
    for run in args.runs:
        t0 = time.perf_counter()
        feats = refusal.run_features(run, progress=False)
        items = refusal.non_lesion_images()
        other = refusal.non_lesion_features(run, items)
        t_feat = time.perf_counter() - t0
        settings = SWEEP if args.sweep else [(refusal.N_COMPONENTS, True)]
        rows = [evaluate_setting(feats, other, k, norm) for k, norm in settings]
        out[str(run)] = {"features_seconds": round(t_feat, 1), "n_non_lesion": len(items), "settings": rows}
        print(f"{run}: {len(items)} non-lesion images, features {t_feat:.0f}s")
        for r in rows:
            print(
                f"  k={r['n_components']:4d} l2={r['l2_normalize']!s:5}  AUROC={r['auroc']:.4f}  "
                f"test refused={r['test_refused']:.2%}  non-lesion refused={r['non_lesion_refused']:.2%}"
            )
        if args.write:
            res = refusal.measure_refusal(run, progress=False, features=feats, refit=True)
            assert res.detector is not None  # refit=True always fits one
            res.detector.save(run)  # metrics.json's refusal block is refreshed by `lesionlab evaluate RUN`
            RunFolder(run).write_refusal(res.result, res.scores)
            print(json.dumps(refusal.summary(res.result), indent=2))
            print("  accepted:", ", ".join(res.result["non_lesion"]["accepted"]) or "none")
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
