"""Figures as PNG files. Each function takes plain arrays and a path, writes atomically, returns the path."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from sklearn.metrics import roc_auc_score, roc_curve

from lesionlab.files import atomic_path


def _save(fig, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, bbox_inches="tight", format="png")
    plt.close(fig)
    return Path(path)


def roc(curves: Mapping[str, tuple[np.ndarray, np.ndarray]], path: Path, title: str = "ROC") -> Path:
    """``curves``: name -> (labels, scores); AUC goes in the legend."""
    fig, ax = plt.subplots(figsize=(5, 5))
    for name, (y, s) in curves.items():
        fpr, tpr, _ = roc_curve(y, s)
        ax.plot(fpr, tpr, label=f"{name} (AUC = {roc_auc_score(y, s):.3f})")
    ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=1)
    ax.set(
        xlabel="False positive rate (1 - specificity)",
        ylabel="True positive rate (sensitivity)",
        title=title,
        xlim=(0, 1),
        ylim=(0, 1.01),
    )
    ax.legend(loc="lower right", fontsize=8)
    return _save(fig, path)


def confusion_matrix(
    cm: Sequence[Sequence[int]], path: Path, title: str, labels: Sequence[str] = ("benign", "malignant")
) -> Path:
    m = np.asarray(cm)
    fig, ax = plt.subplots(figsize=(4, 3.6))
    ax.imshow(m, cmap="Blues")
    for i in range(2):
        for j in range(2):
            ax.text(
                j,
                i,
                str(m[i, j]),
                ha="center",
                va="center",
                color="white" if m[i, j] > m.max() / 2 else "black",
                fontsize=14,
            )
    ax.set(
        xticks=[0, 1],
        yticks=[0, 1],
        xticklabels=labels,
        yticklabels=labels,
        xlabel="predicted",
        ylabel="true",
        title=title,
    )
    return _save(fig, path)


def training_curves(history: Sequence[Mapping[str, str | float]], path: Path, title: str = "training") -> Path:
    ep = [int(h["epoch"]) for h in history]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.5))
    for key, ax in (("loss", a1), ("accuracy", a2)):
        ax.plot(ep, [float(h[f"train_{key}"]) for h in history], label="train")
        ax.plot(ep, [float(h[f"val_{key}"]) for h in history], label="validation")
        ax.set(xlabel="epoch", ylabel=key)
        ax.legend()
    fig.suptitle(title)
    return _save(fig, path)


def reliability(
    bins_before: Sequence[Mapping], bins_after: Sequence[Mapping], path: Path, title: str = "reliability (test)"
) -> Path:
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=1, label="perfect")
    for bins, name in ((bins_before, "before"), (bins_after, "after temperature scaling")):
        ax.plot([b["mean_prob"] for b in bins], [b["freq"] for b in bins], marker="o", label=name)
    ax.set(
        xlabel="predicted P(malignant)", ylabel="observed frequency of malignant", title=title, xlim=(0, 1), ylim=(0, 1)
    )
    ax.legend(loc="upper left", fontsize=8)
    return _save(fig, path)


def tuning_panels(
    panels: Mapping[str, Mapping[float, tuple[list[int], list[float]]]],
    best: Mapping[str, tuple[float, int, float]],
    path: Path,
) -> Path:
    """Study Figure 1: validation accuracy vs epochs, a line per learning rate, a panel per backbone."""
    n = len(panels)
    cols = min(2, n)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(5.5 * cols, 4 * rows), squeeze=False)
    for ax, (name, lines) in zip(axes.flat, panels.items()):
        ticks: set[int] = set()
        for lr, (epochs, accs) in sorted(lines.items()):
            ax.plot(epochs, accs, marker="o", ms=4, label=f"lr={lr:g}")
            ticks.update(epochs)
        lr, ep, acc = best[name]
        ax.plot([ep], [acc], marker="o", ms=12, mfc="none", mec="red", mew=2)
        low = min(min(a) for _, a in lines.values())
        ax.annotate(
            f"best {acc:.3f}\n(lr {lr:g}, {ep} ep)",
            xy=(ep, acc),
            xytext=(ep, acc - 0.35 * (acc - low) - 0.02),
            color="red",
            arrowprops=dict(arrowstyle="->", color="red"),
            ha="center",
            fontsize=8,
        )
        ax.set(title=name, xlabel="epochs", ylabel="validation accuracy", xticks=sorted(ticks))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.tight_layout()
    return _save(fig, path)


def confusion_grid(items: Mapping[str, Sequence[Sequence[int]]], path: Path, title: str | None = None) -> Path:
    """Study Figure 2: a confusion matrix ([[tn, fp], [fn, tp]]) per model, side by side (two rows past 3)."""
    n = len(items)
    cols = n if n <= 3 else (n + 1) // 2
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.8 * cols, 3.6 * rows), squeeze=False)
    for ax, (name, cm) in zip(axes.flat, items.items()):
        m = np.asarray(cm)
        ax.imshow(m, cmap="Blues")
        for i in range(2):
            for j in range(2):
                ax.text(
                    j, i, str(m[i, j]), ha="center", va="center", color="white" if m[i, j] > m.max() / 2 else "black"
                )
        ax.set(
            xticks=[0, 1],
            yticks=[0, 1],
            xticklabels=["benign", "malignant"],
            yticklabels=["benign", "malignant"],
            xlabel="predicted",
            ylabel="true",
            title=name,
        )
        ax.title.set_fontsize(9)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path)
