"""Group-aware, stratified train/validation folds: a near-duplicate group never straddles the split."""

from __future__ import annotations

import numpy as np

from lesionlab.data.sample import Sample
from lesionlab.errors import DataError


def n_folds(val_fraction: float) -> int:
    """How many disjoint validation folds a validation fraction makes (0.2 -> 5)."""
    return max(2, round(1 / val_fraction))


def check_fold(fold: int, val_fraction: float, also_fold: int | None = None) -> None:
    n = n_folds(val_fraction)
    for name, k in (("fold", fold), ("also-val-fold", also_fold)):
        if k is not None and not 0 <= k < n:
            raise DataError(
                f"{name} must be in 0..{n - 1} (validation fraction {val_fraction} makes {n} folds), got {k}"
            )
    if also_fold == fold:
        raise DataError(f"also-val-fold must differ from fold ({fold}): it is a second validation fold")


def split_train_val(
    samples: list[Sample],
    groups: dict[str, int],
    seed: int,
    val_fraction: float = 0.2,
    fold: int = 0,
    also_fold: int | None = None,
) -> tuple[list[Sample], list[Sample]]:
    """Seeded, stratified split in which a near-duplicate group never straddles train and validation.

    The validation part is fold ``fold`` of ``n_folds(val_fraction)`` group-aware folds; fold 0 is the default
    split. Runs on every fold of one seed see each training image in validation exactly once, which is what a
    cross-fitted ensemble needs (its threshold and temperature are fitted on all of train, out of fold).
    ``also_fold`` validates on a second fold too (training on the rest): the inner runs of a nested cross-fit.
    """
    from sklearn.model_selection import StratifiedGroupKFold

    check_fold(fold, val_fraction, also_fold)
    labels = np.array([s.label for s in samples])
    # Files outside any listed group form a group of their own.
    offset = max(groups.values(), default=-1) + 1
    group_ids = np.array([groups.get(s.relpath, offset + i) for i, s in enumerate(samples)])
    splitter = StratifiedGroupKFold(n_splits=n_folds(val_fraction), shuffle=True, random_state=seed)
    held_out = {fold} if also_fold is None else {fold, also_fold}
    val_idx = {
        int(i)
        for k, (_, idx) in enumerate(splitter.split(np.zeros(len(samples)), labels, group_ids))
        if k in held_out
        for i in idx
    }
    return ([s for i, s in enumerate(samples) if i not in val_idx], [s for i, s in enumerate(samples) if i in val_idx])
