"""An ensemble of evaluated runs scored from their per-image files alone: no weights, nothing is run through a
network. For runs whose model files are gone (``bench/results/runs/`` keeps only the small files) and for asking,
cheaply, whether averaging would help before building the real one (``lesionlab ensemble``).

Usage: python bench/score_ensemble.py RUN RUN [RUN ...] [--against RUN] [--policy P] [--json FILE]

The rule is ``lesionlab ensemble``'s (``ensemble.scores.COMBINE``): the mean of the members' calibrated
probabilities (``predictions.csv``, ``external_predictions.csv``); its threshold is chosen on the members' common
validation images with the members' policy (``--policy`` to override). The ensemble's own temperature is left
out: it is monotone, so it changes no AUC and, refitted together with the threshold, no decision. Every image is
scored, refused ones too, as in ``bench/ablation.py``'s paired columns (the refusal rule of an ensemble, the median
member, needs the members' detectors). Rows: validation (what a choice may read), ``test_dedup:<source>``, then
every external set all members were scored on; with ``--against``, the paired difference from that run, each at
its own threshold.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from lesionlab.evaluation.metrics import PAIRED, choose_threshold, metrics_with_ci, paired_differences
from lesionlab.evaluation.per_image import read_scores


def common_scores(runs: list[Path], key: str) -> tuple[list[str], np.ndarray, np.ndarray] | None:
    """The images every run scored in set ``key``: names, labels, and probabilities (runs x images)."""
    per_run = [read_scores(r, key) for r in runs]
    if not all(per_run):
        return None
    names = sorted(set.intersection(*(set(s) for s in per_run)))
    labels = np.array([per_run[0][k][0] for k in names])
    for s in per_run[1:]:
        if any(s[k][0] != per_run[0][k][0] for k in names):
            raise SystemExit(f"{key}: the runs label some images differently; not the same set")
    return names, labels, np.array([[s[k][1] for k in names] for s in per_run])


def fmt(block: dict) -> str:
    lo, hi = block["ci95"]
    return f"{block['value']:.3f} [{lo:.3f}, {hi:.3f}]"


def signed(block: dict) -> str:
    lo, hi = block["ci95"]
    return f"{block['value']:+.3f} [{lo:+.3f}, {hi:+.3f}]"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--source", default="isic-kaggle")
    ap.add_argument("--against", type=Path, help="a run to difference the ensemble from, image by image")
    ap.add_argument("--policy", help="threshold policy (default: the first member's)")
    ap.add_argument("--n-resamples", type=int, default=1000)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    if len(args.runs) < 2:
        ap.error("an ensemble needs at least two runs")
    metrics = [json.loads((r / "metrics.json").read_text()) for r in args.runs]
    policy = args.policy or metrics[0]["threshold"]["policy"]
    val = common_scores(args.runs, "val")
    if val is None:
        raise SystemExit("every run needs validation rows in predictions.csv")
    threshold = choose_threshold(val[1], val[2].mean(axis=0), policy)
    base = json.loads((args.against / "metrics.json").read_text())["threshold"]["value"] if args.against else None
    externals = set.intersection(*(set(m.get("external") or {}) for m in metrics))
    out = {"members": [str(r) for r in args.runs], "policy": policy, "threshold": threshold, "sets": {}}
    head = ["set", "n", "AUC", "sensitivity", "specificity"]
    if args.against:
        head += [f"Δ{k} vs {args.against.name}" for k in PAIRED]
    print(f"ensemble of {len(args.runs)} runs, threshold {threshold:.3f} ({policy} on validation)\n")
    print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for key in ["val", f"test_dedup:{args.source}", *sorted(externals)]:
        got = common_scores(args.runs, key)
        if got is None:
            continue
        names, y, probs = got
        p = probs.mean(axis=0)
        m = metrics_with_ci(y, p, threshold, args.n_resamples)
        row = {"n": len(y), **{k: m[k if k != "sensitivity" else "recall"] for k in PAIRED}}
        cells = [key, str(len(y)), *(fmt(row[k]) for k in PAIRED)]
        if args.against:
            ref = read_scores(args.against, key)
            keep = [i for i, k in enumerate(names) if k in ref]
            p_ref = np.array([ref[names[i]][1] for i in keep])
            d = paired_differences(y[keep], p_ref, p[keep], (base, threshold), args.n_resamples)
            row["paired"] = d
            cells += [signed(d[k]) if d else "one class" for k in PAIRED]
        out["sets"][key] = row
        print("| " + " | ".join(cells) + " |")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
