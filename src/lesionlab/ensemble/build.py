"""Ensembles as model folders: the mean of the members' calibrated probabilities, evaluated like one run.

An ensemble folder holds ``ensemble.json`` (member paths, relative to the folder when possible),
``config.json`` (what the members are) and, after evaluation, the same files as a run:
metrics.json, calibration.json (the ensemble's own temperature and threshold, fitted on the shared
validation split), predictions.csv, figures and report.md. ``load_predictor`` turns it into an
``EnsemblePredictor``, so predict and serve accept it; exporting it means exporting each member
(``lesionlab export MEMBER``), after which its members run on ONNX Runtime.

The ensemble's temperature and threshold are fitted on validation images that the scoring model never
trained on. Two layouts of members allow that:

- **shared**: every member has the same train/validation split; validation is scored by the ensemble itself.
- **cross-fit**: the members were trained on different folds of one training pool (``train --fold k``), their
  validation folds disjoint. Validation is then *out of fold*: each image is scored by the members that held
  it out (one per fold, or several recipes per fold: members with the same split form a fold group), so the
  temperature and threshold are fitted on up to the whole training pool (2637 images instead of 528), which
  makes the operating threshold far less noisy. Test images are scored by every member. Give every fold group
  the same recipes, so that out-of-fold scores come from the same kind of model throughout.

An out-of-fold score still comes from one fold's members while a test image gets the mean of all of them.
**Inner runs** (``train --fold K --also-val-fold L``, one per pair of folds, the members' recipe) remove that
mismatch: with ``inner`` the temperature and threshold are fitted on a *nested* out-of-fold estimate, each
training image scored by the mean of the inner runs that held its fold out, an ensemble none of whose runs
saw it (docs/results.md 3.4).
"""

from __future__ import annotations

import csv
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from scipy.special import expit

from lesionlab import files
from lesionlab import runs as rf
from lesionlab.runs import RunFolder
from lesionlab.evaluation.evaluate import fitted_metrics, write_evaluation
from lesionlab.evaluation.scoring import EVAL_SPLITS, SplitScores, score_run
from lesionlab.evaluation.metrics import DEFAULT_POLICY, DEFAULT_RESAMPLES, check_policy
from lesionlab.evaluation.report import DISCLAIMER, metrics_table
from lesionlab.inference.predictor import ENSEMBLE_FILE, mean_probability_logit

KIND = "lesionlab-ensemble"
COMBINE = "mean of the members' calibrated probabilities"


# ------------------------------------------------------------------ members


def member_dirs(ensemble_dir: Path, key: str = "members") -> list[Path]:
    """Members (or, with key="inner", inner runs) as listed in ensemble.json; relative paths are relative to
    the ensemble folder."""
    spec = files.read_json(Path(ensemble_dir) / ENSEMBLE_FILE)
    out = []
    for m in spec.get(key, []):
        p = Path(m)
        out.append(p if p.is_absolute() else (Path(ensemble_dir) / p).resolve())
    return out


def _require_member(run_dir: Path) -> Path:
    if (run_dir / ENSEMBLE_FILE).exists():
        raise rf.RunError(f"{run_dir} is itself an ensemble; list its member runs instead")
    rf.require_run(run_dir)
    if not (run_dir / rf.CALIBRATION).exists():
        raise rf.RunError(
            f"{run_dir} has no {rf.CALIBRATION}; run `lesionlab evaluate {run_dir}` first (an "
            "ensemble averages its members' calibrated probabilities)"
        )
    return run_dir


def _split_rows(run_dir: Path) -> set[tuple[str, str, str]]:
    """(relpath, label, split) of the run's train and validation images."""
    with open(run_dir / "splits.csv", newline="") as f:
        return {(r["relpath"], r["label"], r["split"]) for r in csv.DictReader(f) if r["split"] in ("train", "val")}


def check_same_split(members: Sequence[Path]) -> None:
    """Raises RunError unless every member was trained and validated on exactly the same files."""
    first = _split_rows(members[0])
    for m in members[1:]:
        other = _split_rows(m)
        if other != first:
            diff = sorted(first ^ other)
            val_first = sum(1 for r in first if r[2] == "val")
            val_other = sum(1 for r in other if r[2] == "val")
            raise rf.RunError(
                f"{m} and {members[0]} were not trained on the same train/validation split ({len(diff)} rows of "
                f"splits.csv differ, e.g. {diff[0][0]} as {diff[0][2]}; validation sizes {val_other} vs "
                f"{val_first}). Ensemble members must share the data, --split-seed and skipped files, so that "
                "the ensemble's temperature and threshold are fitted on images no member trained on."
            )


SHARED, CROSS_FIT = "shared", "cross-fit"
NESTED_NOTE = (
    "val (nested out of fold: every training image, scored by the mean of the inner runs that held its fold out)"
)


def fold_groups(members: Sequence[Path]) -> list[list[int]]:
    """Member indices grouped by identical train/validation split; one group is the shared layout, several
    are cross-fit and must hold disjoint validation folds of one training pool. RunError for any other mix."""
    rows = [_split_rows(m) for m in members]
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
    """``shared`` or ``cross-fit`` (see the module docstring)."""
    return SHARED if len(groups) == 1 else CROSS_FIT


def _temperature(run_dir: Path) -> float:
    return float(files.read_json(run_dir / rf.CALIBRATION).get("temperature", 1.0))


# ------------------------------------------------------------------ scores


def scores_from_predictions(run_dir: Path, tta: bool = False) -> dict[str, SplitScores] | None:
    """A member's logits from its predictions.csv, or None when the file is missing or does not match the
    member's current calibration, TTA setting or validation split (then it must be scored again)."""
    path = run_dir / rf.PREDICTIONS
    if not path.exists():
        return None
    cal = files.read_json(run_dir / rf.CALIBRATION)
    if bool(cal.get("tta", False)) != tta:
        return None
    rows: dict[str, list[tuple[str, float, float, float]]] = {s: [] for s in EVAL_SPLITS}
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            if r["split"] in rows:
                rows[r["split"]].append((r["relpath"], float(r["label"]), float(r["logit"]), float(r["probability"])))
    if any(not v for v in rows.values()):
        return None
    t = float(cal.get("temperature", 1.0))
    out = {}
    for split, items in rows.items():
        z = np.array([i[2] for i in items])
        if np.max(np.abs(expit(z / t) - np.array([i[3] for i in items]))) > 1e-4:
            return None  # probabilities from another calibration: the file is stale
        out[split] = SplitScores([i[0] for i in items], np.array([i[1] for i in items], np.float32), z)
    val_rel = {r[0] for r in _split_rows(run_dir) if r[2] == "val"}
    return out if set(out["val"].relpaths) <= val_rel else None


def member_scores(
    run_dir: Path, data: str | Path | None, tta: bool, reuse: bool, progress: bool
) -> dict[str, SplitScores]:
    """Uncalibrated logits per split; from predictions.csv when ``reuse`` and it is consistent."""
    if reuse and data is None:
        found = scores_from_predictions(run_dir, tta)
        if found is not None:
            return found
    return score_run(run_dir, data, tta, progress)


def combine(
    per_member: Sequence[dict[str, SplitScores]], temperatures: Sequence[float], splits: Sequence[str] = EVAL_SPLITS
) -> dict[str, SplitScores]:
    """Per split, on the images every member scored: logit of the mean calibrated probability."""
    out = {}
    for split in splits:
        maps = [dict(zip(s[split].relpaths, zip(s[split].y, s[split].logits))) for s in per_member]
        common = [r for r in per_member[0][split].relpaths if all(r in m for m in maps[1:])]
        if not common:
            raise rf.RunError(f"the members have no {split} image in common")
        y = np.array([maps[0][r][0] for r in common], np.float32)
        for m in maps[1:]:
            if any(m[r][0] != maps[0][r][0] for r in common):
                raise rf.RunError(
                    f"members disagree on the labels of {split} images; were they trained on the same "
                    "data folder and classes?"
                )
        probs = [expit(np.array([m[r][1] for r in common]) / t) for m, t in zip(maps, temperatures)]
        out[split] = SplitScores(common, y, mean_probability_logit(probs))
    return out


def out_of_fold(
    per_member: Sequence[dict[str, SplitScores]], temperatures: Sequence[float], groups: Sequence[Sequence[int]]
) -> SplitScores:
    """Cross-fit validation: each fold scored by the members that held it out (mean calibrated probability)."""
    parts = [combine([per_member[i] for i in g], [temperatures[i] for i in g], ["val"])["val"] for g in groups]
    relpaths = [r for p in parts for r in p.relpaths]
    order = np.argsort(relpaths, kind="stable")
    return SplitScores(
        [relpaths[i] for i in order],
        np.concatenate([p.y for p in parts])[order],
        np.concatenate([p.logits for p in parts])[order],
    )


def nested_out_of_fold(per_inner: Sequence[dict[str, SplitScores]], temperatures: Sequence[float]) -> SplitScores:
    """Every inner run's validation images, each scored by the mean calibrated probability of all the inner
    runs that held it out."""
    probs: dict[str, list[float]] = {}
    labels: dict[str, float] = {}
    for scores, t in zip(per_inner, temperatures):
        val = scores["val"]
        for r, y, z in zip(val.relpaths, val.y, val.logits):
            probs.setdefault(r, []).append(float(expit(z / t)))
            if labels.setdefault(r, float(y)) != float(y):
                raise rf.RunError(f"inner runs disagree on the label of {r}; were they trained on the same data?")
    rel = sorted(probs)
    mean = np.array([np.mean(probs[r]) for r in rel])
    return SplitScores(rel, np.array([labels[r] for r in rel], np.float32), mean_probability_logit([mean]))


def ensemble_scores(
    per_member: Sequence[dict[str, SplitScores]],
    temperatures: Sequence[float],
    groups: Sequence[Sequence[int]],
    nested: SplitScores | None = None,
) -> dict[str, SplitScores]:
    """Validation (shared, out of fold, or the nested estimate when given) and test scores of the ensemble."""
    if len(groups) == 1:
        return combine(per_member, temperatures)
    scores = combine(per_member, temperatures, [s for s in EVAL_SPLITS if s != "val"])
    val = out_of_fold(per_member, temperatures, groups)
    if nested is not None:
        if set(nested.relpaths) != set(val.relpaths):
            gap = len(set(val.relpaths) ^ set(nested.relpaths))
            raise rf.RunError(
                f"the inner runs' validation images differ from the members' folds ({gap} images); "
                "give one inner run per pair of the members' folds (`train --fold K "
                "--also-val-fold L`, same --split-seed and data)"
            )
        val = nested
    return {"val": val, **scores}


# ------------------------------------------------------------------ the folder


def _describe_member(run_dir: Path, ensemble_dir: Path) -> dict:
    cfg = files.read_json(run_dir / rf.CONFIG)
    cal = files.read_json(run_dir / rf.CALIBRATION)
    return {
        "path": _member_ref(run_dir, ensemble_dir),
        "model_id": cal.get("model_id"),
        "backbone": cfg["backbone"],
        "mode": cfg["mode"],
        "input_size": cfg["preprocessing"]["input_size"],
        "temperature": cal.get("temperature"),
        "threshold": cal.get("threshold"),
    }


def _member_ref(run_dir: Path, ensemble_dir: Path) -> str:
    """Relative to the ensemble folder, so the two can move together; absolute across drives."""
    try:
        return Path(os.path.relpath(run_dir.resolve(), ensemble_dir.resolve())).as_posix()
    except ValueError:
        return str(run_dir.resolve())


def _member_table(members: Sequence[Path], ensemble_dir: Path) -> str:
    lines = ["| member | backbone | mode | test AUC | test accuracy |", "|---|---|---|---|---|"]
    for m in members:
        cfg = files.read_json(m / rf.CONFIG)
        metrics = files.read_json(m / rf.METRICS) if (m / rf.METRICS).exists() else {}
        test = metrics.get("test", {})
        auc = f"{test['auc']['value']:.3f}" if "auc" in test else "n/a"
        acc = f"{test['accuracy']['value']:.3f}" if "accuracy" in test else "n/a"
        lines.append(f"| `{_member_ref(m, ensemble_dir)}` | {cfg['backbone']} | {cfg['mode']} | {auc} | {acc} |")
    return "\n".join(lines)


def ensemble_report(members: Sequence[Path], ensemble_dir: Path, metrics: dict, refusal: dict | None) -> str:
    from lesionlab.refusal.measure import report_section

    thr, cal = metrics["threshold"], metrics["calibration"]
    if metrics["threshold"].get("chosen_on") == NESTED_NOTE:
        fitted_on = (
            f"a nested out-of-fold estimate on {metrics['val']['n']} training images, each scored by the "
            "mean of the inner runs that held its fold out (cross-fit, nested)"
        )
    elif metrics.get("layout") == CROSS_FIT:
        fitted_on = (
            f"out-of-fold predictions on {metrics['val']['n']} training images, each scored by the "
            "members that did not train on it (cross-fit)"
        )
    else:
        fitted_on = "the shared validation split"
    lines = [
        f"# lesionlab ensemble of {len(members)} runs",
        "",
        f"> {DISCLAIMER}",
        "",
        f"P(malignant) = {COMBINE}, then the ensemble's own temperature and threshold (fitted on "
        f"{fitted_on}). TTA: {'on' if metrics.get('tta') else 'off'}.",
        "",
        "## Members",
        "",
        _member_table(members, ensemble_dir),
        "",
        "## Metrics at threshold 0.5 (95% stratified bootstrap CIs)",
        "",
        metrics_table(metrics),
        "",
        f"## Metrics at the operating threshold {thr['value']:.4f} (policy `{thr['policy']}`, chosen on validation)",
        "",
        metrics_table(metrics, key="at_threshold"),
        "",
        "## Calibration",
        f"Temperature {cal['temperature']:.3f} on the ensemble's logit, fitted on validation.",
        "",
        "| split | ECE before | ECE after | Brier before | Brier after |",
        "|---|---|---|---|---|",
    ]
    for s in EVAL_SPLITS:
        c = cal[s]
        lines.append(
            f"| {s} | {c['ece_before']:.4f} | {c['ece_after']:.4f} | {c['brier_before']:.4f} | {c['brier_after']:.4f} |"
        )
    lines += [
        "",
        report_section(refusal)
        if refusal
        else "## Refusal\n\nNot measured: evaluate every member first (each writes refusal_scores.csv).\n",
        "## Figures",
        "",
        "![ROC](figures/roc.png)",
        "",
        "![confusion](figures/confusion.png)",
        "",
        "![operating point](figures/confusion_operating.png)",
        "",
        "![reliability](figures/reliability.png)",
        "",
    ]
    return "\n".join(lines)


def _evaluate(
    ensemble_dir: Path,
    members: list[Path],
    groups: list[list[int]],
    data,
    policy: str,
    tta: bool,
    n_resamples: int,
    seed: int,
    progress: bool,
    reuse: bool,
    inner: Sequence[Path] = (),
) -> dict:
    from lesionlab.refusal.measure import combine_refusal, summary

    layout = layout_of(groups)
    per_member = [member_scores(m, data, tta, reuse, progress) for m in members]
    nested = None
    if inner:
        per_inner = [member_scores(r, data, tta, reuse, progress) for r in inner]
        nested = nested_out_of_fold(per_inner, [_temperature(r) for r in inner])
    scores = ensemble_scores(per_member, [_temperature(m) for m in members], groups, nested)
    names = ", ".join(RunFolder(m).config.backbone for m in members)
    metrics, probs = fitted_metrics(scores, policy, n_resamples, seed, tta)
    metrics["layout"] = layout
    if layout == CROSS_FIT:
        metrics["threshold"]["chosen_on"] = (
            NESTED_NOTE
            if inner
            else ("val (out of fold: every training image, scored by the members that held it out)")
        )
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
    point on a nested estimate (module docstring). If anything fails, no servable ensemble is left behind: a
    folder this call created is removed, an existing one loses its operating point."""
    check_policy(policy)
    members = [_require_member(Path(r)).resolve() for r in run_dirs]
    inner_runs = [_require_member(Path(r)).resolve() for r in inner]
    out = Path(out)
    if len(members) < 2:
        raise rf.RunError("an ensemble needs at least two run folders")
    if len(set(members)) < len(members):
        raise rf.RunError("a run is listed twice; each member counts once in the mean")
    if out.resolve() in members or (out / rf.MODEL).exists():
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
            for name in (rf.CALIBRATION, rf.METRICS):
                (out / name).unlink(missing_ok=True)
        raise


def _write_ensemble(
    members: list[Path],
    groups: list[list[int]],
    out: Path,
    data,
    policy: str,
    tta: bool,
    n_resamples: int,
    seed: int,
    progress: bool,
    command: str,
    inner: list[Path],
) -> dict:
    layout = layout_of(groups)
    out.mkdir(parents=True, exist_ok=True)
    files.atomic_write_json(
        out / ENSEMBLE_FILE,
        {"members": [_member_ref(m, out) for m in members], "combine": COMBINE}
        | ({"inner": [_member_ref(r, out) for r in inner]} if inner else {}),
    )
    first = files.read_json(members[0] / rf.CONFIG)
    files.atomic_write_json(
        out / rf.CONFIG,
        {
            "kind": KIND,
            "mode": "ensemble",
            "backbone": "ensemble(" + ",".join(files.read_json(m / rf.CONFIG)["backbone"] for m in members) + ")",
            "combine": COMBINE,
            "layout": layout,
            "members": [_describe_member(m, out) for m in members],
            "data": {
                k: first["data"].get(k)
                for k in (
                    "root",
                    "classes",
                    "positive_class",
                    "split_seed",
                    "n_train",
                    "n_val",
                    "n_test",
                    "n_test_dedup",
                )
            }
            | ({} if layout == SHARED else _cross_fit_data(members, groups)),
            **(
                {
                    "inner": [_describe_member(r, out) | {"val_folds": _val_folds(r)} for r in inner],
                    "calibrated_on": NESTED_NOTE,
                }
                if inner
                else {}
            ),
            "versions": rf.package_versions(),
            "command": command,
        },
    )
    if layout == SHARED:
        files.atomic_write_text(out / "splits.csv", (members[0] / "splits.csv").read_text())
    else:
        files.atomic_write_text(out / "splits.csv", _cross_fit_splits(members, groups))
    return _evaluate(out, members, groups, data, policy, tta, n_resamples, seed, progress, reuse=True, inner=inner)


def _val_folds(run_dir: Path) -> list[int]:
    d = files.read_json(run_dir / rf.CONFIG)["data"]
    return sorted({d.get("fold", 0)} | ({d["also_val_fold"]} if "also_val_fold" in d else set()))


def _cross_fit_data(members: Sequence[Path], groups: Sequence[Sequence[int]]) -> dict:
    """config.json's data block of a cross-fit ensemble: one validation fold per fold group, not per member."""
    first_of_group = [files.read_json(members[g[0]] / rf.CONFIG)["data"] for g in groups]
    return {
        "n_val": sum(d.get("n_val", 0) for d in first_of_group),
        "n_val_note": "out of fold: each fold scored by the members that held it out",
        "folds": [d.get("fold", 0) for d in first_of_group],
    }


def _cross_fit_splits(members: Sequence[Path], groups: Sequence[Sequence[int]]) -> str:
    """splits.csv of a cross-fit ensemble: every pool image is validation (out of fold); ``members`` lists the
    members that held it out (indices in ensemble.json, separated by ';')."""
    rows = []
    for g in groups:
        held_out_by = ";".join(str(i) for i in g)
        rows += [(r[0], r[1], held_out_by) for r in _split_rows(members[g[0]]) if r[2] == "val"]
    return "relpath,label,split,members\n" + "".join(f"{p},{label},val,{g}\n" for p, label, g in sorted(rows))


def evaluate_ensemble(
    run_dir: str | Path,
    data: str | Path | None = None,
    policy: str = DEFAULT_POLICY,
    tta: bool = False,
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
    progress: bool = True,
) -> dict:
    """Re-scores every member (with TTA if asked) and rewrites the ensemble's evaluation."""
    run_dir = Path(run_dir)
    if not (run_dir / ENSEMBLE_FILE).exists():
        raise rf.RunError(f"{run_dir} has no {ENSEMBLE_FILE}; create one with `lesionlab ensemble RUN RUN --out DIR`")
    members = [_require_member(m) for m in member_dirs(run_dir)]
    if not members:
        raise rf.RunError(f"{run_dir / ENSEMBLE_FILE} lists no members")
    inner = [_require_member(r) for r in member_dirs(run_dir, "inner")]
    return _evaluate(
        run_dir, members, fold_groups(members), data, policy, tta, n_resamples, seed, progress, reuse=False, inner=inner
    )
