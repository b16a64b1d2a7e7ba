"""``refusal``: fit a model folder's lesion detector again (and measure it), e.g. with clinical photos to refuse."""

from __future__ import annotations

from pathlib import Path

import typer

from lesionlab.cli.common import USER_ERRORS, fail

NON_LESION_HELP = (
    "Repeatable: a folder of clinical (non-dermoscopic) or natural photos, read recursively. Each folder is split "
    "in two by sub-folder (seeded): the detector learns from one half to refuse such photos (reason 'not a "
    "dermoscopic image') and is measured on the other. Default: the folders the detector was fitted with, if any."
)


def refusal(
    model_dir: Path = typer.Argument(..., help="A trained run folder, or a copy of a model folder (the bundled one)."),
    non_lesion: list[Path] | None = typer.Option(None, "--non-lesion", help=NON_LESION_HELP),
    data: Path | None = typer.Option(None, help="Data folder (default: the one the model was trained on)."),
    refit: bool = typer.Option(
        True, help="Fit the detector again; --no-refit measures the one there and writes nothing."
    ),
    quiet: bool = typer.Option(False),
) -> None:
    """Fit MODEL_DIR's lesion detector on its training images (and the --non-lesion photos), threshold it on its
    validation images and measure it; writes ood.npz, ood.json, refusal.json, refusal_scores.csv and the refusal
    block of metrics.json (report.md's section is refreshed by `lesionlab evaluate`)."""
    from lesionlab.refusal.measure import measure_refusal, summary
    from lesionlab.runs import METRICS, RunFolder

    try:
        run = RunFolder(model_dir)
        if run.is_ensemble:
            fail(f"{model_dir} is an ensemble: refit each member with `lesionlab refusal MEMBER`, then evaluate it")
        m = measure_refusal(run.path, data, not quiet, refit=refit, non_lesion=non_lesion or [])
        if refit:
            assert m.detector is not None  # refit always fits one
            m.detector.save(run.path)
            run.write_refusal(m.result, m.scores)
            if run.has(METRICS):
                run.write_metrics({**run.metrics(), "refusal": summary(m.result)})
    except USER_ERRORS as e:
        fail(str(e))
    r = m.result
    for name, rate in r["lesions"].items():
        typer.echo(f"{name + ' lesions':>22}: refused {rate['refused']}/{rate['n']} ({rate['rate']:.2%})")
    nl = r["non_lesion"]
    typer.echo(f"{'generated non-lesions':>22}: refused {nl['refused']}/{nl['n']} ({nl['rate']:.2%})")
    photos = r["clinical_photos"]
    if "held_out" in photos:
        h = photos["held_out"]
        typer.echo(f"{'held-out photos':>22}: refused {h['refused']}/{h['n']} ({h['rate']:.2%})")
    else:
        typer.echo(f"{'photos':>22}: {photos['note']}")
    typer.echo(f"detector: {r['method']}" + ("" if refit else " (measured, not refitted: nothing written)"))
