"""The diagnosis decision under class imbalance: the most probable diagnosis, or the most probable after dividing
by the training prior (logit adjustment, Menon et al., ICLR 2021: the Bayes decision for balanced accuracy)?

    python bench/diagnosis_priors.py RUN [--external NAME=SPEC ...] [--json FILE]

A diagnosis model (``--target diagnosis``) trained on HAM10000 sees nevi in two thirds of its diagnosed images, so
its argmax says "nv" for most uncertain lesions, and balanced multi-class accuracy (the ISIC 2018 Task 3 metric)
pays for every rare class it misses. Dividing each class's probability by its frequency among the run's TRAINING
images with a diagnosis (nothing is fitted: the priors are counts) makes the argmax the balanced-accuracy decision
if the model's probabilities are right. P(malignant), the threshold and every binary number are untouched.

Scored once per set with the served predictor (TTA as the run's operating point was fitted): the run's
validation split (what a choice may look at) and each ``--external`` set (reported, never chosen on). Printed:
balanced accuracy with its 95% CI (bootstrap stratified by diagnosis) and each diagnosis's recall, both decisions.
``lesionlab evaluate`` makes the same choice on validation itself (``evaluation.diagnosis.choose_decision``) and
reports only the chosen rule; this shows both rules on every set, the one not chosen included.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from lesionlab.data.loading import dataset_from_record
from lesionlab.data.sources import load_external
from lesionlab.evaluation.diagnosis import RULES, diagnosis_metrics, training_priors
from lesionlab.evaluation.external import NONE, score_external
from lesionlab.evaluation.report import cell
from lesionlab.inference.loading import load_predictor
from lesionlab.runs import RunFolder


def decisions(truth: list[str | None], probs: np.ndarray, names: list[str], prior: dict, n: int) -> dict:
    return {rule: diagnosis_metrics(truth, probs, names, n, decision={"rule": rule, "priors": prior}) for rule in RULES}


def table(name: str, result: dict, names: list[str]) -> str:
    lines = [
        f"{name}: " + ", ".join(f"{k} {cell(v['balanced_accuracy'])}" for k, v in result.items() if v),
        "",
        "| decision | balanced accuracy | " + " | ".join(f"recall {d}" for d in names) + " |",
        "|---|---|" + "---|" * len(names),
    ]
    for k, v in result.items():
        if v:
            recalls = [cell(v["per_class"][d]["recall"]) if v["per_class"][d]["recall"] else "" for d in names]
            lines.append(f"| {k} | {cell(v['balanced_accuracy'])} | " + " | ".join(recalls) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--external", action="append", default=[], help="NAME=SPEC, repeatable (reported only)")
    ap.add_argument("--n-resamples", type=int, default=1000)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    folder = RunFolder(args.run)
    predictor = load_predictor(args.run)
    names = list(predictor.info.diagnoses)
    if not names:
        sys.exit(f"{args.run} has no diagnosis head (train with --target diagnosis)")
    splits = folder.dataset_splits(dataset_from_record(folder.config.raw["data"]))
    prior = training_priors([s.diagnosis for s in splits["train"]], names)
    if prior is None:
        sys.exit("the run's training split has no diagnoses: not a --target diagnosis run")
    sets = {"val": splits["val"]}
    for spec in args.external:
        name, _, path = spec.partition("=")
        sets[name] = load_external(f"{path}?name={name}").test
    record: dict[str, Any] = {
        "run": str(args.run),
        "priors": {n: round(q, 4) for n, q in prior.items()},
        "command": "python bench/diagnosis_priors.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "sets": {},
    }
    print(f"training priors: {record['priors']}\n")
    for name, samples in sets.items():
        scored = score_external(predictor, samples)
        if scored.diagnosis_probs is None:
            sys.exit("the predictor gave no diagnosis probabilities")
        truth = [None if d == NONE else d for d in scored.diagnoses]
        result = decisions(truth, scored.diagnosis_probs, names, prior, args.n_resamples)
        record["sets"][name] = result
        print(table(name, result, names) + "\n")
    if args.json:
        args.json.write_text(json.dumps(record, indent=2, default=float) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
