"""``evaluate`` and ``ensemble``: metrics with 95% CIs, figures and a report, for a run or a combination of runs."""

from __future__ import annotations

import shlex
from pathlib import Path

import typer

from lesionlab.cli.common import POLICY_OPTION, RESAMPLES_HELP, USER_ERRORS, command_line, fail, print_summary
from lesionlab.runs import REPORT


def evaluate(
    run_dir: Path = typer.Argument(..., help="A run folder written by `lesionlab train`, or an ensemble folder."),
    data: Path | None = typer.Option(None, help="Data folder (default: the one the run was trained on)."),
    threshold_policy: str = POLICY_OPTION,
    tta: bool = typer.Option(False, help="Test-time augmentation: mean over 8 flips/rotations."),
    resamples: int = typer.Option(1000, help=RESAMPLES_HELP),
    quiet: bool = typer.Option(False),
) -> None:
    """Write metrics.json (with 95% bootstrap CIs), figures and report.md into RUN_DIR."""
    from lesionlab.ensemble.build import evaluate_model

    try:
        metrics = evaluate_model(run_dir, data, threshold_policy, tta, resamples, progress=not quiet)
        print_summary(metrics)
        typer.echo(f"report: {run_dir / REPORT}")
    except USER_ERRORS as e:
        fail(str(e))


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
