"""``predict``, ``explain`` and ``export``: using a trained model, and shipping it as ONNX."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from lesionlab.cli.common import RUNTIME_HELP, USER_ERRORS, deprecated_alias, fail, prefer
from lesionlab.data.images import BadImageError


def predict(
    ctx: typer.Context,
    images: list[str] = typer.Argument(
        ...,
        help="Image files (any size; JPEG, PNG, BMP, GIF, TIFF, WebP), folders (read recursively; a dataset folder "
        "as its format lists it), or globs such as 'site/**/*.jpg'.",
    ),
    model: Path | None = typer.Option(None, help="Run or ensemble folder (default: the bundled model)."),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON list."),
    csv_out: Path | None = typer.Option(
        None, "--csv", help="Write one row per image (path, probability, label, threshold, refused, reason, error)."
    ),
    tta: bool | None = typer.Option(
        None,
        "--tta/--no-tta",
        help="Test-time augmentation (mean over 8 flips/rotations). Default: as the model's threshold was fitted.",
    ),
    batch_size: int = typer.Option(32, min=1, help="Images per forward pass."),
    runtime: str = typer.Option("auto", help=RUNTIME_HELP),
    backend: str | None = deprecated_alias("--backend", "--runtime"),
    quiet: bool = typer.Option(False, help="No progress bar."),
) -> None:
    """Probability of malignant and the label at the model's operating threshold, per image (screening, not a
    diagnosis)."""
    from lesionlab.data.inputs import expand_inputs
    from lesionlab.inference.loading import BACKENDS, load_predictor
    from lesionlab.inference.scoring import score_files

    runtime = prefer(ctx, "runtime", runtime, backend)
    if runtime not in BACKENDS:  # a user error, whatever load_predictor raises for it
        fail(f"--runtime must be one of {', '.join(BACKENDS)}, got '{runtime}'")
    try:
        paths = expand_inputs(images)
        predictor = load_predictor(model, runtime)
    except USER_ERRORS as e:
        fail(str(e))
    given = {p: str(p) for p in paths}
    results = score_files(predictor, paths, tta, batch_size, progress=not quiet and len(paths) > batch_size)
    rows = [{"path": given[p], **r} for p, r in zip(paths, results)]
    if csv_out is not None:
        write_predictions_csv(csv_out, rows)
    errors = sum("error" in r for r in rows)
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
    elif csv_out is None or len(rows) <= 20:
        for r in rows:
            if "error" in r:
                typer.secho(f"{r['path']}: error: {r['error']}", fg=typer.colors.RED, err=True)
            elif r["refused"]:
                typer.echo(f"{r['path']}\tnot_a_lesion\t({r['reason']})")
            else:
                typer.echo(
                    f"{r['path']}\tP(malignant)={r['probability']:.4f}\t{r['label']}\t(threshold {r['threshold']:.4f})"
                )
    if csv_out is not None:
        labels = [r.get("label", "error") for r in rows]
        summary = ", ".join(f"{k} {labels.count(k)}" for k in ("benign", "malignant", "not_a_lesion", "error"))
        typer.echo(f"{len(rows)} images: {summary}; one row each in {csv_out}", err=True)
    if not as_json:
        typer.echo("Screening aid only, not a diagnosis.", err=True)
    if errors:
        raise typer.Exit(1)


CSV_FIELDS = ("path", "probability", "label", "threshold", "refused", "reason", "ood_score", "error")


def write_predictions_csv(path: Path, rows: list[dict]) -> None:
    """One row per image, written atomically (a reader never sees half a file)."""
    import csv
    import io

    from lesionlab.files import atomic_write_text

    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_FIELDS, extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
    atomic_write_text(path, buf.getvalue())


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
    except (ExportError, *USER_ERRORS) as e:  # ExportError: the exported model disagrees with PyTorch
        fail(str(e))


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
    from lesionlab.inference.explain import TARGETS, explain_image

    if target not in TARGETS:  # a user error, whatever explain_image raises for it
        fail(f"target must be one of {', '.join(TARGETS)}, got '{target}'")
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
