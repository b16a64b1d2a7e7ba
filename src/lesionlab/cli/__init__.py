"""The ``lesionlab`` command: a thin shell over the modules, one module per command group.

Errors a user can fix print one line (``error: ...``, exit 2); anything else is a bug and shows its traceback
(``lesionlab.cli.common.USER_ERRORS``). Entry point: ``lesionlab.cli:main`` (also ``python -m lesionlab``).
"""

from __future__ import annotations

import typer

from lesionlab.cli import calibration, evaluation, inference, refusal, serving, training
from lesionlab.cli.common import USER_ERRORS, fail

__all__ = ["USER_ERRORS", "app", "fail", "main"]

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Train, evaluate and serve skin-lesion classifiers (benign vs malignant). "
    "A screening aid for research, not a diagnosis.",
)

# in the order `lesionlab --help` lists them
for command in (
    training.train,
    evaluation.evaluate,
    inference.predict,
    training.sweep,
    inference.export,
    serving.serve,
    evaluation.ensemble,
    calibration.calibrate,
    refusal.refusal,
    inference.explain,
):
    app.command()(command)


def main() -> None:
    """The console script: keeps freed memory for reuse (see lesionlab.runtime), then runs the command."""
    from lesionlab.runtime import keep_freed_memory

    keep_freed_memory()
    app()
