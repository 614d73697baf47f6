"""Worker and training configuration: pydantic-settings, environment prefix ``OCLUST_``.

These classes are the single source of the command line's options: every field becomes an
``oclust`` option of the same name (``batch_size`` -> ``--batch-size``) with the field's default,
description and checks, and is also read from ``OCLUST_<FIELD>``. Values that would only fail
later (an unknown regulariser, a prior that does not fit K, a store URL nobody can open) are
rejected when the settings are built, before any work, lease or progress bar.

Example:
    >>> s = WorkerSettings(topic="digits", n_clusters=10)
    >>> s.dlq_topic_name, s.consumer_group, round(s.collapse_threshold_nats, 3)
    ('digits.dlq', 'oclust-oclust', 1.151)
    >>> WorkerSettings(store="ftp://x")
    Traceback (most recent call last):
    ...
    pydantic_core._pydantic_core.ValidationError: 1 validation error for WorkerSettings
    store
      Value error, unknown store URL scheme 'ftp' in 'ftp://x': use redis:// or file:// ...
"""

from __future__ import annotations

import math
import re
from typing import Any, Literal
from urllib.parse import urlparse, urlsplit

from pydantic import Field, ValidationInfo, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = [
    "DEFAULT_STORE",
    "FLOAT32_MAX",
    "IN_PROCESS",
    "MAX_ABS_FEATURE",
    "KafkaSettings",
    "ModelSettings",
    "StoreLocation",
    "StoreSettings",
    "TrainSettings",
    "WorkerSettings",
    "check_bootstrap_servers",
    "check_device",
    "check_encoder",
    "check_init",
    "check_prior",
    "check_regulariser",
    "check_store_url",
    "regulariser_names",
    "seconds_field",
]

DEFAULT_STORE = "file://.oclust/store"
IN_PROCESS = "in-process"  # the bootstrap servers of ``oclust up``'s in-process stream
STORE_SCHEMES = ("redis", "rediss", "unix", "file", "")

MAX_ABS_FEATURE = 1e6  # larger finite features are refused (DLQ out_of_range, HTTP 422)
FLOAT32_MAX = float.fromhex("0x1.fffffep+127")  # float32's largest value (no numpy here)


def seconds_field(default: float, description: str, finite: bool = False) -> Any:
    """A settings field holding a positive duration (``inf`` allowed unless ``finite``); its
    description starts "seconds …"."""
    return Field(default, gt=0, allow_inf_nan=not finite, description=f"seconds {description}")


def check_store_url(url: str) -> str:
    """``url`` if a store can be opened from it (scheme only: nothing connects).

    >>> check_store_url("redis://127.0.0.1:6379/0")
    'redis://127.0.0.1:6379/0'
    """
    if not url:
        raise ValueError("no store given: pass redis://HOST:PORT/DB or file://DIR")
    parsed = urlparse(url)
    if parsed.scheme not in STORE_SCHEMES:
        raise ValueError(f"unknown store URL scheme {parsed.scheme!r} in {url!r}: use redis:// or "
                         "file://")
    if parsed.scheme in ("redis", "rediss"):
        try:
            _ = parsed.hostname, parsed.port  # both parse lazily: a bad one raises here
        except ValueError as exc:  # redis-py's own ValueError was a traceback
            raise ValueError(f"bad host or port in the Redis URL: {exc}") from None
        if not re.fullmatch(r"/?[0-9]*", parsed.path):  # redis-py took /abc for database 0
            raise ValueError(f"the Redis database {parsed.path[1:]!r} is not a non-negative "
                             "integer: use redis://HOST:PORT/DB")
    return url


def check_bootstrap_servers(servers: str) -> str:
    """``servers`` if it is comma-separated HOST:PORT, each port 1 to 65535 (an IPv6 address
    in brackets), or :data:`IN_PROCESS`, the stream of ``oclust up``.

    >>> check_bootstrap_servers("kafka-0:9092,[::1]:9093")
    'kafka-0:9092,[::1]:9093'
    >>> check_bootstrap_servers("127.0.0.1:99999")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: '127.0.0.1:99999' is not HOST:PORT with a port from 1 to 65535 (Port out of ...)
    """
    if servers == IN_PROCESS:
        return servers
    for server in (s.strip() for s in servers.split(",")):
        why = ""
        try:  # aiokafka's own parsing raised OverflowError or blamed something else
            parts = urlsplit("//" + server)
            ok = bool(parts.hostname) and parts.netloc == server and "@" not in server \
                and 1 <= (parts.port or 0) <= 65535
        except ValueError as exc:  # a port that is no number or out of range, a bad [address]
            ok, why = False, f" ({exc})"
        if not ok:
            raise ValueError(f"{server!r} is not HOST:PORT with a port from 1 to 65535{why}")
    return servers


def regulariser_names() -> list[str]:
    """The registered regulariser names (imports the model library, so torch, on first call)."""
    import oclust.model  # noqa: F401  (registers every built-in regulariser)
    from oclust.model.regularisers import REGULARISERS

    return sorted(REGULARISERS)


def check_regulariser(name: str) -> str:
    """``name`` if it is in the regulariser registry."""
    names = regulariser_names()
    if name not in names:
        raise ValueError(f"unknown regulariser {name!r}; choose from {', '.join(names)}")
    return name


def check_device(device: str) -> str:
    """``device`` if it is ``auto``, ``cpu``, or a device torch understands and, for CUDA, has
    (``cuda:1`` on a machine with two GPUs). ``auto`` and ``cpu`` never import torch.

    >>> check_device("cpu"), check_device("auto")
    ('cpu', 'auto')
    """
    if device in ("auto", "cpu"):
        return device
    import torch

    try:
        parsed = torch.device(device)
    except RuntimeError as exc:
        raise ValueError(f"unknown device {device!r}: use auto, cpu or cuda[:i]") from exc
    if parsed.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (parsed.index or 0) >= count:
            raise ValueError(f"device {device!r} is not available: torch sees {count} CUDA "
                             "device(s) here (use auto or cpu)")
    return device


def check_namespace(namespace: str) -> str:
    """``namespace`` if a store takes it (``ValueError`` otherwise: a settings check)."""
    from oclust.training_worker.store.base import StoreError
    from oclust.training_worker.store.base import check_namespace as store_check

    try:
        return store_check(namespace)
    except StoreError as exc:
        raise ValueError(str(exc)) from None


def check_encoder(encoder: str) -> str:
    """``encoder`` if it is ``auto`` or a known encoder kind."""
    from oclust.model.encoder_config import ENCODERS

    if encoder != "auto" and encoder not in ENCODERS:
        raise ValueError(f"unknown encoder {encoder!r}; choose from auto, {', '.join(ENCODERS)}")
    return encoder


def check_init(init: str) -> str:
    """``init`` if it is a centroid seeding the clusterer knows (``auto`` among them)."""
    from oclust.model.validation import INITS

    if init not in INITS:
        raise ValueError(f"unknown seeding {init!r}; choose from {', '.join(INITS)}")
    return init


def check_prior(text: str | None, n_clusters: int) -> str | None:
    """``text`` if it is ``uniform``, ``online`` or K comma-separated probabilities."""
    from oclust.model.priors import parse_prior, resolve_prior

    resolve_prior(parse_prior(text), n_clusters)
    return text


class _Env(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="OCLUST_", extra="ignore")


class StoreLocation(_Env):
    """Where the snapshots live."""

    store: str = Field(DEFAULT_STORE, description="redis://HOST:PORT/DB or file://DIR")
    namespace: str = Field("oclust", description="snapshot namespace (Redis key prefix)")

    @field_validator("store")
    @classmethod
    def _store_opens(cls, value: str) -> str:
        return check_store_url(value)

    @field_validator("namespace")
    @classmethod
    def _namespace_valid(cls, value: str) -> str:
        return check_namespace(value)


class StoreSettings(StoreLocation):
    """A store that is written to."""

    keep: int = Field(5, ge=1, description="snapshot versions kept in the store")
    store_sample: bool = Field(
        True, description="store a sample of the inputs (raw, at most 1 MiB) with each snapshot: "
        "a worker resumed from it judges its snapshots on them too"
    )


class ModelSettings(_Env):
    """A fresh model's hyper-parameters (a stored snapshot's own win when training resumes)."""

    n_clusters: int = Field(10, ge=1, description="K, the number of clusters")
    regulariser: str = Field("ca", description="collapse regulariser (a registered name)")
    prior: str | None = Field(
        None, description="cluster prior: uniform, online, or K comma-separated probabilities"
    )
    prior_max_kl: float | None = Field(
        None, ge=0, allow_inf_nan=False,
        description="--prior online: cap on KL(prior || uniform) of a fresh model, nats "
        "(default 0.1; a resumed snapshot keeps its own)"
    )
    sigma: float | None = Field(  # inf would train nothing: every batch refused
        None, gt=0, allow_inf_nan=False, description="sigma of a fresh model (default 10 for "
        "vectors, 50 for images, whose encoder trains raw latents, and for windows 50 with "
        "ca, 10 with the other regularisers)"
    )
    latent_dim: int | None = Field(None, ge=1, description="latent size of a fresh model")
    input_clip: float | None = Field(
        None, gt=0, description="a fresh model clips its standardised inputs to ± this many "
        "standard deviations (default 5; inf: no clip)"
    )
    views: bool | None = Field(
        None, description="a fresh model also trains on an augmented view of each batch "
        "(default: on for images with the ca regulariser, else off; doubles the encoder's work)"
    )
    init: str | None = Field(
        None, description="centroid seeding of a fresh model: auto, kmeans, inputs (a "
        "balanced k-means of the first batch's inputs), kmeans++, normal or centred (default "
        "auto: kmeans for vectors and windows, centred for images)"
    )
    input_guide: int | None = Field(
        None, ge=0, description="a fresh model's ca assignment also weighs each input's "
        "distance to its cluster's mean input over its first N steps, blended out (default: "
        "200 for vectors with ca and standardised inputs, else 0: never)"
    )
    seed: int | None = Field(
        0, ge=0, le=2**32 - 1, description="seed of a fresh model (0 to 2**32 - 1)"
    )
    device: str = Field("auto", description="auto, cpu or cuda[:i]")
    batch_size: int = Field(256, ge=1, description="samples per training step")

    @field_validator("regulariser")
    @classmethod
    def _regulariser_registered(cls, value: str) -> str:
        return check_regulariser(value)

    @field_validator("device")
    @classmethod
    def _device_known(cls, value: str) -> str:
        return check_device(value)

    @field_validator("prior")
    @classmethod
    def _prior_fits_k(cls, value: str | None, info: ValidationInfo) -> str | None:
        k = info.data.get("n_clusters")
        return value if k is None else check_prior(value, k)

    @field_validator("input_clip")
    @classmethod
    def _clip_bounded(cls, value: float | None) -> float | None:
        from oclust.model.validation import clip_option  # only when given: --help stays light

        if value is not None:
            clip_option(value)
        return value

    @field_validator("init")
    @classmethod
    def _init_known(cls, value: str | None) -> str | None:
        return value if value is None else check_init(value)

    @field_validator("input_guide")
    @classmethod
    def _guide_needs_ca(cls, value: int | None, info: ValidationInfo) -> int | None:
        from oclust.model.validation import check_input_guide  # only when given

        if value is not None:
            check_input_guide(value, info.data.get("regulariser", "ca"))
        return value

    @field_validator("prior_max_kl")
    @classmethod
    def _cap_needs_online(cls, value: float | None, info: ValidationInfo) -> float | None:
        if value is not None and (info.data.get("prior") or "").strip() != "online":
            raise ValueError("the KL cap applies to the online prior only: add --prior online")
        return value

    @property
    def model_params(self) -> dict[str, Any]:
        """The set hyper-parameters of a fresh model, as ``OnlineClusterer`` keywords (the others
        keep the clusterer's defaults).

        >>> ModelSettings(sigma=5.0, input_clip=float("inf")).model_params
        {'sigma': 5.0, 'clip': None}
        """
        from oclust.model.validation import clip_option

        params: dict[str, Any] = {
            "sigma": self.sigma, "latent_dim": self.latent_dim, "views": self.views,
            "init": self.init, "input_guide": self.input_guide,
        }
        params = {k: v for k, v in params.items() if v is not None}
        if self.input_clip is not None:
            params["clip"] = clip_option(self.input_clip)
        return params

    @property
    def prior_params(self) -> dict[str, float] | None:
        """``OnlineClusterer(prior_params=...)`` of a fresh model: the online prior's cap."""
        return None if self.prior_max_kl is None else {"max_kl": self.prior_max_kl}


def check_threshold(threshold: float | None, n_clusters: int) -> None:
    """``ValueError`` unless a set collapse threshold is below log K, the entropy of K equal
    clusters: at or above it no window is ever healthy, and nothing would be published.

    >>> try:
    ...     check_threshold(3.0, 10)
    ... except ValueError as exc:
    ...     print(str(exc)[:64])
    collapse_threshold 3 nats is at or above log K = 2.303 (K = 10):
    """
    if threshold is not None and threshold >= math.log(n_clusters) and n_clusters > 1:
        raise ValueError(
            f"collapse_threshold {threshold:g} nats is at or above log K = "
            f"{math.log(n_clusters):.3f} (K = {n_clusters}): no served window can reach it, so "
            "no snapshot would ever be published; give less (default 0.5 log K)")


class KafkaSettings(_Env):
    """Where Kafka is (``oclust worker`` and ``oclust produce``)."""

    bootstrap_servers: str = Field("127.0.0.1:9092", description="Kafka HOST:PORT[,HOST:PORT]")

    @field_validator("bootstrap_servers")
    @classmethod
    def _servers_parse(cls, value: str) -> str:
        return check_bootstrap_servers(value)


class WorkerSettings(StoreSettings, ModelSettings, KafkaSettings):
    """Everything ``oclust worker`` reads; each field is also ``OCLUST_<FIELD>`` in the env."""

    # where from (bootstrap_servers: KafkaSettings)
    topic: str = Field("oclust-samples", description="topic to learn from")
    group_id: str | None = Field(None, description="consumer group (default oclust-NAMESPACE)")
    auto_offset_reset: Literal["earliest", "latest"] = Field(
        "earliest", description="where a new consumer group starts"
    )
    session_timeout_ms: int = Field(
        10_000, ge=500, description="consumer group session timeout in milliseconds"
    )
    dlq_topic: str | None = Field(None, description="dead-letter topic (default TOPIC.dlq)")

    # messages
    mode: Literal["samples", "readings"] = Field(
        "samples", description="samples, or readings cut into per-device windows"
    )
    encoding: Literal["auto", "json", "f32"] = Field(
        "auto", description="message encoding (auto: by header)"
    )
    max_message_bytes: int = Field(1 << 20, ge=16, description="larger messages are dead letters")
    window_size: int = Field(100, ge=1, description="readings per window (readings mode)")
    window_hop: int | None = Field(
        None, ge=1, description="readings between windows (default: the window size)"
    )
    idle_after: int | None = Field(
        100_000, ge=1, description="readings after which a silent device's buffer is dropped"
    )
    max_abs_feature: float = Field(
        MAX_ABS_FEATURE, gt=0, le=FLOAT32_MAX, allow_inf_nan=False,
        description="features beyond ± this go to the DLQ as out_of_range (finite, at most "
        "float32's largest value)"
    )
    max_label_classes: int = Field(
        1024, ge=1, description="labels at or above are ignored by the live ACC/NMI (counted)"
    )

    # model
    encoder: str = Field("auto", description="encoder of a fresh model (auto: by input shape)")
    lr: float = Field(
        1e-3, gt=0, allow_inf_nan=False, description="learning rate of a fresh model"
    )
    torch_threads: int | None = Field(
        None, ge=1, description="torch intra-op threads of the training step"
    )
    train_process: bool = Field(
        True, description="train in a child process fed through shared memory (off: in a "
        "thread of the worker, sharing its interpreter lock with fetch and decode)"
    )
    train_timeout: float = seconds_field(
        300.0, "the training process may leave the worker's commands (a step, a snapshot, the "
        "final export) unanswered, or the training thread run one call, before it counts as "
        "hung: the process is killed (a thread is left behind) and the worker exits 1, as when "
        "it dies", finite=True,
    )

    @field_validator("encoder")
    @classmethod
    def _encoder_known(cls, value: str) -> str:
        return check_encoder(value)

    # loop
    batch_timeout: float = seconds_field(2.0, "before a partial batch trains anyway")
    snapshot_interval: float = Field(
        30.0, ge=0, description="seconds between snapshots (0: after every batch)"
    )
    quality_window: int = Field(2000, ge=10, description="labelled samples in the live ACC/NMI")

    # collapse guard
    collapse_threshold: float | None = Field(
        None, ge=0, allow_inf_nan=False,
        description="collapse guard threshold in nats (default half the entropy of the "
        "configured prior: 0.5 log K for uniform and online; a resumed snapshot's prior wins)"
    )
    collapse_patience: int = Field(
        20, ge=1, description="low-entropy batches in a row before the guard fires"
    )
    collapse_window: int | None = Field(
        None, ge=1, description="served samples the guard judges (default 20 × K; at least 10 × K "
        "and a batch)"
    )
    collapse_restore: bool = Field(
        True, description="restore the last healthy snapshot when the guard fires"
    )

    # operations
    metrics_port: int = Field(
        9100, ge=-1, le=65535, description="/metrics port (0: any free, -1: off)"
    )
    metrics_host: str = Field(
        "127.0.0.1", description="/metrics address (0.0.0.0 to let a scraper on another host in)"
    )
    lease_ttl: float = Field(  # Redis refuses an expiry under 1 ms; renewed every third of it
        10.0, ge=1.0, le=86_400.0, allow_inf_nan=False,
        description="seconds before an unrenewed lease lapses (1 to 86,400)",
    )
    owner: str | None = Field(None, description="lease owner id (default HOST:PID)")

    # faults
    max_attempts: int = Field(
        3, ge=1, description="worker deaths on one message before it is dead-lettered"
    )
    offset_regression: Literal["reset", "exit"] = Field(
        "reset", description="snapshot offsets beyond the log: reset (train the new log) or exit"
    )
    allow_fresh: bool = Field(
        False, description="start a fresh model although the consumer group has committed "
        "offsets (the store was emptied)"
    )

    @model_validator(mode="after")
    def _threshold_reachable(self) -> WorkerSettings:
        check_threshold(self.collapse_threshold, self.n_clusters)
        return self

    @property
    def dlq_topic_name(self) -> str:
        """``dlq_topic`` or ``<topic>.dlq``."""
        return self.dlq_topic or f"{self.topic}.dlq"

    @property
    def consumer_group(self) -> str:
        """``group_id`` or ``oclust-<namespace>``."""
        return self.group_id or f"oclust-{self.namespace}"

    @property
    def collapse_threshold_nats(self) -> float:
        """The guard's entropy threshold: by default half the entropy of the prior (0.5 log K
        for the uniform and the online prior, less for a fixed uneven one)."""
        if self.collapse_threshold is not None:
            return self.collapse_threshold
        from oclust.model.priors import parse_prior
        from oclust.training_worker.monitor import default_threshold

        return default_threshold(parse_prior(self.prior), self.n_clusters)


class TrainSettings(StoreSettings, ModelSettings):
    """Everything ``oclust train`` reads: offline training on a dataset or a file.

    Example:
        >>> TrainSettings(dataset="digits").epochs
        10
    """

    dataset: str | None = Field(
        None, description="digits, segments, basic_motions, fashion_mnist, hapt or daphnet"
    )
    # K comes from the dataset when not given: a --prior is checked against it then, not here
    n_clusters: int | None = Field(  # type: ignore[assignment]
        None, ge=1, description="K, the number of clusters (default: a named dataset's "
        "classes, else 10)"
    )
    input: str | None = Field(None, description="a .npy or .csv file instead of a dataset")
    epochs: int = Field(10, ge=1, description="passes over the shuffled data")
    batch_size: int = Field(256, ge=2, description="samples per training step")
    window_size: int | None = Field(
        None, ge=2, description="cut a reading stream (T×C) into C×T windows of this size"
    )
    window_hop: int | None = Field(
        None, ge=1, description="readings between windows (default: the window size)"
    )
