"""``oclust serve`` (the assignment service) and ``oclust snapshots list|show|rollback``.

Example:
    $ oclust serve --store redis://127.0.0.1:6379/0 --namespace oclust --port 8000
    $ oclust snapshots list --store redis://127.0.0.1:6379/0 --namespace oclust
    $ oclust snapshots rollback 12 --store redis://127.0.0.1:6379/0 --namespace oclust

The API key is read from the environment only (``OCLUST_API_KEY``), never from the command line
where other users of the machine could see it in the process list.
"""

from __future__ import annotations

import datetime as dt
import json
import time
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from oclust.service.options import (
    build_settings,
    fail,
    field_option,
    settings_command,
    setup_logging,
)
from oclust.service.settings import ServiceSettings

if TYPE_CHECKING:
    from oclust.model.snapshot import Manifest

__all__ = ["register", "run_server", "serve_command", "snapshots_app"]

StoreOpt = field_option(ServiceSettings, "store")
NamespaceOpt = field_option(ServiceSettings, "namespace")


def _settings(**overrides: Any) -> ServiceSettings:
    return build_settings(ServiceSettings, overrides)


def run_server(settings: ServiceSettings) -> None:
    """Serve until interrupted: the app, plus a watcher keeping it on the store's snapshot."""
    import uvicorn

    from oclust.service.app import create_app
    from oclust.service.http import bind_socket, uvicorn_config
    from oclust.service.loader import ModelHolder, SnapshotWatcher
    from oclust.training_worker.store import StoreError, open_store

    sock = bind_socket(settings.host, settings.port)  # a taken port: exit 2, before any work
    try:
        store = open_store(settings.store, settings.namespace, poll_interval=settings.poll_interval)
    except StoreError as exc:
        sock.close()
        raise typer.BadParameter(str(exc), param_hint="--store") from None
    holder = ModelHolder()
    watcher = SnapshotWatcher.for_settings(store, holder, settings)
    app = create_app(settings, holder, background=[watcher])
    try:
        uvicorn.Server(uvicorn_config(app, settings)).run(sockets=[sock])
    finally:
        store.close()


@settings_command(ServiceSettings, exclude=("api_key",))
def serve_command(settings: ServiceSettings) -> None:
    """Serve POST /assign from the store's current snapshot, hot-reloading new versions.

    Every option is also read from OCLUST_<OPTION>. Set OCLUST_API_KEY to require an X-API-Key
    header on /assign*.
    """
    setup_logging(settings.log_level)
    run_server(settings)


# --------------------------------------------------------------------------- snapshots
snapshots_app = typer.Typer(
    help="List, inspect and roll back the model snapshots in a store.", no_args_is_help=True
)


def _open(store: str | None, namespace: str | None) -> Any:
    from oclust.training_worker.store import StoreError, open_store

    s = _settings(store=store, namespace=namespace)
    try:
        return open_store(s.store, s.namespace, keep=None)
    except StoreError as exc:
        raise typer.BadParameter(str(exc), param_hint="--store") from None


def _when(ts: Any) -> str:
    if not isinstance(ts, int | float):
        return "—"
    stamp = dt.datetime.fromtimestamp(ts).isoformat(sep=" ", timespec="seconds")
    age = max(0.0, time.time() - ts)
    ago = f"{age:.0f}s" if age < 120 else f"{age / 60:.0f}m" if age < 7200 else f"{age / 3600:.0f}h"
    return f"{stamp} ({ago} ago)"


def _metric(m: Manifest, key: str) -> str:
    value = m.metrics.get(key)
    return f"{value:.3f}" if isinstance(value, int | float) else "—"


JsonOpt = Annotated[bool, typer.Option("--json", help="print JSON instead of a table")]


def _pointer(st: Any) -> tuple[int | None, str | None]:
    """(current version, problem): a garbled pointer is reported, not raised."""
    from oclust.training_worker.store import CorruptPointer

    try:
        return st.current_version(), None
    except CorruptPointer as exc:
        return None, str(exc)


def _inventory(st: Any) -> dict[str, Any]:
    """Everything ``snapshots list`` shows, as JSON-able data (never raises on bad contents)."""
    from oclust.model.snapshot import Manifest, SnapshotError
    from oclust.training_worker.store import VersionNotFound

    current, problem = _pointer(st)
    rows = []
    for v in st.versions():
        try:
            snap = st.load(v)
            Manifest.from_dict(snap.manifest)  # a field of the wrong type: not valid either
            rows.append({"version": v, "current": v == current, "valid": True, "error": None,
                         "manifest": snap.manifest})
        except (SnapshotError, VersionNotFound) as exc:
            rows.append({"version": v, "current": v == current, "valid": False,
                         "error": str(exc), "manifest": None})
    if problem is None and current is not None and current not in st.versions():
        problem = f"the pointer names version {current}, which is not stored"
    return {"store": st.url, "namespace": st.namespace, "current": current,
            "pointer_problem": problem, "versions": rows}


@snapshots_app.command("list")
def list_command(
    store: StoreOpt = None, namespace: NamespaceOpt = None, as_json: JsonOpt = False
) -> None:
    """Table of stored versions (the current one marked; corrupt ones and pointer problems
    shown, so that `rollback` can repair them)."""
    from oclust.model.snapshot import Manifest
    from oclust.training_worker.store import StoreError

    st = _open(store, namespace)
    try:
        inv = _inventory(st)
    except StoreError as exc:
        raise fail(str(exc)) from None
    finally:
        st.close()
    if as_json:
        typer.echo(json.dumps(inv, sort_keys=True))
        return
    console = Console()
    console.width = max(console.width, 120)
    if inv["pointer_problem"]:
        console.print(f"[red]pointer problem:[/red] {inv['pointer_problem']}", highlight=False)
    if not inv["versions"]:
        console.print(f"no snapshots in {st.url} namespace {st.namespace!r}")
        return
    table = Table(title=f"snapshots in {st.url} namespace {st.namespace!r}")
    for col in ("version", "current", "created", "regulariser", "K", "input", "samples",
                "steps", "loss", "sha256"):
        table.add_column(col, justify="right" if col in ("version", "K", "samples",
                                                         "steps", "loss") else "left")
    for row in inv["versions"]:
        v, mark = row["version"], "*" if row["current"] else ""
        if row["manifest"] is None:
            table.add_row(str(v), mark, f"[red]corrupt: {row['error']}[/red]")
            continue
        m = Manifest.from_dict(row["manifest"])
        table.add_row(
            str(v), mark, _when(m.created_at),
            str(m.regulariser or "—"), str(m.n_clusters or "—"),
            "×".join(map(str, m.input_shape)) or "—",
            str(m.samples_seen), str(m.steps),
            _metric(m, "loss"), (m.sha256 or "")[:12],
        )
    console.print(table)


@snapshots_app.command("show")
def show_command(
    version: Annotated[
        int | None, typer.Argument(help="version (default: the current one)")
    ] = None,
    store: StoreOpt = None,
    namespace: NamespaceOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Print one snapshot's manifest (JSON), after verifying its checksums."""
    from oclust.model.snapshot import SnapshotError
    from oclust.training_worker.store import StoreError

    st = _open(store, namespace)
    try:
        if version is None:
            version, problem = _pointer(st)
            if problem:
                raise fail(f"{problem}; name a version (see `oclust snapshots list`)")
        snap = st.load(version)
    except (StoreError, SnapshotError) as exc:
        raise fail(str(exc)) from None
    finally:
        st.close()
    if as_json:
        typer.echo(json.dumps(snap.manifest, sort_keys=True))
        return
    Console().print_json(json.dumps(snap.manifest, sort_keys=True))


@snapshots_app.command("rollback")
def rollback_command(
    version: Annotated[int, typer.Argument(help="stored version to make current")],
    store: StoreOpt = None,
    namespace: NamespaceOpt = None,
) -> None:
    """Make a stored, valid version current and announce it (replicas hot-reload it).

    Works whatever the pointer holds now (a version, nothing, or garbage), so it also repairs it.
    """
    from oclust.model.snapshot import SnapshotError
    from oclust.training_worker.store import StoreError

    st = _open(store, namespace)
    try:
        before, problem = _pointer(st)
        st.load(version)  # refuse to roll back to a corrupt snapshot
        st.rollback(version)
    except (StoreError, SnapshotError) as exc:
        raise fail(str(exc)) from None
    finally:
        st.close()
    was = "a garbled pointer" if problem else before
    Console().print(f"current version: {version} (was {was})", highlight=False)


def register(app: typer.Typer) -> None:
    """Add ``serve`` and ``snapshots`` to the CLI."""
    app.command("serve")(serve_command)
    app.add_typer(snapshots_app, name="snapshots")
