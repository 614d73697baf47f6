"""The ``oclust`` command line: every part of the system starts from here.

Each command lives in its own module (``service/cmd_*.py``) and registers itself on ``app``.

Example:
    $ oclust --help
"""

from __future__ import annotations

import typer

app = typer.Typer(
    name="oclust",
    help="Streaming online deep clustering: train from a stream, serve, watch for collapse.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)


@app.callback()
def main() -> None:
    """oclust: learn clusters from a stream, serve /assign, and watch for collapse."""


from service import cmd_eval  # noqa: E402

cmd_eval.register(app)

from service import cmd_worker  # noqa: E402

cmd_worker.register(app)

from service import cmd_serve  # noqa: E402

cmd_serve.register(app)

from service import cmd_up  # noqa: E402

cmd_up.register(app)
