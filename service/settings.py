"""Service configuration: pydantic-settings, environment prefix ``OCLUST_``; CLI options override.

Each field is also an ``oclust serve`` option (see :mod:`oclust.service.options`), except the API
key, which is read from the environment only.

Example:
    >>> s = ServiceSettings(api_key="s3cret", max_batch=128)
    >>> s.api_key.get_secret_value(), s.max_batch, s.window
    ('s3cret', 128, 1000)
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, SecretStr, field_validator

from oclust.training_worker.settings import (
    FLOAT32_MAX,
    MAX_ABS_FEATURE,
    StoreLocation,
    check_device,
    seconds_field,
)

__all__ = ["ServiceSettings"]


class ServiceSettings(StoreLocation):
    """Everything ``oclust serve`` reads; each field is also ``OCLUST_<FIELD>`` in the env."""

    # where the snapshots come from (store, namespace: StoreLocation)
    poll_interval: float = seconds_field(  # finite: the watcher waits on these
        1.0, "between polls of the current version (pub/sub fallback)", finite=True)
    retry_interval: float = seconds_field(
        2.0, "of the first pause after a failed store attempt (doubles at each failure, capped)",
        finite=True)
    max_retry_interval: float = seconds_field(
        30.0, "of the longest pause between failed attempts", finite=True)
    device: str = Field(
        "cpu", description="torch device of models served by torch (MLPs run in the CPU kernel)"
    )

    # HTTP
    host: str = Field("127.0.0.1", description="bind address")
    port: int = Field(8000, ge=0, le=65535, description="TCP port")
    api_key: SecretStr | None = Field(
        None, description="when set, /assign* require it in the X-API-Key header (or as "
        "`Authorization: Bearer KEY`), and so do the endpoints below that are protected"
    )
    protect_model: bool = Field(True, description="with an API key, /model requires it too")
    protect_stats: bool = Field(True, description="with an API key, /stats* require it too")
    protect_metrics: bool = Field(True, description="with an API key, /metrics requires it too")
    header_timeout: float = seconds_field(10.0, "a client may take to send a request's headers")
    body_timeout: float = seconds_field(30.0, "a client may take to send a request body (else 408)")
    keep_alive_timeout: int = Field(
        5, ge=1, description="seconds an idle keep-alive connection stays open"
    )
    max_batch: int = Field(4096, ge=1, description="most items in one /assign/batch request")
    max_body_bytes: int = Field(
        16 * 1024 * 1024, ge=64, description="largest accepted request body in bytes (else 413)"
    )
    access_log: bool = Field(False, description="log every request (costs throughput)")
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        "info", description="log level: debug, info, warning or error"
    )

    # inference and monitoring
    torch_threads: int = Field(
        1, ge=1, description="inference threads: torch's intra-op threads for a model served "
        "by torch, the BLAS threads of the compiled kernel otherwise (set when a model loads)"
    )
    inline_body_bytes: int = Field(
        64 * 1024, ge=0, description="batch bodies up to this size run on the event loop, "
        "larger ones in a worker thread (keeps the loop responsive)"
    )
    window: int = Field(1000, ge=1, description="sliding window of recent assignments (monitor)")
    max_abs_feature: float = Field(
        MAX_ABS_FEATURE, gt=0, le=FLOAT32_MAX, allow_inf_nan=False,
        description="largest accepted feature magnitude (else 422 out_of_range; finite, at most "
        "float32's largest value)"
    )

    @field_validator("log_level", mode="before")
    @classmethod
    def _lower_level(cls, value: Any) -> Any:
        return value.lower() if isinstance(value, str) else value

    @field_validator("device")
    @classmethod
    def _device_known(cls, value: str) -> str:  # else every torch snapshot is refused, forever
        return check_device(value)

    @field_validator("api_key")
    @classmethod
    def _key_not_empty(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and not value.get_secret_value().strip():  # it turned auth off
            raise ValueError("OCLUST_API_KEY is set but empty: unset it to serve without a key")
        return value
