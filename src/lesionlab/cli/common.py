"""What the commands share: the one-line error, the errors a user can fix, shared options, the command line.

Errors a user can fix print ``error: ...`` and exit 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import typer

from lesionlab.data.dataset import default_data_dir
from lesionlab.errors import LesionlabError
from lesionlab.evaluation.metrics import DEFAULT_POLICY, PolicyError, check_policy
from lesionlab.evaluation.report import held_out_splits

T = TypeVar("T")

#: What the commands catch and print as one line: LesionlabError (data, run, config, weights, image, policy,
#: settings and sweep errors) and FileNotFoundError (a path the user gave, e.g. --weights, that is not there).
#: A bare ValueError is a bug and shows its traceback.
USER_ERRORS = (LesionlabError, FileNotFoundError)

DATA_HELP = "Data folder (default: $LESIONLAB_DATA or ../shared/data/isic-kaggle)."
MULTI_DATA_HELP = (
    "Repeatable: a data folder (default: $LESIONLAB_DATA or ../shared/data/isic-kaggle). Its format is detected "
    "(train/test class folders, HAM10000, ISIC 2018/2019/2020 ground truth, a CSV of image,label or diagnosis); "
    "'FORMAT:PATH?option=value&...' names it where detection needs help. Several folders train on their union, "
    "leak-proof: images of one lesion, patient or photo stay on one side of every split."
)
WEIGHTS_DIR_HELP = "Folder of <timm name>*.pth (default: $LESIONLAB_WEIGHTS_DIR or ../shared/weights)."
CLASSES_HELP = "Class folder names, negative first."
TAXONOMY_HELP = (
    "JSON file extending or replacing the diagnosis taxonomy (which diagnoses are malignant; aliases); "
    "default: lesionlab.data.taxonomy.DEFAULT_TAXONOMY."
)
RESAMPLES_HELP = "Bootstrap resamples for the 95% CIs."
RUNTIME_HELP = "auto (ONNX Runtime when model.onnx exists) | onnx | torch"


def fail(msg: str) -> NoReturn:
    """Prints ``error: msg`` on stderr and exits 2: the end of every command a user error stops."""
    typer.secho(f"error: {msg}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


def resolve_data(data: Path | None) -> Path:
    """``--data``, else $LESIONLAB_DATA or the shared folder; fails with the expected layout when none is found."""
    found = data or default_data_dir()
    if found is None:
        fail(
            "no data folder: pass --data DIR or set LESIONLAB_DATA (expected train/{benign,malignant}/*.jpg "
            "and test/{benign,malignant}/*.jpg)"
        )
    return found


def parse_classes(value: str) -> tuple[str, str]:
    """'benign,malignant' -> ('benign', 'malignant'); anything but two names fails."""
    parts = [p.strip() for p in value.split(",") if p.strip()]
    if len(parts) != 2:
        fail(f"--classes needs two folder names 'negative,positive', got '{value}'")
    return parts[0], parts[1]


def _policy(value: str) -> str:
    """Checked when the command starts, not after an hour of training."""
    try:
        return check_policy(value)
    except PolicyError as e:
        raise typer.BadParameter(str(e)) from None


POLICY_OPTION = typer.Option(
    DEFAULT_POLICY,
    callback=_policy,
    help="fixed:0.5 | youden | sensitivity:0.95 | sensitivity-lcb:0.95 (95% lower bound >= 0.95).",
)


def command_line(command: str, **options: Any) -> str:
    """The command that reproduces a run, spelled out with every setting (not just what was typed).

    ``options`` in order, ``name`` as ``--name``: a bool as the bare flag when true (absent when false), None
    as absent, a list as ``--name value`` per item, anything else as ``--name value``."""
    parts = ["lesionlab", command]
    for key, value in options.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            parts += [flag] if value else []
        elif isinstance(value, list | tuple):
            parts += [p for v in value for p in (flag, str(v))]
        elif value is not None:
            parts += [flag, str(value)]
    return " ".join(shlex.quote(p) for p in parts)


def print_summary(metrics: dict) -> None:
    """One line per split: n and the headline metrics with their 95% CIs."""
    for split in held_out_splits(metrics):
        m = metrics[split]
        typer.echo(
            f"{split:>10}: n={m['n']:4d}  "
            + "  ".join(
                f"{k}={m[k]['value']:.3f} [{m[k]['ci95'][0]:.3f},{m[k]['ci95'][1]:.3f}]"
                for k in ("accuracy", "recall", "specificity", "auc")
            )
        )


# ------------------------------------------------------------------ deprecated spellings


def _source(ctx: typer.Context, name: str) -> str | None:
    """Where option ``name`` got its value: "COMMANDLINE", "ENVIRONMENT", "DEFAULT", ... (None: not yet).

    By name: recent Typer runs on its own copy of click (typer._click), whose ParameterSource is not click's."""
    source = ctx.get_parameter_source(name)
    return None if source is None else source.name


def deprecated_alias(old: str, new: str, envvar: str | None = None, new_envvar: str | None = None) -> Any:
    """A hidden option spelled ``old`` (and read from ``envvar``, if given) that still does what ``new`` does.

    Its value is None unless it is used; then it prints one warning line on stderr. The command takes the
    value with :func:`prefer`. Declare it with the type of ``new``, made optional (``str | None``)."""

    def warn(ctx: typer.Context, param: typer.CallbackParam, value: Any) -> Any:
        if value is not None:
            from_env = envvar is not None and _source(ctx, param.name or "") == "ENVIRONMENT"
            spelled, instead = (envvar, new_envvar or new) if from_env else (old, new)
            typer.secho(f"warning: {spelled} is deprecated; use {instead}", fg=typer.colors.YELLOW, err=True)
        return value

    return typer.Option(None, old, envvar=envvar, hidden=True, callback=warn, help=f"Deprecated: use {new}.")


def prefer(ctx: typer.Context, name: str, value: T, alias_value: T | None) -> T:
    """The value of option ``name``, or its deprecated alias' value where ``name`` was not given (on the command
    line or by its environment variable): the new spelling wins when both are."""
    if alias_value is None or _source(ctx, name) not in (None, "DEFAULT", "DEFAULT_MAP"):
        return value
    return alias_value
