"""Markdown tables of finished runs for docs/results.md, read from their run folders (no recomputation).

python bench/results_table.py runs/lite0-frozen runs/mobilenetv2-frozen ...
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from lesionlab.evaluation.report import fmt

COLUMNS = ("accuracy", "precision", "recall", "specificity", "f1", "auc")


def rows(run: Path, key: str | None = None) -> list[str]:
    m = json.loads((run / "metrics.json").read_text())
    out = []
    for split in ("test", "test_dedup"):
        block = m[split][key] if key else m[split]
        out.append(
            f"| {split} (n={block['n']}) | " + " | ".join(fmt(block[c]) for c in COLUMNS) + f" | {block['confusion']} |"
        )
    return out


def describe(run: Path) -> str:
    cfg = json.loads((run / "config.json").read_text())
    m = json.loads((run / "metrics.json").read_text())
    timing = cfg.get("timing", {})
    wall = timing.get("wall_seconds")
    epochs = len((run / "history.csv").read_text().splitlines()) - 1
    lines = [
        f"### {run.name}: `{cfg['backbone']}` {cfg['mode']} "
        f"({'ImageNet weights, ' + cfg['weights']['source'] if cfg['pretrained'] else 'RANDOM init'})",
        "",
        f"Command: `{cfg.get('command', '')}`",
        "",
        f"Best validation epoch {cfg.get('best_epoch')} of {epochs}; training wall time "
        + (f"{wall / 60:.1f} min" if wall else "see note")
        + " on 2 CPU cores.",
        "",
        "At threshold 0.5 (95% stratified bootstrap CIs, 1000 resamples):",
        "",
        "| split | " + " | ".join(COLUMNS) + " | confusion [[tn, fp], [fn, tp]] |",
        "|---|" + "---|" * (len(COLUMNS) + 1),
        *rows(run),
        "",
        f"At the operating threshold {m['threshold']['value']:.3f} (`{m['threshold']['policy']}` on validation):",
        "",
        "| split | " + " | ".join(COLUMNS) + " | confusion [[tn, fp], [fn, tp]] |",
        "|---|" + "---|" * (len(COLUMNS) + 1),
        *rows(run, "at_threshold"),
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    print("\n".join(describe(Path(p)) for p in sys.argv[1:]))
