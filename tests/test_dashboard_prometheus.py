"""Every PromQL expression of the Grafana dashboard and of the alert rules, run by a REAL
Prometheus that scrapes a running ``oclust serve`` and a worker metrics endpoint.

The stack (one per module):

* ``oclust serve`` as a subprocess on a ``file://`` store holding one snapshot (K = 3) and a
  small monitor window, so that the window statistics (drift included) have values after a few
  dozen assignments;
* the training worker's Prometheus registry (:class:`oclust.training_worker.monitor.WorkerMetrics`)
  served in-process by ``prometheus_client.start_http_server``, with a few values set;
* ``prometheus`` (Debian's ``prometheus`` package) as a subprocess, configured from
  ``deploy/prometheus/prometheus.yml`` (same job names, same rule file) with the targets
  replaced by the local ones and 1 s scrape and evaluation intervals.

The fixture waits on events only: the service's ``/readyz``, Prometheus' ``/-/ready``, every
target ``up``, and queries showing that Prometheus ingested the samples before and after the
test traffic, so every ``rate()`` window holds an increase.

The tests then check that every dashboard expression (Grafana variables substituted with
``dashboard_exprs``' rules) evaluates without error as an instant and as a range query, that
the panels show data once the service has answered requests, and that every alert expression
evaluates, both through the query API and in Prometheus' own rule evaluation.
"""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import yaml
from prometheus_client import start_http_server

from oclust.training_worker.monitor import WorkerMetrics
from tests.conftest import system_binary
from tests.test_deploy import (
    DASHBOARD,
    GRAFANA_VARIABLE_DEFAULTS,
    PROMETHEUS_DIR,
    alert_rules,
    dashboard_exprs,
    dashboard_panels,
    load_yaml,
    substitute_grafana_variables,
)

ROOT = Path(__file__).resolve().parents[1]

SCRAPE_INTERVAL = "1s"
# Grafana's $__rate_interval is at least 4 scrape intervals; a minute keeps every rate() window
# comfortably above two samples even when a loaded machine delays some scrapes.
RATE_INTERVAL = "1m"
RANGE_SECONDS = 30  # query_range covers the last RANGE_SECONDS at a 1 s step
# every scraped series of the service and the worker; not ALERTS, which rule evaluation writes
# with the target's job label: an alert pending for one evaluation (a slow first request) left
# a one-sample series there for a minute, and the wait below timed out on it
SCRAPED = '{job=~"oclust-.*", __name__!~"ALERTS.*"}[1m]'

N_CLUSTERS = 3
N_FEATURES = 5
WINDOW = 8  # the service's monitor window: drift needs 2 * WINDOW assignments
SINGLE_ASSIGNS = 2 * WINDOW + 4
BATCH_ITEMS = 6
ASSIGNED = SINGLE_ASSIGNS + BATCH_ITEMS

SERVICE_START_TIMEOUT = 120.0  # torch import and snapshot load on a loaded 2-core machine
PROMETHEUS_TIMEOUT = 60.0
HTTP_TIMEOUT = 10.0
POLL = 0.1

# Panels (by title) whose query may select nothing while the service is healthy: without a 5xx
# answer in the rate window the numerator of the share has no series, or only a flat one.
MAY_BE_EMPTY = {"5xx share"}


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def _free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _tail(path: Path, chars: int = 3000) -> str:
    """The end of a log file (for failure messages)."""
    try:
        return path.read_text(encoding="utf-8", errors="replace")[-chars:]
    except OSError:
        return f"<no log at {path}>"


def _wait_for(
    condition: Callable[[], bool],
    timeout: float,
    what: str,
    diagnostics: Callable[[], str] = lambda: "",
) -> None:
    """Poll ``condition`` (which queries a real endpoint) until it holds; fail after ``timeout``.

    ``diagnostics`` is called on every poll for a fatal problem (a dead subprocess) and once more
    on timeout for the failure message.
    """
    deadline = time.monotonic() + timeout
    while True:
        if condition():
            return
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}\n{diagnostics()}")
        time.sleep(POLL)


def _get(url: str, **params: Any) -> httpx.Response | None:
    """GET ``url``; ``None`` while the server does not accept connections yet."""
    try:
        return httpx.get(url, params=params, timeout=HTTP_TIMEOUT)
    except httpx.TransportError:
        return None


def _values(data: dict[str, Any]) -> list[float]:
    """Every sample value of a query API ``data`` object (vector, matrix or scalar)."""
    kind, result = data["resultType"], data["result"]
    if kind == "scalar":
        return [float(result[1])]
    if kind == "vector":
        return [float(item["value"][1]) for item in result]
    if kind == "matrix":
        return [float(v) for item in result for _, v in item["values"]]
    return []


@dataclass
class Stack:
    """The running stack: URLs, the worker's metrics and the subprocess logs."""

    prometheus: str
    service: str
    worker_metrics: WorkerMetrics
    prometheus_log: Path
    service_log: Path
    # once the traffic is scraped, queries are evaluated at that moment: the [1m] rates of
    # the panels then see it however slowly the tests run afterwards (a loaded CI machine)
    at: float | None = None

    def query(self, expr: str) -> dict[str, Any]:
        """The JSON answer of an instant query (at :attr:`at` once set, else now)."""
        params: dict[str, Any] = {"query": expr} | ({"time": self.at} if self.at else {})
        r = httpx.get(f"{self.prometheus}/api/v1/query", params=params, timeout=HTTP_TIMEOUT)
        return dict(r.json())

    def query_range(self, expr: str, seconds: int = RANGE_SECONDS) -> dict[str, Any]:
        """The JSON answer of a range query over the ``seconds`` before :attr:`at` (or now)."""
        end = self.at or time.time()
        params = {"query": expr, "start": end - seconds, "end": end, "step": "1s"}
        r = httpx.get(f"{self.prometheus}/api/v1/query_range", params=params, timeout=HTTP_TIMEOUT)
        return dict(r.json())

    def scalar(self, expr: str) -> float | None:
        """The single value of an instant query, ``None`` when it selects nothing."""
        answer = self.query(expr)
        assert answer["status"] == "success", f"{expr!r}: {answer}"
        values = _values(answer["data"])
        assert len(values) <= 1, f"{expr!r} gave {len(values)} values"
        return values[0] if values else None

    def fewest_samples(self, range_selector: str) -> int:
        """The fewest samples any series selected by ``range_selector`` holds (0: none)."""
        return min(self.samples_per_series(range_selector).values(), default=0)

    def samples_per_series(self, range_selector: str) -> dict[str, int]:
        """Samples each series selected by ``range_selector`` holds, by its labels."""
        answer = self.query(range_selector)
        assert answer["status"] == "success", f"{range_selector!r}: {answer}"
        return {json.dumps(s["metric"], sort_keys=True): len(s["values"])
                for s in answer["data"]["result"]}

    def logs(self) -> str:
        """The tails of both subprocess logs."""
        return (
            f"--- service log ---\n{_tail(self.service_log)}\n"
            f"--- prometheus log ---\n{_tail(self.prometheus_log)}"
        )


def _prometheus_config(
    rule_file: Path, targets: dict[str, str], scrape_interval: str
) -> dict[str, Any]:
    """``deploy/prometheus/prometheus.yml`` with local targets, fast intervals, absolute rules.

    ``targets`` maps each job name of the deployed config to the ``host:port`` to scrape.
    """
    config = load_yaml(PROMETHEUS_DIR / "prometheus.yml")
    config["global"].update(
        scrape_interval=scrape_interval,
        scrape_timeout=scrape_interval,
        evaluation_interval=scrape_interval,
    )
    config["rule_files"] = [str(rule_file)]
    jobs = {job["job_name"] for job in config["scrape_configs"]}
    assert jobs == set(targets), f"deployed scrape jobs {jobs} != local targets {set(targets)}"
    for job in config["scrape_configs"]:
        job["static_configs"] = [{"targets": [targets[job["job_name"]]]}]
    return config


def _publish_snapshot(store_url: str, namespace: str) -> None:
    """Train a tiny model a few steps and publish it as version 1."""
    from oclust.model import OnlineClusterer
    from oclust.training_worker.store import open_store

    rng = np.random.default_rng(0)
    clf = OnlineClusterer(n_clusters=N_CLUSTERS, latent_dim=8, hidden=(16,), seed=0, device="cpu")
    for _ in range(3):
        clf.partial_fit(rng.normal(size=(64, N_FEATURES)).astype("float32"))
    store = open_store(store_url, namespace=namespace)
    try:
        store.publish(clf.to_snapshot(metrics={"loss": 0.5}))
    finally:
        store.close()


def _send_traffic(client: httpx.Client, rng: np.random.Generator, singles: int, batch: int) -> None:
    """``singles`` POST /assign, one POST /assign/batch of ``batch`` items and one bad request."""
    for _ in range(singles):
        r = client.post("/assign", json={"features": rng.normal(size=N_FEATURES).tolist()})
        assert r.status_code == 200, r.text
    r = client.post("/assign/batch", json={"items": rng.normal(size=(batch, N_FEATURES)).tolist()})
    assert r.status_code == 200, r.text
    r = client.post("/assign", json={"features": [1.0]})  # wrong shape: a 4xx for the panels
    assert r.status_code == 422, r.text


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """Terminate a subprocess this module started; kill it if it does not exit in time."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


# --------------------------------------------------------------------------------------------
# The stack
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def prometheus_binary() -> str:
    """Path of the prometheus server; fails (never skips) when it is not installed."""
    return system_binary("prometheus", "prometheus")


@pytest.fixture(scope="module")
def stack(prometheus_binary: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """Service + worker metrics + Prometheus, with traffic ingested (see the module docstring)."""
    tmp = tmp_path_factory.mktemp("prom-stack")
    store_url, namespace = f"file://{tmp / 'store'}", "dash"
    (tmp / "store").mkdir()
    service_port, prometheus_port = _free_port(), _free_port()

    worker = WorkerMetrics()
    worker.samples.inc(64)
    worker.batches.inc()
    worker.messages.inc(64)
    worker.step_seconds.observe(0.02)
    worker.loss.set(1.25)
    worker.served_hard_entropy.set(1.0)
    worker.served_kl_star.set(0.1)
    worker.train_hard_entropy.set(1.5)
    worker.train_kl_star.set(0.05)
    worker.reservoir_hard_entropy.set(1.4)
    worker.lag.labels("0").set(10)
    worker.dlq.labels("decode").inc()
    worker.published.inc()
    worker.version.set(1)
    worker.collapse_events.inc(0)
    worker.collapsed.set(0)
    worker.active.set(1)
    worker_server, worker_thread = start_http_server(0, addr="127.0.0.1", registry=worker.registry)
    worker_port = int(worker_server.server_port)

    config = _prometheus_config(
        PROMETHEUS_DIR / "alerts.yml",
        {
            "oclust-service": f"127.0.0.1:{service_port}",
            "oclust-worker": f"127.0.0.1:{worker_port}",
            "prometheus": f"127.0.0.1:{prometheus_port}",
        },
        SCRAPE_INTERVAL,
    )
    config_file = tmp / "prometheus.yml"
    config_file.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")

    stack = Stack(
        prometheus=f"http://127.0.0.1:{prometheus_port}",
        service=f"http://127.0.0.1:{service_port}",
        worker_metrics=worker,
        prometheus_log=tmp / "prometheus.log",
        service_log=tmp / "service.log",
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("OCLUST_API_KEY", None)
    procs: list[subprocess.Popen[bytes]] = []
    with stack.prometheus_log.open("wb") as prom_log, stack.service_log.open("wb") as svc_log:
        try:
            # Both start now and come up in parallel with the snapshot being trained here.
            procs.append(
                subprocess.Popen(
                    [
                        prometheus_binary,
                        f"--config.file={config_file}",
                        f"--storage.tsdb.path={tmp / 'tsdb'}",
                        f"--web.listen-address=127.0.0.1:{prometheus_port}",
                        "--log.level=warn",
                    ],
                    cwd=tmp,
                    stdout=prom_log,
                    stderr=subprocess.STDOUT,
                )
            )
            procs.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "oclust",
                        "serve",
                        "--store",
                        store_url,
                        "--namespace",
                        namespace,
                        "--host",
                        "127.0.0.1",
                        "--port",
                        str(service_port),
                        "--window",
                        str(WINDOW),
                        "--log-level",
                        "warning",
                    ],
                    cwd=ROOT,
                    env=env,
                    stdout=svc_log,
                    stderr=subprocess.STDOUT,
                )
            )
            _publish_snapshot(store_url, namespace)
            _bring_up(stack, procs)
            yield stack
        finally:
            for proc in reversed(procs):
                _stop(proc)
            worker_server.shutdown()
            worker_server.server_close()
            worker_thread.join(timeout=10)


def _bring_up(stack: Stack, procs: list[subprocess.Popen[bytes]]) -> None:
    """Wait for readiness and targets, send traffic, wait until Prometheus ingested it."""

    def diagnostics() -> str:
        dead = [f"{p.args[0]} exited with {p.returncode}" for p in procs if p.poll() is not None]
        return "\n".join(dead) + "\n" + stack.logs()

    def alive_and(check: Callable[[], bool]) -> Callable[[], bool]:
        def condition() -> bool:
            if any(p.poll() is not None for p in procs):
                pytest.fail(f"a subprocess of the stack died\n{diagnostics()}")
            return check()

        return condition

    def status_ok(url: str) -> bool:
        r = _get(url)
        return r is not None and r.status_code == 200

    _wait_for(
        alive_and(lambda: status_ok(f"{stack.service}/readyz")),
        SERVICE_START_TIMEOUT,
        "oclust serve /readyz",
        diagnostics,
    )
    _wait_for(
        alive_and(lambda: status_ok(f"{stack.prometheus}/-/ready")),
        PROMETHEUS_TIMEOUT,
        "prometheus /-/ready",
        diagnostics,
    )

    targets: list[dict[str, Any]] = []

    def all_targets_up() -> bool:
        r = _get(f"{stack.prometheus}/api/v1/targets", state="active")
        if r is None or r.status_code != 200:
            return False
        targets[:] = r.json()["data"]["activeTargets"]
        return len(targets) == 3 and all(t["health"] == "up" for t in targets)

    _wait_for(
        alive_and(all_targets_up),
        PROMETHEUS_TIMEOUT,
        "every scrape target up",
        lambda: (
            json.dumps([(t["scrapeUrl"], t["health"], t["lastError"]) for t in targets], indent=1)
            + "\n"
            + diagnostics()
        ),
    )

    # Warm-up: one request of each kind creates the request series, so that the traffic below
    # is an increase of existing counters (Prometheus 2 does not treat a new series as a jump
    # from 0, so the first requests of a series never show up in rate()).
    with httpx.Client(base_url=stack.service, timeout=HTTP_TIMEOUT) as client:
        _send_traffic(client, np.random.default_rng(1), singles=1, batch=1)
    warmup = 1 + 1

    # Baseline: a scrape of the service after the warm-up and one of the worker are stored.
    _wait_for(
        alive_and(
            lambda: (
                stack.scalar("sum(oclust_assignments_total)") == warmup
                and stack.scalar('count(oclust_http_requests_total{endpoint=~".*assign.*"})') == 3
                and stack.scalar("sum(oclust_worker_samples_total)") == 64
            )
        ),
        PROMETHEUS_TIMEOUT,
        "the baseline scrape of the service and the worker",
        diagnostics,
    )

    with httpx.Client(base_url=stack.service, timeout=HTTP_TIMEOUT) as client:
        _send_traffic(client, np.random.default_rng(2), singles=SINGLE_ASSIGNS, batch=BATCH_ITEMS)
    worker = stack.worker_metrics
    worker.samples.inc(128)
    worker.batches.inc(2)
    worker.step_seconds.observe(0.01)
    worker.step_seconds.observe(0.04)
    worker.published.inc()
    worker.version.set(2)
    worker.lag.labels("0").set(4)

    def after_traffic() -> dict[str, object]:
        return {
            "assigned": stack.scalar("sum(oclust_assignments_total)"),
            # the bad request comes last: a scrape between it and the assignments raced it
            "bad requests": stack.scalar('sum(oclust_http_requests_total{status="4xx"})'),
            "worker samples": stack.scalar("sum(oclust_worker_samples_total)"),
            "fewest up samples": stack.scalar("min(count_over_time(up[1m]))"),
            "targets": stack.scalar("count(count_over_time(up[1m]))"),
            # every series of the service and the worker holds 2+ samples by now
            "fewest series samples": stack.fewest_samples(SCRAPED),
            "series with one sample": [
                k for k, n in stack.samples_per_series(SCRAPED).items() if n < 2
            ][:5],
        }

    want = {"assigned": warmup + ASSIGNED, "bad requests": 2, "worker samples": 64 + 128,
            "targets": 3}

    def settled() -> bool:
        seen = after_traffic()
        return all(seen[k] == v for k, v in want.items()) and all(
            (seen[k] or 0) >= 2 for k in ("fewest up samples", "fewest series samples"))

    _wait_for(
        alive_and(settled),
        PROMETHEUS_TIMEOUT,
        "the scrapes after the traffic",
        lambda: f"last seen {after_traffic()}, wanted {want} and 2+ samples\n{diagnostics()}",
    )
    stack.at = time.time()


# --------------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------------


def _panel_queries(rate_interval: str = RATE_INTERVAL) -> list[tuple[str, str]]:
    """(panel title, expression) for every dashboard query, Grafana variables substituted."""
    values = {**GRAFANA_VARIABLE_DEFAULTS, "__rate_interval": rate_interval}
    queries = [
        (panel["title"], substitute_grafana_variables(target["expr"], values))
        for panel in dashboard_panels()
        for target in panel.get("targets", [])
        if target.get("expr")
    ]
    assert [expr for _, expr in queries] == dashboard_exprs(rate_interval=rate_interval)
    return queries


def _problem(answer: dict[str, Any]) -> str | None:
    """Why a query API answer is not a clean success (``None`` when it is)."""
    if answer.get("status") != "success" or "error" in answer:
        return f"{answer.get('errorType')}: {answer.get('error')}"
    if answer.get("warnings"):
        return f"warnings: {answer['warnings']}"
    return None


def test_every_dashboard_expression_evaluates_as_instant_and_range_query(stack: Stack) -> None:
    failures = []
    queries = _panel_queries()
    assert queries
    for title, expr in queries:
        for kind, answer in (
            ("query", stack.query(expr)),
            ("query_range", stack.query_range(expr)),
        ):
            problem = _problem(answer)
            if problem:
                failures.append(f"[{title}] {kind} {expr!r}: {problem}")
    assert not failures, "\n".join(failures)


def test_every_dashboard_panel_shows_data_once_the_service_served_requests(
    stack: Stack,
) -> None:
    empty = []
    for title, expr in _panel_queries():
        answer = stack.query(expr)
        assert answer["status"] == "success", (title, expr, answer)
        values = _values(answer["data"])
        finite = [v for v in values if math.isfinite(v)]
        if title in MAY_BE_EMPTY:
            assert all(0.0 <= v <= 1.0 for v in values), f"[{title}] {expr!r}: {values}"
            continue
        if not finite:
            empty.append(f"[{title}] {expr!r}: {values or 'no series'}")
        if not _values(stack.query_range(expr)["data"]):
            empty.append(f"[{title}] query_range {expr!r}: no samples in {RANGE_SECONDS}s")
    assert not empty, "panels without data:\n" + "\n".join(empty)


def test_the_key_panels_show_the_expected_values(stack: Stack) -> None:
    shares = stack.query("avg by (cluster) (oclust_cluster_share)")["data"]["result"]
    assert {s["metric"]["cluster"] for s in shares} == {str(k) for k in range(N_CLUSTERS)}
    assert math.isclose(sum(float(s["value"][1]) for s in shares), 1.0, abs_tol=1e-9)

    ratio = stack.scalar("oclust_hard_entropy_ratio")
    assert ratio is not None and 0.0 <= ratio <= 1.0
    kl = stack.scalar("oclust_kl_star_nats")
    assert kl is not None and kl >= 0.0
    drift = stack.scalar("oclust_drift_js_nats")
    assert drift is not None and 0.0 <= drift <= math.log(2) + 1e-9
    assert stack.scalar("max(oclust_snapshot_version)") == 1
    assert stack.scalar("min(oclust_store_up)") == 1
    assert stack.scalar("max(oclust_worker_snapshot_version)") == 2

    p99 = stack.query(
        "histogram_quantile(0.99, sum by (le, endpoint) "
        f"(rate(oclust_assign_latency_seconds_bucket[{RATE_INTERVAL}])))"
    )["data"]["result"]
    by_endpoint = {s["metric"]["endpoint"]: float(s["value"][1]) for s in p99}
    assert set(by_endpoint) == {"/assign", "/assign/batch"}  # the request counter's labels
    assert all(math.isfinite(v) and v > 0 for v in by_endpoint.values()), by_endpoint

    assigned = stack.query(f"sum by (cluster) (rate(oclust_assignments_total[{RATE_INTERVAL}]))")[
        "data"
    ]["result"]
    assert len(assigned) == N_CLUSTERS
    assert sum(float(s["value"][1]) for s in assigned) > 0

    requests = stack.query(
        f"sum by (endpoint, status) (rate(oclust_http_requests_total[{RATE_INTERVAL}]))"
    )["data"]["result"]
    # "/assign/batch" and "assign_batch" alike: the label's spelling is not what this checks
    rates = {
        (s["metric"]["endpoint"].strip("/").replace("/", "_"), s["metric"]["status"]): float(
            s["value"][1]
        )
        for s in requests
    }
    for key in (("assign", "2xx"), ("assign_batch", "2xx"), ("assign", "4xx")):
        assert rates.get(key, 0.0) > 0, (key, rates)

    samples = stack.scalar(f"sum(rate(oclust_worker_samples_total[{RATE_INTERVAL}]))")
    assert samples is not None and samples > 0
    step_p99 = stack.scalar(
        "histogram_quantile(0.99, sum by (le) "
        f"(rate(oclust_worker_step_seconds_bucket[{RATE_INTERVAL}])))"
    )
    assert step_p99 is not None and 0 < step_p99 <= 0.05


def test_every_alert_expression_evaluates(stack: Stack) -> None:
    failures = []
    rules = alert_rules()
    assert rules
    for rule in rules:
        problem = _problem(stack.query(rule["expr"]))
        if problem:
            failures.append(f"[{rule['alert']}] {' '.join(rule['expr'].split())!r}: {problem}")
    assert not failures, "\n".join(failures)


def test_prometheus_loads_and_evaluates_every_alert_rule(stack: Stack) -> None:
    expected = {rule["alert"] for rule in alert_rules()}
    rules: dict[str, dict[str, Any]] = {}

    def all_evaluated() -> bool:
        r = _get(f"{stack.prometheus}/api/v1/rules", type="alert")
        if r is None or r.status_code != 200:
            return False
        rules.clear()
        for group in r.json()["data"]["groups"]:
            for rule in group["rules"]:
                rules[rule["name"]] = rule
        return set(rules) == expected and all(
            not rule["lastEvaluation"].startswith("0001-") for rule in rules.values()
        )

    _wait_for(
        all_evaluated,
        PROMETHEUS_TIMEOUT,
        "Prometheus to evaluate every alert rule",
        lambda: f"loaded {sorted(rules)}, expected {sorted(expected)}\n{stack.logs()}",
    )
    unhealthy = {
        name: (rule["health"], rule.get("lastError"))
        for name, rule in rules.items()
        if rule["health"] != "ok" or rule.get("lastError")
    }
    assert not unhealthy, unhealthy


def _label_values(stack: Stack, selector: str, label: str) -> list[str]:
    """What Grafana's ``label_values(selector, label)`` lists: Prometheus' label values API."""
    r = httpx.get(f"{stack.prometheus}/api/v1/label/{label}/values",
                  params={"match[]": selector}, timeout=HTTP_TIMEOUT)
    answer = r.json()
    assert answer["status"] == "success", answer
    return sorted(answer["data"])


def test_job_and_instance_variables_list_the_oclust_targets_and_scope_the_panels(
    stack: Stack,
) -> None:
    variables = {v["name"]: v for v in json.loads(DASHBOARD.read_text())["templating"]["list"]}

    def options(name: str, values: dict[str, str]) -> list[str]:
        # "label_values(SELECTOR, LABEL)" with the dashboard's variables filled in
        definition = substitute_grafana_variables(variables[name]["definition"], values)
        selector, label = definition.removeprefix("label_values(").removesuffix(")").rsplit(", ", 1)
        return _label_values(stack, selector, label)

    jobs = options("job", {})
    assert jobs == ["oclust-service", "oclust-worker"]  # Prometheus' own job is not offered
    (service_instance,) = options("instance", {"job": "oclust-service"})
    assert service_instance.endswith(stack.service.rsplit(":", 1)[1])
    shares = next(t["expr"] for p in dashboard_panels() for t in p.get("targets", [])
                  if "oclust_cluster_share" in t["expr"])
    scoped = {"__rate_interval": "1m", "job": "oclust-service", "instance": service_instance}
    assert _values(stack.query(substitute_grafana_variables(shares, scoped))["data"])
    elsewhere = scoped | {"instance": "nowhere:1"}
    assert not _values(stack.query(substitute_grafana_variables(shares, elsewhere))["data"])
