"""``calibrate``: a model's operating point re-fitted on a site's own labelled sample, written as a new folder."""

from __future__ import annotations

from pathlib import Path

import typer

from lesionlab.cli.common import (
    POLICY_OPTION,
    RESAMPLES_HELP,
    RUNTIME_HELP,
    TAXONOMY_HELP,
    USER_ERRORS,
    command_line,
    fail,
)


def calibrate(
    run_dir: Path | None = typer.Argument(
        None, help="Run, ensemble or model folder to calibrate (default: the bundled model). Never written."
    ),
    data: str = typer.Option(
        ...,
        help="The site's labelled sample, read whole: any folder a data format reads (ISIC ground-truth CSVs, "
        "HAM10000, a CSV with image,label or diagnosis); 'format:PATH?option=value' where detection needs help, "
        "'?name=SITE' to name the site.",
    ),
    out: Path = typer.Option(..., help="New model folder to write (absent or empty); predict and serve accept it."),
    threshold_policy: str = POLICY_OPTION,
    tta: bool | None = typer.Option(
        None,
        "--tta/--no-tta",
        help="Score the sample with test-time augmentation. Default: as the model's operating point was fitted.",
    ),
    runtime: str = typer.Option("auto", help=RUNTIME_HELP),
    taxonomy: Path | None = typer.Option(None, help=TAXONOMY_HELP),
    resamples: int = typer.Option(1000, help=RESAMPLES_HELP),
    quiet: bool = typer.Option(False, help="No progress bar."),
) -> None:
    """Re-fit temperature and threshold on a site's labelled sample (any threshold policy) into a new folder OUT,
    and say what sensitivity a sample of this size can certify."""
    from lesionlab.data.taxonomy import DEFAULT_TAXONOMY, Taxonomy
    from lesionlab.evaluation.calibrate import calibrate_run
    from lesionlab.inference.loading import BACKENDS

    if runtime not in BACKENDS:
        fail(f"--runtime must be one of {', '.join(BACKENDS)}, got '{runtime}'")
    command = (
        command_line(
            "calibrate", data=data, out=out, threshold_policy=threshold_policy, runtime=runtime, taxonomy=taxonomy
        )
        + ("" if tta is None else " --tta" if tta else " --no-tta")
        + (f" {run_dir}" if run_dir else "")
    )
    try:
        tax = Taxonomy.from_file(taxonomy) if taxonomy else DEFAULT_TAXONOMY
        record = calibrate_run(
            run_dir,
            data,
            out,
            threshold_policy,
            tta,
            runtime,
            tax,
            n_resamples=resamples,
            progress=not quiet,
            command=command,
        )
    except USER_ERRORS as e:
        fail(str(e))
    rep = record["sample_report"]
    site, src, at, ach = record["site"], record["source"], rep["at_site_threshold"], rep["achievable"]
    typer.echo(
        f"site {site['name']}: n={site['n']} ({site['n_malignant']} malignant); {record['policy']}: "
        f"temperature {record['temperature']:.4f} (was {src['temperature']:.4f}), threshold "
        f"{record['threshold']:.4f} (was {src['threshold']:.4f})"
    )
    for key in ("sensitivity", "specificity"):
        r = at[key]
        typer.echo(
            f"  {key} on the sample: {r['count']}/{r['n']} = {r['value']:.3f} [{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}]"
        )
    typer.echo(
        f"  with {site['n_malignant']} malignant images the sample can certify a sensitivity of at most "
        f"{ach['best_sensitivity_bound']:.3f} ({ach['confidence']:.0%} lower bound, none missed)"
    )
    for w in rep["warnings"]:
        typer.secho(f"warning: {w}", fg=typer.colors.YELLOW, err=True)
    typer.echo(f"wrote {out}: lesionlab predict --model {out} IMAGE; lesionlab serve --model {out}")
