"""The serving pipeline a fitted model exports: scaler -> encoder -> centroids -> served rule.

:func:`load` builds it from a snapshot and :meth:`oclust.model.OnlineClusterer.export` from a fitted
clusterer; both give an :class:`Inference`: a callable from a validated float32 batch
(N, *input_shape) to an :class:`Assignment` (labels, squared distances to the chosen centroid,
soft assignments, the latents), the same answers as ``OnlineClusterer.assign`` and ``soft_assign``.

* MLP encoders run in :class:`CompiledInference`, one numba kernel (:mod:`oclust.model.kernel`) over
  NumPy arrays. From a snapshot it is built **without importing torch**: the weights are read
  with ``safetensors.numpy``, the layer program comes from the encoder config
  (:func:`oclust.model.encoder_config.mlp_program`), and the served tail (scaler statistics, serving
  centroids, a method's own head) from the ``serving.*`` tensors the clusterer writes.
* Other encoders (or a snapshot without a ``serving.*`` section) run in torch
  (:class:`oclust.model.inference_torch.TorchInference`), imported only then.

Example:
    >>> import numpy as np
    >>> from oclust.model import OnlineClusterer
    >>> X = np.random.default_rng(0).normal(size=(64, 3)).astype("float32")
    >>> clf = OnlineClusterer(n_clusters=2, latent_dim=4, random_state=0, device="cpu")
    >>> inf = load(clf.partial_fit(X).to_snapshot())
    >>> inf.backend, inf(X[:5]).labels.tolist() == clf.predict(X[:5]).tolist()
    ('compiled', True)
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from oclust.model.encoder_config import NORM_EPS, EncoderConfig, mlp_program
from oclust.model.kernel import Kernel, compile_program
from oclust.model.snapshot import Snapshot, SnapshotError, check_finite_weights, unpack_arrays

__all__ = [
    "SERVING_PREFIX",
    "Assignment",
    "CompiledInference",
    "Inference",
    "limit_blas_threads",
    "load",
]

#: Prefix of the snapshot tensors that describe the served tail: ``serving.centroids`` (K, m),
#: optional ``serving.scaler.mean`` / ``serving.scaler.std`` (the input standardisation, absent
#: when it is the identity) with ``serving.scaler.clip`` (1,) (absent: not clipped), and
#: ``serving.head.weight`` (K, m) / ``serving.head.bias`` (K,) (a method's own linear rule).
#: Without ``serving.centroids`` a snapshot is served by torch.
SERVING_PREFIX = "serving."


@dataclass(frozen=True)
class Assignment:
    """Served answers for a batch (nearest centroid, or the method's own rule)."""

    labels: np.ndarray  # int64 (N,)
    distances: np.ndarray  # float64 (N,), squared distance to the chosen centroid
    soft: np.ndarray  # float32 (N, K), softmax of the served logits
    latents: np.ndarray  # float32 (N, m), the encoder's output (what the centroids live in)


class Inference(Protocol):
    """What a serving pipeline offers (see the module docstring)."""

    n_clusters: int
    input_shape: tuple[int, ...]
    backend: str  # "compiled" (numba, no torch) or "torch"

    @property
    def centroids(self) -> np.ndarray:
        """The serving centroids, float32 (K, m), in the latent space of ``latents``."""
        ...

    def __call__(self, batch: np.ndarray) -> Assignment:
        """Assign a validated float32 batch of shape (N, *input_shape)."""
        ...


@dataclass(frozen=True, eq=False)
class CompiledInference:
    """An MLP serving pipeline in one numba kernel; build it with :meth:`from_arrays`.

    Example:
        >>> import numpy as np
        >>> from oclust.model.encoder_config import EncoderConfig
        >>> cfg = EncoderConfig("mlp", (2,), latent_dim=2, hidden=(), latent_norm="none")
        >>> arrays = {"net.0.weight": np.eye(2, dtype="float32"),
        ...           "net.0.bias": np.zeros(2, "float32"),
        ...           "serving.centroids": np.array([[0, 0], [5, 5]], "float32")}
        >>> inf = CompiledInference.from_arrays(cfg, 1.0, arrays, encoder_prefix="")
        >>> inf(np.array([[1, 1], [4, 6]], "float32")).labels.tolist()
        [0, 1]
    """

    kernel: Kernel
    n_clusters: int
    input_shape: tuple[int, ...]
    backend: str = "compiled"

    @classmethod
    def from_arrays(
        cls,
        cfg: EncoderConfig,
        sigma: float,
        arrays: Mapping[str, np.ndarray],
        encoder_prefix: str = "encoder.",
    ) -> CompiledInference:
        """Lower an MLP from its named weights (a snapshot's tensors as NumPy arrays).

        Raises :class:`SnapshotError` when a weight is missing or the shapes do not chain.
        """
        try:
            ops: list[tuple[str, tuple[np.ndarray, ...]]] = []
            if SERVING_PREFIX + "scaler.mean" in arrays:
                clip = arrays.get(SERVING_PREFIX + "scaler.clip", np.full(1, np.inf))
                ops.append(("standardize", (arrays[SERVING_PREFIX + "scaler.mean"],
                                            arrays[SERVING_PREFIX + "scaler.std"], clip)))
            for op, keys in mlp_program(cfg):
                params = tuple(arrays[encoder_prefix + k] for k in keys)
                ops.append((op, (*params, np.float32(NORM_EPS)) if "norm" in op else params))
            centroids = arrays[SERVING_PREFIX + "centroids"]
            head = None
            if SERVING_PREFIX + "head.weight" in arrays:
                head = (arrays[SERVING_PREFIX + "head.weight"],
                        arrays[SERVING_PREFIX + "head.bias"])
            kernel = compile_program(ops, math.prod(cfg.input_shape), centroids, sigma, head)
        except (KeyError, ValueError) as exc:
            raise SnapshotError(f"weights do not fit the manifest's MLP: {exc!r}") from exc
        return cls(kernel, int(centroids.shape[0]), tuple(cfg.input_shape))

    def __call__(self, batch: np.ndarray) -> Assignment:
        """Assign a validated float32 batch of shape (N, *input_shape)."""
        labels, dist, soft, latents = self.kernel(batch)
        return Assignment(labels, dist.astype(np.float64), soft, latents)

    @property
    def centroids(self) -> np.ndarray:
        """The serving centroids, float32 (K, m)."""
        return self.kernel.centroids


def limit_blas_threads(threads: int) -> None:
    """Run the compiled kernel's matrix products (numba's ``np.dot``: SciPy's OpenBLAS) on at
    most ``threads`` threads, process-wide, as ``torch.set_num_threads`` does for torch.

    Left alone, OpenBLAS starts a thread per core for every product of a batch's 128-row
    blocks; on a host whose cores are busy (the HTTP server, its clients) those threads wait on
    each other, and a 4096-point batch took 2-4x longer than on one thread (measured).
    """
    import scipy.linalg.cython_blas  # noqa: F401  (what numba's np.dot calls: loaded first)
    from threadpoolctl import threadpool_limits

    threadpool_limits(threads, user_api="blas")


def load(
    snapshot: Snapshot, device: str = "cpu", verify: bool = True,
    torch_threads: int | None = None,
) -> Inference:
    """The serving pipeline of a snapshot; :class:`SnapshotError` if it is bad.

    ``verify=False`` skips the checksums of a snapshot already verified (by the store that read
    it). An MLP snapshot with a ``serving.*`` section is built without torch (whatever
    ``device``), its matrix products then limited to ``torch_threads`` BLAS threads when given
    (:func:`limit_blas_threads`); anything else rebuilds the clusterer in torch on ``device``
    and exports it, after setting torch's intra-op threads to ``torch_threads`` when given.
    """
    if verify:
        snapshot.verify()
    try:
        cfg = EncoderConfig.from_dict(snapshot.manifest["encoder"])
        sigma = float(snapshot.manifest["sigma"])
        if not 0.0 < sigma < math.inf:  # 0 divides by zero; negative or NaN inverts soft labels
            raise ValueError(f"sigma must be a positive finite number, got {sigma!r}")
    except (KeyError, TypeError, ValueError) as exc:
        raise SnapshotError(f"manifest is missing or has a bad field: {exc!r}") from exc
    arrays = unpack_arrays(snapshot.weights)
    check_finite_weights(arrays)  # NaN weights would answer 422 "values too large" to everyone
    if cfg.kind == "mlp" and SERVING_PREFIX + "centroids" in arrays:
        compiled = CompiledInference.from_arrays(cfg, sigma, arrays)
        if torch_threads is not None:
            limit_blas_threads(torch_threads)
        return compiled
    import torch  # only for what the kernel cannot run

    from oclust.model.clusterer import OnlineClusterer

    if torch_threads is not None:
        torch.set_num_threads(torch_threads)
    return OnlineClusterer.from_snapshot(snapshot, device=device, verify=False).export()
