"""The README's commands exist as written: every ``oclust CMD --option`` it shows is real."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import typer.main

from oclust.service.cli import app

README = Path(__file__).resolve().parents[1] / "README.md"


def _commands() -> dict[str, Any]:
    """Every command and subcommand of the CLI by its full name."""
    group: Any = typer.main.get_command(app)
    out: dict[str, Any] = {}
    for name, cmd in group.commands.items():
        out[name] = cmd
        if hasattr(cmd, "commands"):
            out |= {f"{name} {sub}": c for sub, c in cmd.commands.items()}
    return out


def readme_invocations(text: str) -> list[tuple[str, list[str]]]:
    """``(command, [--flags])`` of each ``oclust ...`` written in the README.

    >>> readme_invocations("run `oclust up --port 8001` or `oclust snapshots list --store X`")
    [('up', ['--port']), ('snapshots list', ['--store'])]
    """
    found = []
    for m in re.finditer(r"oclust ((?:[a-z]+)(?: (?:list|show|rollback))?)([^`\n]*)", text):
        command, rest = m.group(1), m.group(2)
        flags = re.findall(r"(--[a-z][a-z-]*)", rest)
        found.append((command, flags))
    return found


def test_every_readme_command_and_option_exists() -> None:
    commands = _commands()
    invocations = [(c, f) for c, f in readme_invocations(README.read_text())
                   if c.split()[0] in commands or c in ("up", "worker", "serve")]
    assert len(invocations) >= 10
    for command, flags in invocations:
        assert command in commands, f"README shows `oclust {command}`, which does not exist"
        options = {o for p in commands[command].params for o in (*p.opts, *p.secondary_opts)}
        for flag in flags:
            assert flag in options, f"README shows `oclust {command} {flag}`: no such option"


def test_readme_lists_every_command() -> None:
    text = README.read_text()
    for name in _commands():
        assert f"oclust {name}" in text, f"`oclust {name}` is missing from the README"
