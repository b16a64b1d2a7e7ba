"""Creating and evaluating an ensemble folder (see the package docstring for layouts and inner runs).

``create_ensemble`` checks the members, writes ensemble.json, config.json and splits.csv, then evaluates;
``evaluate_ensemble`` re-scores the members of an existing folder. Both leave the files of an evaluated run
(``write_evaluation``), so an ensemble is served, reported and compared like one run.

The names the CLI, inference and bench scripts import from here before the package was split are re-exported.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lesionlab import files
from lesionlab import runs as rf
from lesionlab.ensemble.members import (
    CROSS_FIT,
    SHARED,
    check_same_split,
    fold_groups,
    layout_of,
    member_dirs,
    member_ref,
    pool_rows,
    require_member,
    temperature,
)
from lesionlab.ensemble.report import ensemble_report
from lesionlab.ensemble.scores import (
    COMBINE,
    NESTED_NOTE,
    OUT_OF_FOLD_NOTE,
    combine,
    ensemble_scores,
    member_scores,
    nested_out_of_fold,
    out_of_fold,
    scores_from_predictions,
)
from lesionlab.evaluation import evaluate
from lesionlab.evaluation.evaluate import fitted_metrics, write_evaluation
from lesionlab.evaluation.metrics import DEFAULT_POLICY, DEFAULT_RESAMPLES, check_policy
from lesionlab.refusal.measure import combine_refusal, summary
from lesionlab.runs import RunFolder, SplitRow

__all__ = [
    "COMBINE",
    "CROSS_FIT",
    "KIND",
    "NESTED_NOTE",
    "SHARED",
    "check_same_split",
    "combine",
    "create_ensemble",
    "ensemble_scores",
    "evaluate_ensemble",
    "fold_groups",
    "layout_of",
    "member_dirs",
    "member_scores",
    "nested_out_of_fold",
    "out_of_fold",
    "scores_from_predictions",
]

KIND = rf.ENSEMBLE_KIND
#: The members' config.json data keys an ensemble's config.json repeats (they describe the shared data).
DATA_KEYS = ("root", "classes", "positive_class", "split_seed", "n_train", "n_val", "n_test", "n_test_dedup")


def create_ensemble(
    run_dirs: Sequence[str | Path],
    out: str | Path,
    data: str | Path | None = None,
    policy: str = DEFAULT_POLICY,
    tta: bool = False,
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
    progress: bool = True,
    command: str = "",
    inner: Sequence[str | Path] = (),
) -> dict:
    """Writes ensemble.json and config.json into ``out`` and evaluates the ensemble (reusing the members'
    predictions.csv when they match); returns metrics.json's content. ``inner``: runs that fit the operating
    point on a nested estimate (package docstring). If anything fails, no servable ensemble is left behind: a
    folder this call created is removed, an existing one loses its operating point."""
    check_policy(policy)
    members = [require_member(Path(r)).resolve() for r in run_dirs]
    inner_runs = [require_member(Path(r)).resolve() for r in inner]
    out = Path(out)
    if len(members) < 2:
        raise rf.RunError("an ensemble needs at least two run folders")
    if len(set(members)) < len(members):
        raise rf.RunError("a run is listed twice; each member counts once in the mean")
    if out.resolve() in members or RunFolder(out).has(rf.MODEL):
        raise rf.RunError(f"{out} is a run folder; choose a new folder for the ensemble")
    groups = fold_groups(members)
    if inner_runs and len(groups) < 2:
        raise rf.RunError(
            "inner runs calibrate a cross-fit ensemble, but these members share one split; train "
            "them on different folds (`train --fold K`)"
        )
    created = not out.exists()
    try:
        return _write_ensemble(
            members, groups, out, data, policy, tta, n_resamples, seed, progress, command, inner_runs
        )
    except BaseException:
        if created:
            shutil.rmtree(out, ignore_errors=True)
        else:
            RunFolder(out).forget_operating_point()
        raise


def evaluate_ensemble(
    run_dir: str | Path,
    data: str | Path | None = None,
    policy: str = DEFAULT_POLICY,
    tta: bool = False,
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
    progress: bool = True,
) -> dict:
    """Re-scores every member (with TTA if asked) and rewrites the ensemble's evaluation; returns metrics.json's
    content. RunError when ``run_dir`` is not an ensemble or lists no members."""
    run_dir = Path(run_dir)
    members = [require_member(m) for m in member_dirs(run_dir)]  # RunError without ensemble.json
    if not members:
        raise rf.RunError(f"{run_dir / rf.ENSEMBLE} lists no members")
    inner = [require_member(r) for r in member_dirs(run_dir, "inner")]
    return _evaluate(
        run_dir, members, fold_groups(members), data, policy, tta, n_resamples, seed, progress, reuse=False, inner=inner
    )


def evaluate_model(
    model_dir: str | Path,
    data: str | Path | None = None,
    policy: str = DEFAULT_POLICY,
    tta: bool = False,
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
    progress: bool = True,
    non_lesion: Sequence[str | Path] = (),
) -> dict:
    """Evaluates any model folder: an ensemble with :func:`evaluate_ensemble`, a run with
    ``evaluation.evaluate.evaluate_run`` (``non_lesion``: photo folders its lesion detector learns to refuse);
    returns metrics.json's content."""
    if RunFolder(model_dir).is_ensemble:
        if non_lesion:
            raise rf.RunError(f"{model_dir} is an ensemble: fit each member's detector with `lesionlab refusal MEMBER`")
        return evaluate_ensemble(model_dir, data, policy, tta, n_resamples, seed, progress)
    return evaluate.evaluate_run(model_dir, data, policy, tta, n_resamples, seed, progress, non_lesion)


# ------------------------------------------------------------------ writing the folder


def _write_ensemble(
    members: list[Path],
    groups: list[list[int]],
    out: Path,
    data: str | Path | None,
    policy: str,
    tta: bool,
    n_resamples: int,
    seed: int,
    progress: bool,
    command: str,
    inner: list[Path],
) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    folder = RunFolder(out)
    folder.write_json(
        rf.ENSEMBLE,
        {"members": [member_ref(m, out) for m in members], "combine": COMBINE}
        | ({"inner": [member_ref(r, out) for r in inner]} if inner else {}),
    )
    folder.write_config(_config(members, groups, out, command, inner))
    if layout_of(groups) == SHARED:
        # The members' own splits.csv, byte for byte: the ensemble was trained and validated exactly as they were.
        files.atomic_write_bytes(out / rf.SPLITS, (RunFolder(members[0]) / rf.SPLITS).read_bytes())
    else:
        folder.write_split_rows(_cross_fit_split_rows(members, groups))
    return _evaluate(out, members, groups, data, policy, tta, n_resamples, seed, progress, reuse=True, inner=inner)


def _config(
    members: Sequence[Path], groups: Sequence[Sequence[int]], out: Path, command: str, inner: Sequence[Path]
) -> dict[str, Any]:
    """config.json of an ensemble (without schema_version, which ``write_config`` adds)."""
    configs = [RunFolder(m).config for m in members]
    first_data = configs[0].data
    return {
        "kind": KIND,
        "mode": "ensemble",
        "backbone": "ensemble(" + ",".join(c.backbone for c in configs) + ")",
        "combine": COMBINE,
        "layout": layout_of(groups),
        "members": [_describe_member(m, out) for m in members],
        "data": {k: first_data.get(k) for k in DATA_KEYS}
        | ({} if layout_of(groups) == SHARED else _cross_fit_data(members, groups)),
        **(
            {
                "inner": [_describe_member(r, out) | {"val_folds": RunFolder(r).config.val_folds} for r in inner],
                "calibrated_on": NESTED_NOTE,
            }
            if inner
            else {}
        ),
        "versions": rf.package_versions(),
        "command": command,
    }


def _describe_member(run_dir: Path, ensemble_dir: Path) -> dict[str, Any]:
    """A member (or inner run) as the ensemble's config.json records it: recipe and own operating point."""
    run = RunFolder(run_dir)
    op = run.require_operating_point()
    return {
        "path": member_ref(run_dir, ensemble_dir),
        "model_id": op.model_id,
        "backbone": run.config.backbone,
        "mode": run.config.mode,
        "input_size": run.config.preprocessing.input_size,
        "temperature": op.temperature,
        "threshold": op.threshold,
    }


def _cross_fit_data(members: Sequence[Path], groups: Sequence[Sequence[int]]) -> dict[str, Any]:
    """config.json's data block of a cross-fit ensemble: one validation fold per fold group, not per member."""
    first_of_group = [RunFolder(members[g[0]]).config.data for g in groups]
    return {
        "n_val": sum(d.get("n_val", 0) for d in first_of_group),
        "n_val_note": "out of fold: each fold scored by the members that held it out",
        "folds": [d.get("fold", 0) for d in first_of_group],
    }


def _cross_fit_split_rows(members: Sequence[Path], groups: Sequence[Sequence[int]]) -> list[SplitRow]:
    """splits.csv of a cross-fit ensemble: every pool image is validation (out of fold); ``members`` lists the
    members that held it out (indices in ensemble.json, separated by ';'). Sorted by relpath."""
    rows = []
    for g in groups:
        held_out_by = ";".join(str(i) for i in g)
        rows += [(r[0], r[1], held_out_by) for r in pool_rows(members[g[0]]) if r[2] == "val"]
    return [SplitRow(path, label, "val", by) for path, label, by in sorted(rows)]


# ------------------------------------------------------------------ evaluation


def _evaluate(
    ensemble_dir: Path,
    members: list[Path],
    groups: list[list[int]],
    data: str | Path | None,
    policy: str,
    tta: bool,
    n_resamples: int,
    seed: int,
    progress: bool,
    reuse: bool,
    inner: Sequence[Path] = (),
) -> dict:
    """Scores the members (and inner runs), fits the ensemble's operating point and writes its evaluation
    (metrics.json, calibration.json, predictions.csv, figures, report.md, refusal.json); returns the metrics."""
    layout = layout_of(groups)
    per_member = [member_scores(m, data, tta, reuse, progress) for m in members]
    nested = None
    if inner:
        per_inner = [member_scores(r, data, tta, reuse, progress) for r in inner]
        nested = nested_out_of_fold(per_inner, [temperature(r) for r in inner])
    scores = ensemble_scores(per_member, [temperature(m) for m in members], groups, nested)
    names = ", ".join(RunFolder(m).config.backbone for m in members)
    metrics, probs = fitted_metrics(scores, policy, n_resamples, seed, tta)
    metrics["layout"] = layout
    if layout == CROSS_FIT:
        metrics["threshold"]["chosen_on"] = NESTED_NOTE if inner else OUT_OF_FOLD_NOTE
    run = RunFolder(ensemble_dir)
    refusal = combine_refusal(members)
    if refusal is not None:
        metrics["refusal"] = summary(refusal)
        run.write_refusal(refusal)
    report = ensemble_report(members, ensemble_dir, metrics, refusal)
    write_evaluation(
        run, scores, probs, metrics, f"ensemble ({names})", f"ensemble-{len(members)}-{ensemble_dir.name}", report
    )
    return metrics
