"""``oclust worker``, ``oclust produce`` and ``oclust train``: the training side of the CLI.

Every ``worker`` option is also read from ``OCLUST_<OPTION>`` (pydantic-settings); an option
given on the command line wins.

Example:
    $ oclust produce --dataset digits --topic digits --bootstrap-servers 127.0.0.1:9092
    $ oclust worker --bootstrap-servers 127.0.0.1:9092 --topic digits \\
          --store redis://127.0.0.1:6379/0 --namespace digits --n-clusters 10
    $ oclust train --dataset digits --store file://.oclust/store --n-clusters 10 --epochs 20
"""

from __future__ import annotations

import asyncio
import logging
import sys
from typing import Annotated, Any

import typer
from aiokafka.errors import KafkaError
from pydantic import ValidationError
from tqdm import tqdm

__all__ = ["produce_command", "register", "train_command", "worker_command"]

Opt = typer.Option
REGULARISER_HELP = "ca, sk, ent, ss, varm, cm, aecm, ckm, drc, tcc or none"
PRIOR_HELP = "uniform, online, or K comma-separated probabilities"
RegulariserOpt = Annotated[str, Opt(help=REGULARISER_HELP)]
PriorOpt = Annotated[str | None, Opt(help=PRIOR_HELP)]


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("aiokafka").setLevel(logging.WARNING)


def _fail(message: str) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(1)


def worker_command(
    bootstrap_servers: Annotated[str | None, Opt(help="Kafka HOST:PORT[,HOST:PORT]")] = None,
    topic: Annotated[str | None, Opt(help="topic to learn from")] = None,
    store: Annotated[str | None, Opt(help="redis://HOST:PORT/DB or file://DIR")] = None,
    namespace: Annotated[str | None, Opt(help="snapshot namespace (Redis key prefix)")] = None,
    n_clusters: Annotated[int | None, Opt(help="K")] = None,
    regulariser: Annotated[str | None, Opt(help=REGULARISER_HELP)] = None,
    prior: PriorOpt = None,
    batch_size: Annotated[int | None, Opt(help="samples per training step")] = None,
    batch_timeout: Annotated[
        float | None, Opt(help="seconds before a partial batch trains anyway")
    ] = None,
    snapshot_interval: Annotated[
        float | None, Opt(help="seconds between snapshots (0: every batch)")
    ] = None,
    mode: Annotated[str | None, Opt(help="samples or readings (per-device windows)")] = None,
    encoding: Annotated[str | None, Opt(help="auto (by header), json or f32")] = None,
    window_size: Annotated[int | None, Opt(help="readings per window (readings mode)")] = None,
    window_hop: Annotated[int | None, Opt(help="readings between windows")] = None,
    group_id: Annotated[str | None, Opt(help="consumer group (default oclust-NS)")] = None,
    dlq_topic: Annotated[str | None, Opt(help="dead-letter topic (default TOPIC.dlq)")] = None,
    latent_dim: Annotated[int | None, Opt(help="latent size of a fresh model")] = None,
    sigma: Annotated[float | None, Opt(help="sigma of a fresh model")] = None,
    lr: Annotated[float | None, Opt(help="learning rate of a fresh model")] = None,
    seed: Annotated[int | None, Opt(help="seed of a fresh model")] = None,
    device: Annotated[str | None, Opt(help="auto, cpu or cuda[:i]")] = None,
    torch_threads: Annotated[int | None, Opt(help="torch threads of the training step")] = None,
    keep: Annotated[int | None, Opt(help="snapshot versions kept in the store")] = None,
    collapse_threshold: Annotated[
        float | None, Opt(help="collapse guard threshold in nats (default 0.5 log K)")
    ] = None,
    collapse_patience: Annotated[
        int | None, Opt(help="low-entropy batches in a row before the guard fires")
    ] = None,
    collapse_restore: Annotated[
        bool | None, Opt("--collapse-restore/--no-collapse-restore",
                         help="restore the last healthy snapshot when the guard fires")
    ] = None,
    metrics_port: Annotated[int | None, Opt(help="/metrics port (0: any, -1: off)")] = None,
    lease_ttl: Annotated[float | None, Opt(help="seconds before an unrenewed lease lapses")] = None,
    session_timeout_ms: Annotated[
        int | None, Opt(help="consumer group session timeout in milliseconds")
    ] = None,
    log_level: Annotated[str, Opt(help="debug, info, warning, error")] = "info",
) -> None:
    """Learn clusters from a Kafka topic and publish versioned snapshots to the store."""
    from training_worker.settings import WorkerSettings
    from training_worker.store import StoreError
    from training_worker.worker import TrainingWorker

    cli = {k: v for k, v in locals().items() if v is not None and k in WorkerSettings.model_fields}
    try:
        settings = WorkerSettings(**cli)
    except ValidationError as exc:
        raise _fail(f"bad worker settings:\n{exc}") from None
    _setup_logging(log_level)
    worker = TrainingWorker(settings)
    try:
        code = asyncio.run(worker.run(handle_signals=True))
    except KafkaError as exc:
        raise _fail(f"Kafka at {settings.bootstrap_servers}: {exc}") from None
    except (StoreError, ValueError, OSError) as exc:
        raise _fail(f"{type(exc).__name__}: {exc}") from None
    raise typer.Exit(code)


def produce_command(
    dataset: Annotated[str, Opt(help="digits, segments, basic_motions or daphnet")],
    topic: Annotated[str, Opt(help="topic to write to (created if missing)")],
    bootstrap_servers: Annotated[
        str, Opt(envvar="OCLUST_BOOTSTRAP_SERVERS", help="Kafka HOST:PORT")
    ] = "127.0.0.1:9092",
    rate: Annotated[float | None, Opt(min=0.001, help="messages per second (default: max)")] = (
        None
    ),
    limit: Annotated[int | None, Opt(min=1, help="stop after this many messages")] = None,
    loop: Annotated[bool, Opt("--loop", help="replay the dataset forever")] = False,
    binary: Annotated[bool, Opt("--binary", help="float32 payloads instead of JSON")] = False,
    devices: Annotated[int, Opt(min=1, help="daphnet: simulated devices")] = 1,
    partitions: Annotated[int, Opt(min=1, help="partitions of a new topic")] = 1,
    samples_per_message: Annotated[int, Opt(
        min=1, help="pack this many samples into one float32 message (rows header)")] = 1,
    quiet: Annotated[bool, Opt("--quiet", help="no progress bar")] = False,
) -> None:
    """Stream a bundled dataset into a topic as sample (or reading) messages, labels included."""
    from training_worker.producer import replay

    try:
        sent = asyncio.run(replay(
            bootstrap_servers, topic, dataset, rate=rate, limit=limit, loop=loop, binary=binary,
            devices=devices, partitions=partitions, progress=not quiet,
            samples_per_message=samples_per_message,
        ))
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--dataset") from None
    except KafkaError as exc:
        raise _fail(f"Kafka at {bootstrap_servers}: {exc}") from None
    except KeyboardInterrupt:
        raise typer.Exit(130) from None
    typer.echo(f"sent {sent} messages to {topic}", err=True)


def train_command(
    n_clusters: Annotated[int, Opt(min=1, help="K")],
    dataset: Annotated[str | None, Opt(help="digits, segments, basic_motions or daphnet")] = None,
    input_path: Annotated[str | None, Opt("--input", help="a .npy or .csv file")] = None,
    store: Annotated[str, Opt(envvar="OCLUST_STORE", help="redis://HOST:PORT/DB or file://DIR")]
    = "file://.oclust/store",
    namespace: Annotated[str, Opt(envvar="OCLUST_NAMESPACE", help="snapshot namespace")] = (
        "oclust"
    ),
    epochs: Annotated[int, Opt(min=1, help="passes over the shuffled data")] = 10,
    regulariser: RegulariserOpt = "ca",
    prior: PriorOpt = None,
    batch_size: Annotated[int, Opt(min=2)] = 256,
    seed: Annotated[int, Opt()] = 0,
    latent_dim: Annotated[int | None, Opt()] = None,
    sigma: Annotated[float | None, Opt()] = None,
    device: Annotated[str, Opt(envvar="OCLUST_DEVICE", help="auto, cpu or cuda[:i]")] = "auto",
    window_size: Annotated[
        int | None, Opt(help="cut a reading stream (T×C) into C×T windows of this size")
    ] = None,
    window_hop: Annotated[int | None, Opt(help="readings between windows")] = None,
    keep: Annotated[int, Opt(min=1, help="snapshot versions kept in the store")] = 5,
) -> None:
    """Train offline on a dataset or file and publish the model as a snapshot."""
    from model.priors import parse_prior
    from training_worker.offline import (
        evaluate,
        load_input,
        make_windows,
        publish_model,
        train_offline,
    )
    from training_worker.store import StoreError, open_store

    try:
        X, y = load_input(dataset, input_path)
        if window_size is not None:
            X, y = make_windows(X, y, window_size, window_hop)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--dataset/--input") from None
    try:
        parsed_prior = parse_prior(prior)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--prior") from None
    params: dict[str, Any] = {
        k: v for k, v in {"latent_dim": latent_dim, "sigma": sigma, "prior": parsed_prior}.items()
        if v is not None
    }
    steps = epochs * -(-len(X) // batch_size)
    try:
        with tqdm(total=steps, desc="train", unit="step", file=sys.stderr) as bar:
            clf = train_offline(
                X, n_clusters, epochs=epochs, batch_size=batch_size, regulariser=regulariser,
                seed=seed, device=device, on_step=lambda _r: bar.update(1), **params,
            )
    except ValueError as exc:
        raise _fail(str(exc)) from None
    metrics = evaluate(clf, X, y)
    try:
        with open_store(store, namespace=namespace, keep=keep) as st:
            version = publish_model(st, clf, metrics)
            url = st.url
    except StoreError as exc:
        raise _fail(str(exc)) from None
    shown = ", ".join(f"{k} {v:.3f}" for k, v in metrics.items())
    typer.echo(f"published version {version} to {url} namespace {namespace!r}: {shown}")


def register(app: typer.Typer) -> None:
    """Add ``worker``, ``produce`` and ``train`` to the CLI."""
    app.command("worker")(worker_command)
    app.command("produce")(produce_command)
    app.command("train")(train_command)
