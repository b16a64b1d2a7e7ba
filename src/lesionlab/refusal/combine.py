"""An ensemble's refusal, combined from its members' measured scores (refusal_scores.csv) without recomputing."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lesionlab.models.detector import ENSEMBLE_RULE, ensemble_refusal_score
from lesionlab.refusal.report import auroc, rate
from lesionlab.runs import RunFolder


def _read_scores(run_dir: Path) -> dict[tuple[str, str], float] | None:
    """(set, name) -> distance / threshold (> 1 means refused) from a member's refusal_scores.csv."""
    run = RunFolder(run_dir)
    rows = run.refusal_scores()
    if rows is None:
        return None
    threshold = float(run.refusal()["threshold"])
    return {(r.set, r.name): r.score / threshold for r in rows}


def combine_refusal(member_dirs: list[Path]) -> dict | None:
    """An ensemble refuses when the median member refuses (``ood.ensemble_refusal_score``, as
    EnsemblePredictor.analyze does); measured from the members' refusal_scores.csv without recomputing.
    None when a member has not been measured."""
    read = [_read_scores(Path(m)) for m in member_dirs]
    per_member = [p for p in read if p is not None]
    if len(per_member) < len(read):
        return None
    keys = [k for k in per_member[0] if all(k in p for p in per_member[1:])]
    combined = ensemble_refusal_score([[p[k] for k in keys] for p in per_member])
    score = dict(zip(keys, combined.tolist()))
    kind = lambda k: k[1].split("/", 1)[0]
    test = np.array([v for k, v in score.items() if k[0] == "test"])
    other = [(k, v) for k, v in score.items() if k[0] == "non_lesion"]
    nl = np.array([v for _, v in other])
    photos = [(k[1], v) for k, v in score.items() if k[0] == "photo"]
    result = {
        "method": ENSEMBLE_RULE,
        "threshold": 1.0,
        "max_refusal_on_validation": RunFolder(member_dirs[0]).refusal().get("max_refusal_on_validation", 0.01),
        "members": [str(m) for m in member_dirs],
        "auroc_test_vs_non_lesion": auroc(test, nl),
        "lesions": {"test": rate(test > 1.0)},
        "non_lesion": {
            **rate(nl > 1.0),
            "accepted": [k[1] for k, v in other if v <= 1.0],
            "by_kind": {
                c: rate(np.array([v > 1.0 for k, v in other if kind(k) == c]))
                for c in sorted({kind(k) for k, _ in other})
            },
        },
    }
    if photos:  # the members were measured on the same held-out photos
        refused = np.array([v > 1.0 for _, v in photos])
        result["clinical_photos"] = {
            "held_out": rate(refused),
            "held_out_accepted": [n for (n, _), r in zip(photos, refused) if not r],
            "sources": sorted({n.split("/", 1)[0] for n, _ in photos}),
            "split": "as the members' refusal.json says",
            "dermoscopy_discriminator": all(
                RunFolder(m).refusal().get("clinical_photos", {}).get("dermoscopy_discriminator") for m in member_dirs
            ),
        }
    return result
