"""Runs scored on a multi-source run's cross-source test_dedup: the test images of one source that match no
training image of any source (found by the duplicate detector), so that models trained on one source and on the
union are compared on the same leak-free images.

Usage: python bench/cross_source_dedup.py UNION_RUN [RUN ...] [--source isic-kaggle] [--n-resamples N]

UNION_RUN is a run trained on several sources (``lesionlab train --data A --data B``); its data is read again
from its config.json and ``test_dedup:<source>`` taken from it. Each RUN (``bundled`` = the bundled model; by
default UNION_RUN itself and the bundled model) is scored on those images at its own operating threshold, with
``lesionlab.evaluation.external``. Prints a markdown table; writes nothing.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from lesionlab.data.loading import dataset_from_record
from lesionlab.evaluation.external import external_metrics, score_external
from lesionlab.evaluation.report import fmt
from lesionlab.inference.loading import load_predictor
from lesionlab.runs import RunFolder


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("union", type=Path)
    ap.add_argument("runs", nargs="*")
    ap.add_argument("--source", default="isic-kaggle")
    ap.add_argument("--n-resamples", type=int, default=1000)
    args = ap.parse_args(argv)
    run = RunFolder(args.union)
    splits = dataset_from_record(run.config.data).splits()
    test, dedup = splits[f"test:{args.source}"], splits[f"test_dedup:{args.source}"]
    print(f"{args.source} test: {len(test)} images; without matches of any training image: {len(dedup)}\n")
    print("| run | n | AUC | sens @thr | spec @thr | accuracy @0.5 |\n|---|---|---|---|---|---|")
    for name in args.runs or [str(args.union), "bundled"]:
        predictor = load_predictor(None if name == "bundled" else Path(name))
        b = external_metrics(
            score_external(predictor, dedup, progress=False), predictor.info.threshold, args.n_resamples
        )
        t, h = b["at_threshold"], b["at_0.5"]
        print(
            f"| {name} | {b['n']} | {fmt(t['auc'])} | {fmt(t['recall'])} | {fmt(t['specificity'])} | "
            f"{fmt(h['accuracy'])} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
