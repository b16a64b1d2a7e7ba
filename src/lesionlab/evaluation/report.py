"""Markdown for people: a run's report and metric tables with confidence intervals."""

from __future__ import annotations

import math
from collections.abc import Mapping

from lesionlab.disclaimer import DISCLAIMER
from lesionlab.evaluation.metrics import METRICS

SPLIT_TITLES = {
    "val": "validation",
    "test": "test (official split)",
    "test_dedup": "test_dedup (test without near-duplicates of training images)",
}


def held_out_splits(metrics: Mapping) -> list[str]:
    """The splits of ``metrics`` to show, in order: val, test, test_dedup, then each source's own test and
    test_dedup when more than one source has them (with one source they repeat the whole splits)."""
    per_source = [k for k in metrics if k.startswith(("test:", "test_dedup:"))]
    several = len({k.split(":", 1)[1] for k in per_source}) > 1
    return [k for k in ("val", "test", "test_dedup", *(sorted(per_source) if several else [])) if k in metrics]


def fmt(block: Mapping) -> str:
    lo, hi = block["ci95"]
    return f"{block['value']:.3f} [{lo:.3f}, {hi:.3f}]"


def cell(block: Mapping | None) -> str:
    """:func:`fmt` of a metric block that may be missing or undefined (a value of None or NaN: e.g. sensitivity
    on a set without malignant images): "undefined" then."""
    if block is None or block.get("value") is None or math.isnan(block["value"]):
        return "undefined"
    return fmt(block)


def metrics_table(metrics: Mapping, splits=("val", "test", "test_dedup"), key: str | None = None) -> str:
    """Rows = metrics, columns = splits; ``key`` picks a sub-block such as ``at_threshold``."""
    cols = [s for s in splits if s in metrics]
    blocks = {s: (metrics[s][key] if key else metrics[s]) for s in cols}
    head = "| metric | " + " | ".join(f"{s} (n={blocks[s]['n']})" for s in cols) + " |"
    lines = [head, "|---|" + "---|" * len(cols)]
    for m in METRICS:
        lines.append(f"| {m} | " + " | ".join(fmt(blocks[s][m]) for s in cols) + " |")
    lines.append("| confusion [[tn, fp], [fn, tp]] | " + " | ".join(str(blocks[s]["confusion"]) for s in cols) + " |")
    return "\n".join(lines)


def metrics_sections(metrics: Mapping, calibration_note: str, splits=("val", "test", "test_dedup")) -> list[str]:
    """The report lines shared by runs and ensembles: metrics at 0.5 and at the operating threshold, calibration."""
    thr, cal = metrics["threshold"], metrics["calibration"]
    lines = [
        "## Metrics at threshold 0.5 (95% stratified bootstrap CIs)",
        "",
        metrics_table(metrics),
        "",
        f"## Metrics at the operating threshold {thr['value']:.4f} (policy `{thr['policy']}`, chosen on validation)",
        "",
        metrics_table(metrics, key="at_threshold"),
        "",
        "## Calibration",
        calibration_note,
        "",
        "| split | ECE before | ECE after | Brier before | Brier after |",
        "|---|---|---|---|---|",
    ]
    for s in splits:
        c = cal[s]
        lines.append(
            f"| {s} | {c['ece_before']:.4f} | {c['ece_after']:.4f} | {c['brier_before']:.4f} | {c['brier_after']:.4f} |"
        )
    return lines


def run_report(config: Mapping, metrics: Mapping) -> str:
    w = config.get("weights", {})
    cal = metrics["calibration"]
    pretrained = "ImageNet weights" if config.get("pretrained") else "RANDOM initial weights (no ImageNet weights)"
    t = config.get("train", {})
    lines = [
        f"# lesionlab run: {config.get('backbone')} ({config.get('mode')})",
        "",
        f"> {DISCLAIMER}",
        "",
        "## Model",
        f"- backbone `{config.get('backbone')}` from {pretrained}; weights source `{w.get('source')}`, "
        f"sha256 `{w.get('sha256')}`",
        f"- head: {config.get('model', {}).get('head')}; transfer mode `{config.get('mode')}`",
        f"- training: lr {t.get('lr')}, {t.get('epochs')} epochs, batch {t.get('batch_size')}, optimizer "
        f"{t.get('optimizer')}, schedule {t.get('schedule')}, seed {t.get('seed')}; best validation epoch "
        f"{config.get('best_epoch')}",
        f"- data: `{config.get('data', {}).get('root')}`; train {config['data'].get('n_train')}, validation "
        f"{config['data'].get('n_val')} (group-aware split, seed {config['data'].get('split_seed')}), test "
        f"{config['data'].get('n_test')}, test_dedup {config['data'].get('n_test_dedup')}",
        f"- command: `{config.get('command') or 'n/a'}`",
        "",
        *metrics_sections(
            metrics,
            f"Temperature {cal['temperature']:.3f}, fitted on validation. Probabilities reported by predict and "
            "serve are the calibrated ones.",
        ),
    ]
    lines += [
        "",
        "## Figures",
        "",
        "![ROC](figures/roc.png)",
        "",
        "![confusion](figures/confusion.png)",
        "",
        "![operating point](figures/confusion_operating.png)",
        "",
        "![training](figures/training_curves.png)",
        "",
        "![reliability](figures/reliability.png)",
        "",
    ]
    return "\n".join(lines)
