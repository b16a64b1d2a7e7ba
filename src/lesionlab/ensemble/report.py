"""An ensemble's report.md: its members, metrics at 0.5 and at the operating threshold, calibration, refusal."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from lesionlab.ensemble.members import CROSS_FIT, member_ref
from lesionlab.ensemble.scores import COMBINE, NESTED_NOTE
from lesionlab.evaluation.report import DISCLAIMER, metrics_sections
from lesionlab.evaluation.scoring import EVAL_SPLITS
from lesionlab.refusal.measure import report_section
from lesionlab.runs import FIGURES, REFUSAL_SCORES, RunFolder


def member_table(members: Sequence[Path], ensemble_dir: Path) -> str:
    """One markdown row per member: its path as ensemble.json records it, recipe and own test metrics."""
    lines = ["| member | backbone | mode | test AUC | test accuracy |", "|---|---|---|---|---|"]
    for m in members:
        run = RunFolder(m)
        test = run.metrics().get("test", {})  # an unevaluated member reads as n/a, not as an error
        auc = f"{test['auc']['value']:.3f}" if "auc" in test else "n/a"
        acc = f"{test['accuracy']['value']:.3f}" if "accuracy" in test else "n/a"
        lines.append(f"| `{member_ref(m, ensemble_dir)}` | {run.config.backbone} | {run.config.mode} | {auc} | {acc} |")
    return "\n".join(lines)


def _fitted_on(metrics: dict) -> str:
    """Which images the ensemble's temperature and threshold were fitted on, in words."""
    if metrics["threshold"].get("chosen_on") == NESTED_NOTE:
        return (
            f"a nested out-of-fold estimate on {metrics['val']['n']} training images, each scored by the "
            "mean of the inner runs that held its fold out (cross-fit, nested)"
        )
    if metrics.get("layout") == CROSS_FIT:
        return (
            f"out-of-fold predictions on {metrics['val']['n']} training images, each scored by the "
            "members that did not train on it (cross-fit)"
        )
    return "the shared validation split"


def ensemble_report(members: Sequence[Path], ensemble_dir: Path, metrics: dict, refusal: dict | None) -> str:
    """report.md of an evaluated ensemble; ``metrics`` is its metrics.json content, ``refusal`` the combined
    detector measurement (None when some member was not measured)."""
    cal = metrics["calibration"]
    lines = [
        f"# lesionlab ensemble of {len(members)} runs",
        "",
        f"> {DISCLAIMER}",
        "",
        f"P(malignant) = {COMBINE}, then the ensemble's own temperature and threshold (fitted on "
        f"{_fitted_on(metrics)}). TTA: {'on' if metrics.get('tta') else 'off'}.",
        "",
        "## Members",
        "",
        member_table(members, ensemble_dir),
        "",
        *metrics_sections(
            metrics, f"Temperature {cal['temperature']:.3f} on the ensemble's logit, fitted on validation.", EVAL_SPLITS
        ),
    ]
    lines += [
        "",
        report_section(refusal)
        if refusal
        else f"## Refusal\n\nNot measured: evaluate every member first (each writes {REFUSAL_SCORES}).\n",
        "## Figures",
        "",
        f"![ROC]({FIGURES}/roc.png)",
        "",
        f"![confusion]({FIGURES}/confusion.png)",
        "",
        f"![operating point]({FIGURES}/confusion_operating.png)",
        "",
        f"![reliability]({FIGURES}/reliability.png)",
        "",
    ]
    return "\n".join(lines)
