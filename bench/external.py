"""External evaluation benchmark: runs scored on datasets they never saw, printed as markdown tables.

Usage: python bench/external.py [RUN ...] --external NAME=PATH [--external NAME=PATH ...]
                                [--tta | --no-tta] [--n-resamples N] [--backend auto|onnx|torch] [--json FILE]

No RUN (or the word ``bundled``) means the bundled model. Per set it prints one table with a row per run (AUC,
sensitivity and specificity at the run's threshold and at 0.5, ECE, refusal rate, each with its 95% CI) and
per run the by-diagnosis table (which benign diagnoses get flagged, which malignant ones are missed). It only
prints (and with ``--json`` writes the blocks to FILE): nothing is written into a run folder; for that use
``lesionlab evaluate RUN --external NAME=PATH`` (``lesionlab.evaluation.external.evaluate_external``).

Reading the sets: ``lesionlab.data.sources.load_external("PATH?name=NAME")`` when that module exists; otherwise
(a fallback for a tree without it, or with ``--local-reader``) a small local reader for two layouts: the ISIC
2018 Task 3 ground truth (``*GroundTruth*.csv``, one-hot ``image,MEL,NV,BCC,AKIEC,BKL,DF,VASC``, images in
``images/<image>.jpg``; malignant = MEL, BCC, AKIEC) and a generic CSV ``image,diagnosis,label`` (image path
relative to the folder, label benign/malignant or 0/1; e.g. PH2's ``PH2_labels.csv``).

Example: python bench/external.py --external isic2018=../shared/data/isic2018-task3-test \\
             --external ph2=../shared/data/ph2
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path
from typing import Any

from lesionlab.data.sample import Sample
from lesionlab.errors import LesionlabError
from lesionlab.evaluation.external import external_metrics, report_section, score_external
from lesionlab.evaluation.report import fmt
from lesionlab.inference.loading import load_predictor

ISIC_CLASSES = ("MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC")
ISIC_MALIGNANT = {"MEL", "BCC", "AKIEC"}
LABEL_WORDS = {"benign": 0, "malignant": 1, "0": 0, "1": 1}


def _read_isic_ground_truth(csv_path: Path, name: str) -> list[Sample]:
    root = csv_path.parent
    out = []
    with open(csv_path, newline="") as f:
        for row in csv.DictReader(f):
            hot = [c for c in ISIC_CLASSES if float(row.get(c) or 0) >= 0.5]
            if len(hot) != 1:
                raise LesionlabError(f"{csv_path}: row {row['image']} has {len(hot)} diagnoses marked, expected one")
            rel = f"images/{row['image']}.jpg"
            out.append(Sample(rel, root / rel, int(hot[0] in ISIC_MALIGNANT), hot[0].lower(), source=name))
    return out


def _read_generic(csv_path: Path, name: str) -> list[Sample]:
    root = csv_path.parent
    out = []
    with open(csv_path, newline="") as f:
        for row in csv.DictReader(f):
            label = LABEL_WORDS.get(row["label"].strip().lower())
            if label is None:
                raise LesionlabError(f"{csv_path}: label '{row['label']}' of {row['image']} is not benign/malignant")
            out.append(Sample(row["image"], root / row["image"], label, row.get("diagnosis") or None, source=name))
    return out


def read_local(path: Path, name: str) -> list[Sample]:
    """The fallback reader (see the module docstring): the ISIC 2018 ground truth, else the one CSV in ``path``
    whose header has ``image`` and ``label``."""
    if path.is_file():
        path, only = path.parent, [path]
    else:
        only = sorted(path.glob("*.csv"))
    for c in only:
        if "GroundTruth" in c.name:
            return _read_isic_ground_truth(c, name)
    for c in only:
        with open(c, newline="") as f:
            header = next(csv.reader(f), [])
        if {"image", "label"} <= set(header):
            return _read_generic(c, name)
    raise LesionlabError(f"{path}: no ISIC *GroundTruth*.csv and no CSV with image,label columns")


def read_set(path: Path, name: str, local: bool = False) -> list[Sample]:
    """``load_external("PATH?name=NAME")`` (diagnoses mapped to the taxonomy's codes: PH2's nevi become ``nv``),
    or the local reader when ``local`` or when lesionlab.data.sources does not exist (source names kept)."""
    if not local:
        try:
            from lesionlab.data.sources import load_external
        except ImportError:
            local = True
    if local:
        return read_local(path, name)
    return list(load_external(f"{path}?name={name}").all)


def _row(run: str, b: dict[str, Any]) -> str:
    t, h = b["at_threshold"], b["at_0.5"]
    cell = lambda x: "undefined" if not x or x.get("value") is None else fmt(x)
    return (
        f"| {run} | {b['threshold']:.4f} | {b['n']} | {cell(t.get('auc'))} | {cell(t.get('sensitivity'))} | "
        f"{cell(t.get('specificity'))} | {cell(h.get('sensitivity'))} | {cell(h.get('specificity'))} | "
        f"{cell(b['ece'])} | {cell(b['refusal_rate'])} ({b['n_refused']}) |"
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="*", default=["bundled"], help="Run or ensemble folders; none: the bundled model.")
    ap.add_argument("--external", action="append", default=[], metavar="NAME=PATH", required=True)
    ap.add_argument("--tta", action=argparse.BooleanOptionalAction, default=None, help="Default: as fitted.")
    ap.add_argument("--n-resamples", type=int, default=1000)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--skip-bad", action="store_true", help="Leave unreadable images out (listed) instead of failing.")
    ap.add_argument(
        "--local-reader",
        action="store_true",
        help="Read the sets with this script's reader even when data.sources exists: it keeps the source's own "
        "diagnosis names (PH2's common and atypical nevi, which the taxonomy maps to nv).",
    )
    ap.add_argument("--json", type=Path, help="Also write {set: {run: block}} to this file.")
    args = ap.parse_args(argv)
    sets = {}
    for spec in args.external:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            ap.error(f"--external takes NAME=PATH, got '{spec}'")
        sets[name] = read_set(Path(path), name, args.local_reader)
        print(f"{name}: {len(sets[name])} images from {path}", file=sys.stderr)
    results: dict[str, dict[str, Any]] = {name: {} for name in sets}
    for run in args.runs:
        predictor = load_predictor(None if run == "bundled" else run, backend=args.backend)
        for name, samples in sets.items():
            t0 = time.perf_counter()
            scores = score_external(predictor, samples, args.tta, args.batch_size, True, args.skip_bad)
            t1 = time.perf_counter()
            block = external_metrics(scores, predictor.info.threshold, args.n_resamples)
            block["seconds"] = {"scoring": round(t1 - t0, 1), "metrics": round(time.perf_counter() - t1, 1)}
            results[name][run] = block
            print(f"{run} on {name}: scored in {t1 - t0:.0f}s", file=sys.stderr)
    for name, by_run in results.items():
        print(f"\n## {name}\n")
        print("| run | threshold | n | AUC | sens @thr | spec @thr | sens @0.5 | spec @0.5 | ECE | refusal (n) |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for run, block in by_run.items():
            print(_row(run, block))
        for run, block in by_run.items():
            print("\n" + report_section(f"{name}: {run}", block))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
