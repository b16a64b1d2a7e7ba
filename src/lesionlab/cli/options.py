"""Command-line options derived from a settings dataclass, so that a flag, its default and its help live in one place.

A field ``batch_size: int = setting(32, "Images per optimizer step.")`` (``lesionlab.training.config``) becomes
``--batch-size INTEGER  Images per optimizer step. [default: 32]``. :func:`options_from` adds one such option per
field to a Typer command; :func:`flag_values` spells a built config back out for the reproducible command line.

Field metadata read here: ``help`` (required), ``flag`` (False: no option) and ``unset`` (the config value that
the command line spells as the option's absence: the option defaults to None, and None becomes ``unset``).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import typing
from collections.abc import Callable
from typing import Any, TypeVar

import typer

F = TypeVar("F", bound=Callable[..., Any])


def flag_fields(config_cls: type) -> list[dataclasses.Field]:
    """The fields of ``config_cls`` that are command-line options, in declaration order.

    Raises TypeError (a bug, not a user error) for an option without help: every option explains itself."""
    found = [f for f in dataclasses.fields(config_cls) if f.metadata.get("flag", True)]
    for f in found:
        if not f.metadata.get("help"):
            raise TypeError(f"{config_cls.__name__}.{f.name} needs metadata={{'help': ...}} to be an option")
    return found


def options_from(config_cls: type, *, after: str | None = None) -> Callable[[F], F]:
    """Decorator: adds one Typer option per :func:`flag_fields` field of ``config_cls`` to a command.

    The command is declared as ``def cmd(<its own options>, **settings)``. Typer sees the derived options in the
    command's signature, after the own option named ``after`` (first when None), with the field's type, default
    and help; the command receives them in ``settings`` as config values (None turned back into ``unset``),
    ready for ``config_cls(**settings)``, which it builds itself so that a bad value is a user error it reports.
    """
    hints = typing.get_type_hints(config_cls)
    config_fields = flag_fields(config_cls)

    def decorate(func: F) -> F:
        signature = inspect.signature(func, eval_str=True)
        own = [p for p in signature.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
        if len(own) == len(signature.parameters):
            raise TypeError(f"{func.__name__} needs **settings to receive the {config_cls.__name__} options")
        derived = []
        for f in config_fields:
            kind, default = hints[f.name], f.default
            if "unset" in f.metadata:
                kind, default = kind | None, None
            # no explicit name: Typer derives --batch-size from batch_size, and --x/--no-x for a bool
            option = typer.Option(default, help=f.metadata["help"])
            derived.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=kind))
        at = 0 if after is None else [p.name for p in own].index(after) + 1
        # keyword-only throughout: Typer calls commands with keywords, and a signature may then mix
        # parameters with and without defaults in any order
        params = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own[:at]] + derived
        params += [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own[at:]]

        @functools.wraps(func)
        def command(**kwargs: Any) -> Any:
            settings = {f.name: kwargs.pop(f.name) for f in config_fields}
            for f in config_fields:
                if "unset" in f.metadata and settings[f.name] is None:
                    settings[f.name] = f.metadata["unset"]
            return func(**kwargs, **settings)

        command.__signature__ = signature.replace(parameters=params)  # type: ignore[attr-defined]
        # real types, so that Typer's get_type_hints agrees with the signature (func's are strings)
        command.__annotations__ = {p.name: p.annotation for p in params}
        return typing.cast(F, command)

    return decorate


def flag_values(config: Any) -> dict[str, Any]:
    """The option fields of a built ``config`` by name, as :func:`lesionlab.cli.common.command_line` spells them:
    every value as the config holds it (resolved, e.g. ``precision``), a field at its ``unset`` value as None."""
    values = {}
    for f in flag_fields(type(config)):
        value = getattr(config, f.name)
        values[f.name] = None if "unset" in f.metadata and value == f.metadata["unset"] else value
    return values
