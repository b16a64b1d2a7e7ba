"""What a lesion detector's measurement (refusal.json's content) puts in metrics.json and report.md."""

from __future__ import annotations

import numpy as np


def rate(refused: np.ndarray) -> dict:
    """How many of a set a detector refused: ``n``, ``refused`` and ``rate`` (NaN for an empty set)."""
    return {
        "n": len(refused),
        "refused": int(refused.sum()),
        "rate": float(refused.mean()) if len(refused) else float("nan"),
    }


def auroc(lesion_scores: np.ndarray, other_scores: np.ndarray) -> float:
    """How well the distance separates non-lesions (positive) from real lesions; 1.0 = perfectly."""
    from sklearn.metrics import roc_auc_score

    y = np.r_[np.zeros(len(lesion_scores)), np.ones(len(other_scores))]
    return float(roc_auc_score(y, np.r_[lesion_scores, other_scores]))


def threshold_rule(confidence: float, pixels: bool, dermoscopy: bool) -> str:
    """How the thresholds were set, for refusal.json: each component gets an equal share of the budget."""
    text = (
        f"lowest threshold whose validation refusal rate has a one-sided {confidence:.0%} Clopper-Pearson upper "
        "bound <= max_refusal_on_validation"
    )
    if pixels and dermoscopy:
        return text + " / 3, for each of the two distances and the dermoscopy discriminator"
    if pixels or dermoscopy:
        return text + (
            " / 2, for each of the two distances" if pixels else " / 2, for the distance and the discriminator"
        )
    return text


def summary(result: dict) -> dict:
    """The few refusal numbers that belong in metrics.json (the details stay in refusal.json)."""
    out = {
        "auroc_test_vs_non_lesion": result["auroc_test_vs_non_lesion"],
        **{f"{name}_refused": r["rate"] for name, r in result["lesions"].items()},
        "non_lesion_refused": result["non_lesion"]["rate"],
        "n_non_lesion": result["non_lesion"]["n"],
        "threshold": result["threshold"],
    }
    photos = result.get("clinical_photos", {})
    if "held_out" in photos:
        out["clinical_photos_held_out_refused"] = photos["held_out"]["rate"]
        out["n_clinical_photos_held_out"] = photos["held_out"]["n"]
    return out


def report_section(result: dict) -> str:
    """Markdown appended to a run's report.md."""
    nl = result["non_lesion"]
    how = (
        f"Threshold {result['threshold']:.2f}: the lowest whose validation refusal rate is, with 95% "
        f"confidence, at most {result['max_refusal_on_validation']:.0%}."
        if "members" not in result
        else "Each member keeps its own threshold."
    )
    lines = [
        "## Refusal of non-lesion images",
        "",
        f"{result['method']}. {how}",
        "",
        f"- AUROC, test lesions vs {nl['n']} non-lesion images: {result['auroc_test_vs_non_lesion']:.4f}",
        *(
            f"- {name} lesions refused: {r['refused']}/{r['n']} ({r['rate']:.2%})"
            for name, r in result["lesions"].items()
        ),
        f"- non-lesion images refused: {nl['refused']}/{nl['n']} ({nl['rate']:.2%}); by kind: "
        + ", ".join(f"{k} {v['refused']}/{v['n']}" for k, v in nl["by_kind"].items()),
        f"- accepted non-lesion images: {', '.join(nl['accepted']) or 'none'}",
        *_photo_lines(result.get("clinical_photos", {})),
        "",
    ]
    return "\n".join(lines)


def _photo_lines(block: dict) -> list[str]:
    if "held_out" not in block:
        return [f"- clinical photos: {block['note']}"] if "note" in block else []
    h = block["held_out"]
    how = "fitted on the other half" if block["dermoscopy_discriminator"] else "no dermoscopy discriminator"
    return [
        f"- clinical or natural photos ({', '.join(block['sources'])}), held-out half refused: "
        f"{h['refused']}/{h['n']} ({h['rate']:.2%}; {how}, {block['split']})"
    ]
