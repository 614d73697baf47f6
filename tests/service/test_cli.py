"""The command line as a whole: --version, a light --help, one-line usage errors (exit 2)
caught before any work, and options made from the settings classes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import typer.main
from typer.testing import CliRunner

from oclust.model import REGULARISER_NAMES
from oclust.service.cli import app, oclust_version
from oclust.service.settings import ServiceSettings
from oclust.training_worker.settings import TrainSettings, WorkerSettings

ROOT = Path(__file__).resolve().parents[2]
runner = CliRunner()
HEAVY = ("torch", "numpy", "sklearn", "numba", "scipy", "aiokafka", "fastapi", "uvicorn")


def _python(code: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=60, check=True)
    return proc.stdout


@pytest.mark.parametrize("command", ["", "worker", "up", "train", "eval", "serve", "snapshots"])
def test_help_imports_nothing_heavy(command: str) -> None:
    argv = [command, "--help"] if command else ["--help"]
    out = _python(
        "import json, sys\n"
        "from oclust.service.cli import app\n"
        f"try:\n    app({argv!r})\nexcept SystemExit as e:\n    assert e.code == 0, e.code\n"
        f"print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))\n"
    )
    if command in ("worker", "up", "train", "eval"):  # the regularisers are listed, torch-free
        assert all(name in out for name in REGULARISER_NAMES), out
    else:
        assert "Usage" in out  # the help itself was printed
    assert json.loads(out.strip().splitlines()[-1]) == []


def test_version() -> None:
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.output == f"oclust {oclust_version()}\n"
    assert oclust_version()[0].isdigit()


def _error_line(args: list[str]) -> str:
    result = runner.invoke(app, args)
    assert result.exit_code == 2, (args, result.output)
    lines = result.output.splitlines()
    assert len(lines) == 1, (args, result.output)
    return lines[0]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        # refused before the data is loaded or the progress bar starts
        (["train", "--dataset", "digits", "--regulariser", "bogus"],
         "'--regulariser': unknown regulariser 'bogus'"),
        # refused before training every epoch, not when publishing
        (["train", "--dataset", "digits", "--store", "ftp://x"], "unknown store URL scheme"),
        (["train", "--dataset", "digits", "--n-clusters", "3", "--prior", "0.5,0.5"],
         "'--prior': prior must be a vector of length n_clusters=3"),
        (["train", "--dataset", "digits", "--batch-size", "1"], "'--batch-size'"),
        (["train", "--dataset", "digits", "--input-clip", "0"], "'--input-clip'"),
        (["worker", "--input-clip", "nan"], "'--input-clip'"),
        (["worker", "--input-clip", "1e7"], "'--input-clip': at most 1e+06"),
        (["train", "--dataset", "nope"], "unknown dataset 'nope'"),
        (["train", "--dataset", "digits", "--device", "gpu0"], "'--device': unknown device"),
        (["worker", "--encoder", "transformer"], "'--encoder': unknown encoder"),
        (["up", "--regulariser", "bogus"], "unknown regulariser 'bogus'"),
        (["up", "--store", "ftp://x"], "unknown store URL scheme"),
        (["up", "--dataset", "mnist"], "unknown dataset 'mnist'"),
        (["serve", "--port", "70000"], "'--port'"),
        (["serve", "--log-level", "verbose"], "'--log-level'"),  # was uvicorn's KeyError
        (["serve", "--retry-interval", "inf"], "'--retry-interval'"),  # killed the watcher
        (["serve", "--poll-interval", "inf"], "'--poll-interval'"),
        (["worker", "--metrics-port", "70000"], "'--metrics-port'"),
        (["worker", "--lease-ttl", "0.0001"], "'--lease-ttl'"),  # Redis: "invalid expire time"
        (["worker", "--lease-ttl", "1e300"], "'--lease-ttl'"),  # Redis: "out of range"
        # these trained first and failed after (or never, for serve)
        (["train", "--dataset", "digits", "--seed", "-1"], "'--seed'"),
        (["train", "--dataset", "digits", "--seed", str(2**70)], "'--seed'"),
        (["train", "--dataset", "digits", "--device", "cuda:9"], "is not available"),
        (["serve", "--device", "bogus"], "'--device': unknown device"),
        (["train", "--dataset", "digits", "--namespace", "a/b"], "'--namespace'"),
        (["worker", "--namespace", "a b"], "'--namespace'"),
        (["serve", "--namespace", "a b"], "'--namespace'"),
        (["eval", "-r", "ca,bogus"], "bogus"),
        (["snapshots", "list", "--store", "ftp://x"], "unknown store URL scheme"),
        # a bad Redis port or host: redis-py's ValueError was a traceback (exit 1)
        (["serve", "--store", "redis://127.0.0.1:abc/0", "--namespace", "ns"],
         "Invalid value for '--store': bad host or port in the Redis URL"),
        (["serve", "--store", "redis://127.0.0.1:99999/0"], "'--store': bad host or port"),
        (["serve", "--store", "redis://[zz]:1/0"], "'--store': 'zz' does not appear"),
        (["snapshots", "list", "--store", "redis://127.0.0.1:abc/0"], "'--store': bad host"),
        (["snapshots", "show", "--store", "redis://127.0.0.1:99999/0"], "'--store': bad host"),
        (["up", "--store", "redis://127.0.0.1:99999/0"], "'--store': bad host or port"),
        (["worker", "--store", "redis://127.0.0.1:abc/0"], "'--store': bad host or port"),
        (["train", "--dataset", "digits", "--store", "redis://127.0.0.1:99999/0"],
         "'--store': bad host or port"),
        # a database that is not a number was Redis's database 0, silently
        (["serve", "--store", "redis://127.0.0.1:6379/abc"],
         "'--store': the Redis database 'abc' is not a non-negative integer"),
        (["up", "--store", "redis://127.0.0.1:6379/1/2"], "'--store': the Redis database '1/2'"),
        # Kafka addresses: a 165-line OverflowError, or a ValueError blamed on --dataset
        (["produce", "--dataset", "digits", "--topic", "t", "--bootstrap-servers",
          "127.0.0.1:99999"], "'--bootstrap-servers': '127.0.0.1:99999' is not HOST:PORT"),
        (["produce", "--dataset", "digits", "--topic", "t", "--bootstrap-servers",
          "host:notaport"], "'--bootstrap-servers': 'host:notaport' is not HOST:PORT"),
        (["up", "--port", "0", "--bootstrap-servers", "host:notaport"],  # failed after its banner
         "'--bootstrap-servers': 'host:notaport' is not HOST:PORT"),
        (["no-such-command"], "No such command"),
    ],
)
def test_bad_arguments_are_one_line_and_exit_2(args: list[str], message: str) -> None:
    line = _error_line(args)
    assert line.startswith("oclust") and ": error: " in line, line
    assert args[0] in line.split(": error: ")[0] or "No such command" in line, line
    assert message in line, line


def test_input_clip_reaches_a_fresh_model_and_inf_turns_it_off(tmp_path: Path) -> None:
    from oclust.training_worker.resume import fresh_model
    from oclust.training_worker.store import open_store

    for value, clip in ((None, 5.0), (3.0, 3.0), (float("inf"), None)):
        s = WorkerSettings(topic="t", n_clusters=3, input_clip=value)
        assert fresh_model(s, "cpu").clip == clip
    store = f"file://{tmp_path}"
    r = runner.invoke(app, ["train", "--dataset", "digits", "--epochs", "1", "--store", store,
                            "--input-clip", "inf"])
    assert r.exit_code == 0, r.output
    with open_store(store) as st:
        manifest = st.load().manifest
    assert "clip" in manifest and manifest["clip"] is None


def test_views_reach_a_fresh_model(tmp_path: Path) -> None:
    from oclust.training_worker.resume import fresh_model
    from oclust.training_worker.store import open_store

    for value, views in ((None, "auto"), (True, True), (False, False)):
        assert fresh_model(WorkerSettings(topic="t", views=value), "cpu").views == views
    store = f"file://{tmp_path}"
    r = runner.invoke(app, ["train", "--dataset", "digits", "--epochs", "1", "--store", store,
                            "--views"])
    assert r.exit_code == 0, r.output
    with open_store(store) as st:
        assert st.load().manifest["views"] is True  # the MLP's default is off


def test_worker_refuses_a_bad_regulariser_before_taking_the_lease(tmp_path: Path) -> None:
    store = f"file://{tmp_path}"
    _error_line(["worker", "--store", store, "--regulariser", "bogus", "--metrics-port", "-1"])
    assert list(tmp_path.iterdir()) == []  # no lease file, no namespace directory


@pytest.mark.parametrize("servers", ["127.0.0.1:99999", "host:notaport", "host:0", "kafka",
                                     "a:9092,", "[zz]:9092"])
def test_worker_refuses_bad_bootstrap_servers_before_taking_the_lease(
    servers: str, tmp_path: Path
) -> None:
    # it took the lease, then failed with a traceback (OverflowError) or `error: ValueError`
    line = _error_line(["worker", "--store", f"file://{tmp_path}", "--metrics-port", "-1",
                        "--bootstrap-servers", servers])
    assert "Invalid value for '--bootstrap-servers'" in line and "HOST:PORT" in line, line
    assert list(tmp_path.iterdir()) == []
    for good in ("127.0.0.1:9092", "kafka-0:9092, kafka-1:9093", "[::1]:9092"):
        assert WorkerSettings(bootstrap_servers=good).bootstrap_servers == good


@pytest.mark.parametrize(
    ("command", "cls", "left_out"),
    [("worker", WorkerSettings, set()), ("train", TrainSettings, set()),
     ("serve", ServiceSettings, {"api_key"})],
)
def test_every_setting_is_an_option_with_its_help(command: str, cls: type, left_out: set) -> None:
    group = typer.main.get_command(app)
    params = {p.name: p for p in group.commands[command].params}  # type: ignore[attr-defined]
    assert set(cls.model_fields) - left_out <= set(params)
    assert not left_out & set(params)  # the API key never appears in the process list
    for name, field in cls.model_fields.items():
        if name in params:
            assert params[name].help.startswith(field.description), name


def test_environment_still_sets_what_the_command_line_leaves_out() -> None:
    result = runner.invoke(app, ["train", "--dataset", "digits"],
                           env={"OCLUST_REGULARISER": "bogus"})
    assert result.exit_code == 2 and "unknown regulariser 'bogus'" in result.output


def test_a_taken_port_or_bad_host_is_a_one_line_error_for_serve_and_up(tmp_path: Path) -> None:
    import socket

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    port = str(taken.getsockname()[1])
    try:
        store = f"file://{tmp_path}"
        for command in ("serve", "up"):  # serve exited 3 after loading, uvicorn's own code
            line = _error_line([command, "--store", store, "--port", port])
            assert "--port: cannot listen on" in line, line
        line = _error_line(["up", "--store", store, "--host", "999.1.1.1", "--port", "0"])
        assert "--host: cannot listen on 999.1.1.1" in line, line  # it named --port
    finally:
        taken.close()


def test_up_with_an_unreachable_store_is_one_error_line_not_a_traceback() -> None:
    result = runner.invoke(app, ["up", "--quiet", "--port", "0", "--store",
                                 "redis://127.0.0.1:1/0"])
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: cannot use the store"), result.output


def test_up_with_an_unwritable_directory_store_fails_before_binding_the_port(
    tmp_path: Path,
) -> None:
    # up served while its worker retried the store forever; the port it asks for is taken, so
    # only a store checked first is the error
    import socket

    (tmp_path / "file").write_text("")
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    try:
        result = runner.invoke(app, ["up", "--quiet", "--port", str(taken.getsockname()[1]),
                                     "--store", f"file://{tmp_path}/file/store"])
    finally:
        taken.close()
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: cannot use the store"), result.output


@pytest.mark.parametrize("store", ["redis://127.0.0.1:1/0", "file:///dev/null/store"])
def test_train_with_an_unusable_store_fails_before_training(store: str) -> None:
    result = runner.invoke(app, ["train", "--dataset", "digits", "--store", store])
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()  # no progress bar: it failed after every epoch
    assert len(lines) == 1 and lines[0].startswith("error: cannot use the store"), result.output


def test_an_empty_api_key_is_refused_not_taken_for_no_key() -> None:
    for value in ("", "  "):  # an unset secret mapped to the variable: auth was silently off
        result = runner.invoke(app, ["serve"], env={"OCLUST_API_KEY": value})
        assert result.exit_code == 2, result.output
        assert "OCLUST_API_KEY is set but empty" in result.output, result.output
        assert "Invalid value for OCLUST_API_KEY:" in result.output  # there is no --api-key
        assert "--api-key" not in result.output, result.output
    result = runner.invoke(app, ["snapshots", "list"], env={"OCLUST_MAX_BATCH": "0"})
    assert result.exit_code == 2 and "Invalid value for OCLUST_MAX_BATCH:" in result.output
