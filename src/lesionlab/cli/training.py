"""``train`` and ``sweep``: one model, and the study's grid of them.

``train``'s model settings are TrainConfig's fields (their flags, defaults and help are defined there, see
``lesionlab.cli.options``); the sweep's defaults are SweepGrid's and the study's lists.
"""

from __future__ import annotations

import dataclasses
import json
from decimal import Decimal
from pathlib import Path
from typing import Any

import typer

from lesionlab.cli.common import (
    CLASSES_HELP,
    MULTI_DATA_HELP,
    POLICY_OPTION,
    RESAMPLES_HELP,
    TAXONOMY_HELP,
    USER_ERRORS,
    WEIGHTS_DIR_HELP,
    command_line,
    deprecated_alias,
    fail,
    parse_classes,
    prefer,
    print_summary,
    resolve_data,
)
from lesionlab.cli.options import flag_values, options_from
from lesionlab.data.taxonomy import DEFAULT_TAXONOMY, Taxonomy
from lesionlab.runs import REPORT, RunFolder
from lesionlab.sweep.grid import STUDY_BACKBONES, STUDY_EPOCHS, STUDY_LRS, SweepGrid
from lesionlab.training.config import TrainConfig

QUIET_HELP = "No progress bars."


@options_from(TrainConfig, after="data")
def train(
    data: list[str] | None = typer.Option(None, help=MULTI_DATA_HELP),
    taxonomy: Path | None = typer.Option(None, help=TAXONOMY_HELP),
    weights: Path | None = typer.Option(None, help="ImageNet weights file for the backbone."),
    weights_dir: Path | None = typer.Option(None, help=WEIGHTS_DIR_HELP),
    allow_random_init: bool = typer.Option(False, help="Train from random weights when no ImageNet weights are found."),
    skip_bad: bool = typer.Option(False, help="Skip unreadable images (listed in the run folder) instead of stopping."),
    skip_invalid: bool = typer.Option(
        False,
        help="Skip invalid rows of a dataset's table (a listed image missing, an unlisted image, a duplicate row, "
        "an unknown diagnosis; listed in the run folder's skipped_files.txt) instead of stopping.",
    ),
    classes: str = typer.Option("benign,malignant", help=CLASSES_HELP),
    threshold_policy: str = POLICY_OPTION,
    no_eval: bool = typer.Option(False, "--no-eval", help="Do not evaluate after training."),
    out: Path | None = typer.Option(
        None, help="Run folder (default: runs/<backbone>-<mode>-lr<lr>-e<epochs>-s<seed>)."
    ),
    quiet: bool = typer.Option(False, help=QUIET_HELP),
    backend: str = typer.Option(
        "local",
        help="local (this process; several under torchrun: `torchrun --nproc-per-node N -m lesionlab train ...`) or "
        "ray (Ray Train's data-parallel workers; pip install 'lesionlab[ray]').",
    ),
    ray_address: str | None = typer.Option(
        None, help="--backend ray: the cluster's address (auto, ray://HOST:10001; default: start a local Ray)."
    ),
    num_workers: int = typer.Option(2, help="--backend ray: training processes (one GPU each when --device is cuda)."),
    **settings: Any,
) -> None:
    """Train one model (resumes when the same command is run again) and evaluate it."""
    import os

    from lesionlab.evaluation.evaluate import evaluate_run
    from lesionlab.training.loop import train as run_train

    try:
        cfg = TrainConfig(**settings)
        out = out or Path("runs") / f"{cfg.backbone}-{cfg.mode}-lr{cfg.lr:g}-e{cfg.epochs}-s{cfg.seed}"
        specs = [str(s) for s in data] if data else [str(resolve_data(None))]
        tax = Taxonomy.from_file(taxonomy) if taxonomy else DEFAULT_TAXONOMY
        command = command_line(
            "train",
            data=specs,
            taxonomy=taxonomy,
            **flag_values(cfg),  # every model setting, as it was resolved (precision auto -> bf16 or fp32)
            weights=weights,
            weights_dir=weights_dir,
            allow_random_init=allow_random_init,
            skip_bad=skip_bad,
            skip_invalid=skip_invalid,
            classes=classes,
            threshold_policy=threshold_policy,
            out=out,
            **(
                {"backend": backend, "ray_address": ray_address, "num_workers": num_workers}
                if backend != "local"
                else {}
            ),
        )
        evaluated = RunFolder(out).state == "evaluated"
        kwargs: dict[str, Any] = dict(
            weights=weights,
            weights_dir=weights_dir,
            allow_random_init=allow_random_init,
            skip_bad=skip_bad,
            classes=parse_classes(classes),
            command=command,
            taxonomy=tax,
            skip_invalid=skip_invalid,
        )
        if backend == "ray":
            from lesionlab.training.config import device_type
            from lesionlab.training.ray_train import train_on_ray

            use_gpu = device_type(cfg.device) == "cuda" or (cfg.device == "auto" and ray_address is not None)
            run_dir = train_on_ray(
                cfg, specs, out, address=ray_address, num_workers=num_workers, use_gpu=use_gpu, **kwargs
            )
        elif backend == "local":
            run_dir = run_train(cfg, specs[0] if len(specs) == 1 else specs, out, progress=not quiet, **kwargs)
        else:
            fail(f"--backend must be local or ray, got '{backend}'")
        if int(os.environ.get("RANK", "0")) != 0:
            return  # a torchrun process other than rank 0: rank 0 reports and evaluates
        typer.echo(f"trained: {run_dir}")
        if evaluated:  # finished and evaluated earlier: keep that evaluation (it may have used --tta)
            typer.echo(f"already evaluated: {run_dir / REPORT} (`lesionlab evaluate {run_dir}` evaluates again)")
        elif not no_eval:
            metrics = evaluate_run(run_dir, policy=threshold_policy, progress=not quiet)
            print_summary(metrics)
            typer.echo(f"report: {run_dir / REPORT}")
    except USER_ERRORS as e:
        fail(str(e))


def _listed(values: tuple) -> str:
    """A default list as a user types it: '1e-5,5e-4' rather than '1e-05,0.0005'."""
    return ",".join(f"{Decimal(repr(v)):e}" if isinstance(v, float) else str(v) for v in values)


_GRID = SweepGrid()  # the study grid: its mode, batch size and seeds are the defaults
_TRAIN_HELP = {f.name: f.metadata["help"] for f in dataclasses.fields(TrainConfig)}


def sweep(
    ctx: typer.Context,
    data: list[str] | None = typer.Option(None, help=MULTI_DATA_HELP),
    taxonomy: Path | None = typer.Option(None, help=TAXONOMY_HELP),
    out: Path = typer.Option(..., help="Sweep folder; running the same command again finishes what is left."),
    backbones: str = typer.Option(
        _listed(STUDY_BACKBONES), help="Comma-separated backbones (default: the study's four)."
    ),
    lrs: str = typer.Option(_listed(STUDY_LRS), help="Comma-separated learning rates (default: the study's)."),
    epochs: str = typer.Option(_listed(STUDY_EPOCHS), help="Comma-separated epoch counts (default: the study's)."),
    mode: str = typer.Option(_GRID.mode, help="frozen (study) or finetune."),
    seeds: int = typer.Option(len(_GRID.seeds), help="Number of training seeds per configuration (seeds 0..N-1)."),
    batch_size: int = typer.Option(_GRID.batch_size, help=_TRAIN_HELP["batch_size"]),
    weights_dir: Path | None = typer.Option(None, help=WEIGHTS_DIR_HELP),
    allow_random_init: bool = typer.Option(False, help="Sweep backbones without ImageNet weights from random weights."),
    backend: str = typer.Option("local", help="Where trials run: local or ray (pip install 'lesionlab[ray]')."),
    ray_address: str | None = typer.Option(None, help="Ray cluster address (default: start a local Ray)."),
    gpus_per_trial: float = typer.Option(
        0.0, help="Ray backend: each trial's share of a GPU (e.g. 0.25: four trials per GPU; 0 = CPU trials)."
    ),
    skip_bad: bool = typer.Option(False, help="Skip unreadable images instead of stopping."),
    classes: str = typer.Option("benign,malignant", help=CLASSES_HELP),
    resamples: int = typer.Option(1000, help=RESAMPLES_HELP),
    trial_workers: int = typer.Option(0, help="Local backend: trial processes (0 = one per CPU core)."),
    workers: int | None = deprecated_alias("--workers", "--trial-workers"),
    quiet: bool = typer.Option(False, help=QUIET_HELP),
) -> None:
    """The study's grid search: select per backbone on validation, evaluate on test; writes Table 1 and Figures 1-3."""
    from lesionlab.sweep.sweep import parse_list, run_sweep

    trial_workers = prefer(ctx, "trial_workers", trial_workers, workers)
    try:
        if seeds < 1:
            fail("--seeds must be >= 1")
        grid = SweepGrid(
            backbones=parse_list(backbones, str, "--backbones"),
            lrs=parse_list(lrs, float, "--lrs"),
            epochs=parse_list(epochs, int, "--epochs"),
            seeds=tuple(range(seeds)),
            mode=mode,
            batch_size=batch_size,
        )
        specs = [str(s) for s in data] if data else [str(resolve_data(None))]
        command = command_line(
            "sweep",
            data=specs,
            taxonomy=taxonomy,
            out=out,
            backbones=backbones,
            lrs=lrs,
            epochs=epochs,
            mode=mode,
            seeds=seeds,
            batch_size=batch_size,
            weights_dir=weights_dir,
            allow_random_init=allow_random_init,
            backend=backend,
            ray_address=ray_address,
            gpus_per_trial=gpus_per_trial or None,
            skip_bad=skip_bad,
            classes=classes,
            resamples=resamples,
        )
        result = run_sweep(
            grid,
            specs[0] if len(specs) == 1 else specs,
            out,
            weights_dir,
            allow_random_init,
            backend,
            ray_address,
            skip_bad,
            parse_classes(classes),
            resamples,
            not quiet,
            command,
            trial_workers or None,
            taxonomy=Taxonomy.from_file(taxonomy) if taxonomy else DEFAULT_TAXONOMY,
            gpus_per_trial=gpus_per_trial,
        )
    except USER_ERRORS as e:
        fail(str(e))
    typer.echo(
        f"trained {result.trained} of {len(grid.trials())} trials in {result.seconds['total']:.0f} s; "
        f"{len(result.rows)} rows in {out / 'results.csv'}"
    )
    for bb, ch in result.choices.items():
        test = json.loads((result.selected[bb] / "metrics.json").read_text())["test"]
        typer.echo(
            f"{bb:>20}: lr {ch.lr:g}, {ch.epochs} epochs, val acc {ch.val_accuracy:.4f} -> test acc "
            f"{test['accuracy']['value']:.4f}, AUC {test['auc']['value']:.4f}  ({result.selected[bb]})"
        )
    typer.echo(f"table: {out / 'table1.md'}")
