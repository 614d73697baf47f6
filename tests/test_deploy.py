"""Checks of the deployment files: Prometheus rules and config (with promtool), the Grafana
dashboard, docker-compose.yml, the Dockerfile and the Kubernetes manifests.

``dashboard_exprs()`` also serves tests that run a real Prometheus against the service and
evaluate every dashboard expression there.

promtool comes from Debian's ``prometheus`` package
(``apt-get install -y --no-install-recommends prometheus``); without it the promtool tests fail.
"""

from __future__ import annotations

import base64
import json
import re
import subprocess
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import system_binary

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
PROMETHEUS_DIR = DEPLOY / "prometheus"
GRAFANA_DIR = DEPLOY / "grafana"
DASHBOARD = GRAFANA_DIR / "dashboards" / "oclust.json"
K8S_DIR = DEPLOY / "k8s"
COMPOSE = ROOT / "docker-compose.yml"
COMPOSE_GPU = DEPLOY / "compose" / "gpu.yml"

# The metric contract of the service and the worker (counters without the client's "_total"
# suffix stripped: these are the names Prometheus stores).
SERVICE_METRICS = frozenset(
    {
        "oclust_assignments_total",
        "oclust_cluster_share",
        "oclust_hard_entropy_nats",
        "oclust_hard_entropy_ratio",
        "oclust_kl_star_nats",
        "oclust_soft_entropy_nats",
        "oclust_drift_js_nats",
        "oclust_assign_latency_seconds",
        "oclust_http_requests_total",
        "oclust_snapshot_version",
        "oclust_snapshot_age_seconds",
        "oclust_store_up",
        "oclust_snapshot_fallback",
    }
)
WORKER_METRICS = frozenset(
    {
        "oclust_worker_samples_total",
        "oclust_worker_batches_total",
        "oclust_worker_step_seconds",
        "oclust_worker_loss",
        "oclust_worker_served_hard_entropy_nats",
        "oclust_worker_served_kl_star_nats",
        "oclust_worker_train_hard_entropy_nats",
        "oclust_worker_train_kl_star_nats",
        "oclust_worker_reservoir_hard_entropy_nats",
        "oclust_worker_consumer_lag",
        "oclust_worker_dlq_messages_total",
        "oclust_worker_snapshots_published_total",
        "oclust_worker_snapshot_version",
        "oclust_worker_collapse_events_total",
        "oclust_worker_collapsed",
    }
)
HISTOGRAMS = frozenset({"oclust_assign_latency_seconds", "oclust_worker_step_seconds"})
CONTRACT_FAMILIES = SERVICE_METRICS | WORKER_METRICS
CONTRACT_SERIES = CONTRACT_FAMILIES | {
    f"{name}{suffix}" for name in HISTOGRAMS for suffix in ("_bucket", "_sum", "_count")
}

# Concrete values for Grafana's built-in variables.
def _dashboard_all_values() -> dict[str, str]:
    """The "All" value of each multi-value template variable of the dashboard (job, instance)."""
    templating = json.loads(DASHBOARD.read_text(encoding="utf-8"))["templating"]["list"]
    return {v["name"]: v["allValue"] for v in templating if v.get("includeAll")}


GRAFANA_VARIABLE_DEFAULTS = {
    "__rate_interval": "1m", "__interval": "15s", "__range": "1h", **_dashboard_all_values()
}

_GRAFANA_VARIABLE = re.compile(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)")
_PROMQL_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_PROMQL_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_PROMQL_SELECTOR = re.compile(r"\{[^}]*\}")
_PROMQL_RANGE = re.compile(r"\[[^\]]*\]")
_PROMQL_IDENTIFIER = re.compile(r"(?<![\w:.])([A-Za-z_:][\w:]*)(?![\w:])(?!\s*\()")
_PROMQL_KEYWORDS = frozenset(
    {
        "and",
        "or",
        "unless",
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
        "offset",
        "bool",
        "atan2",
        "inf",
        "nan",
    }
)


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def load_yaml(path: Path) -> Any:
    """The single YAML document in ``path``.

    Example:
        >>> load_yaml(ROOT / "docker-compose.yml")["name"]
        'oclust'
    """
    with path.open(encoding="utf-8") as handle:
        return yaml.safe_load(handle)


def load_yaml_documents(path: Path) -> list[dict[str, Any]]:
    """Every non-empty YAML document in ``path`` (Kubernetes files hold several).

    Example:
        >>> kinds = [d["kind"] for d in load_yaml_documents(K8S_DIR / "base" / "service.yaml")]
        >>> "HorizontalPodAutoscaler" in kinds
        True
    """
    with path.open(encoding="utf-8") as handle:
        return [doc for doc in yaml.safe_load_all(handle) if doc is not None]


def _walk_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from _walk_panels(panel.get("panels", []))


def dashboard_panels() -> list[dict[str, Any]]:
    """Every panel of the dashboard, panels inside rows included, rows themselves included.

    Example:
        >>> any(p["type"] == "timeseries" for p in dashboard_panels())
        True
    """
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return list(_walk_panels(dashboard["panels"]))


def substitute_grafana_variables(expr: str, values: dict[str, str]) -> str:
    """``expr`` with ``$name`` / ``${name}`` replaced by ``values[name]``.

    Raises ``KeyError`` naming the variable when ``values`` has no value for it.

    Example:
        >>> substitute_grafana_variables("rate(x[$__rate_interval])", {"__rate_interval": "1m"})
        'rate(x[1m])'
    """

    def replace(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        if name not in values:
            raise KeyError(f"no value for Grafana variable ${name} in {expr!r}")
        return values[name]

    return _GRAFANA_VARIABLE.sub(replace, expr)


def dashboard_exprs(
    rate_interval: str = GRAFANA_VARIABLE_DEFAULTS["__rate_interval"],
    interval: str = GRAFANA_VARIABLE_DEFAULTS["__interval"],
    range_: str = GRAFANA_VARIABLE_DEFAULTS["__range"],
) -> list[str]:
    """All PromQL expressions of the Grafana dashboard, ready for a Prometheus query API.

    Grafana's variables are replaced by concrete durations: ``$__rate_interval`` by
    ``rate_interval`` (keep it at least 2 scrape intervals of the Prometheus that evaluates
    them), ``$__interval`` by ``interval``, ``$__range`` by ``range_``; ``$job`` and
    ``$instance`` by their "All" value (every series).

    Example:
        >>> exprs = dashboard_exprs(rate_interval="30s")
        >>> any("oclust_cluster_share" in e for e in exprs)
        True
        >>> any("$" in e for e in exprs)
        False
    """
    values = {**GRAFANA_VARIABLE_DEFAULTS, "__rate_interval": rate_interval,
              "__interval": interval, "__range": range_}
    exprs = []
    for panel in dashboard_panels():
        for target in panel.get("targets", []):
            if target.get("expr"):
                exprs.append(substitute_grafana_variables(target["expr"], values))
    return exprs


def promql_metric_names(expr: str) -> set[str]:
    """Metric names an expression selects (label names, functions and keywords left out).

    A lexical scan, enough for the expressions in this repository's dashboards and rules.

    Example:
        >>> sorted(promql_metric_names('sum by (le) (rate(a_bucket{x="y"}[5m])) / on(i) b'))
        ['a_bucket', 'b']
    """
    text = _PROMQL_STRING.sub('""', expr)
    text = _PROMQL_GROUPING.sub(" ", text)
    text = _PROMQL_SELECTOR.sub(" ", text)
    text = _PROMQL_RANGE.sub(" ", text)
    return {
        name for name in _PROMQL_IDENTIFIER.findall(text) if name.lower() not in _PROMQL_KEYWORDS
    }


def alert_rules() -> list[dict[str, Any]]:
    """Every alerting rule of ``deploy/prometheus/alerts.yml``.

    Example:
        >>> "OclustClusterCollapse" in {rule["alert"] for rule in alert_rules()}
        True
    """
    groups = load_yaml(PROMETHEUS_DIR / "alerts.yml")["groups"]
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


def compose_services() -> dict[str, dict[str, Any]]:
    """The services of docker-compose.yml.

    Example:
        >>> "worker" in compose_services()
        True
    """
    return load_yaml(COMPOSE)["services"]


def bind_mounts(service: dict[str, Any]) -> dict[str, str]:
    """Container path -> host path of a compose service's ``./host:/container[:mode]`` mounts.

    Example:
        >>> bind_mounts({"volumes": ["./a:/etc/a:ro", "data:/data"]})
        {'/etc/a': './a'}
    """
    mounts = {}
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        if source.startswith("."):
            mounts[target] = source
    return mounts


def k8s_documents() -> list[dict[str, Any]]:
    """Every Kubernetes object of the base manifests (kustomization files excluded).

    Example:
        >>> {"Deployment", "Service"} <= {d["kind"] for d in k8s_documents()}
        True
    """
    docs = []
    for path in sorted((K8S_DIR / "base").glob("*.yaml")):
        if path.name != "kustomization.yaml":
            docs.extend(load_yaml_documents(path))
    return docs


def k8s_object(kind: str, name: str) -> dict[str, Any]:
    """The base object of ``kind`` called ``name``.

    Example:
        >>> k8s_object("Deployment", "oclust-worker")["spec"]["replicas"]
        1
    """
    matches = [d for d in k8s_documents() if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(matches) == 1, f"expected one {kind} {name}, found {len(matches)}"
    return matches[0]


def cli_flags(argv: list[str]) -> tuple[str, set[str]]:
    """The subcommand and the long options of an ``oclust`` command line.

    Example:
        >>> command, flags = cli_flags(["serve", "--port", "8000", "--host=0.0.0.0"])
        >>> command, sorted(flags)
        ('serve', ['--host', '--port'])
    """
    return argv[0], {arg.split("=", 1)[0] for arg in argv[1:] if arg.startswith("--")}


def _run(argv: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=60, check=False)


@pytest.fixture(scope="session")
def promtool() -> str:
    """Path of promtool; fails (never skips) when it is not installed."""
    return system_binary("promtool", "prometheus")


# --------------------------------------------------------------------------------------------
# Prometheus
# --------------------------------------------------------------------------------------------


def test_promtool_check_rules(promtool: str) -> None:
    result = _run([promtool, "check", "rules", "alerts.yml"], PROMETHEUS_DIR)
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_unit_tests_of_the_alerts_pass(promtool: str) -> None:
    result = _run([promtool, "test", "rules", "alerts_test.yml"], PROMETHEUS_DIR)
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_check_config(promtool: str) -> None:
    result = _run([promtool, "check", "config", "prometheus.yml"], PROMETHEUS_DIR)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 rule files found" in result.stdout


def test_the_rule_unit_tests_cover_every_alert_firing_and_silent() -> None:
    tests = load_yaml(PROMETHEUS_DIR / "alerts_test.yml")
    assert tests["rule_files"] == ["alerts.yml"]
    firing: set[str] = set()
    silent: set[str] = set()
    for case in tests["tests"]:
        for check in case.get("alert_rule_test", []):
            (firing if check.get("exp_alerts") else silent).add(check["alertname"])
    names = {rule["alert"] for rule in alert_rules()}
    assert names - firing == set(), "alerts without a firing case"
    assert names - silent == set(), "alerts without a not-firing case"
    assert (firing | silent) - names == set(), "tests of alerts that do not exist"


def test_every_alert_has_a_severity_summary_and_description() -> None:
    rules = alert_rules()
    assert len({rule["alert"] for rule in rules}) == len(rules), "duplicate alert names"
    for rule in rules:
        assert rule["labels"]["severity"] in {"warning", "critical"}, rule["alert"]
        assert rule["annotations"]["summary"].strip(), rule["alert"]
        assert rule["annotations"]["description"].strip(), rule["alert"]


def test_the_required_alerts_exist() -> None:
    exprs = {rule["alert"]: " ".join(rule["expr"].split()) for rule in alert_rules()}
    collapse = exprs["OclustClusterCollapse"]
    assert collapse.startswith("oclust_hard_entropy_ratio < 0.5")
    assert next(r for r in alert_rules() if r["alert"] == "OclustClusterCollapse")["for"] == "5m"
    needles = {
        "OclustKLStarHigh": "oclust_kl_star_nats",
        "OclustDriftHigh": "oclust_drift_js_nats",
        "OclustSnapshotStale": "oclust_snapshot_age_seconds",
        "OclustWorkerLagGrowing": "deriv(oclust_worker_consumer_lag",
        "OclustWorkerDeadLetters": "rate(oclust_worker_dlq_messages_total",
        "OclustServiceErrorRate": 'status="5xx"',
        "OclustWorkerCollapseGuardHolding": "oclust_worker_collapsed",
    }
    for alert, needle in needles.items():
        assert needle in exprs[alert], alert


def test_alert_expressions_only_use_contract_metrics() -> None:
    for rule in alert_rules():
        unknown = promql_metric_names(rule["expr"]) - CONTRACT_SERIES - {"up"}
        assert unknown == set(), f"{rule['alert']} uses {unknown}"


def test_prometheus_scrapes_the_compose_services_on_their_ports() -> None:
    config = load_yaml(PROMETHEUS_DIR / "prometheus.yml")
    assert config["rule_files"] == ["alerts.yml"]
    targets = {
        job["job_name"]: {t for sc in job["static_configs"] for t in sc["targets"]}
        for job in config["scrape_configs"]
    }
    assert targets["oclust-service"] == {"service-1:8000", "service-2:8000"}
    assert targets["oclust-worker"] == {"worker:9100"}

    services = compose_services()
    for host_port in targets["oclust-service"] | targets["oclust-worker"]:
        host, port = host_port.split(":")
        command = services[host]["command"]
        flag = "--port" if command[0] == "serve" else "--metrics-port"
        assert command[command.index(flag) + 1] == port, host_port


# --------------------------------------------------------------------------------------------
# Grafana
# --------------------------------------------------------------------------------------------


def test_promql_metric_names_ignores_labels_functions_and_durations() -> None:
    expr = (
        'histogram_quantile(0.99, sum by (le, endpoint) (rate(m_bucket{endpoint="a b"}[5m] '
        "offset 1h))) / ignoring(x) group_left(y) other:recorded * 1e-3 and on() vector(1)"
    )
    assert promql_metric_names(expr) == {"m_bucket", "other:recorded"}


def test_grafana_variables_are_substituted_and_unknown_ones_refused() -> None:
    values = {"__rate_interval": "2m", "__range": "3h"}
    assert substitute_grafana_variables("a[$__rate_interval] b[${__range}]", values) == (
        "a[2m] b[3h]"
    )
    with pytest.raises(KeyError, match="instance"):
        substitute_grafana_variables('x{instance="$instance"}', values)


def test_dashboard_picks_its_datasource_through_a_variable() -> None:
    provisioned = load_yaml(GRAFANA_DIR / "provisioning" / "datasources" / "prometheus.yml")
    (datasource,) = provisioned["datasources"]
    assert datasource["type"] == "prometheus" and datasource["isDefault"]
    assert datasource["url"] == "http://prometheus:9090"
    assert "prometheus" in compose_services()

    text = DASHBOARD.read_text(encoding="utf-8")
    assert datasource["uid"] not in text  # no hard-coded uid: any Prometheus will do
    variables = {v["name"]: v for v in json.loads(text)["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    chosen = {"type": "prometheus", "uid": "${datasource}"}
    for panel in dashboard_panels():
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == chosen, panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == chosen, panel["title"]


def test_job_and_instance_variables_scope_every_query() -> None:
    variables = {v["name"]: v for v in json.loads(DASHBOARD.read_text())["templating"]["list"]}
    for name in ("job", "instance"):
        var = variables[name]
        assert var["type"] == "query" and var["datasource"]["uid"] == "${datasource}", name
        assert var["multi"] and var["includeAll"] and var["allValue"] == ".*", name
        assert 'label_values({__name__=~"oclust_.+"' in var["definition"], name
        assert var["definition"].endswith(f", {name})"), name
    assert 'job=~"$job"' in variables["instance"]["definition"]  # instances of the chosen jobs
    for panel in dashboard_panels():
        for target in panel.get("targets", []):
            for metric in re.finditer(r"\b(oclust_\w+)(\{[^}]*\})?", target["expr"]):
                assert metric.group(2), f"{panel['title']!r}: {metric.group(1)} is not scoped"
                assert 'job=~"$job"' in metric.group(2), panel["title"]
                assert 'instance=~"$instance"' in metric.group(2), panel["title"]


def test_every_panel_queries_contract_metrics_only() -> None:
    panels = [p for p in dashboard_panels() if p["type"] != "row"]
    assert len(panels) >= 15
    for panel in panels:
        exprs = [t.get("expr", "") for t in panel.get("targets", [])]
        assert exprs and all(e.strip() for e in exprs), f"panel {panel['title']!r} has no query"
        for expr in exprs:
            names = promql_metric_names(expr)
            assert names, f"{panel['title']!r}: {expr!r} selects no metric"
            assert names <= CONTRACT_SERIES, f"{panel['title']!r} uses {names - CONTRACT_SERIES}"


def test_the_dashboard_shows_every_contract_metric() -> None:
    used = set().union(*(promql_metric_names(e) for e in dashboard_exprs()))
    shown = {name for name in CONTRACT_FAMILIES if name in used or f"{name}_bucket" in used}
    assert CONTRACT_FAMILIES - shown == set()


def test_cluster_shares_are_stacked_and_thresholds_match_the_alerts() -> None:
    panels = {p["title"]: p for p in dashboard_panels()}
    shares = panels["Cluster shares (sliding window)"]
    assert shares["fieldConfig"]["defaults"]["custom"]["stacking"]["mode"] == "normal"
    assert "oclust_cluster_share" in shares["targets"][0]["expr"]

    def steps(title: str) -> list[float]:
        defaults = panels[title]["fieldConfig"]["defaults"]
        return [s["value"] for s in defaults["thresholds"]["steps"] if s["value"] is not None]

    assert 0.5 in steps("Hard entropy ratio  H / log K")
    assert 0.5 in steps("KL*  (window vs prior)")
    assert 0.1 in steps("Drift  (Jensen-Shannon, window vs reference)")
    assert 900 in steps("Snapshot age")


def test_dashboard_exprs_substitute_every_variable_and_parse_with_promtool(
    promtool: str, tmp_path: Path
) -> None:
    exprs = dashboard_exprs()
    assert len(exprs) == sum(len(p.get("targets", [])) for p in dashboard_panels())
    assert all("$" not in e for e in exprs)
    assert any("[1m]" in e for e in exprs)
    rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [
                    {"record": f"dashboard:expr_{i}", "expr": e} for i, e in enumerate(exprs)
                ],
            }
        ]
    }
    rule_file = tmp_path / "dashboard_rules.yml"
    rule_file.write_text(yaml.safe_dump(rules), encoding="utf-8")
    result = _run([promtool, "check", "rules", str(rule_file)], tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{len(exprs)} rules found" in result.stdout


def test_dashboard_layout_has_unique_ids_and_no_overlapping_panels() -> None:
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    assert dashboard["uid"] and dashboard["title"]
    panels = dashboard_panels()
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    cells: dict[tuple[int, int], str] = {}
    for panel in panels:
        pos = panel["gridPos"]
        assert pos["x"] >= 0 and pos["w"] > 0 and pos["x"] + pos["w"] <= 24, panel["title"]
        for x in range(pos["x"], pos["x"] + pos["w"]):
            for y in range(pos["y"], pos["y"] + pos["h"]):
                assert (x, y) not in cells, f"{panel['title']!r} overlaps {cells[(x, y)]!r}"
                cells[(x, y)] = panel["title"]


def test_grafana_provisioning_points_at_the_mounted_dashboards() -> None:
    providers = load_yaml(GRAFANA_DIR / "provisioning" / "dashboards" / "oclust.yml")["providers"]
    (provider,) = providers
    mounts = bind_mounts(compose_services()["grafana"])
    assert mounts[provider["options"]["path"]] == "./deploy/grafana/dashboards"
    assert mounts["/etc/grafana/provisioning"] == "./deploy/grafana/provisioning"


# --------------------------------------------------------------------------------------------
# docker-compose
# --------------------------------------------------------------------------------------------


def test_compose_has_the_whole_stack() -> None:
    services = compose_services()
    assert set(services) == {
        "kafka",
        "kafka-init",
        "redis",
        "worker",
        "service-1",
        "service-2",
        "producer",
        "prometheus",
        "grafana",
    }
    for name, service in services.items():
        for dependency in service.get("depends_on", {}):
            assert dependency in services, f"{name} depends on unknown {dependency}"


def test_compose_runs_kafka_in_kraft_mode_with_a_healthcheck() -> None:
    kafka = compose_services()["kafka"]
    assert kafka["image"].startswith("apache/kafka:")
    env = kafka["environment"]
    assert set(env["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
    assert env["KAFKA_CONTROLLER_QUORUM_VOTERS"] == "1@kafka:9093"
    assert "PLAINTEXT://kafka:9092" in env["KAFKA_ADVERTISED_LISTENERS"]
    cluster_id = env["CLUSTER_ID"]
    assert len(base64.urlsafe_b64decode(cluster_id + "=" * (-len(cluster_id) % 4))) == 16
    assert "kafka:9092" in " ".join(kafka["healthcheck"]["test"])
    init = compose_services()["kafka-init"]
    assert init["depends_on"]["kafka"]["condition"] == "service_healthy"
    assert "samples" in init["command"]


def test_compose_commands_match_the_cli_contract() -> None:
    services = compose_services()
    assert services["worker"]["command"] == [
        "worker", "--bootstrap-servers", "kafka:9092", "--topic", "samples",
        "--store", "redis://redis:6379/0", "--namespace", "oclust",
        "--n-clusters", "10", "--metrics-port", "9100",
    ]  # fmt: skip
    serve = [
        "serve", "--store", "redis://redis:6379/0", "--namespace", "oclust",
        "--host", "0.0.0.0", "--port", "8000",
    ]  # fmt: skip
    assert services["service-1"]["command"] == serve
    assert services["service-2"]["command"] == serve
    assert services["service-1"]["ports"] == ["8001:8000"]
    assert services["service-2"]["ports"] == ["8002:8000"]
    assert services["producer"]["command"] == [
        "produce", "--dataset", "digits", "--topic", "samples",
        "--bootstrap-servers", "kafka:9092", "--rate", "200", "--loop",
    ]  # fmt: skip
    for name in ("worker", "service-1", "service-2", "producer"):
        assert services[name]["build"]["context"] == "."
        assert services[name]["build"]["args"]["TORCH_VARIANT"] == "cpu"


def test_compose_mounts_prometheus_and_grafana_config_that_exists() -> None:
    services = compose_services()
    assert services["prometheus"]["ports"] == ["9090:9090"]
    assert "--config.file=/etc/prometheus/prometheus.yml" in services["prometheus"]["command"]
    assert "./deploy/prometheus:/etc/prometheus:ro" in services["prometheus"]["volumes"]
    assert services["grafana"]["ports"] == ["3000:3000"]
    env = services["grafana"]["environment"]
    assert env["GF_AUTH_ANONYMOUS_ENABLED"] == "true"
    assert env["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"
    for service in services.values():
        for source in bind_mounts(service).values():
            assert (ROOT / source).exists(), source


def test_the_gpu_override_reserves_a_gpu_for_the_worker_only() -> None:
    override = load_yaml(COMPOSE_GPU)["services"]
    assert set(override) == {"worker"}
    worker = override["worker"]
    (device,) = worker["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
    assert worker["build"]["args"]["TORCH_VARIANT"].startswith("cu")
    assert worker["image"] != compose_services()["worker"]["image"]


def test_compose_and_k8s_commands_use_existing_cli_options() -> None:
    import typer.main

    from oclust.service.cli import app

    # With a single registered command typer returns that command, not a group.
    commands = getattr(typer.main.get_command(app), "commands", {})
    argvs = [s["command"] for s in compose_services().values() if s.get("build")]
    argvs += [
        container["args"]
        for doc in k8s_documents()
        if doc["kind"] == "Deployment"
        for container in doc["spec"]["template"]["spec"]["containers"]
    ]
    for argv in argvs:
        command, flags = cli_flags(argv)
        assert command in commands, f"oclust has no command {command!r}"
        options = {opt for p in commands[command].params for opt in p.opts}
        assert flags - options == set(), f"oclust {command} lacks {flags - options}"


# --------------------------------------------------------------------------------------------
# Dockerfile
# --------------------------------------------------------------------------------------------


def test_dockerfile_installs_the_chosen_torch_then_the_package_as_non_root() -> None:
    text = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    instructions = [line for line in text.splitlines() if line and not line.startswith("#")]
    assert instructions[0] == "FROM python:3.11-slim"
    assert "ARG TORCH_VARIANT=cpu" in instructions
    pinned = re.search(r"torch==(\S+)", (ROOT / "Makefile").read_text(encoding="utf-8"))
    assert pinned and f"ARG TORCH_VERSION={pinned.group(1)}" in instructions
    torch_at = text.index("https://download.pytorch.org/whl/${TORCH_VARIANT}")
    assert torch_at < text.index("pip install /src")
    user = next(line.split()[1] for line in instructions if line.startswith("USER "))
    assert user.split(":")[0] not in {"root", "0"}
    assert instructions[-2:] == ['ENTRYPOINT ["oclust"]', 'CMD ["--help"]']


def test_docker_build_context_holds_what_the_dockerfile_copies() -> None:
    text = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    ignored = {
        line.strip()
        for line in (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert {".venv", ".git", "tests"} <= ignored
    sources = [
        source
        for line in text.splitlines()
        if line.startswith("COPY ")
        for source in line.split()[1:-1]
        if not source.startswith("--")
    ]
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    setuptools = project["tool"]["setuptools"]
    needed = {"pyproject.toml", project["project"]["readme"], *project["project"]["license-files"],
              "oclust", *setuptools["package-dir"].values()}
    assert needed == {"pyproject.toml", "README.md", "LICENSE", "oclust", "model",
                      "training_worker", "service"}
    assert needed <= set(sources)
    for source in sources:
        assert (ROOT / source).exists(), f"Dockerfile copies missing {source}"
        assert source not in ignored, f"{source} is excluded by .dockerignore"


# --------------------------------------------------------------------------------------------
# Kubernetes
# --------------------------------------------------------------------------------------------


def test_k8s_manifests_parse_and_kustomizations_resolve() -> None:
    kustomizations = sorted(K8S_DIR.rglob("kustomization.yaml"))
    assert len(kustomizations) == 2
    for path in kustomizations:
        kustomization = load_yaml(path)
        assert kustomization["kind"] == "Kustomization"
        for resource in kustomization.get("resources", []):
            assert (path.parent / resource).exists(), f"{path}: {resource}"
        for patch in kustomization.get("patches", []):
            assert (path.parent / patch["path"]).exists(), f"{path}: {patch}"
    listed = set(load_yaml(K8S_DIR / "base" / "kustomization.yaml")["resources"])
    on_disk = {p.name for p in (K8S_DIR / "base").glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == on_disk
    for path in sorted(K8S_DIR.rglob("*.yaml")):
        for doc in load_yaml_documents(path):
            assert doc["apiVersion"] and doc["kind"], path
            if doc["kind"] != "Kustomization":
                assert doc["metadata"]["name"], path


def test_k8s_worker_is_a_single_recreated_trainer() -> None:
    worker = k8s_object("Deployment", "oclust-worker")
    assert worker["spec"]["replicas"] == 1
    assert worker["spec"]["strategy"] == {"type": "Recreate"}
    (container,) = worker["spec"]["template"]["spec"]["containers"]
    assert container["args"][0] == "worker"
    assert {p["containerPort"] for p in container["ports"]} == {9100}


def test_k8s_gpu_overlay_adds_a_gpu_to_the_worker_container() -> None:
    patch = load_yaml(K8S_DIR / "overlays" / "gpu" / "worker-gpu.yaml")
    worker = k8s_object(patch["kind"], patch["metadata"]["name"])
    base_names = {c["name"] for c in worker["spec"]["template"]["spec"]["containers"]}
    (container,) = patch["spec"]["template"]["spec"]["containers"]
    assert container["name"] in base_names
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1


def test_k8s_service_has_probes_a_service_and_a_cpu_autoscaler() -> None:
    deployment = k8s_object("Deployment", "oclust-service")
    pod = deployment["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    assert container["args"][0] == "serve"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["resources"]["requests"]["cpu"], "a CPU autoscaler needs CPU requests"
    port_names = {p["name"] for p in container["ports"]}

    service = k8s_object("Service", "oclust-service")
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    assert deployment["spec"]["selector"]["matchLabels"] == service["spec"]["selector"]
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= port_names

    hpa = k8s_object("HorizontalPodAutoscaler", "oclust-service")
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "oclust-service",
    }
    (metric,) = hpa["spec"]["metrics"]
    assert metric["resource"]["name"] == "cpu"
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]


def test_k8s_args_only_reference_configmap_settings() -> None:
    config = k8s_object("ConfigMap", "oclust-config")["data"]
    assert all(key.startswith("OCLUST_") for key in config)
    for doc in k8s_documents():
        if doc["kind"] != "Deployment":
            continue
        for container in doc["spec"]["template"]["spec"]["containers"]:
            refs = {c["configMapRef"]["name"] for c in container["envFrom"]}
            assert refs == {"oclust-config"}
            for arg in container["args"]:
                for name in re.findall(r"\$\((\w+)\)", arg):
                    assert name in config, f"{doc['metadata']['name']}: $({name}) undefined"
