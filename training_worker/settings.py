"""Worker configuration: pydantic-settings, environment prefix ``OCLUST_``; CLI options override.

Example:
    >>> s = WorkerSettings(topic="digits", n_clusters=10)
    >>> s.dlq_topic_name, s.consumer_group, round(s.collapse_threshold_nats, 3)
    ('digits.dlq', 'oclust-oclust', 1.151)
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from training_worker.codec import DEFAULT_MAX_ABS_FEATURE

__all__ = ["WorkerSettings"]


class WorkerSettings(BaseSettings):
    """Everything ``oclust worker`` reads; each field is also ``OCLUST_<FIELD>`` in the env."""

    model_config = SettingsConfigDict(env_prefix="OCLUST_", extra="ignore")

    # where from, where to
    bootstrap_servers: str = "127.0.0.1:9092"
    topic: str = "oclust-samples"
    group_id: str | None = None  # default: oclust-<namespace>
    auto_offset_reset: Literal["earliest", "latest"] = "earliest"
    session_timeout_ms: int = Field(10_000, ge=500)  # group membership; heartbeats every 1/3
    store: str = "file://.oclust/store"
    namespace: str = "oclust"
    keep: int = Field(5, ge=1)
    dlq_topic: str | None = None  # default: <topic>.dlq

    # messages
    mode: Literal["samples", "readings"] = "samples"
    encoding: Literal["auto", "json", "f32"] = "auto"
    max_message_bytes: int = Field(1 << 20, ge=16)
    window_size: int = Field(100, ge=1)
    window_hop: int | None = Field(None, ge=1)
    idle_after: int | None = Field(100_000, ge=1)
    max_abs_feature: float = Field(DEFAULT_MAX_ABS_FEATURE, gt=0)  # beyond: DLQ out_of_range
    max_label_classes: int = Field(1024, ge=1)  # live-quality labels at or above: ignored

    # model
    n_clusters: int = Field(10, ge=1)
    regulariser: str = "ca"
    prior: str | None = None  # uniform (default), online, or K comma-separated probabilities
    sigma: float | None = Field(None, gt=0)
    latent_dim: int | None = Field(None, ge=1)
    encoder: str = "auto"
    lr: float = Field(1e-3, gt=0)
    seed: int | None = 0
    device: str = "auto"
    torch_threads: int | None = Field(None, ge=1)  # intra-op threads of the training thread

    # loop
    batch_size: int = Field(256, ge=1)
    batch_timeout: float = Field(2.0, gt=0)  # seconds: a partial batch trains after this long
    snapshot_interval: float = Field(30.0, ge=0)  # 0: after every batch
    quality_window: int = Field(2000, ge=10)

    # collapse guard
    collapse_threshold: float | None = Field(None, ge=0)  # nats; default 0.5 * log K
    collapse_patience: int = Field(20, ge=1)  # consecutive low-entropy batches
    collapse_restore: bool = True

    # operations
    metrics_port: int = Field(9100, ge=-1)  # 0: any free port, -1: no metrics server
    metrics_host: str = "127.0.0.1"  # 0.0.0.0 to let a scraper on another host in
    lease_ttl: float = Field(10.0, gt=0)
    owner: str | None = None  # lease owner id; default host:pid

    # faults
    max_attempts: int = Field(3, ge=1)  # crashes on one message before it is dead-lettered
    offset_regression: Literal["reset", "exit"] = "reset"  # snapshot offsets beyond the log
    allow_fresh: bool = False  # start a fresh model although the group has committed offsets

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
        """The guard's entropy threshold (default half of log K)."""
        if self.collapse_threshold is not None:
            return self.collapse_threshold
        return 0.5 * math.log(self.n_clusters) if self.n_clusters > 1 else 0.0
