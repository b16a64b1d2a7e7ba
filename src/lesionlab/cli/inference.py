"""``predict``, ``explain`` and ``export``: using a trained model, and shipping it as ONNX."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from lesionlab.cli.common import RUNTIME_HELP, USER_ERRORS, deprecated_alias, fail, prefer
from lesionlab.data.images import BadImageError


def predict(
    ctx: typer.Context,
    images: list[Path] = typer.Argument(..., help="Image files (any size; JPEG, PNG, BMP, GIF, TIFF, WebP)."),
    model: Path | None = typer.Option(None, help="Run or ensemble folder (default: the bundled model)."),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON list."),
    tta: bool | None = typer.Option(
        None,
        "--tta/--no-tta",
        help="Test-time augmentation (mean over 8 flips/rotations). Default: as the model's threshold was fitted.",
    ),
    runtime: str = typer.Option("auto", help=RUNTIME_HELP),
    backend: str | None = deprecated_alias("--backend", "--runtime"),
) -> None:
    """Probability of malignant and the label at the model's operating threshold, per image."""
    from lesionlab.data.images import open_image
    from lesionlab.inference.loading import BACKENDS, load_predictor

    runtime = prefer(ctx, "runtime", runtime, backend)
    if runtime not in BACKENDS:  # a user error, whatever load_predictor raises for it
        fail(f"--runtime must be one of {', '.join(BACKENDS)}, got '{runtime}'")
    try:
        predictor = load_predictor(model, runtime)
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
