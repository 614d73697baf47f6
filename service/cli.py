"""The ``oclust`` command line: every part of the system starts from here.

Each command lives in its own module (``service/cmd_*.py``) and registers itself on ``app``.
The command modules import nothing heavy at module level, so ``oclust --help`` and
``oclust --version`` stay fast; torch and friends load when a command runs.

Exit codes: 0 success, 1 a runtime failure (Kafka or the store unreachable, a failed run),
2 a bad command line or setting (one ``error:`` line on stderr, before any work), 130 Ctrl-C.

Example:
    $ oclust --help
    $ oclust --version
"""

from __future__ import annotations

import sys
from typing import Annotated, Any

import typer
from typer.core import TyperGroup

from oclust.service import installed_version
from oclust.service.options import ClickException

__all__ = ["app", "oclust_version"]


def oclust_version() -> str:
    """The installed package's version (``0+unknown`` when run from an uninstalled tree)."""
    return installed_version("0+unknown")


class _OneLineErrors(TyperGroup):
    """The root group: a usage error is one ``oclust CMD: error: ...`` line and exit code 2."""

    def main(self, args: Any = None, prog_name: str | None = None, complete_var: str | None = None,
             standalone_mode: bool = True, **extra: Any) -> Any:
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except ClickException as exc:
            ctx = getattr(exc, "ctx", None)
            where = ctx.command_path if ctx is not None else "oclust"
            message = " ".join(exc.format_message().split())
            typer.echo(f"{where}: error: {message}", err=True)
            sys.exit(exc.exit_code)
        except typer.Abort:
            typer.echo("aborted", err=True)
            sys.exit(130)
        sys.exit(code if isinstance(code, int) else 0)


app = typer.Typer(
    name="oclust",
    cls=_OneLineErrors,
    help="Streaming online deep clustering: train from a stream, serve, watch for collapse.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"oclust {oclust_version()}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[bool, typer.Option(
        "--version", callback=_print_version, is_eager=True, help="print the version and exit"
    )] = False,
) -> None:
    """oclust: learn clusters from a stream, serve /assign, and watch for collapse."""


from oclust.service import cmd_eval, cmd_serve, cmd_up, cmd_worker  # noqa: E402

for _module in (cmd_eval, cmd_worker, cmd_serve, cmd_up):
    _module.register(app)
