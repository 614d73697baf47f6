"""`oclust eval`: the JSON contract, the table, and clear errors."""

import json
import subprocess
import sys

from typer.testing import CliRunner

from service.cli import app


def test_eval_json_prints_one_object_of_means_and_nothing_else():
    # A real subprocess: stdout must hold the JSON alone (the progress bar goes to stderr).
    proc = subprocess.run(
        [sys.executable, "-m", "service", "eval", "--dataset", "digits", "-r", "ca,none",
         "--seeds", "1", "--epochs", "2", "--json"],
        capture_output=True, text=True, timeout=300, check=False,
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert set(out) == {"ca", "none"}
    for scores in out.values():
        assert set(scores) == {"acc", "nmi", "ari", "kl_star_hard", "kl_star_soft"}
        assert 0.0 <= scores["acc"] <= 1.0 and scores["kl_star_hard"] >= 0.0
    assert out["ca"]["nmi"] > 0.3  # two epochs already learn something on digits
    assert "eval digits" in proc.stderr  # the progress bar


def test_eval_table_has_reference_rows():
    result = CliRunner().invoke(
        app, ["eval", "--dataset", "segments", "--seeds", "1", "--epochs", "1"]
    )
    assert result.exit_code == 0, result.output
    for row in ("ca", "KMeans", "MiniBatchKMeans", "KL* hard"):
        assert row in result.output


def test_eval_rejects_unknown_names():
    runner = CliRunner()
    bad_reg = runner.invoke(app, ["eval", "-r", "ca,bogus"])
    assert bad_reg.exit_code != 0 and "bogus" in bad_reg.output
    bad_ds = runner.invoke(app, ["eval", "--dataset", "mnist"])
    assert bad_ds.exit_code != 0 and "unknown dataset" in bad_ds.output
