"""``evaluate`` and ``ensemble``: metrics with 95% CIs, figures and a report, for a run or a combination of runs."""

from __future__ import annotations

import shlex
from pathlib import Path

import typer

from lesionlab.cli.common import (
    POLICY_OPTION,
    RESAMPLES_HELP,
    TAXONOMY_HELP,
    USER_ERRORS,
    command_line,
    fail,
    print_summary,
)
from lesionlab.cli.refusal import NON_LESION_HELP
from lesionlab.runs import REPORT, RunFolder


def evaluate(
    run_dir: Path = typer.Argument(..., help="A run folder written by `lesionlab train`, or an ensemble folder."),
    data: Path | None = typer.Option(None, help="Data folder (default: the one the run was trained on)."),
    threshold_policy: str = POLICY_OPTION,
    tta: bool = typer.Option(False, help="Test-time augmentation: mean over 8 flips/rotations."),
    resamples: int = typer.Option(1000, help=RESAMPLES_HELP),
    external: list[str] | None = typer.Option(
        None,
        help="Repeatable: NAME=PATH, an external set scored whole at the run's operating threshold (any folder a "
        "data format reads: ISIC ground-truth CSVs, HAM10000, a CSV with image,label or diagnosis; "
        "'format:PATH?option=value' where detection needs help). Sets scored before are scored again.",
    ),
    only_external: bool = typer.Option(
        False, help="Score the external sets only, keeping the run's evaluation (it must have one)."
    ),
    taxonomy: Path | None = typer.Option(None, help=TAXONOMY_HELP),
    non_lesion: list[Path] | None = typer.Option(None, "--non-lesion", help=NON_LESION_HELP),
    quiet: bool = typer.Option(False),
) -> None:
    """Write metrics.json (with 95% bootstrap CIs), figures and report.md into RUN_DIR; with --external, also how
    the model does on other collections (by source and by diagnosis)."""
    from lesionlab.ensemble.build import evaluate_model

    try:
        sets = parse_external(external or [])
        run = RunFolder(run_dir)
        earlier = {k: v["spec"] for k, v in run.metrics().get("external", {}).items() if "spec" in v}
        if only_external:
            run.require_operating_point()
            if not sets:
                fail("--only-external needs at least one --external NAME=PATH")
        else:
            photos = non_lesion or []
            metrics = evaluate_model(
                run_dir, data, threshold_policy, tta, resamples, progress=not quiet, non_lesion=photos
            )
            print_summary(metrics)
            sets = {**earlier, **sets}  # a new operating point: every external set is scored again
        if sets:
            score_external_sets(run_dir, sets, taxonomy, resamples, not quiet)
        typer.echo(f"report: {run_dir / REPORT}")
    except USER_ERRORS as e:
        fail(str(e))


def parse_external(values: list[str]) -> dict[str, str]:
    """['isic2018=PATH', ...] -> {'isic2018': 'PATH'}; a value without a name is named after its folder."""
    out: dict[str, str] = {}
    for v in values:
        name, sep, spec = v.partition("=")
        if not sep:
            name, spec = Path(v.split("?", 1)[0].split(":", 1)[-1]).name, v
        if not name or not spec:
            fail(f"--external needs NAME=PATH, got {v!r}")
        if name in out:
            fail(f"--external {name} is given twice")
        out[name] = spec
    return out


def score_external_sets(
    run_dir: Path, sets: dict[str, str], taxonomy: Path | None, resamples: int, progress: bool
) -> None:
    """Reads each set with the data formats, scores it, records the spec beside its block, prints a line each."""
    from lesionlab.data.sources import load_external
    from lesionlab.data.taxonomy import DEFAULT_TAXONOMY, Taxonomy
    from lesionlab.evaluation.external import evaluate_external

    tax = Taxonomy.from_file(taxonomy) if taxonomy else DEFAULT_TAXONOMY
    read = {name: load_external(spec, tax).test for name, spec in sets.items()}
    blocks = evaluate_external(run_dir, read, n_resamples=resamples, progress=progress)
    run = RunFolder(run_dir)
    metrics = run.metrics()
    for name, spec in sets.items():
        metrics["external"][name]["spec"] = spec  # so that a later evaluation scores the set again
    run.write_metrics(metrics)
    for name, b in blocks.items():
        at = b["at_threshold"]
        cells = [f"{k}={at[k]['value']:.3f}" for k in ("auc", "recall", "specificity") if isinstance(at.get(k), dict)]
        typer.echo(f"{name:>10}: n={b['n']:5d}  " + "  ".join(cells) + f"  refused={b['n_refused']}")


def ensemble(
    run_dirs: list[Path] = typer.Argument(
        ...,
        help="Two or more evaluated run folders: trained on the same split, or on "
        "different folds of one split seed (`train --fold`: a cross-fit ensemble).",
    ),
    out: Path = typer.Option(..., help="Ensemble folder to write (ensemble.json, metrics, report)."),
    data: Path | None = typer.Option(None, help="Data folder (default: the one the runs were trained on)."),
    threshold_policy: str = POLICY_OPTION,
    tta: bool = typer.Option(False, help="Test-time augmentation for every member (re-scores them)."),
    resamples: int = typer.Option(1000, help=RESAMPLES_HELP),
    inner: list[Path] | None = typer.Option(
        None,
        help="Cross-fit only, repeatable: an inner run (`train --fold K "
        "--also-val-fold L`, one per pair of folds); the threshold and "
        "temperature are then fitted on the nested out-of-fold estimate.",
    ),
    quiet: bool = typer.Option(False),
) -> None:
    """Combine runs into one model (mean of calibrated probabilities) and evaluate it; predict and serve accept OUT."""
    from lesionlab.ensemble.build import create_ensemble

    inner = inner or []
    command = (
        command_line("ensemble", out=out, data=data, threshold_policy=threshold_policy, tta=tta, resamples=resamples)
        + "".join(f" --inner {shlex.quote(str(r))}" for r in inner)
        + " "
        + " ".join(shlex.quote(str(d)) for d in run_dirs)
    )
    try:
        metrics = create_ensemble(
            run_dirs, out, data, threshold_policy, tta, resamples, progress=not quiet, command=command, inner=inner
        )
    except USER_ERRORS as e:
        fail(str(e))
    print_summary(metrics)
    typer.echo(f"report: {out / REPORT}")
