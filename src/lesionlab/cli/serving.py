"""``serve``: the HTTP service under uvicorn, every setting checked before uvicorn starts."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import typer

from lesionlab.cli.common import RUNTIME_HELP, USER_ERRORS, deprecated_alias, fail, prefer
from lesionlab.serve.settings import PREFIX, ServeSettings

#: the defaults of the settings the options set, defined once in ServeSettings
_DEFAULT = {f.name: f.default for f in dataclasses.fields(ServeSettings)}


def serve(
    ctx: typer.Context,
    model: Path | None = typer.Option(
        None, envvar="LESIONLAB_MODEL", help="Run or ensemble folder (default: the bundled model)."
    ),
    host: str = typer.Option("127.0.0.1", help="Interface to listen on (0.0.0.0 for all)."),
    port: int = typer.Option(8000),
    workers: int = typer.Option(1, min=1, help="uvicorn worker processes."),
    threads: int | None = typer.Option(
        None, min=1, help="Intra-op threads per request (default: cores / (workers x inference threads), at least 1)."
    ),
    inference_threads: int = typer.Option(
        _DEFAULT["inference_threads"], help="Requests decoded and inferred at once per worker."
    ),
    max_body_bytes: int = typer.Option(_DEFAULT["max_body_bytes"], help="Request body cap (413 above it)."),
    max_concurrency: int = typer.Option(
        _DEFAULT["max_concurrency"], help="Requests admitted at once per worker (503 + Retry-After above)."
    ),
    timeout: float = typer.Option(
        _DEFAULT["timeout_s"], help="Per-request processing timeout in seconds (503 after it)."
    ),
    runtime: str = typer.Option(_DEFAULT["runtime"], envvar=PREFIX + "RUNTIME", help=RUNTIME_HELP),
    backend: str | None = deprecated_alias(
        "--backend", "--runtime", envvar=PREFIX + "BACKEND", new_envvar=PREFIX + "RUNTIME"
    ),
    access_log: bool = typer.Option(True, help="uvicorn access log (method, path, status; never bodies)."),
) -> None:
    """Serve the model over HTTP: /predict (study contract), /v1/predict, /v1/model, health probes, a web page at /.

    Bearer-token auth is on when LESIONLAB_API_TOKENS (comma-separated) or LESIONLAB_API_TOKENS_FILE is set."""
    import os

    import uvicorn

    from lesionlab.inference.loading import require_operating_point
    from lesionlab.serve.service import resolve_model_dir
    from lesionlab.serve.settings import default_threads

    runtime = prefer(ctx, "runtime", runtime, backend)
    try:
        model_dir = resolve_model_dir(model).resolve()
        require_operating_point(model_dir)  # here, not as a 503 from every worker
        settings = ServeSettings(
            model_dir=str(model_dir),
            max_body_bytes=max_body_bytes,
            max_concurrency=max_concurrency,
            timeout_s=timeout,
            runtime=runtime,
            num_threads=threads or default_threads(workers, inference_threads),
            inference_threads=inference_threads,
            load_before_accepting=workers > 1,
        )
        os.environ.update(settings.to_env())
        tokens = ServeSettings.from_env(os.environ).tokens  # a bad token file fails here, not in each worker
    except (OSError, *USER_ERRORS) as e:  # OSError: LESIONLAB_API_TOKENS_FILE unreadable (not only missing)
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
