"""The ``lesionlab`` command: a thin shell over the modules. Errors a user can fix print one clear line."""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path
from typing import List, Optional

import typer

from .backbones import DEFAULT_BACKBONE, REGISTRY, WeightsError
from .data import BadImageError, DataError, default_data_dir
from .metrics import DEFAULT_POLICY
from .runfiles import RunError

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Train, evaluate and serve skin-lesion classifiers (benign vs malignant). "
                       "A screening aid for research, not a diagnosis.")

USER_ERRORS = (DataError, BadImageError, WeightsError, RunError, ValueError, FileNotFoundError)


def fail(msg: str) -> None:
    typer.secho(f"error: {msg}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


def resolve_data(data: Optional[Path]) -> Path:
    found = data or default_data_dir()
    if found is None:
        fail("no data folder: pass --data DIR or set LESIONLAB_DATA (expected train/{benign,malignant}/*.jpg "
             "and test/{benign,malignant}/*.jpg)")
    return found


def _classes(value: str) -> tuple[str, str]:
    parts = [p.strip() for p in value.split(",") if p.strip()]
    if len(parts) != 2:
        fail(f"--classes needs two folder names 'negative,positive', got '{value}'")
    return parts[0], parts[1]


def _command_line() -> str:
    return "lesionlab " + " ".join(shlex.quote(a) for a in sys.argv[1:])


@app.command()
def train(
    data: Optional[Path] = typer.Option(None, help="Data folder (default: $LESIONLAB_DATA or ../shared/data/isic-kaggle)."),
    backbone: str = typer.Option(DEFAULT_BACKBONE, help=f"One of: {', '.join(REGISTRY)}."),
    lr: float = typer.Option(1e-3, help="Learning rate."),
    epochs: int = typer.Option(20, help="Epochs."),
    mode: str = typer.Option("frozen", help="frozen (study: backbone fixed, head trained) or finetune."),
    batch_size: int = typer.Option(32),
    seed: int = typer.Option(0, help="Training seed (head init, shuffling, augmentation)."),
    split_seed: int = typer.Option(0, help="Seed of the train/validation split."),
    optimizer: str = typer.Option("adam", help="adam (study) or adamw."),
    weight_decay: float = typer.Option(0.0),
    schedule: str = typer.Option("constant", help="constant or cosine (with --warmup-epochs)."),
    warmup_epochs: float = typer.Option(0.0),
    label_smoothing: float = typer.Option(0.0),
    class_weight: bool = typer.Option(False, help="Weight the positive class by the class ratio."),
    augment: str = typer.Option("auto", help="auto (on in finetune), none or dermoscopy."),
    weights: Optional[Path] = typer.Option(None, help="ImageNet weights file for the backbone."),
    weights_dir: Optional[Path] = typer.Option(None, help="Folder of <timm name>*.pth (default: $LESIONLAB_WEIGHTS_DIR or ../shared/weights)."),
    allow_random_init: bool = typer.Option(False, help="Train from random weights when no ImageNet weights are found."),
    skip_bad: bool = typer.Option(False, help="Skip unreadable images (listed in the run folder) instead of stopping."),
    classes: str = typer.Option("benign,malignant", help="Class folder names, negative first."),
    threshold_policy: str = typer.Option(DEFAULT_POLICY, help="fixed:0.5 | youden | sensitivity:0.95"),
    no_eval: bool = typer.Option(False, "--no-eval", help="Do not evaluate after training."),
    out: Optional[Path] = typer.Option(None, help="Run folder (default: runs/<backbone>-<mode>-lr<lr>-e<epochs>-s<seed>)."),
    quiet: bool = typer.Option(False, help="No progress bars."),
) -> None:
    """Train one model (resumes when the same command is run again) and evaluate it."""
    from .evaluate import evaluate_run
    from .train import TrainConfig, train as run_train

    try:
        cfg = TrainConfig(backbone=backbone, mode=mode, lr=lr, epochs=epochs, batch_size=batch_size, seed=seed,
                          split_seed=split_seed, optimizer=optimizer, weight_decay=weight_decay, schedule=schedule,
                          warmup_epochs=warmup_epochs, label_smoothing=label_smoothing, class_weight=class_weight,
                          augment=augment)
        out = out or Path("runs") / f"{backbone}-{mode}-lr{lr:g}-e{epochs}-s{seed}"
        run_dir = run_train(cfg, resolve_data(data), out, weights, weights_dir, allow_random_init, skip_bad,
                            not quiet, _classes(classes), _command_line())
        typer.echo(f"trained: {run_dir}")
        if not no_eval:
            metrics = evaluate_run(run_dir, policy=threshold_policy, progress=not quiet)
            _print_summary(metrics)
            typer.echo(f"report: {run_dir / 'report.md'}")
    except USER_ERRORS as e:
        fail(str(e))


def _print_summary(metrics: dict) -> None:
    for split in ("val", "test", "test_dedup"):
        m = metrics[split]
        typer.echo(f"{split:>10}: n={m['n']:4d}  " + "  ".join(
            f"{k}={m[k]['value']:.3f} [{m[k]['ci95'][0]:.3f},{m[k]['ci95'][1]:.3f}]"
            for k in ("accuracy", "recall", "specificity", "auc")))


@app.command()
def evaluate(
    run_dir: Path = typer.Argument(..., help="A run folder written by `lesionlab train`, or an ensemble folder."),
    data: Optional[Path] = typer.Option(None, help="Data folder (default: the one the run was trained on)."),
    threshold_policy: str = typer.Option(DEFAULT_POLICY, help="fixed:0.5 | youden | sensitivity:0.95"),
    tta: bool = typer.Option(False, help="Test-time augmentation: mean over 8 flips/rotations."),
    resamples: int = typer.Option(1000, help="Bootstrap resamples for the 95% CIs."),
    quiet: bool = typer.Option(False),
) -> None:
    """Write metrics.json (with 95% bootstrap CIs), figures and report.md into RUN_DIR."""
    from .evaluate import evaluate_run

    try:
        if (run_dir / "ensemble.json").exists():
            from .ensemble import evaluate_ensemble

            metrics = evaluate_ensemble(run_dir, data, threshold_policy, tta, resamples, progress=not quiet)
        else:
            metrics = evaluate_run(run_dir, data, threshold_policy, tta, resamples, progress=not quiet)
        _print_summary(metrics)
        typer.echo(f"report: {run_dir / 'report.md'}")
    except USER_ERRORS as e:
        fail(str(e))


@app.command()
def predict(
    images: List[Path] = typer.Argument(..., help="Image files (any size; JPEG, PNG, BMP, GIF, TIFF, WebP)."),
    model: Optional[Path] = typer.Option(None, help="Run or ensemble folder (default: the bundled model)."),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON list."),
    tta: bool = typer.Option(False, help="Test-time augmentation."),
    backend: str = typer.Option("auto", help="auto | onnx | torch"),
) -> None:
    """Probability of malignant and the label at the model's operating threshold, per image."""
    from .data import open_image
    from .predictor import load_predictor

    try:
        predictor = load_predictor(model, backend)
    except USER_ERRORS as e:
        fail(str(e))
    results, errors = [], 0
    for path in images:
        given = str(path)
        try:
            prob = float(predictor.predict([open_image(path, given)], tta)[0])
            results.append({"path": given, "probability": round(prob, 6), "label": predictor.label(prob),
                            "threshold": predictor.info.threshold})
        except BadImageError as e:
            errors += 1
            results.append({"path": given, "error": e.reason})
    if as_json:
        typer.echo(json.dumps(results, indent=2))
    else:
        for r in results:
            if "error" in r:
                typer.secho(f"{r['path']}: error: {r['error']}", fg=typer.colors.RED, err=True)
            else:
                typer.echo(f"{r['path']}\tP(malignant)={r['probability']:.4f}\t{r['label']}"
                           f"\t(threshold {r['threshold']:.4f})")
        typer.echo("Screening aid only, not a diagnosis.", err=True)
    if errors:
        raise typer.Exit(1)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
