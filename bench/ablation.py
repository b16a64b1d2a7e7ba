"""The transfer ablation table: evaluated runs side by side, from their metrics.json alone (nothing is scored).

Usage: python bench/ablation.py RUN [RUN ...] [--source isic-kaggle] [--against BASE_RUN] [--json FILE]

Per run: validation AUC (what a choice may look at), then, at the run's own operating threshold (chosen on its
validation), AUC, sensitivity and specificity with their 95% bootstrap CIs on validation itself, on the
cross-source test split of
``--source`` (``test_dedup:<source>``: its test images that match no training image of any source) and on each
external set the run was scored on (``lesionlab evaluate RUN --external NAME=PATH``), and balanced multi-class
accuracy where the run has a diagnosis head and the set has diagnoses. External sets report; they choose nothing.

``--against BASE_RUN`` adds, per run and set, the paired difference from BASE_RUN (``metrics.paired_differences``:
AUC, and sensitivity and specificity each at its own run's threshold, with a 95% CI from one stratified bootstrap
of the images both runs scored; the per-image scores of ``predictions.csv`` and ``external_predictions.csv``,
so external sets must have been evaluated by code that writes the latter). Two runs' own CIs overlap by
construction, since they share the set's sampling noise; a paired CI that excludes 0 is a real difference.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from lesionlab.evaluation.metrics import PAIRED, paired_differences
from lesionlab.evaluation.per_image import aligned, read_scores


def ci(block: dict[str, Any] | None) -> str:
    if not block or block.get("value") is None:
        return "n/a"
    lo, hi = block["ci95"]
    return f"{block['value']:.3f} [{lo:.3f}, {hi:.3f}]"


def at_threshold(m: dict[str, Any]) -> dict[str, Any]:
    """A split's or an external set's metrics at the operating threshold (sensitivity is `recall` in splits)."""
    t = m.get("at_threshold", m)
    return {
        "auc": t.get("auc") or m.get("auc"),
        "sens": t.get("sensitivity") or t.get("recall"),
        "spec": t.get("specificity"),
    }


def balanced(m: dict[str, Any]) -> str:
    d = m.get("diagnosis")
    return ci(d.get("balanced_accuracy")) if isinstance(d, dict) else ""


def rows(run: Path, source: str, base: Path | None = None, n_resamples: int = 1000) -> list[list[str]]:
    """One row per set of ``run``: validation (the one a choice may read), the cross-source test split, then the
    external sets; with ``base``, each row ends with the paired difference from it (``paired``)."""
    m = json.loads((run / "metrics.json").read_text())
    key = f"test_dedup:{source}" if f"test_dedup:{source}" in m else "test_dedup"
    sets = [("val", m["val"]), (key, m[key]), *(m.get("external") or {}).items()]
    threshold = m["threshold"]["value"]
    against = (base, json.loads((base / "metrics.json").read_text())["threshold"]["value"]) if base else None
    out = []
    for name, block in sets:
        t = at_threshold(block)
        row = [
            run.name,
            f"{m['val']['auc']['value']:.3f}",
            f"{name} (n={block['n']})",
            ci(t["auc"]),
            ci(t["sens"]),
            ci(t["spec"]),
            balanced(block),
        ]
        if against:
            row += paired(run, against[0], name, (against[1], threshold), n_resamples)
        out.append(row)
    return out


def paired(run: Path, base: Path, key: str, thresholds: tuple[float, float], n_resamples: int) -> list[str]:
    """ΔAUC, Δsensitivity, Δspecificity of ``run`` minus ``base`` on the images both scored in set ``key``, each
    at its own threshold (``thresholds``: base's, run's), and how many images were paired."""
    a, b = read_scores(base, key), read_scores(run, key)
    if not a or not b:
        return ["no per-image scores", "", "", ""]
    y, p_base, p_run = aligned(a, b)
    d = paired_differences(y, p_base, p_run, thresholds, n_resamples)
    if d is None:
        return ["one class", "", "", ""]
    return [f"{d[k]['value']:+.3f} [{d[k]['ci95'][0]:+.3f}, {d[k]['ci95'][1]:+.3f}]" for k in PAIRED] + [str(len(y))]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--source", default="isic-kaggle")
    ap.add_argument("--against", type=Path, help="a run to difference every run from, image by image")
    ap.add_argument("--n-resamples", type=int, default=1000)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    table = [r for run in args.runs for r in rows(run, args.source, args.against, args.n_resamples)]
    head = ["run", "val AUC", "set", "AUC", "sensitivity", "specificity", "balanced accuracy (7 classes)"]
    if args.against:
        head += [f"Δ{k} vs {args.against.name}" for k in PAIRED] + ["n paired"]
    print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for r in table:
        print("| " + " | ".join(r) + " |")
    if args.json:
        args.json.write_text(json.dumps([dict(zip(head, r)) for r in table], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
