"""``oclust up``: the whole service in one process — replay, training worker, store, service.

With no options it needs neither Kafka nor Redis: an in-process stream
(:class:`~oclust.training_worker.stream.LocalStream`) carries the replayed dataset to the training
worker, snapshots go to a directory store (``./.oclust/store``), and the service answers on
``http://127.0.0.1:8000`` (the live page at ``/``). Only the stream and the store differ from a
deployment: ``--bootstrap-servers HOST:PORT --store redis://...`` runs the very same worker,
producer and service on real components. Ctrl-C (or SIGTERM), during start-up too, stops the
replay, trains what is queued, publishes a final snapshot and exits 0. Started again on the
same store, training goes on from the last snapshot.

Example:
    $ oclust up                                   # digits, K=10, http://127.0.0.1:8000
    $ oclust up --dataset daphnet --port 8001     # the reading stream, cut into windows
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import signal
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Annotated, Any

import typer

from oclust.service import options
from oclust.service.settings import ServiceSettings
from oclust.training_worker.settings import IN_PROCESS, WorkerSettings

__all__ = ["LiveStats", "register", "run_up", "up_command"]

Opt = typer.Option
log = logging.getLogger(__name__)

_StoreOpt = options.field_option(WorkerSettings, "store")
_RegulariserOpt = options.field_option(WorkerSettings, "regulariser")
_PriorOpt = options.field_option(WorkerSettings, "prior")
_BatchSizeOpt = options.field_option(WorkerSettings, "batch_size")
_SeedOpt = options.field_option(WorkerSettings, "seed")
_HostOpt = options.field_option(ServiceSettings, "host")
_PortOpt = options.field_option(ServiceSettings, "port")

DEFAULT_K = {"digits": 10, "segments": 7, "basic_motions": 4, "daphnet": 2, "fashion_mnist": 10,
             "hapt": 6}
READING_STREAMS = {"daphnet": 64, "hapt": 128}  # reading streams and their window sizes


@dataclass(frozen=True)
class LiveView:
    """What the terminal shows, replaced as a whole after each step (no torn reads)."""

    samples: int = 0
    steps: int = 0
    loss: float = math.nan
    counts: tuple[int, ...] = ()  # served (nearest-centroid) labels of the recent batches
    at: float = field(default_factory=time.monotonic)


class LiveStats:
    """Collects the training worker's steps (``on_step`` runs in its training thread).

    Example:
        >>> from oclust.model import StepReport
        >>> stats = LiveStats(n_clusters=3)
        >>> stats.view.samples
        0
    """

    def __init__(self, n_clusters: int, recent_batches: int = 8) -> None:
        self.n_clusters = n_clusters
        self.view = LiveView(counts=(0,) * n_clusters)
        self._recent: deque[Any] = deque(maxlen=recent_batches)

    def on_step(self, report: Any, _batch: Any) -> None:
        """Trainer hook: fold one step's report into a new view."""
        import numpy as np

        self._recent.append(np.bincount(report.served_labels, minlength=self.n_clusters))
        counts = np.sum(self._recent, axis=0)
        old = self.view
        self.view = LiveView(
            old.samples + report.n, old.steps + 1, report.loss, tuple(int(c) for c in counts),
        )


def _number(value: float, decimals: int) -> str:
    """``value`` to ``decimals`` places; a dash while it is undefined (NaN)."""
    return "—" if math.isnan(value) else f"{value:.{decimals}f}"


def _render(stats: LiveStats, worker: Any, url: str, started: float) -> Any:
    from rich.console import Group
    from rich.table import Table

    v = stats.view
    k = stats.n_clusters
    elapsed = max(time.monotonic() - started, 1e-9)
    # The served figures the collapse guard judges (its window), as the worker exports them.
    gauges = worker.metrics.registry
    entropy = gauges.get_sample_value("oclust_worker_served_hard_entropy_nats")
    kl = gauges.get_sample_value("oclust_worker_served_kl_star_nats")
    entropy = math.nan if entropy is None else entropy
    kl = math.nan if kl is None else kl
    ratio = entropy / math.log(k) if k > 1 and math.isfinite(entropy) else math.nan
    head = Table.grid(padding=(0, 2))
    head.add_row("[bold]oclust up[/]", url, "Ctrl-C: final snapshot and exit")
    facts = Table(show_header=True, header_style="bold", box=None)
    for name in ("samples trained", "steps", "samples/s", "loss", "served entropy ratio",
                 "served KL*", "snapshot"):
        facts.add_column(name, justify="right")
    # NaN (no served window yet, as the gauges read before the first step): a dash, no colour
    style = "dim" if math.isnan(ratio) else "red" if ratio < 0.5 else "yellow" if ratio < 0.8 \
        else "green"
    facts.add_row(
        f"{v.samples:,}", f"{v.steps:,}", f"{v.samples / elapsed:,.0f}", _number(v.loss, 4),
        f"[{style}]{_number(ratio, 3)}[/]", _number(kl, 4), str(worker.last_version or "—"),
    )
    sizes = Table(title="served cluster sizes (last batches)", show_header=True, box=None)
    sizes.add_column("cluster", justify="right")
    sizes.add_column("size", justify="right")
    sizes.add_column("share")
    total = max(sum(v.counts), 1)
    for cluster, count in enumerate(v.counts):
        share = count / total
        sizes.add_row(str(cluster), str(count), f"{'█' * round(40 * share):<40} {share:6.1%}")
    return Group(head, facts, sizes)


def _server(config: Any) -> Any:
    """A uvicorn server without its own signal handling (``oclust up`` owns the signals)."""
    import uvicorn

    class _Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            yield

    return _Server(config)


@contextlib.contextmanager
def _signals(stop: asyncio.Event) -> Iterator[None]:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        yield
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


async def run_up(
    worker_settings: Any, service_settings: Any, dataset: str, rate: float | None,
    devices: int, display: bool,
) -> int:
    """Run replay, worker and service until SIGINT/SIGTERM; returns the exit code.

    ``worker_settings.bootstrap_servers == IN_PROCESS`` selects the in-process stream. The
    signal handlers come first: a Ctrl-C during start-up stops as one after it does.
    """
    stop = asyncio.Event()
    with _signals(stop):
        return await _run_up(worker_settings, service_settings, dataset, rate, devices, display,
                             stop)


async def _run_up(
    worker_settings: Any, service_settings: Any, dataset: str, rate: float | None,
    devices: int, display: bool, stop: asyncio.Event,
) -> int:
    from rich.console import Console
    from rich.live import Live

    from oclust.service.app import create_app
    from oclust.service.http import bind_socket, uvicorn_config
    from oclust.service.loader import ModelHolder, SnapshotWatcher
    from oclust.training_worker.monitor import WorkerMetrics
    from oclust.training_worker.producer import replay
    from oclust.training_worker.resume import current_snapshot
    from oclust.training_worker.store import StoreError, open_store
    from oclust.training_worker.stream import LocalStream
    from oclust.training_worker.trainer import TrainerHooks
    from oclust.training_worker.worker import TrainingWorker

    ws, ss = worker_settings, service_settings
    sock = bind_socket(ss.host, ss.port)
    url = f"http://{ss.host}:{sock.getsockname()[1]}"
    stream = None
    try:
        store = open_store(ws.store, ws.namespace, keep=ws.keep)
        if ws.bootstrap_servers == IN_PROCESS:
            stream = LocalStream()
            last = current_snapshot(store)  # the one the worker resumes from (a corrupt
            if last is not None:  # current one falls back), where its stream goes on
                stream.start_at(ws.topic, int(last.meta.offsets.get(f"{ws.topic}:0", 0)),
                                ws.consumer_group, snapshot=last.version)
            stream.bound(ws.topic, max(20 * ws.batch_size, 5000))
    except StoreError as exc:  # e.g. Redis not running: one line, exit 1, as worker and serve
        sock.close()
        raise options.fail(f"cannot use the store: {exc}") from None
    stats = LiveStats(ws.n_clusters)
    holder = ModelHolder()
    served = open_store(ss.store, ss.namespace, poll_interval=ss.poll_interval)
    watcher = SnapshotWatcher.for_settings(served, holder, ss)  # as oclust serve runs it
    app = create_app(ss, holder, background=[watcher])
    # the worker's metrics join the service's registry: one /metrics shows both
    worker = TrainingWorker(ws, store=store, metrics=WorkerMetrics(app.state.metrics.registry),
                            hooks=TrainerHooks(on_step=stats.on_step), stream=stream)
    config = uvicorn_config(app, ss)  # the same header and keep-alive timeouts as serve
    config.access_log, config.lifespan = False, "on"
    server = _server(config)
    started = time.monotonic()
    console = Console(stderr=True)
    source = "in-process stream" if stream else f"Kafka {ws.bootstrap_servers} topic {ws.topic}"
    console.print(f"[bold]oclust up[/]: {dataset} → {source} → worker ({ws.regulariser}, "
                  f"K={ws.n_clusters}) → {ws.store} → {url}  (live page {url}/, API docs "
                  f"{url}/docs)", highlight=False)
    server_task = asyncio.create_task(server.serve(sockets=[sock]))
    worker_task = asyncio.create_task(worker.run())
    replay_task = asyncio.create_task(replay(
        ws.bootstrap_servers, ws.topic, dataset, rate=rate, loop=True,
        devices=devices, progress=False, stream=stream,
    ))
    stopped = asyncio.create_task(stop.wait())
    tasks = {server_task, worker_task, replay_task, stopped}
    with Live(_render(stats, worker, url, started), console=console,
              refresh_per_second=2, transient=False) if display \
            else contextlib.nullcontext() as live:
        while not stopped.done():
            done, _ = await asyncio.wait(tasks, timeout=0.5,
                                         return_when=asyncio.FIRST_COMPLETED)
            if live is not None:
                live.update(_render(stats, worker, url, started))
            if done - {stopped}:
                break  # something ended on its own: shut the rest down
    if display and not console.is_terminal:
        console.line()  # the last render of the table ends without a newline
    worker_failed = worker_task.done() and not worker_task.cancelled() \
        and worker_task.exception() is not None
    console.print("stopping…" if worker_failed else "stopping: final snapshot…")
    replay_task.cancel()
    worker.request_stop()
    code = 0
    for name, task in (("replay", replay_task), ("worker", worker_task)):
        with contextlib.suppress(asyncio.CancelledError):
            try:
                await task
            except Exception as exc:  # reported, and the exit code says so
                log.error("%s failed: %s: %s", name, type(exc).__name__, exc)
                code = 1
    server.should_exit = True
    await server_task
    stopped.cancel()
    served.close()
    store.close()
    console.print(f"stopped; last snapshot version {worker.last_version or '—'} in {ws.store}")
    return code


def up_command(
    dataset: Annotated[str, Opt(help="digits, segments, basic_motions (HAR windows), "
                                     "fashion_mnist, or a reading stream cut into windows per "
                                     "device: daphnet, hapt (30 users)")] = "digits",
    host: _HostOpt = None,
    port: _PortOpt = None,
    store: _StoreOpt = None,
    namespace: Annotated[str | None, Opt(help="snapshot namespace (default up-DATASET)")] = None,
    bootstrap_servers: Annotated[
        str | None, Opt(help="Kafka HOST:PORT (default: an in-process stream)")
    ] = None,
    topic: Annotated[str | None, Opt(help="topic (default oclust-up-DATASET)")] = None,
    n_clusters: Annotated[int | None, Opt(min=2, help="K (default: the dataset's classes)")] = (
        None
    ),
    regulariser: _RegulariserOpt = None,
    prior: _PriorOpt = None,
    batch_size: _BatchSizeOpt = None,
    snapshot_interval: Annotated[float, Opt(min=0, help="seconds between snapshots")] = 5.0,
    rate: Annotated[float | None, Opt(min=0.001, help="replayed messages per second "
                                                      "(default: as fast as training)")] = None,
    window_size: Annotated[int | None, Opt(min=2, help="reading streams: readings per window "
                                                       "(daphnet 64, hapt 128)")] = None,
    devices: Annotated[int | None, Opt(min=1, help="daphnet only: simulated devices "
                                              "(default 2)")] = None,
    seed: _SeedOpt = None,
    quiet: Annotated[bool, Opt("--quiet", help="no live terminal display")] = False,
    log_level: options.LogLevelOpt = "warning",
) -> None:
    """Replay a dataset, train on it and serve it, in one process: no Kafka, no Redis needed."""
    from oclust.model.datasets import check_installed
    from oclust.service.cmd_eval import key_of
    from oclust.service.cmd_worker import check_store

    key = key_of(dataset).replace("-", "_")  # the names eval, train and produce take
    if key not in DEFAULT_K:
        raise typer.BadParameter(f"unknown dataset {dataset!r}; choose one of "
                                 f"{', '.join(DEFAULT_K)}", param_hint="--dataset")
    if devices is not None and key != "daphnet":
        raise typer.BadParameter(f"applies to daphnet only, not {key}", param_hint="--devices")
    if window_size is not None and key not in READING_STREAMS:
        raise typer.BadParameter(f"applies to the reading streams (daphnet, hapt) only, not "
                                 f"{key}", param_hint="--window-size")

    try:
        check_installed(key)  # before the port is bound and the banner printed
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--dataset") from None
    namespace = namespace or f"up-{key}"
    window = window_size or READING_STREAMS.get(key, 64)
    ws = options.build_settings(WorkerSettings, dict(
        bootstrap_servers=bootstrap_servers or IN_PROCESS,
        topic=topic or f"oclust-up-{key}", store=store, namespace=namespace,
        n_clusters=n_clusters or DEFAULT_K[key],
        regulariser=regulariser, prior=prior, batch_size=batch_size, batch_timeout=1.0,
        snapshot_interval=snapshot_interval, seed=seed, metrics_port=-1, torch_threads=1,
        mode="readings" if key in READING_STREAMS else "samples", window_size=window,
        window_hop=max(1, window // 2),
    ))
    ss = options.build_settings(ServiceSettings, dict(
        store=ws.store, namespace=namespace, host=host, port=port, poll_interval=0.5,
        log_level=log_level,
    ))
    options.setup_logging(log_level, rich=True)
    # a directory store is checked before the port is bound: waiting for it, as for a Redis not
    # up yet, never makes it writable
    check_store(ws.store, ws.namespace, ws.keep, directory_only=True)
    devices = devices or (2 if key == "daphnet" else 1)  # hapt brings its own 30 devices
    code = asyncio.run(run_up(ws, ss, key, rate, devices, display=not quiet))
    raise typer.Exit(code)


def register(app: typer.Typer) -> None:
    """Add ``up`` to the CLI."""
    app.command("up", cls=options.SettingsCommand)(up_command)
