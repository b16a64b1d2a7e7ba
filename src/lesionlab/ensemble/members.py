"""The members of an ensemble: which runs qualify, their train/validation splits, fold groups and layout.

Everything here reads member folders through :class:`~lesionlab.runs.RunFolder`; nothing is written.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from lesionlab import runs as rf
from lesionlab.runs import RunFolder

#: The two layouts of members (see the package docstring).
SHARED, CROSS_FIT = "shared", "cross-fit"

#: (relpath, label, split) of one train or validation image of a run.
PoolRow = tuple[str, int, str]


def member_dirs(ensemble_dir: str | Path, key: str = "members") -> list[Path]:
    """Members (or, with key="inner", inner runs) as listed in ensemble.json; relative paths are relative to
    the ensemble folder. RunError when ``ensemble_dir`` has no ensemble.json."""
    return RunFolder(ensemble_dir).members(key)


def require_member(run_dir: Path) -> Path:
    """``run_dir`` if it can be a member: a finished run (not an ensemble) with an operating point; else
    RunError saying what to do."""
    run = RunFolder(run_dir)
    if run.is_ensemble:
        raise rf.RunError(f"{run_dir} is itself an ensemble; list its member runs instead")
    run.require_trained()
    if not run.has(rf.CALIBRATION):
        raise rf.RunError(
            f"{run_dir} has no {rf.CALIBRATION}; run `lesionlab evaluate {run_dir}` first (an "
            "ensemble averages its members' calibrated probabilities)"
        )
    return run_dir


def pool_rows(run_dir: Path) -> set[PoolRow]:
    """(relpath, label, split) of the run's train and validation images, from its splits.csv."""
    return {(r.relpath, r.label, r.split) for r in RunFolder(run_dir).split_rows() if r.split in ("train", "val")}


def temperature(run_dir: Path) -> float:
    """The member's own temperature (calibration.json): its calibrated probability is expit(logit / T)."""
    return RunFolder(run_dir).require_operating_point().temperature


def check_same_split(members: Sequence[Path]) -> None:
    """Raises RunError unless every member was trained and validated on exactly the same files."""
    first = pool_rows(members[0])
    for m in members[1:]:
        other = pool_rows(m)
        if other != first:
            diff = sorted(first ^ other)
            val_first = sum(1 for r in first if r[2] == "val")
            val_other = sum(1 for r in other if r[2] == "val")
            raise rf.RunError(
                f"{m} and {members[0]} were not trained on the same train/validation split ({len(diff)} rows of "
                f"{rf.SPLITS} differ, e.g. {diff[0][0]} as {diff[0][2]}; validation sizes {val_other} vs "
                f"{val_first}). Ensemble members must share the data, --split-seed and skipped files, so that "
                "the ensemble's temperature and threshold are fitted on images no member trained on."
            )


def fold_groups(members: Sequence[Path]) -> list[list[int]]:
    """Member indices grouped by identical train/validation split; one group is the shared layout, several
    are cross-fit and must hold disjoint validation folds of one training pool. RunError for any other mix."""
    rows = [pool_rows(m) for m in members]
    groups: list[list[int]] = []
    for i, r in enumerate(rows):
        same = next((g for g in groups if rows[g[0]] == r), None)
        if same is None:
            groups.append([i])
        else:
            same.append(i)
    if len(groups) == 1:
        return groups
    pools = [{(r[0], r[1]) for r in rs} for rs in rows]
    if any(p != pools[0] for p in pools[1:]):
        check_same_split(members)  # raises, naming the first differing file
    vals = [{r[0] for r in rows[g[0]] if r[2] == "val"} for g in groups]
    for a in range(len(groups)):
        for b in range(a + 1, len(groups)):
            if vals[a] & vals[b]:
                i, j = groups[a][0], groups[b][0]
                raise rf.RunError(
                    f"{members[i]} and {members[j]} were not trained on the same train/validation split, yet their "
                    f"validation folds overlap ({len(vals[a] & vals[b])} images). Members need either the same "
                    "split (same --split-seed and --fold) or disjoint validation folds of one --split-seed "
                    "(`lesionlab train --fold 0..4`)."
                )
    return groups


def layout_of(groups: Sequence[Sequence[int]]) -> str:
    """``shared`` or ``cross-fit`` (see the package docstring)."""
    return SHARED if len(groups) == 1 else CROSS_FIT


def member_ref(run_dir: Path, ensemble_dir: Path) -> str:
    """How ensemble.json names a member: relative to the ensemble folder, so the two can move together;
    absolute across drives (where no relative path exists)."""
    try:
        return Path(os.path.relpath(run_dir.resolve(), ensemble_dir.resolve())).as_posix()
    except ValueError:
        return str(run_dir.resolve())
