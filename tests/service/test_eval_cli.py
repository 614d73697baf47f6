"""`oclust eval`: the JSON contract, the table, and clear errors."""

import json
import subprocess
import sys

from typer.testing import CliRunner

from oclust.service.cli import app


def test_eval_json_prints_one_object_of_means_and_nothing_else():
    # A real subprocess: stdout must hold the JSON alone (the progress bar goes to stderr).
    proc = subprocess.run(
        [sys.executable, "-m", "oclust", "eval", "--dataset", "digits", "-r", "ca,none",
         "--seeds", "1", "--epochs", "2", "--json"],
        capture_output=True, text=True, timeout=300, check=False,
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert set(out) == {"ca", "none", "KMeans", "MiniBatchKMeans"}
    for scores in out.values():
        assert set(scores) == {"acc", "nmi", "ari", "kl_star_hard", "kl_star_soft"}
        assert 0.0 <= scores["acc"] <= 1.0 and scores["kl_star_hard"] >= 0.0
    assert out["KMeans"]["kl_star_soft"] is None  # no soft assignment: null, not NaN
    assert out["KMeans"]["nmi"] > 0.5
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


def test_eval_paper_protocol_on_a_fashion_mnist_slice_with_probes():
    result = CliRunner().invoke(
        app, ["eval", "--dataset", "fashion_mnist", "--protocol", "paper", "-r", "ca",
              "--seeds", "1", "--epochs", "1", "--limit", "600", "--probes", "--no-reference",
              "--json"],
    )
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert set(out) == {"ca"}
    scores = out["ca"]
    assert set(scores) >= {"acc", "nmi", "linear_probe", "knn_probe"}
    assert 0.1 < scores["knn_probe"] <= 1.0 and 0.1 < scores["linear_probe"] <= 1.0


def test_paper_preset_builds_the_lenet_encoder_with_raw_latents_and_normal_centroids():
    import numpy as np
    import torch

    from oclust.model import OnlineClusterer, presets

    X = np.random.default_rng(0).random((64, 1, 28, 28)).astype(np.float32)
    clf = OnlineClusterer(**presets.paper(X.shape[1:], 10), seed=0)
    clf.partial_fit(X)
    convs = [m for m in clf.encoder_.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size) for c in convs] == [
        (1, 6, (5, 5)), (6, 16, (5, 5))]
    assert clf.encoder_.head.in_features == 256 and clf.encoder_.head.out_features == 128
    assert clf.encoder_config_.latent_norm == "none"
    assert clf.sigma == presets.PAPER_SIGMA == 50.0
    assert clf.optimizer_.param_groups[0]["betas"] == (0.9, 0.99)  # the paper's text
    assert clf.scaler_.count.item() == 0  # images go in as given: no running standardisation
    fresh = OnlineClusterer(**presets.paper(X.shape[1:], 10), seed=0)
    fresh._build(X.shape[1:])
    fresh._init_centroids(torch.zeros(4, 1, 28, 28), torch.zeros(4, 128))
    c = fresh.centroids_.detach().numpy()
    assert abs(c.mean()) < 0.1 and 0.9 < c.std() < 1.1  # N(0, 1), not data-driven


def test_eval_rejects_unknown_protocol():
    bad = CliRunner().invoke(app, ["eval", "--protocol", "authors"])
    assert bad.exit_code != 0 and "unknown protocol" in bad.output


def test_eval_rejects_batches_smaller_than_k_and_a_bad_limit():
    import pytest

    from oclust.model.evaluation import evaluate

    small = CliRunner().invoke(app, ["eval", "--dataset", "digits", "--batch-size", "4",
                                     "--seeds", "1", "--epochs", "1", "--limit", "100"])
    assert small.exit_code == 2 and "--batch-size" in small.output
    assert "Traceback" not in small.output
    ok = CliRunner().invoke(app, ["eval", "--dataset", "digits", "--batch-size", "4", "--json",
                                  "--seeds", "1", "--epochs", "1", "--limit", "100",
                                  "--no-reference"])
    assert ok.exit_code == 0 and set(json.loads(ok.stdout)) == {"ca"}, ok.output
    for bad in (0, -5, 2.5, True):
        with pytest.raises(ValueError, match="limit must be a positive integer"):
            evaluate("digits", ["ca"], limit=bad)
    few = CliRunner().invoke(app, ["eval", "--dataset", "digits", "--limit", "5"])
    assert few.exit_code == 2 and "--limit" in few.output and "Traceback" not in few.output
    with pytest.raises(ValueError, match=r"holds [0-9] of the dataset's 10 classes"):
        evaluate("digits", ["ca"], seeds=1, epochs=1, limit=5)  # K = 10: KL* would be nonsense
    dropped = CliRunner().invoke(app, ["eval", "--dataset", "digits", "--limit", "12"])
    assert dropped.exit_code == 2 and "7 of the dataset's 10 classes" in dropped.output
    for sigma in ("inf", "nan", "0"):
        bad_sigma = CliRunner().invoke(app, ["eval", "--sigma", sigma])
        assert bad_sigma.exit_code == 2 and "--sigma" in bad_sigma.output, bad_sigma.output
    import numpy as np

    out = evaluate("digits", ["ca"], seeds=1, epochs=1, limit=np.int64(200), reference=False)
    assert len(out["ca"]) == 1  # numpy integers are integers
    with pytest.raises(ValueError, match="MiniBatchKMeans reference needs at least 10"):
        evaluate("digits", ["ca"], seeds=1, epochs=1, batch_size=4, reference=True, limit=100)


def test_paper_protocol_feeds_fashion_mnist_in_zero_one_and_defaults_to_ten_epochs(monkeypatch):
    from oclust.model import OnlineClusterer, evaluation

    seen = []

    class Spy(OnlineClusterer):
        def fit(self, X, y=None, **kw):
            seen.append((self.get_params()["standardize"], float(X.min()), float(X.max())))
            return super().fit(X, y, **kw)

    monkeypatch.setattr(evaluation, "OnlineClusterer", Spy)
    evaluation.evaluate("fashion_mnist", ["ca"], seeds=1, epochs=1, protocol="paper", limit=300)
    evaluation.evaluate("fashion_mnist", ["ca"], seeds=1, epochs=1, limit=300)
    (paper_std, lo, hi), (default_std, dlo, _) = seen
    assert not paper_std and lo == 0.0 and hi == 1.0  # ToTensor's pixels, as the authors feed them
    assert default_std and dlo < 0.0  # the default protocol standardises
    assert evaluation.default_epochs("paper") == 10 and evaluation.default_epochs("default") == 40
    # the default protocol's epochs follow the data's size: ~400 steps, at most 40 epochs
    assert [evaluation.default_epochs("default", n) for n in (1797, 2310, 10_411, 70_000)] == [
        40, 40, 10, 2]
    assert evaluation.default_epochs("paper", 70_000) == 10


def _spied(monkeypatch, param: str) -> list:
    """The ``param`` of each model ``oclust eval`` fits from now on, in order."""
    from oclust.model import OnlineClusterer, evaluation

    seen = []

    class Spy(OnlineClusterer):
        def fit(self, X, y=None, **kw):
            seen.append(self.get_params()[param])
            return super().fit(X, y, **kw)

    monkeypatch.setattr(evaluation, "OnlineClusterer", Spy)
    return seen


def test_eval_input_clip_reaches_the_model_and_bad_values_are_refused(monkeypatch):
    seen = _spied(monkeypatch, "clip")
    runner = CliRunner()
    for value, clip in ((None, 5.0), ("3", 3.0), ("inf", None)):
        args = ["eval", "--seeds", "1", "--epochs", "1", "--limit", "300", "--no-reference"]
        result = runner.invoke(app, args + ([] if value is None else ["--input-clip", value]))
        assert result.exit_code == 0, result.output
        assert seen.pop() == clip
    result = runner.invoke(app, ["eval", "--protocol", "paper", "--seeds", "1", "--epochs", "1",
                                 "--limit", "300", "--no-reference"])
    assert result.exit_code == 0 and seen.pop() is None  # the authors clip nothing
    for bad in ("0", "-1", "1e7", "nan"):
        result = runner.invoke(app, ["eval", "--input-clip", bad])
        assert result.exit_code == 2 and "--input-clip" in result.output, (bad, result.output)


def test_eval_views_reach_the_model_over_the_protocol(monkeypatch):
    seen = _spied(monkeypatch, "views")
    runner = CliRunner()
    base = ["eval", "--seeds", "1", "--epochs", "1", "--limit", "300", "--no-reference"]
    for extra, views in (([], "auto"), (["--views"], True), (["--protocol", "paper"], False),
                         (["--protocol", "paper", "--views"], True)):
        result = runner.invoke(app, base + extra)
        assert result.exit_code == 0, result.output
        assert seen.pop() == views, extra


def test_eval_init_reaches_the_model_and_bad_values_are_refused(monkeypatch):
    seen = _spied(monkeypatch, "init")
    runner = CliRunner()
    base = ["eval", "--seeds", "1", "--epochs", "1", "--limit", "300", "--no-reference"]
    for extra, init in (([], "auto"), (["--init", "inputs"], "inputs"),
                        (["--protocol", "paper"], "normal"),
                        (["--protocol", "paper", "--init", "kmeans"], "kmeans")):
        result = runner.invoke(app, base + extra)
        assert result.exit_code == 0, result.output
        assert seen.pop() == init, extra
    result = runner.invoke(app, ["eval", "--init", "spectral"])
    assert result.exit_code == 2 and "--init" in result.output and "inputs" in result.output


def test_eval_input_guide_reaches_the_model_and_is_refused_for_other_regularisers(monkeypatch):
    seen = _spied(monkeypatch, "input_guide")
    runner = CliRunner()
    base = ["eval", "--seeds", "1", "--epochs", "1", "--limit", "300", "--no-reference"]
    for extra, guide in (([], "auto"), (["--input-guide", "0"], 0),
                         (["--protocol", "paper"], 0),
                         (["--protocol", "paper", "--input-guide", "5"], 5)):
        result = runner.invoke(app, base + extra)
        assert result.exit_code == 0, result.output
        assert seen.pop() == guide, extra
    result = runner.invoke(app, ["eval", "-r", "ca,sk", "--input-guide", "5"])
    assert result.exit_code == 2, result.output
    assert "Invalid value for '--input-guide'" in result.output and "'sk'" in result.output
    assert "eval digits" not in result.output  # before any work


def test_eval_refuses_a_model_parameter_the_protocol_cannot_build_before_any_work():
    # a latent of 2 under LayerNorm failed at the first batch: exit 1 after loading, bar shown
    result = CliRunner().invoke(app, ["eval", "--latent-dim", "2"])
    assert result.exit_code == 2, result.output
    assert result.output.count("\n") == 1 and "eval digits" not in result.output, result.output
    assert "Invalid value for '--latent-dim': latent_dim must be at least 3" in result.output
    ok = CliRunner().invoke(app, ["eval", "--latent-dim", "2", "--protocol", "paper", "--json",
                                  "--seeds", "1", "--epochs", "1", "--limit", "300",
                                  "--no-reference"])
    assert ok.exit_code == 0, ok.output  # the paper's raw latents take any size
