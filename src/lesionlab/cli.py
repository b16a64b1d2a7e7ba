"""The ``lesionlab`` command: a thin shell over the modules. Errors a user can fix print one clear line."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import typer

from lesionlab.data.dataset import default_data_dir
from lesionlab.data.images import BadImageError
from lesionlab.errors import DataError
from lesionlab.evaluation.metrics import DEFAULT_POLICY, check_policy
from lesionlab.models.backbones import DEFAULT_BACKBONE, REGISTRY, WeightsError
from lesionlab.runs import METRICS, MODEL, STATE, RunError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Train, evaluate and serve skin-lesion classifiers (benign vs malignant). "
    "A screening aid for research, not a diagnosis.",
)

USER_ERRORS = (DataError, BadImageError, WeightsError, RunError, ValueError, FileNotFoundError)


def fail(msg: str) -> None:
    typer.secho(f"error: {msg}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


def resolve_data(data: Path | None) -> Path:
    found = data or default_data_dir()
    if found is None:
        fail(
            "no data folder: pass --data DIR or set LESIONLAB_DATA (expected train/{benign,malignant}/*.jpg "
            "and test/{benign,malignant}/*.jpg)"
        )
    return found


def _classes(value: str) -> tuple[str, str]:
    parts = [p.strip() for p in value.split(",") if p.strip()]
    if len(parts) != 2:
        fail(f"--classes needs two folder names 'negative,positive', got '{value}'")
    return parts[0], parts[1]


def _policy(value: str) -> str:
    """Checked when the command starts, not after an hour of training."""
    try:
        return check_policy(value)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None


POLICY_OPTION = typer.Option(
    DEFAULT_POLICY,
    callback=_policy,
    help="fixed:0.5 | youden | sensitivity:0.95 | sensitivity-lcb:0.95 (95% lower bound >= 0.95).",
)


def _command_line(command: str, **options) -> str:
    """The command that reproduces a run, spelled out with every setting (not just what was typed)."""
    parts = ["lesionlab", command]
    for key, value in options.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            parts += [flag] if value else []
        elif value is not None:
            parts += [flag, str(value)]
    return " ".join(shlex.quote(p) for p in parts)


@app.command()
def train(
    data: Path | None = typer.Option(
        None, help="Data folder (default: $LESIONLAB_DATA or ../shared/data/isic-kaggle)."
    ),
    backbone: str = typer.Option(DEFAULT_BACKBONE, help=f"One of: {', '.join(REGISTRY)}."),
    lr: float = typer.Option(1e-3, help="Learning rate."),
    epochs: int = typer.Option(20, help="Epochs."),
    mode: str = typer.Option("frozen", help="frozen (study: backbone fixed, head trained) or finetune."),
    batch_size: int = typer.Option(32),
    seed: int = typer.Option(0, help="Training seed (head init, shuffling, augmentation)."),
    split_seed: int = typer.Option(0, help="Seed of the train/validation split."),
    fold: int = typer.Option(
        0,
        help="Which of the 5 group-aware folds is validation (0 = the default split; train "
        "all five for a cross-fitted ensemble).",
    ),
    also_val_fold: int | None = typer.Option(
        None,
        help="Validate on this fold too, training on the other three: "
        "the inner runs that estimate a cross-fit ensemble out of fold "
        "(bench/nested_threshold.py).",
    ),
    optimizer: str = typer.Option("adam", help="adam (study) or adamw."),
    weight_decay: float = typer.Option(0.0),
    schedule: str = typer.Option("constant", help="constant or cosine (with --warmup-epochs)."),
    warmup_epochs: float = typer.Option(0.0),
    label_smoothing: float = typer.Option(0.0),
    class_weight: bool = typer.Option(False, help="Weight the positive class by the class ratio."),
    augment: str = typer.Option("auto", help="auto (on in finetune), none or dermoscopy."),
    precision: str = typer.Option("auto", help="finetune arithmetic: auto (bf16 where the CPU has it), bf16 or fp32."),
    ema_decay: float = typer.Option(
        0.0, help="finetune: keep and validate an EMA of the weights (e.g. 0.998; 0 = off)."
    ),
    weights: Path | None = typer.Option(None, help="ImageNet weights file for the backbone."),
    weights_dir: Path | None = typer.Option(
        None, help="Folder of <timm name>*.pth (default: $LESIONLAB_WEIGHTS_DIR or ../shared/weights)."
    ),
    allow_random_init: bool = typer.Option(False, help="Train from random weights when no ImageNet weights are found."),
    skip_bad: bool = typer.Option(False, help="Skip unreadable images (listed in the run folder) instead of stopping."),
    classes: str = typer.Option("benign,malignant", help="Class folder names, negative first."),
    threshold_policy: str = POLICY_OPTION,
    no_eval: bool = typer.Option(False, "--no-eval", help="Do not evaluate after training."),
    out: Path | None = typer.Option(
        None, help="Run folder (default: runs/<backbone>-<mode>-lr<lr>-e<epochs>-s<seed>)."
    ),
    quiet: bool = typer.Option(False, help="No progress bars."),
) -> None:
    """Train one model (resumes when the same command is run again) and evaluate it."""
    from lesionlab.evaluation.evaluate import evaluate_run
    from lesionlab.training.config import TrainConfig
    from lesionlab.training.loop import train as run_train

    try:
        cfg = TrainConfig(
            backbone=backbone,
            mode=mode,
            lr=lr,
            epochs=epochs,
            batch_size=batch_size,
            seed=seed,
            split_seed=split_seed,
            fold=fold,
            also_val_fold=-1 if also_val_fold is None else also_val_fold,
            optimizer=optimizer,
            weight_decay=weight_decay,
            schedule=schedule,
            warmup_epochs=warmup_epochs,
            label_smoothing=label_smoothing,
            class_weight=class_weight,
            augment=augment,
            precision=precision,
            ema_decay=ema_decay,
        )
        out = out or Path("runs") / f"{backbone}-{mode}-lr{lr:g}-e{epochs}-s{seed}"
        data = resolve_data(data)
        command = _command_line(
            "train",
            data=data,
            backbone=backbone,
            lr=lr,
            epochs=epochs,
            mode=mode,
            batch_size=batch_size,
            seed=seed,
            split_seed=split_seed,
            fold=fold,
            also_val_fold=also_val_fold,
            optimizer=optimizer,
            weight_decay=weight_decay,
            schedule=schedule,
            warmup_epochs=warmup_epochs,
            label_smoothing=label_smoothing,
            class_weight=class_weight,
            augment=augment,
            precision=cfg.precision,
            ema_decay=ema_decay,
            weights=weights,
            weights_dir=weights_dir,
            allow_random_init=allow_random_init,
            skip_bad=skip_bad,
            classes=classes,
            threshold_policy=threshold_policy,
            out=out,
        )
        evaluated = all((out / f).exists() for f in (MODEL, METRICS)) and not (out / STATE).exists()
        run_dir = run_train(
            cfg, data, out, weights, weights_dir, allow_random_init, skip_bad, not quiet, _classes(classes), command
        )
        typer.echo(f"trained: {run_dir}")
        if evaluated:  # finished and evaluated earlier: keep that evaluation (it may have used --tta)
            typer.echo(f"already evaluated: {run_dir / 'report.md'} (`lesionlab evaluate {run_dir}` evaluates again)")
        elif not no_eval:
            metrics = evaluate_run(run_dir, policy=threshold_policy, progress=not quiet)
            _print_summary(metrics)
            typer.echo(f"report: {run_dir / 'report.md'}")
    except USER_ERRORS as e:
        fail(str(e))


def _print_summary(metrics: dict) -> None:
    for split in ("val", "test", "test_dedup"):
        m = metrics[split]
        typer.echo(
            f"{split:>10}: n={m['n']:4d}  "
            + "  ".join(
                f"{k}={m[k]['value']:.3f} [{m[k]['ci95'][0]:.3f},{m[k]['ci95'][1]:.3f}]"
                for k in ("accuracy", "recall", "specificity", "auc")
            )
        )


@app.command()
def evaluate(
    run_dir: Path = typer.Argument(..., help="A run folder written by `lesionlab train`, or an ensemble folder."),
    data: Path | None = typer.Option(None, help="Data folder (default: the one the run was trained on)."),
    threshold_policy: str = POLICY_OPTION,
    tta: bool = typer.Option(False, help="Test-time augmentation: mean over 8 flips/rotations."),
    resamples: int = typer.Option(1000, help="Bootstrap resamples for the 95% CIs."),
    quiet: bool = typer.Option(False),
) -> None:
    """Write metrics.json (with 95% bootstrap CIs), figures and report.md into RUN_DIR."""
    from lesionlab.evaluation.evaluate import evaluate_run

    try:
        if (run_dir / "ensemble.json").exists():
            from lesionlab.ensemble.build import evaluate_ensemble

            metrics = evaluate_ensemble(run_dir, data, threshold_policy, tta, resamples, progress=not quiet)
        else:
            metrics = evaluate_run(run_dir, data, threshold_policy, tta, resamples, progress=not quiet)
        _print_summary(metrics)
        typer.echo(f"report: {run_dir / 'report.md'}")
    except USER_ERRORS as e:
        fail(str(e))


@app.command()
def predict(
    images: list[Path] = typer.Argument(..., help="Image files (any size; JPEG, PNG, BMP, GIF, TIFF, WebP)."),
    model: Path | None = typer.Option(None, help="Run or ensemble folder (default: the bundled model)."),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON list."),
    tta: bool | None = typer.Option(
        None,
        "--tta/--no-tta",
        help="Test-time augmentation (mean over 8 flips/rotations). Default: as the model's threshold was fitted.",
    ),
    backend: str = typer.Option("auto", help="auto | onnx | torch"),
) -> None:
    """Probability of malignant and the label at the model's operating threshold, per image."""
    from lesionlab.data.images import open_image
    from lesionlab.inference.predictor import load_predictor

    try:
        predictor = load_predictor(model, backend)
    except USER_ERRORS as e:
        fail(str(e))
    results, errors = [], 0
    for path in images:
        given = str(path)
        try:
            p = predictor.analyze([open_image(path, given)], tta)[0]
            results.append(
                {
                    "path": given,
                    "probability": round(p.probability, 6),
                    "label": p.label,
                    "threshold": predictor.info.threshold,
                    "refused": p.refused,
                    "reason": p.reason,
                    "ood_score": None if p.ood_score is None else round(p.ood_score, 3),
                }
            )
        except BadImageError as e:
            errors += 1
            results.append({"path": given, "error": e.reason})
    if as_json:
        typer.echo(json.dumps(results, indent=2))
    else:
        for r in results:
            if "error" in r:
                typer.secho(f"{r['path']}: error: {r['error']}", fg=typer.colors.RED, err=True)
            elif r["refused"]:
                typer.echo(f"{r['path']}\tnot_a_lesion\t({r['reason']})")
            else:
                typer.echo(
                    f"{r['path']}\tP(malignant)={r['probability']:.4f}\t{r['label']}\t(threshold {r['threshold']:.4f})"
                )
        typer.echo("Screening aid only, not a diagnosis.", err=True)
    if errors:
        raise typer.Exit(1)


@app.command()
def sweep(
    data: Path | None = typer.Option(
        None, help="Data folder (default: $LESIONLAB_DATA or ../shared/data/isic-kaggle)."
    ),
    out: Path = typer.Option(..., help="Sweep folder; running the same command again finishes what is left."),
    backbones: str = typer.Option(
        "mobilenetv2,resnet50v2,efficientnetv2b0,vgg16", help="Comma-separated backbones (default: the study's four)."
    ),
    lrs: str = typer.Option("1e-5,5e-4,1e-4,5e-3,1e-3", help="Comma-separated learning rates (default: the study's)."),
    epochs: str = typer.Option("10,20,30,40,50,100", help="Comma-separated epoch counts (default: the study's)."),
    mode: str = typer.Option("frozen", help="frozen (study) or finetune."),
    seeds: int = typer.Option(1, help="Number of training seeds per configuration (seeds 0..N-1)."),
    batch_size: int = typer.Option(32),
    weights_dir: Path | None = typer.Option(
        None, help="Folder of <timm name>*.pth (default: $LESIONLAB_WEIGHTS_DIR or ../shared/weights)."
    ),
    allow_random_init: bool = typer.Option(False, help="Sweep backbones without ImageNet weights from random weights."),
    backend: str = typer.Option("local", help="local or ray (pip install 'lesionlab[ray]')."),
    ray_address: str | None = typer.Option(None, help="Ray cluster address (default: start a local Ray)."),
    skip_bad: bool = typer.Option(False, help="Skip unreadable images instead of stopping."),
    classes: str = typer.Option("benign,malignant", help="Class folder names, negative first."),
    resamples: int = typer.Option(1000, help="Bootstrap resamples for the 95% CIs."),
    workers: int = typer.Option(0, help="Local backend: trial processes (0 = one per CPU core)."),
    quiet: bool = typer.Option(False, help="No progress bars."),
) -> None:
    """The study's grid search: select per backbone on validation, evaluate on test; writes Table 1 and Figures 1-3."""
    from lesionlab.sweep.sweep import SweepError, SweepGrid, parse_list, run_sweep

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
        data = resolve_data(data)
        command = _command_line(
            "sweep",
            data=data,
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
            skip_bad=skip_bad,
            classes=classes,
            resamples=resamples,
        )
        result = run_sweep(
            grid,
            data,
            out,
            weights_dir,
            allow_random_init,
            backend,
            ray_address,
            skip_bad,
            _classes(classes),
            resamples,
            not quiet,
            command,
            workers or None,
        )
    except (SweepError, *USER_ERRORS) as e:
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


@app.command()
def export(
    run_dir: Path = typer.Argument(..., help="An evaluated run folder written by `lesionlab train`."),
    quantize: str | None = typer.Option(
        None,
        help="int8: also try ONNX Runtime static int8 quantization, kept "
        "only if test AUC stays within 0.005 of the float model.",
    ),
    data: Path | None = typer.Option(None, help="Data folder (default: the one the run was trained on)."),
    opset: int = typer.Option(17, help="ONNX opset (>= 17)."),
) -> None:
    """Write model.onnx and preprocess.json into RUN_DIR, checked against PyTorch on 32 images."""
    from lesionlab.inference.export import ExportError, export_run, quantize_run

    if quantize not in (None, "int8"):
        fail(f"--quantize accepts only int8, got '{quantize}'")
    if opset < 17:
        fail(f"--opset must be >= 17, got {opset}")
    try:
        result = export_run(run_dir, data, opset, log=typer.echo)
        typer.echo(f"wrote {result.onnx_path} and {result.preprocess_path}")
        if quantize:
            quantize_run(run_dir, data, log=typer.echo)
    except (ExportError, *USER_ERRORS) as e:
        fail(str(e))


@app.command()
def serve(
    model: Path | None = typer.Option(
        None, envvar="LESIONLAB_MODEL", help="Run or ensemble folder (default: the bundled model)."
    ),
    host: str = typer.Option("127.0.0.1", help="Interface to listen on (0.0.0.0 for all)."),
    port: int = typer.Option(8000),
    workers: int = typer.Option(1, min=1, help="uvicorn worker processes."),
    threads: int | None = typer.Option(
        None, min=1, help="Intra-op threads per request (default: cores / (workers x inference threads), at least 1)."
    ),
    inference_threads: int = typer.Option(2, help="Requests decoded and inferred at once per worker."),
    max_body_bytes: int = typer.Option(10_000_000, help="Request body cap (413 above it)."),
    max_concurrency: int = typer.Option(32, help="Requests admitted at once per worker (503 + Retry-After above)."),
    timeout: float = typer.Option(15.0, help="Per-request processing timeout in seconds (503 after it)."),
    backend: str = typer.Option(
        "auto", envvar="LESIONLAB_SERVE_BACKEND", help="auto (ONNX Runtime when model.onnx exists) | onnx | torch"
    ),
    access_log: bool = typer.Option(True, help="uvicorn access log (method, path, status; never bodies)."),
) -> None:
    """Serve the model over HTTP: /predict (study contract), /v1/predict, /v1/model, health probes, a web page at /.

    Bearer-token auth is on when LESIONLAB_API_TOKENS (comma-separated) or LESIONLAB_API_TOKENS_FILE is set."""
    import os

    import uvicorn

    from lesionlab.inference.predictor import require_operating_point
    from lesionlab.serve.service import resolve_model_dir
    from lesionlab.serve.settings import ServeSettings, default_threads

    try:
        model_dir = resolve_model_dir(model).resolve()
        require_operating_point(model_dir)  # here, not as a 503 from every worker
        settings = ServeSettings(
            str(model_dir),
            max_body_bytes,
            max_concurrency,
            timeout,
            backend,
            threads or default_threads(workers, inference_threads),
            inference_threads,
            load_before_accepting=workers > 1,
        )
        os.environ.update(settings.to_env())
        tokens = ServeSettings.from_env(os.environ).tokens  # a bad token file fails here, not in each worker
    except (OSError, *USER_ERRORS) as e:
        fail(str(e))
    typer.echo(
        f"serving {model_dir} at http://{host}:{port} ({workers} worker(s), {settings.num_threads} "
        f"thread(s) each, auth {'on' if tokens else 'off'}). Screening aid only, not a diagnosis.",
        err=True,
    )
    uvicorn.run(
        "lesionlab.serve.app:app_from_env",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        access_log=access_log,
        log_level="info",
    )


@app.command()
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
    resamples: int = typer.Option(1000, help="Bootstrap resamples for the 95% CIs."),
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
        _command_line("ensemble", out=out, data=data, threshold_policy=threshold_policy, tta=tta, resamples=resamples)
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
    _print_summary(metrics)
    typer.echo(f"report: {out / 'report.md'}")


@app.command()
def explain(
    image: Path = typer.Argument(..., help="Image file."),
    out: Path = typer.Option(..., help="PNG file to write: the image at model size with a Grad-CAM heatmap."),
    model: Path | None = typer.Option(
        None,
        help="Run folder (default: the bundled model); for an ensemble "
        "folder, its first member's network is drawn for the "
        "ensemble's answer.",
    ),
    target: str = typer.Option("predicted", help="predicted | malignant | benign: whose evidence to show."),
) -> None:
    """Grad-CAM heatmap over IMAGE: where the evidence for the model's answer lies (a visual aid, not a diagnosis)."""
    from lesionlab.data.images import open_image
    from lesionlab.files import atomic_path
    from lesionlab.inference.explain import explain_image

    try:
        result = explain_image(model, open_image(image, str(image)), target)
        with atomic_path(out) as tmp:
            result.overlay().save(tmp, format="PNG")
    except BadImageError as e:
        fail(f"{e.path}: {e.reason}")
    except USER_ERRORS as e:
        fail(str(e))
    p = result.prediction
    answer = "not_a_lesion (" + (p.reason or "") + ")" if p.refused else f"P(malignant)={p.probability:.4f} {p.label}"
    typer.echo(f"wrote {out}: {result.target} evidence of {result.model_dir}; {answer}")


def main() -> None:
    from lesionlab.runtime import keep_freed_memory

    keep_freed_memory()
    app()


if __name__ == "__main__":
    main()
