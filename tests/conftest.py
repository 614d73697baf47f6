"""Shared fixtures: a real Kafka-protocol broker (Tansu) and a real redis-server (pytest-redis).

* ``tansu_broker`` / ``kafka_bootstrap`` (session): ``"127.0.0.1:PORT"`` of one Tansu broker.
  Tests share it, so each test uses its own topic names (see ``unique_topic``).
* ``redis_server`` (session): the pytest-redis executor (a redis-server on a free port).
* ``redis_url`` (function): ``"redis://127.0.0.1:PORT/0"``, database flushed before and after.
* ``redis_store_url`` (function): same server, database 1, flushed; for a second store.
"""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Iterator

import pytest
import redis
from pytest_redis import factories

from oclust.training_worker.devbroker import TansuBroker

redis_server = factories.redis_proc(port=None)


@pytest.fixture(scope="session")
def tansu_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Bootstrap string of a Tansu broker that lives for the whole session."""
    log = tmp_path_factory.mktemp("tansu") / "tansu.log"
    with TansuBroker(log_path=log) as broker:
        yield broker.bootstrap_servers


@pytest.fixture(scope="session")
def kafka_bootstrap(tansu_broker: str) -> str:
    """Alias of ``tansu_broker``."""
    return tansu_broker


@pytest.fixture
def unique_topic(request: pytest.FixtureRequest) -> str:
    """A topic name no other test uses."""
    name = "".join(c if c.isalnum() else "-" for c in request.node.name)[:40]
    return f"t-{name}-{uuid.uuid4().hex[:8]}"


def _flushed_url(server: object, db: int) -> Iterator[str]:
    host, port = server.host, server.port  # type: ignore[attr-defined]
    client = redis.Redis(host=host, port=port, db=db)
    client.flushdb()
    try:
        yield f"redis://{host}:{port}/{db}"
    finally:
        client.flushdb()
        client.close()


@pytest.fixture
def redis_url(redis_server: object) -> Iterator[str]:
    """``redis://127.0.0.1:PORT/0`` on a freshly flushed database."""
    yield from _flushed_url(redis_server, 0)


@pytest.fixture
def redis_store_url(redis_server: object) -> Iterator[str]:
    """``redis://127.0.0.1:PORT/1`` on a freshly flushed database."""
    yield from _flushed_url(redis_server, 1)


def system_binary(name: str, package: str) -> str:
    """Path of a system program the tests drive; fails (never skips) when it is missing."""
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} not found on PATH: install Debian's {package} package "
                    f"(apt-get install -y --no-install-recommends {package}; make sysdeps)")
    return path
