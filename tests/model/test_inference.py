"""The exported serving pipeline (model.inference): same answers as the clusterer, built from a
snapshot without torch for MLPs, torch for the other encoders."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from oclust.model import OnlineClusterer, Snapshot
from oclust.model.encoder_config import LATENT_NORMS, EncoderConfig, mlp_program
from oclust.model.encoders import build_encoder
from oclust.model.inference import SERVING_PREFIX, load
from oclust.model.kernel import compile_program
from oclust.model.snapshot import SnapshotError, pack_tensors, unpack_tensors

ROOT = Path(__file__).resolve().parents[2]


def _fit(shape: tuple[int, ...], seed: int = 0, k: int = 3, **kw: object) -> OnlineClusterer:
    rng = np.random.default_rng(seed)
    kw = {"latent_dim": 8, "hidden": (16,), "random_state": seed, "device": "cpu", **kw}
    clf = OnlineClusterer(n_clusters=k, **kw)
    for _ in range(3):
        clf.partial_fit(rng.normal(size=(64, *shape)).astype("float32"))
    return clf


def _assert_same(inf, clf: OnlineClusterer, x: np.ndarray) -> None:
    """Labels exactly, distances, soft assignments and latents to float32 tolerance."""
    labels, dists = clf.assign(x)
    soft = clf.soft_assign(x)
    got = inf(x)
    assert got.labels.dtype == np.int64 and got.distances.dtype == np.float64
    assert got.labels.tolist() == labels.tolist()
    np.testing.assert_allclose(got.distances, dists, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(got.soft, soft, rtol=1e-4, atol=1e-5)
    assert got.latents.dtype == np.float32 and got.latents.shape == (len(x), clf.latent_dim)
    np.testing.assert_allclose(got.latents, clf.transform(x), rtol=1e-4, atol=1e-4)
    assert inf.centroids.shape == (inf.n_clusters, clf.latent_dim)
    for i in range(0, len(x), 5):  # single samples (the traced path for torch)
        one = inf(x[i : i + 1])
        assert one.labels.tolist() == [labels[i]]
        np.testing.assert_allclose(one.distances, dists[i : i + 1], rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(one.latents, got.latents[i : i + 1], rtol=1e-4, atol=1e-4)


CASES = [
    ((5,), {}, "compiled"),
    ((5,), {"standardize": False}, "compiled"),
    ((5,), {"latent_norm": "batch"}, "compiled"),
    ((5,), {"latent_norm": "none", "hidden": (16, 8)}, "compiled"),
    ((5,), {"regulariser": "cm"}, "compiled"),  # the clustering module's argmax-gamma head
    ((5,), {"regulariser": "aecm"}, "compiled"),
    ((5,), {"regulariser": "sk", "prior": "online"}, "compiled"),
    ((2, 12), {}, "torch"),
    ((2, 12), {"regulariser": "cm"}, "torch"),
    ((6, 6), {"encoder": "cnn"}, "torch"),
    ((6, 6), {}, "torch"),  # convnet, the default for images
]


@pytest.mark.parametrize(("shape", "kw", "backend"), CASES)
def test_snapshot_and_export_answer_as_the_clusterer(
    shape: tuple[int, ...], kw: dict[str, object], backend: str
) -> None:
    clf = _fit(shape, **kw)
    x = np.random.default_rng(9).normal(size=(40, *shape)).astype("float32") * 2
    for inf in (load(clf.to_snapshot()), clf.export()):
        assert inf.backend == backend
        assert (inf.n_clusters, inf.input_shape) == (3, shape)
        _assert_same(inf, clf, x)


@pytest.mark.parametrize(("shape", "backend"), [((5,), "compiled"), ((2, 12), "torch")])
def test_standardised_inputs_are_clipped_alike_by_every_path(
    shape: tuple[int, ...], backend: str
) -> None:
    x = np.random.default_rng(4).normal(size=(12, *shape)).astype("float32")
    far, farther = x.copy(), x.copy()
    far.reshape(12, -1)[:, 0], farther.reshape(12, -1)[:, 0] = 1e3, 1e4  # both beyond 5 std
    clipped, unclipped = _fit(shape), _fit(shape, clip=None)
    assert clipped.clip == 5.0 and clipped.to_snapshot().manifest["clip"] == 5.0
    np.testing.assert_array_equal(clipped.transform(far), clipped.transform(farther))
    assert not np.allclose(unclipped.transform(far), unclipped.transform(farther))
    for clf in (clipped, unclipped):
        for inf in (load(clf.to_snapshot()), clf.export()):
            assert inf.backend == backend
            _assert_same(inf, clf, far)
    inf = load(clipped.to_snapshot())
    np.testing.assert_array_equal(inf(far).latents, inf(farther).latents)


def test_serving_clips_as_the_built_model_after_set_params() -> None:
    clf = _fit((5,))
    clf.set_params(clip=None)  # builds nothing: the model keeps clipping as it was built
    x = np.random.default_rng(6).normal(size=(8, 5)).astype("float32")
    x[:, 0] = 1e3
    assert clf.to_snapshot().manifest["clip"] == 5.0
    for inf in (load(clf.to_snapshot()), clf.export()):
        _assert_same(inf, clf, x)


def test_a_manifest_without_clip_serves_unclipped_as_it_was_written() -> None:
    snap = _fit((5,), clip=None).to_snapshot()
    manifest = {k: v for k, v in snap.manifest.items() if k not in ("sha256", "clip")}
    old = Snapshot.create(snap.weights, manifest)  # as written before the field existed
    assert OnlineClusterer.from_snapshot(old).clip is None
    x = np.random.default_rng(5).normal(size=(8, 5)).astype("float32")
    x[:, 0] = 1e3
    np.testing.assert_array_equal(load(old)(x).latents, load(snap)(x).latents)


def test_digits_mlp_labels_equal_predict() -> None:
    from oclust.model.datasets import load_digits

    X, _ = load_digits()
    clf = OnlineClusterer(n_clusters=10, random_state=0, device="cpu")
    clf.fit(X, epochs=1)
    inf = load(clf.to_snapshot())
    assert inf.backend == "compiled"
    _assert_same(inf, clf, X.astype(np.float32))


def test_export_is_frozen() -> None:
    clf = _fit((5,))
    x = np.random.default_rng(1).normal(size=(30, 5)).astype("float32")
    inf = clf.export()
    before = inf(x)
    clf.partial_fit(np.random.default_rng(2).normal(size=(64, 5)).astype("float32") * 5)
    np.testing.assert_array_equal(inf(x).distances, before.distances)
    assert not np.array_equal(clf.export()(x).distances, before.distances)


def test_torch_export_is_frozen() -> None:
    clf = _fit((2, 12))
    x = np.random.default_rng(1).normal(size=(30, 2, 12)).astype("float32")
    inf = clf.export()
    before = inf(x)
    clf.partial_fit(np.random.default_rng(2).normal(size=(64, 2, 12)).astype("float32") * 5)
    np.testing.assert_array_equal(inf(x).distances, before.distances)
    assert not np.array_equal(clf.export()(x).distances, before.distances)


def test_traced_path_runs_without_a_grad_context() -> None:
    inf = _fit((2, 12)).export()
    assert inf.single_path == "traced"
    x = np.random.default_rng(0).normal(size=(1, 2, 12)).astype(np.float32)
    labels, dist, soft, latents = inf.single(x)  # outside inference mode, as the service calls
    with torch.inference_mode():
        want = inf.pipeline(torch.from_numpy(x))
    assert labels.tolist() == want[0].tolist()
    np.testing.assert_allclose(dist, want[1].numpy(), rtol=1e-5, atol=1e-5)  # float32 roundoff
    np.testing.assert_allclose(soft, want[2].numpy(), rtol=1e-5)
    np.testing.assert_allclose(latents, want[3].numpy(), rtol=1e-5, atol=1e-6)


def test_snapshot_without_serving_section_is_rebuilt_in_torch() -> None:
    clf = _fit((5,), regulariser="cm")
    snap = clf.to_snapshot()
    tensors = {k: v for k, v in unpack_tensors(snap.weights).items()
               if not k.startswith(SERVING_PREFIX)}  # as written before the section existed
    manifest = {k: v for k, v in snap.manifest.items() if k != "sha256"}
    inf = load(Snapshot.create(pack_tensors(tensors), manifest))  # via the clusterer's export
    assert inf.backend == "compiled"
    _assert_same(inf, clf, np.random.default_rng(3).normal(size=(20, 5)).astype("float32"))


def test_bad_snapshots_are_refused() -> None:
    snap = _fit((5,)).to_snapshot()
    with pytest.raises(SnapshotError, match="sha256"):
        load(Snapshot(snap.weights + b"x", snap.manifest))
    tensors = {k: v for k, v in unpack_tensors(snap.weights).items() if "net.3" not in k}
    manifest = {k: v for k, v in snap.manifest.items() if k != "sha256"}
    with pytest.raises(SnapshotError, match=r"net\.3\.weight"):  # the last Linear
        load(Snapshot.create(pack_tensors(tensors), manifest))
    with pytest.raises(SnapshotError, match="encoder"):
        load(Snapshot.create(pack_tensors(tensors), {"sigma": 1.0}))
    with pytest.raises(SnapshotError, match="safetensors"):
        load(Snapshot.create(b"garbage", manifest))


@pytest.mark.parametrize("norm", LATENT_NORMS)
def test_mlp_program_names_the_encoders_weights(norm: str) -> None:
    cfg = EncoderConfig.for_shape((7,), latent_dim=4, hidden=(6, 5), latent_norm=norm)
    state = build_encoder(cfg).state_dict()
    used = {k for _, keys in mlp_program(cfg) for k in keys}
    assert used <= set(state)
    assert {k for k in state if not k.endswith("num_batches_tracked")} == used
    with pytest.raises(ValueError, match="conv1d"):
        mlp_program(EncoderConfig.for_shape((2, 12)))


def _serve_in_fresh_process(
    tmp_path: Path, clf: OnlineClusterer, x: np.ndarray, lines: str
) -> dict:
    """Write ``clf``'s snapshot and ``x`` to ``tmp_path``, then run ``lines`` in a fresh
    interpreter that has ``snap`` (the snapshot read back) and ``x``; its last stdout line is
    a JSON object, returned."""
    snap = clf.to_snapshot()
    (tmp_path / "w.safetensors").write_bytes(snap.weights)
    (tmp_path / "m.json").write_text(snap.manifest_json())
    np.save(tmp_path / "x.npy", x)
    code = (
        "import sys, json, numpy as np\n"
        "from pathlib import Path\n"
        "from oclust.model.snapshot import Snapshot\n"
        "from oclust.model.inference import load\n"
        f"d = Path({str(tmp_path)!r})\n"
        "w, m = (d / 'w.safetensors').read_bytes(), (d / 'm.json').read_text()\n"
        "snap = Snapshot.from_parts(w, m)\n"
        "x = np.load(d / 'x.npy')\n" + lines
    )
    env = {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=env, cwd=ROOT, timeout=120)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_an_mlp_snapshot_is_served_without_importing_torch(tmp_path: Path) -> None:
    clf = _fit((5,), regulariser="cm")
    x = np.random.default_rng(4).normal(size=(10, 5)).astype("float32")
    answer = _serve_in_fresh_process(tmp_path, clf, x, (
        "out = load(snap)(x)\n"
        "print(json.dumps({'torch': 'torch' in sys.modules, 'labels': out.labels.tolist()}))\n"
    ))
    assert answer == {"torch": False, "labels": clf.predict(x).tolist()}


def test_compiled_kernel_blas_threads_follow_the_setting(tmp_path: Path) -> None:
    # in a fresh process (the limit is process-wide) where OpenBLAS starts on 1 thread
    clf = _fit((5,))
    x = np.random.default_rng(5).normal(size=(300, 5)).astype("float32")
    answer = _serve_in_fresh_process(tmp_path, clf, x, (
        "from threadpoolctl import threadpool_info\n"
        "inf = load(snap, torch_threads=2)\n"
        "blas = sorted({i['num_threads'] for i in threadpool_info() if i['user_api'] == 'blas'})\n"
        "print(json.dumps({'blas': blas, 'labels': inf(x).labels.tolist()}))\n"
    ))
    assert answer == {"blas": [2], "labels": clf.predict(x).tolist()}


@settings(max_examples=30, deadline=None)
@given(
    layers=st.lists(
        st.sampled_from(["linear", "relu", "layernorm", "batchnorm", "affine_batchnorm"]),
        max_size=5,
    ),
    width=st.integers(1, 9),
    k=st.integers(1, 5),
    scale=st.sampled_from([0.01, 1.0, 30.0]),
    head=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_kernel_equals_torch(
    layers: list[str], width: int, k: int, scale: float, head: bool, seed: int
) -> None:
    torch.manual_seed(seed)
    mods: list[nn.Module] = [nn.Linear(4, width)]
    for name in layers:
        if name == "linear":
            mods.append(nn.Linear(width, width))
        elif name == "relu":
            mods.append(nn.ReLU())
        elif name == "layernorm":
            mods.append(nn.LayerNorm(width, elementwise_affine=False))
        else:  # the MLP's hidden layers have an affine BatchNorm, the latent one none
            bn = nn.BatchNorm1d(width, affine=name == "affine_batchnorm").eval()
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
            if bn.affine:
                with torch.no_grad():
                    bn.weight.uniform_(-2, 2)
                    bn.bias.uniform_(-1, 1)
            mods.append(bn)
    ops = []
    for m in mods:
        if isinstance(m, nn.Linear):
            ops.append(("linear", (m.weight.detach().numpy(), m.bias.detach().numpy())))
        elif isinstance(m, nn.ReLU):
            ops.append(("relu", ()))
        elif isinstance(m, nn.LayerNorm):
            ops.append(("layernorm", (m.eps,)))
        else:
            affine = (m.weight.detach().numpy(), m.bias.detach().numpy()) if m.affine else ()
            stats = (m.running_mean.numpy(), m.running_var.numpy())
            ops.append(("batchnorm", (*stats, *affine, m.eps)))
    enc = nn.Sequential(*mods).eval()
    centroids = torch.randn(k, width)
    lin = nn.Linear(width, k)
    kernel = compile_program(ops, 4, centroids.numpy(), sigma=1.0, head=(
        lin.weight.detach().numpy(), lin.bias.detach().numpy()) if head else None)
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(seed)) * scale
    with torch.no_grad():
        z = enc(x)
        d = torch.cdist(z, centroids) ** 2
        logits = lin(z) if head else -0.5 * d
    labels, dist, soft, latents = kernel(x.numpy())
    np.testing.assert_allclose(latents, z.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(soft, torch.softmax(logits, dim=1).numpy(), rtol=1e-3, atol=1e-5)
    if head:
        assert labels.tolist() == logits.argmax(dim=1).tolist()
        np.testing.assert_allclose(dist, d.numpy()[np.arange(3), labels], rtol=1e-4, atol=1e-4)
    else:
        np.testing.assert_allclose(dist, d.min(dim=1).values.numpy(), rtol=1e-4, atol=1e-4)
        close = d.numpy()[np.arange(3), labels] <= d.min(dim=1).values.numpy() + 1e-4
        assert close.all()  # the chosen centroid is a nearest one (ties within rounding)


def test_kernel_turns_overflow_into_nan() -> None:
    w = np.ones((4, 3), np.float32)
    kernel = compile_program([("linear", (w, np.zeros(4, np.float32))), ("layernorm", (1e-5,))],
                             3, np.random.default_rng(0).normal(size=(2, 4)), sigma=1.0)
    labels, dist, _, _ = kernel(np.full((1, 3), 3e38, np.float32))
    assert labels.tolist() in ([0], [1]) and np.isnan(dist).all()


def test_kernel_refuses_shapes_that_do_not_chain() -> None:
    w = np.ones((4, 3), np.float32)
    with pytest.raises(ValueError, match="linear layer"):
        compile_program([("linear", (w, np.zeros(4, np.float32)))], 5, np.zeros((2, 4)), 1.0)
    with pytest.raises(ValueError, match="centroids"):
        compile_program([("linear", (w, np.zeros(4, np.float32)))], 3, np.zeros((2, 3)), 1.0)
    stats, eps = (np.zeros(4), np.ones(4)), 1e-5
    linear = ("linear", (w, np.zeros(4, np.float32)))
    with pytest.raises(ValueError, match=r"batchnorm of shapes \[\(4,\), \(4,\), \(3,\)"):
        compile_program([linear, ("batchnorm", (*stats, np.ones(3), np.zeros(4), eps))], 3,
                        np.zeros((2, 4)), 1.0)
    with pytest.raises(ValueError, match="batchnorm of shapes"):  # a scalar would broadcast
        compile_program([linear, ("batchnorm", (np.zeros(1), np.ones(4), eps))], 3,
                        np.zeros((2, 4)), 1.0)
