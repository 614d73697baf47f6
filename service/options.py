"""The command line's plumbing: options made from the settings classes, errors, logging.

Every ``oclust`` option that configures a component is a field of a settings class
(:class:`~oclust.training_worker.settings.WorkerSettings`,
:class:`~oclust.service.settings.ServiceSettings`, ...). :func:`settings_command` turns those fields
into typer options (name, type, default, help, choices) so that adding an option is one line in the
settings. Values are checked by the settings themselves when the command starts, before any work: a
bad value ends the command with exit code 2 and one line naming the option.

This module imports nothing heavy (no torch, numpy or sklearn): ``oclust --help`` stays fast.

Example:
    >>> from pydantic import Field
    >>> from pydantic_settings import BaseSettings
    >>> class Demo(BaseSettings):
    ...     size: int = Field(3, ge=1, description="how many")
    >>> @settings_command(Demo)
    ... def demo(settings: Demo) -> int:
    ...     return settings.size
    >>> list(inspect.signature(demo).parameters)
    ['size']
    >>> demo(size=None), demo(size=5)
    (3, 5)
    >>> demo(size=0)
    Traceback (most recent call last):
    ...
    typer._click.exceptions.BadParameter: Input should be greater than or equal to 1
"""

from __future__ import annotations

import functools
import inspect
import logging
import sys
import types
from collections.abc import Callable, Iterable
from typing import Annotated, Any, Literal, TypeVar, Union, get_args, get_origin

import typer
from pydantic import BaseModel, ValidationError
from typer.core import TyperCommand, TyperOption

try:  # typer >= 0.22 carries its own copy of click
    from typer._click.core import Context, Parameter
    from typer._click.exceptions import ClickException, MissingParameter
    from typer._click.globals import get_current_context
except ImportError:  # pragma: no cover - older typer on click
    from click import Context, Parameter, get_current_context
    from click.exceptions import ClickException, MissingParameter

__all__ = [
    "ClickException",
    "LogLevelOpt",
    "SettingsCommand",
    "build_settings",
    "fail",
    "field_option",
    "settings_command",
    "setup_logging",
]

S = TypeVar("S", bound=BaseModel)
LOG_LEVELS = ("debug", "info", "warning", "error")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _strip_none(annotation: Any) -> Any:
    if get_origin(annotation) in (Union, types.UnionType):
        args = [a for a in get_args(annotation) if a is not type(None)]
        return args[0] if len(args) == 1 else annotation
    return annotation


def field_option(cls: type[BaseModel], name: str, **override: Any) -> Any:
    """The typer option for one settings field, as an ``Annotated`` type (default ``None``).

    The CLI passes on only the options given, so the field's own default (or its
    ``OCLUST_<FIELD>`` environment variable) applies to the others; the help shows that default.

    >>> from oclust.training_worker.settings import WorkerSettings
    >>> info = get_args(field_option(WorkerSettings, "mode"))[1]
    >>> info.help
    'samples, or readings cut into per-device windows [choices: samples, readings]'
    """
    field = cls.model_fields[name]
    annotation = _strip_none(field.annotation)
    decls = [_flag(name)]
    help_text = field.description or ""
    if get_origin(annotation) is Literal:
        choices = [str(c) for c in get_args(annotation)]
        help_text += f" [choices: {', '.join(choices)}]"
        annotation = str
    elif annotation is bool:
        decls = [f"{_flag(name)}/--no-{_flag(name)[2:]}"]
    shown: str | bool = False if field.default is None else str(field.default)
    if field.is_required():
        shown = False
        help_text += " [required]"
    kwargs: dict[str, Any] = {"help": help_text, "show_default": shown} | override
    return Annotated[annotation | None, typer.Option(*decls, **kwargs)]


def _one_line(
    exc: ValidationError, cls: type[BaseModel], options: Iterable[str]
) -> ClickException:
    """The first problem of a settings validation, phrased as a usage error of its option (or
    of its environment variable, for a field the command has no option for)."""
    err = exc.errors()[0]
    field = str(err["loc"][0]) if err["loc"] else ""
    msg = err["msg"].removeprefix("Value error, ")
    ctx = get_current_context(silent=True)  # names the command in the error line
    if err["type"] == "missing":
        return MissingParameter(ctx=ctx, param_hint=f"'{_flag(field)}'", param_type="option")
    hint = f"'{_flag(field)}'" if field else None
    if field and field not in options:  # e.g. OCLUST_API_KEY: there is no --api-key
        hint = (str(cls.model_config.get("env_prefix") or "") + field).upper()
    return typer.BadParameter(" ".join(msg.split()), ctx=ctx, param_hint=hint)


def build_settings(cls: type[S], values: dict[str, Any]) -> S:
    """``cls(**values)`` without the ``None`` values; a bad value is a one-line usage error.

    ``values`` holds one entry (maybe ``None``) per option of the command: a bad value of any
    other field came from its environment variable, and the error names that.
    """
    try:
        return cls(**{k: v for k, v in values.items() if v is not None})
    except ValidationError as exc:
        raise _one_line(exc, cls, values) from None


def settings_command(
    cls: type[BaseModel], *, exclude: tuple[str, ...] = (), **overrides: dict[str, Any]
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorate ``fn(settings, **own_options)``: every field of ``cls`` becomes an option.

    ``exclude`` names fields left off the command line; ``overrides`` maps a field to extra
    ``typer.Option`` arguments (e.g. ``{"help": ...}``).
    """

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        own = list(inspect.signature(fn, eval_str=True).parameters.values())[1:]
        taken = {p.name for p in own}
        own_fields = cls.__annotations__  # the class's own fields first, then inherited ones
        names = sorted((n for n in cls.model_fields if n not in exclude and n not in taken),
                       key=lambda n: n not in own_fields)
        generated = [
            inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=None,
                              annotation=field_option(cls, n, **overrides.get(n, {})))
            for n in names
        ]
        params = generated + [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own]

        @functools.wraps(fn)
        def command(**kwargs: Any) -> Any:
            settings = build_settings(cls, {n: kwargs.pop(n, None) for n in names})
            return fn(settings, **kwargs)

        command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
        command.__annotations__ = {p.name: p.annotation for p in params}
        del command.__wrapped__  # typer must read the signature above, not fn's
        return command

    return decorate


class SettingsCommand(TyperCommand):
    """A command whose ``--regulariser`` help lists the built-in regularisers.

    The names come from ``oclust.model.REGULARISER_NAMES``, which the registry checks at import,
    so a command's ``--help`` does not import torch; the value itself is checked against the
    full registry (user-registered classes included) when the command runs.
    """

    _registry_help_added = False

    def get_params(self, ctx: Context) -> list[Parameter]:
        """The parameters, with the registered regulariser names in ``--regulariser``'s help."""
        if not self._registry_help_added:
            self._registry_help_added = True
            from oclust.model import REGULARISER_NAMES  # the built-in names, without torch

            for p in self.params:
                if p.name == "regulariser" and isinstance(p, TyperOption):
                    p.help = f"{p.help or ''}: {', '.join(REGULARISER_NAMES)}"
        return super().get_params(ctx)


def fail(message: str, code: int = 1) -> typer.Exit:
    """Print ``error: message`` on stderr and return the exit to raise (1: a runtime failure)."""
    typer.echo(f"error: {' '.join(message.split())}", err=True)
    return typer.Exit(code)


def setup_logging(level: str, *, rich: bool = False) -> None:
    """The one logging setup of every command: stderr, loggers named after their modules."""
    handler: logging.Handler
    if rich:
        from rich.console import Console
        from rich.logging import RichHandler

        handler = RichHandler(console=Console(stderr=True), show_path=False)
        handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO), handlers=[handler],
                        force=True)
    noisy = logging.WARNING if logging.getLogger().level <= logging.INFO else logging.ERROR
    logging.getLogger("aiokafka").setLevel(noisy)


def _check_level(value: str) -> str:
    if value.lower() not in LOG_LEVELS:
        raise typer.BadParameter(f"{value!r} is not one of {', '.join(LOG_LEVELS)}")
    return value.lower()


LogLevelOpt = Annotated[
    str, typer.Option(help=f"log level: {', '.join(LOG_LEVELS)}", callback=_check_level)
]
