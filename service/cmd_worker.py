"""``oclust worker``, ``oclust produce`` and ``oclust train``: the training side of the CLI.

The ``worker`` and ``train`` options are the fields of
``oclust.training_worker.settings.WorkerSettings`` and ``TrainSettings``
(see :mod:`oclust.service.options`): each is also read from ``OCLUST_<OPTION>``, and an option given
on the command line wins.

Example:
    $ oclust produce --dataset digits --topic digits --bootstrap-servers 127.0.0.1:9092
    $ export OCLUST_STORE=redis://:PASSWORD@127.0.0.1:6379/0   # secrets: env, not argv
    $ oclust worker --bootstrap-servers 127.0.0.1:9092 --topic digits \\
          --namespace digits --n-clusters 10
    $ oclust train --dataset digits --store file://.oclust/store --n-clusters 10 --epochs 20
"""

from __future__ import annotations

import asyncio
import sys
from typing import Annotated

import typer

from oclust.service.options import (
    LogLevelOpt,
    SettingsCommand,
    build_settings,
    fail,
    field_option,
    settings_command,
    setup_logging,
)
from oclust.training_worker.settings import KafkaSettings, TrainSettings, WorkerSettings

__all__ = ["produce_command", "register", "train_command", "worker_command"]

Opt = typer.Option
DATASET_HELP = "digits, segments, basic_motions, fashion_mnist, daphnet or hapt (readings)"
_BootstrapOpt = field_option(KafkaSettings, "bootstrap_servers")


@settings_command(WorkerSettings)
def worker_command(settings: WorkerSettings, log_level: LogLevelOpt = "info") -> None:
    """Learn clusters from a Kafka topic and publish versioned snapshots to the store.

    Every option is also read from OCLUST_<OPTION>; an option given here wins.
    """
    from aiokafka.errors import KafkaError

    from oclust.training_worker.store import StoreError
    from oclust.training_worker.trainer import ModelBroken
    from oclust.training_worker.worker import TrainingWorker, WorkerHalt

    setup_logging(log_level)
    # a directory store is checked now: waiting for it, as for a Redis not up yet, never
    # makes it writable
    check_store(settings.store, settings.namespace, settings.keep, directory_only=True)
    worker = TrainingWorker(settings)
    try:
        code = asyncio.run(worker.run(handle_signals=True))
    except KafkaError as exc:
        raise fail(f"Kafka at {settings.bootstrap_servers}: {exc}") from None
    except (WorkerHalt, ModelBroken) as exc:
        raise fail(str(exc)) from None
    except (StoreError, ValueError, OSError, FloatingPointError) as exc:
        raise fail(f"{type(exc).__name__}: {exc}") from None
    raise typer.Exit(code)


def produce_command(
    dataset: Annotated[str, Opt(help=DATASET_HELP)],
    topic: Annotated[str, Opt(help="topic to write to (created if missing)")],
    bootstrap_servers: _BootstrapOpt = None,
    rate: Annotated[float | None, Opt(min=0.001, help="messages per second (default: max; "
                                     "hapt: 1500 is 50 Hz per user while all 30 send)")] = (
        None
    ),
    limit: Annotated[int | None, Opt(min=1, help="stop after this many messages")] = None,
    loop: Annotated[bool, Opt("--loop", help="replay the dataset forever")] = False,
    binary: Annotated[bool, Opt("--binary", help="float32 payloads instead of JSON")] = False,
    devices: Annotated[int, Opt(min=1, help="daphnet only: simulated devices")] = 1,
    partitions: Annotated[int, Opt(min=1, help="partitions of a new topic")] = 1,
    samples_per_message: Annotated[int, Opt(
        min=1, help="pack this many samples into one float32 message (rows header)")] = 1,
    quiet: Annotated[bool, Opt("--quiet", help="no progress bar")] = False,
) -> None:
    """Stream a bundled dataset into a topic as sample (or reading) messages, labels included."""
    from aiokafka.errors import KafkaError

    from oclust.model.datasets import DATASETS, check_installed
    from oclust.service.cmd_eval import key_of
    from oclust.training_worker.producer import misused_option, replay

    bootstrap_servers = build_settings(
        KafkaSettings, {"bootstrap_servers": bootstrap_servers}
    ).bootstrap_servers
    # the dataset's own errors, before any work: a later ValueError is not the dataset's
    if key_of(dataset) not in DATASETS:
        raise typer.BadParameter(f"unknown dataset {dataset!r}; choose from "
                                 f"{', '.join(DATASETS)}", param_hint="--dataset")
    misused = misused_option(dataset, devices, samples_per_message)
    if misused:
        option, why = misused
        raise typer.BadParameter(why, param_hint="--" + option.replace("_", "-"))
    try:
        check_installed(dataset)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--dataset") from None
    try:
        sent = asyncio.run(replay(
            bootstrap_servers, topic, dataset, rate=rate, limit=limit, loop=loop, binary=binary,
            devices=devices, partitions=partitions, progress=not quiet,
            samples_per_message=samples_per_message,
        ))
    except ValueError as exc:  # e.g. a dataset file that cannot be read
        raise fail(str(exc)) from None
    except KafkaError as exc:
        raise fail(f"Kafka at {bootstrap_servers}: {exc}") from None
    except KeyboardInterrupt:
        raise typer.Exit(130) from None
    typer.echo(f"sent {sent} messages to {topic}", err=True)


@settings_command(TrainSettings)
def train_command(settings: TrainSettings) -> None:
    """Train offline on a dataset or file and publish the model as a snapshot.

    K defaults to a named dataset's class count; daphnet (a reading stream) is cut into windows
    of 64 readings, half overlapping, as in ``oclust up``. Every option is also read from
    OCLUST_<OPTION>; an option given here wins.
    """
    from tqdm import tqdm

    from oclust.model.priors import parse_prior
    from oclust.model.snapshot import SnapshotError
    from oclust.service.cmd_eval import key_of
    from oclust.service.cmd_up import DEFAULT_K, READING_STREAMS
    from oclust.training_worker.offline import (
        evaluate,
        load_input,
        make_windows,
        publish_model,
        train_offline,
    )
    from oclust.training_worker.settings import check_prior
    from oclust.training_worker.store import StoreError, open_store

    s = settings
    key = key_of(s.dataset) if s.dataset is not None else None
    windowed = s.window_size is not None or s.window_hop is not None
    if windowed and key in DEFAULT_K and key != "daphnet":  # hapt loads as labelled windows
        raise typer.BadParameter(
            f"cuts a (T, C) reading stream into windows (daphnet, or an --input file); {key} "
            "loads as samples", param_hint="--window-size/--window-hop")
    size, hop = s.window_size, s.window_hop
    if key == "daphnet" and size is None:
        size, hop = READING_STREAMS[key], hop or READING_STREAMS[key] // 2
    if hop is not None and size is None:  # an --input file has no window size of its own
        raise typer.BadParameter("needs --window-size: the readings per window",
                                 param_hint="'--window-hop'")
    # K given (on the command line or in OCLUST_N_CLUSTERS), else the dataset's classes, else 10
    k = s.n_clusters or DEFAULT_K.get(key or "", 10)
    try:  # the settings checked a prior against a given K only
        check_prior(s.prior, k)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="'--prior'") from None
    try:
        X, y = load_input(s.dataset, s.input)
        if size is not None:
            X, y = make_windows(X, y, size, hop)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--dataset/--input") from None
    if k > len(X):  # more clusters than samples: most would stay empty, KL* meaningless
        raise typer.BadParameter(f"{k} clusters for {len(X)} samples: give at most "
                                 f"{len(X)} (or more data)", param_hint="--n-clusters")
    priors = {"prior": parse_prior(s.prior), "prior_params": s.prior_params}
    params = {**s.model_params, **{n: v for n, v in priors.items() if v is not None}}
    check_train_params(X.shape[1:], k, s, params)  # the model is built at its first batch
    # before training: a store that cannot take the snapshot failed after training
    check_store(s.store, s.namespace, s.keep)
    steps = s.epochs * -(-len(X) // s.batch_size)
    try:
        with tqdm(total=steps, desc="train", unit="step", file=sys.stderr) as bar:
            clf = train_offline(
                X, k, epochs=s.epochs, batch_size=s.batch_size,
                regulariser=s.regulariser, seed=s.seed, device=s.device,
                on_step=lambda _r: bar.update(1),
                **params,
            )
    except ValueError as exc:
        raise fail(str(exc)) from None
    metrics = evaluate(clf, X, y)
    try:
        with open_store(s.store, namespace=s.namespace, keep=s.keep) as st:
            version = publish_model(st, clf, metrics, inputs=X if s.store_sample else None)
            url = st.url
    except (StoreError, SnapshotError) as exc:  # SnapshotError: a model that answers NaN
        raise fail(str(exc)) from None
    shown = ", ".join(f"{k} {v:.3f}" for k, v in metrics.items())
    typer.echo(f"published version {version} to {url} namespace {s.namespace!r}: {shown}")


def check_train_params(shape: tuple[int, ...], k: int, s: TrainSettings,
                       params: dict[str, object]) -> None:
    """Exit 2 naming the option unless ``oclust train``'s model can be built for samples of
    ``shape`` (e.g. ``--latent-dim 2`` with the LayerNorm latents of vectors), before any
    training."""
    from oclust.model import OnlineClusterer
    from oclust.service.cmd_eval import model_option

    try:
        OnlineClusterer(n_clusters=k, regulariser=s.regulariser, seed=s.seed, device=s.device,
                        **params).validate_params(shape)  # type: ignore[arg-type]
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint=model_option(exc)) from None


def check_store(url: str, namespace: str, keep: int | None, directory_only: bool = False
                ) -> None:
    """Exit 1 with one ``error: cannot use the store`` line unless the store at ``url``
    answers and takes writes (``directory_only``: check a ``file://`` store only)."""
    from oclust.training_worker.store import DirectoryStore, StoreError, open_store

    try:
        with open_store(url, namespace=namespace, keep=keep) as store:
            if directory_only and not isinstance(store, DirectoryStore):
                return
            usable, where = store.ping(), store.url
    except StoreError as exc:
        raise fail(f"cannot use the store: {exc}") from None
    if not usable:
        raise fail(f"cannot use the store {where}: it does not answer or cannot be written")


def register(app: typer.Typer) -> None:
    """Add ``worker``, ``produce`` and ``train`` to the CLI."""
    app.command("worker", cls=SettingsCommand)(worker_command)
    app.command("produce")(produce_command)
    app.command("train", cls=SettingsCommand)(train_command)
