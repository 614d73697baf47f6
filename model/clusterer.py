"""The online deep clusterer: encoder + K centroids + a partition-support regulariser.

Example:
    >>> import numpy as np
    >>> from model import OnlineClusterer
    >>> X = np.random.default_rng(0).normal(size=(256, 8)).astype("float32")
    >>> clf = OnlineClusterer(n_clusters=3, latent_dim=8, random_state=0)
    >>> clf.partial_fit(X).last_step_.labels.shape, clf.predict(X[:1]).shape
    ((256,), (1,))

It is a scikit-learn estimator (``clone``, pipelines, ``fit_predict``, ``fit_transform``):

    >>> from sklearn.pipeline import make_pipeline
    >>> from sklearn.preprocessing import StandardScaler
    >>> pipe = make_pipeline(StandardScaler(), OnlineClusterer(3, latent_dim=8, random_state=0))
    >>> pipe.fit_predict(X.astype("float64")).shape
    (256,)
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from sklearn.base import (
    BaseEstimator,
    ClassNamePrefixFeaturesOutMixin,
    ClusterMixin,
    TransformerMixin,
)
from sklearn.exceptions import NotFittedError
from sklearn.utils import Tags
from sklearn.utils.validation import validate_data
from torch import nn

from model import metrics
from model.encoders import IMAGE_KINDS, EncoderConfig, build_encoder
from model.priors import OnlinePrior, resolve_prior
from model.regularisers import REGULARISERS, Batch, make_regulariser, serve, sq_distances
from model.snapshot import Snapshot, SnapshotError, pack_tensors, unpack_tensors

__all__ = ["EXPECTED_FAILED_CHECKS", "OnlineClusterer", "StepReport"]

DEFAULT_SIGMA = 10.0
DEFAULT_LATENT_DIM = 128
INFERENCE_ROWS = 4096  # most samples pushed through the encoder at once by predict & co.
INFERENCE_BYTES = 32 * 2**20  # and a bound on one chunk's widest activation, in bytes
_F32_MAX = float(np.finfo(np.float32).max)

#: The scikit-learn estimator checks OnlineClusterer is known to fail, with the reason; pass it
#: as ``check_estimator(..., expected_failed_checks=EXPECTED_FAILED_CHECKS)``.
EXPECTED_FAILED_CHECKS = {
    "check_methods_subset_invariance": (
        "transform runs the encoder in float32: BLAS computes one row and a batch of rows in a "
        "different order, so latents differ in the last float32 bits (about 5e-7, over the "
        "check's atol of 1e-7); predict agrees exactly"
    ),
}
_GENERATORS = (np.random.RandomState, np.random.Generator)


@dataclass(frozen=True)
class StepReport:
    """What one ``partial_fit`` step did, by the training labels and by the served labels.

    The *training* labels are the regulariser's assignment of the batch (CA and SK balance them
    by construction, even for a collapsed encoder). The *served* labels are the nearest
    (serving) centroid of each sample, the rule ``predict`` and ``/assign`` use, computed from
    the step's own latents (no second forward pass; for an encoder with batch normalisation
    these are the training-mode latents): collapse shows there first. Entropies and KL* are
    in nats.
    """

    labels: np.ndarray  # hard training labels of the batch (from the regulariser)
    loss: float
    train_hard_entropy: float  # entropy of the training-label histogram (max log K)
    train_kl_star: float  # KL(training-label histogram || prior)
    n: int
    served_labels: np.ndarray  # nearest serving centroid of each sample (what predict says)
    served_hard_entropy: float  # entropy of the served-label histogram
    served_kl_star: float  # KL(served-label histogram || prior)

    @property
    def hard_entropy(self) -> float:
        """Alias of :attr:`train_hard_entropy` (kept for older callers)."""
        return self.train_hard_entropy

    @property
    def kl_star(self) -> float:
        """Alias of :attr:`train_kl_star` (kept for older callers)."""
        return self.train_kl_star


class RunningScaler(nn.Module):
    """Streaming per-feature (or per-channel) standardisation with Welford's batch update."""

    def __init__(self, stat_shape: tuple[int, ...], reduce_dims: tuple[int, ...]) -> None:
        super().__init__()
        self.reduce_dims = reduce_dims
        self.register_buffer("count", torch.zeros((), dtype=torch.float64))
        self.register_buffer("mean", torch.zeros(stat_shape, dtype=torch.float64))
        self.register_buffer("m2", torch.zeros(stat_shape, dtype=torch.float64))

    def update(self, x: torch.Tensor) -> None:
        """Merge the batch statistics into the running ones (Chan et al.)."""
        xd = x.to(torch.float64)
        n_b = float(np.prod([x.shape[d] for d in self.reduce_dims]))
        mean_b = xd.mean(dim=self.reduce_dims)
        m2_b = ((xd - self._expand(mean_b)) ** 2).sum(dim=self.reduce_dims)
        n_a = self.count.item()
        delta = mean_b - self.mean
        total = n_a + n_b
        self.mean += delta * (n_b / total)
        self.m2 += m2_b + delta**2 * (n_a * n_b / total)
        self.count += n_b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.count.item() < 2:
            return x
        std = (self.m2 / (self.count - 1)).sqrt()
        std = torch.where(std < 1e-6, torch.ones_like(std), std)  # constant features pass through
        return (x - self._expand(self.mean).to(x)) / self._expand(std).to(x)

    def _expand(self, stat: torch.Tensor) -> torch.Tensor:
        shape = [1] * (len(self.reduce_dims) + stat.dim())
        kept = [d for d in range(len(shape)) if d not in self.reduce_dims]
        for d, s in zip(kept, stat.shape, strict=True):
            shape[d] = s
        return stat.reshape(shape)


def _check_finite(arr: np.ndarray) -> None:
    """Raise ``ValueError`` naming the samples with NaN, inf or values beyond float32's range.

    ``min``/``max`` need no copy of the array; the per-sample search runs only on failure.
    """
    if arr.dtype.kind != "f":
        return
    lo, hi = float(arr.min()), float(arr.max())  # NaN propagates; float: no float16 overflow
    if lo >= -_F32_MAX and hi <= _F32_MAX:
        return
    bad: list[int] = []
    for start in range(0, len(arr), INFERENCE_ROWS):
        chunk = arr[start : start + INFERENCE_ROWS]
        with np.errstate(over="ignore"):
            ok = np.isfinite(chunk.astype(np.float32).reshape(len(chunk), -1)).all(axis=1)
        bad += (start + np.flatnonzero(~ok)).tolist()
        if len(bad) >= 5:
            break
    raise ValueError(
        f"input contains NaN, infinite or beyond-float32 values (samples {bad[:5]})"
    )


def _out_dtype(arr: np.ndarray) -> type[np.floating]:
    """float32 input gives float32 latents, anything else float64 (scikit-learn's rule)."""
    return np.float32 if arr.dtype == np.float32 else np.float64


def _scaler_for(cfg: EncoderConfig) -> RunningScaler:
    shape = cfg.input_shape
    if len(shape) == 1:  # per feature
        return RunningScaler(shape, (0,))
    if cfg.kind in IMAGE_KINDS and len(shape) == 2:  # single-channel image: one global statistic
        return RunningScaler((), (0, 1, 2))
    return RunningScaler((shape[0],), (0, *range(2, len(shape) + 1)))  # per channel


class OnlineClusterer(
    ClassNamePrefixFeaturesOutMixin, ClusterMixin, TransformerMixin, BaseEstimator
):
    """Encoder f, centroids mu and a regulariser, trained one batch at a time.

    A scikit-learn estimator: parameters are stored as given and checked by ``fit`` and the
    first ``partial_fit``; nothing is built until the first batch arrives (which fixes the
    per-sample input shape). ``fit`` starts over, ``partial_fit`` trains one step on one batch;
    both return ``self``. Every method takes any array-like of numbers (lists, strided or
    reversed views, pandas DataFrames, float64 or integer data) and answers as it would on a
    contiguous float32 copy; inference runs in chunks of bounded memory.

    Args:
        n_clusters: K.
        regulariser: name of a registered regulariser (``ca``, ``sk``, ``ent``, ``ss``, ``varm``,
            ``none``, ...).
        prior: ``None`` or ``"uniform"``, a probability vector of length K, or ``"online"``:
            estimated from the stream (:class:`model.priors.OnlinePrior`: EM mixture weights
            from prior-free soft responsibilities of each step's distances, shrunk toward
            uniform, KL-capped, uniform until warmed up; fed back as ``log_prior`` and saved
            in the snapshot manifest).
        sigma: isotropic variance; CA trades distance against ``2 sigma log(n_k + 1)``.
        latent_dim: size of the latent space.
        lr: Adam learning rate (betas (0.9, 0.99), as in the paper).
        device: ``"auto"`` (CUDA when present), ``"cpu"`` or ``"cuda[:i]"``.
        random_state: an int (or a ``numpy`` random generator to draw one from) that makes CPU
            training deterministic: network initialisation, centroid seeding and ``fit``'s
            shuffling. Saved in the snapshot manifest as ``seed``.
        encoder: ``"auto"`` (from the input shape) or a kind of :data:`model.encoders.ENCODERS`.
        hidden: hidden widths (MLP) or channels (convolutional encoders).
        standardize: standardise inputs with running statistics learned from the stream.
        reg_params: keyword arguments of the regulariser (e.g. ``{"lam": 2.0}``).
        latent_norm: ``"layer"`` (default), ``"batch"`` or ``"none"``: normalisation of the
            encoder output. Without it the encoder shrinks every latent onto its centroid and
            the distances stop carrying information.
        init: centroid seeding on the first batch's latents: ``"kmeans"`` (default, a full
            k-means on that batch), ``"kmeans++"`` (seeding only) or ``"normal"`` (N(0, 1)
            draws, as the CA paper's code does).
        seed: the former name of ``random_state``, still accepted; ``random_state`` wins when
            both are given.

    Attributes:
        labels_: cluster of each sample of the last ``fit`` (nearest centroid, as ``predict``)
            or, after ``partial_fit``, the served labels of its batch
            (``last_step_.served_labels``, the rule ``predict`` applies, from the step's latents).
        last_step_: the :class:`StepReport` of the last training step.
        cluster_centers_: the K centroids the model serves, in the *latent* space (compare
            them with ``transform(X)``, not with X), shape (K, latent_dim).
        n_features_in_: ``X.shape[1]`` of the training data (``feature_names_in_`` too when it
            was a DataFrame with string column names).
        input_shape_: the per-sample shape, ``X.shape[1:]``.
        samples_seen_, steps_: samples and steps trained since ``fit`` (or the first batch).
    """

    samples_seen_: int = 0  # class defaults: readable before the first batch
    steps_: int = 0
    _built = False
    _centroids_ready = False
    _in_fit = False

    def __init__(
        self,
        n_clusters: int = 10,
        regulariser: str = "ca",
        prior: np.ndarray | list[float] | str | None = None,
        sigma: float = DEFAULT_SIGMA,
        latent_dim: int = DEFAULT_LATENT_DIM,
        lr: float = 1e-3,
        device: str = "auto",
        random_state: int | np.random.RandomState | np.random.Generator | None = None,
        encoder: str = "auto",
        hidden: tuple[int, ...] | None = None,
        standardize: bool = True,
        reg_params: dict[str, float] | None = None,
        latent_norm: str = "layer",
        init: str = "kmeans",
        seed: int | None = None,
    ) -> None:
        self.n_clusters = n_clusters
        self.regulariser = regulariser
        self.prior = prior
        self.sigma = sigma
        self.latent_dim = latent_dim
        self.lr = lr
        self.device = device
        self.random_state = random_state
        self.encoder = encoder
        self.hidden = hidden
        self.standardize = standardize
        self.reg_params = reg_params
        self.latent_norm = latent_norm
        self.init = init
        self.seed = seed

    # ----------------------------------------------------------------- validation
    def validate_params(self) -> OnlineClusterer:
        """Check the parameters (``fit`` and the first ``partial_fit`` do it); return self.

        Raises ``ValueError`` with a clear message, so a caller can reject a bad configuration
        before any data arrives.

        >>> OnlineClusterer(sigma=0).validate_params()
        Traceback (most recent call last):
        ...
        ValueError: sigma must be a positive number, got 0
        """
        k = self.n_clusters
        if not isinstance(k, numbers.Integral) or isinstance(k, bool) or k < 1:
            raise ValueError(f"n_clusters must be a positive integer, got {k!r}")
        if not isinstance(self.regulariser, str) or self.regulariser not in REGULARISERS:
            raise ValueError(
                f"unknown regulariser {self.regulariser!r}; "
                f"choose from {', '.join(sorted(REGULARISERS))}"
            )
        if self.init not in ("kmeans++", "kmeans", "normal"):
            raise ValueError(f"init must be 'kmeans++', 'kmeans' or 'normal', got {self.init!r}")
        if not isinstance(self.sigma, numbers.Real) or not self.sigma > 0:
            raise ValueError(f"sigma must be a positive number, got {self.sigma!r}")
        if not isinstance(self.latent_dim, numbers.Integral) or self.latent_dim < 1:
            raise ValueError(f"latent_dim must be a positive integer, got {self.latent_dim!r}")
        if not isinstance(self.lr, numbers.Real) or not self.lr > 0:
            raise ValueError(f"lr must be a positive number, got {self.lr!r}")
        if self.reg_params is not None and not isinstance(self.reg_params, dict):
            raise ValueError(f"reg_params must be a dict or None, got {self.reg_params!r}")
        resolve_prior(self.prior, int(k))  # raises ValueError for a bad prior
        for name in ("random_state", "seed"):
            state = getattr(self, name)
            if state is not None and not isinstance(state, (numbers.Integral, *_GENERATORS)):
                raise ValueError(f"{name} must be None, an int or a numpy generator, got {state!r}")
        return self

    def _resolve_seed(self) -> int | None:
        """The int seed of this run: ``random_state`` (or ``seed``), drawn from a generator."""
        state = self.random_state if self.random_state is not None else self.seed
        if isinstance(state, np.random.RandomState):
            return int(state.randint(2**31 - 1))
        if isinstance(state, np.random.Generator):
            return int(state.integers(2**31 - 1))
        return None if state is None else int(state)

    @property
    def is_fitted(self) -> bool:
        """True once the first batch has built the network."""
        return self._built

    def __sklearn_is_fitted__(self) -> bool:
        return self._built and self._centroids_ready

    def __sklearn_tags__(self) -> Tags:
        tags = super().__sklearn_tags__()
        tags.input_tags.three_d_array = True  # windows (C, T) and images (H, W) per sample
        tags.transformer_tags.preserves_dtype = ["float64", "float32"]
        on_cpu = self.device == "cpu" or (self.device == "auto" and not torch.cuda.is_available())
        tags.non_deterministic = not on_cpu  # CUDA kernels are not bit-reproducible
        return tags

    @property
    def prior_(self) -> np.ndarray:
        """The prior as a length-K probability vector (the current estimate for ``"online"``)."""
        estimator = getattr(self, "prior_estimator_", None)
        if estimator is not None:
            return estimator.probs
        vector = resolve_prior(self.prior, self.n_clusters)[1]
        if vector is None:
            return np.full(self.n_clusters, 1.0 / self.n_clusters)
        return vector

    @property
    def cluster_centers_(self) -> np.ndarray:
        """The served centroids, in the latent space of ``transform``: (K, latent_dim)."""
        self._check_fitted()
        return self.reg_.serving_centroids(self.centroids_).detach().cpu().numpy().copy()

    @property
    def _n_features_out(self) -> int:
        """Width of ``transform``'s output (names ``onlineclusterer0``, ... for pandas)."""
        self._check_fitted()
        return self.encoder_config_.latent_dim

    def _validated(self, X: Any, reset: bool) -> np.ndarray:
        """X checked as an (N, *input_shape) numeric array, in its own dtype and strides.

        Lists, DataFrames and other array-likes are converted; arrays are not copied (each
        chunk is converted to float32 where it is used). Raises ``ValueError`` with a clear
        message for non-numbers, NaN/inf (or values beyond float32's range), wrong shapes,
        empty batches, a single sample without its batch axis and, after a fit on a
        DataFrame, different column names.
        """
        if reset:
            self.validate_params()
        fast = (  # a plain numeric batch of the fitted shape: skip scikit-learn's ~0.2 ms
            not reset
            and type(X) is np.ndarray
            and X.dtype.kind in "biuf"
            and len(X) > 0
            and X.shape[1:] == self.input_shape_
            and not hasattr(self, "feature_names_in_")
        )
        if not reset and tuple(getattr(X, "shape", ())) == self.input_shape_:
            raise ValueError(
                f"got one sample of shape {self.input_shape_} without its batch axis. Reshape "
                "your data: X[None] or X.reshape(1, *X.shape) is a batch of that one sample"
            )
        arr = X if fast else validate_data(
            self, X, reset=reset, dtype="numeric", allow_nd=True, ensure_all_finite=False
        )
        if not reset and self._built and arr.shape[1:] != self.input_shape_:
            raise ValueError(
                f"expected samples of shape {self.input_shape_} (a batch (N, "
                f"{', '.join(map(str, self.input_shape_))})), got an array of shape {arr.shape}"
            )
        _check_finite(arr)
        return arr

    # ----------------------------------------------------------------- building
    def _resolve_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def _build(self, input_shape: tuple[int, ...]) -> None:
        """Create encoder, centroids, regulariser, scaler and optimiser for this input shape."""
        self.device_ = self._resolve_device()
        self.encoder_config_ = EncoderConfig.for_shape(
            input_shape, self.latent_dim, self.encoder, self.hidden, self.latent_norm
        )
        self.input_shape_ = tuple(input_shape)
        self._seed = self._resolve_seed()
        self.samples_seen_ = 0
        self.steps_ = 0
        with torch.random.fork_rng(devices=[]):
            if self._seed is not None:
                torch.manual_seed(self._seed)
            self.encoder_ = build_encoder(self.encoder_config_).to(self.device_)
            self.reg_ = make_regulariser(self.regulariser, **(self.reg_params or {}))
            self.reg_.build(self.input_shape_, self.latent_dim, self.n_clusters)
            self.reg_.to(self.device_)
        self.centroids_ = nn.Parameter(torch.zeros(self.n_clusters, self.latent_dim))
        self.centroids_.data = self.centroids_.data.to(self.device_)
        self.scaler_ = _scaler_for(self.encoder_config_).to(self.device_)
        online = resolve_prior(self.prior, self.n_clusters)[0] == "online"
        self.prior_estimator_ = OnlinePrior(int(self.n_clusters)) if online else None
        self.log_prior_ = torch.log(torch.as_tensor(self.prior_, dtype=torch.float32)).to(
            self.device_
        )
        self.optimizer_ = torch.optim.Adam(self._parameters(), lr=self.lr, betas=(0.9, 0.99))
        self._rng = np.random.default_rng(self._seed)
        self._centroids_ready = False
        self._built = True

    def _parameters(self) -> Iterator[nn.Parameter]:
        yield from self.encoder_.parameters()
        yield self.centroids_
        yield from self.reg_.parameters()

    def _init_centroids(self, z: torch.Tensor) -> None:
        """Seed the centroids from the first batch's latents (k-means++ or full k-means)."""
        from sklearn.cluster import KMeans

        if self.init == "normal":  # the CA paper's code: N(0, 1), independent of the data
            draw = self._rng.standard_normal((self.n_clusters, self.latent_dim))
            self.centroids_.data.copy_(torch.as_tensor(draw, dtype=z.dtype))
            self._centroids_ready = True
            return
        zs = z.detach().double().cpu().numpy()
        if self.init == "kmeans" and len(np.unique(zs, axis=0)) >= self.n_clusters:
            seed = int(self._rng.integers(2**31))
            km = KMeans(self.n_clusters, n_init=4, random_state=seed).fit(zs)
            self.centroids_.data.copy_(torch.as_tensor(km.cluster_centers_, dtype=z.dtype))
            self._centroids_ready = True
            return
        self._init_centroids_pp(z)

    def _init_centroids_pp(self, z: torch.Tensor) -> None:
        """k-means++ seeding: spread-out first batch points, no centroid far from the data."""
        z = z.detach()
        n = z.shape[0]
        chosen = [int(self._rng.integers(n))]
        d2 = ((z - z[chosen[0]]) ** 2).sum(1)
        for _ in range(1, self.n_clusters):
            p = d2.double().cpu().numpy()
            total = p.sum()
            idx = int(self._rng.choice(n, p=p / total)) if total > 0 else int(self._rng.integers(n))
            chosen.append(idx)
            d2 = torch.minimum(d2, ((z - z[idx]) ** 2).sum(1))
        self.centroids_.data.copy_(z[chosen])
        self._centroids_ready = True

    # ----------------------------------------------------------------- training
    def _tensor(self, arr: np.ndarray) -> torch.Tensor:
        """``arr`` as a contiguous float32 tensor on the model's device (no copy when it is one)."""
        chunk = np.ascontiguousarray(arr, dtype=np.float32)
        if not chunk.flags.writeable or min(chunk.strides) < 0:  # read-only; or a reversed
            chunk = chunk.copy()  # axis of length 1, "contiguous" to numpy but not to torch
        return torch.from_numpy(chunk).to(self.device_)

    def partial_fit(self, X: Any, y: Any = None) -> OnlineClusterer:
        """Train one step on one batch; its report (training and served labels, loss, entropy, KL*)
        is ``last_step_``.

        ``y`` is ignored. Returns ``self``.
        """
        arr = X if self._in_fit else self._validated(X, reset=not self._built)
        if not self._built:
            self._build(arr.shape[1:])
        x = self._tensor(arr)
        if self.standardize:
            self.scaler_.update(x)
            x = self.scaler_(x)
        self.encoder_.train()
        z = self.encoder_(x)
        if not self._centroids_ready:
            self._init_centroids(z)
        batch = Batch.build(x, z, self.centroids_, self.sigma, self.log_prior_, self._encode)
        served = self._served_labels(z, batch.distances)  # before the step moves anything
        out = self.reg_(batch)
        self.optimizer_.zero_grad(set_to_none=True)
        out.loss.backward()
        self.optimizer_.step()
        self.reg_.after_step(self.centroids_.detach())
        self.samples_seen_ += len(arr)
        self.steps_ += 1
        labels = out.labels.detach().cpu().numpy().astype(np.int64)
        prior = self.prior_
        hist = metrics.cluster_distribution(labels, self.n_clusters)
        served_hist = metrics.cluster_distribution(served, self.n_clusters)
        report = StepReport(
            labels=labels,
            loss=float(out.loss.detach()),
            train_hard_entropy=metrics.entropy(hist),
            train_kl_star=metrics.kl_star(hist, prior),
            n=len(arr),
            served_labels=served,
            served_hard_entropy=metrics.entropy(served_hist),
            served_kl_star=metrics.kl_star(served_hist, prior),
        )
        if self.prior_estimator_ is not None:  # online prior: prior-free soft responsibilities
            d = batch.distances.detach().double().cpu().numpy()
            self._set_log_prior(self.prior_estimator_.update_from_distances(d, self.sigma))
        self.last_step_ = report
        self.labels_ = report.served_labels
        return self

    @torch.no_grad()
    def _served_labels(self, z: torch.Tensor, distances: torch.Tensor) -> np.ndarray:
        """The served rule of :meth:`predict` (:func:`model.regularisers.serve`) applied to the
        step's own latents: no second forward pass."""
        serving = self.reg_.serving_centroids(self.centroids_)
        d = distances if serving is self.centroids_ else sq_distances(z.detach(), serving)
        labels = serve(z.detach(), d.detach(), self.sigma, self.reg_.serving_head())[0]
        return labels.cpu().numpy().astype(np.int64)

    def _set_log_prior(self, prior: np.ndarray) -> None:
        self.log_prior_ = torch.log(torch.as_tensor(prior, dtype=torch.float32)).to(self.device_)

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder_(x)

    def fit(
        self,
        X: Any,
        y: Any = None,
        *,
        epochs: int = 1,
        batch_size: int = 256,
        callback: Callable[[StepReport], None] | None = None,
    ) -> OnlineClusterer:
        """Start over: ``epochs`` shuffled passes over X, one step per batch; returns self.

        ``labels_`` is then ``predict(X)``. ``callback`` gets each step's report. ``y`` is
        ignored.
        """
        if not isinstance(epochs, numbers.Integral) or epochs < 1:
            raise ValueError(f"epochs must be a positive integer, got {epochs!r}")
        if not isinstance(batch_size, numbers.Integral) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        arr = self._validated(X, reset=True)
        self._build(arr.shape[1:])  # a new network, centroids and optimiser: fit starts over
        rng = np.random.default_rng(self._seed)
        self._in_fit = True  # the batches below are slices of the checked X
        try:
            for _ in range(epochs):
                order = rng.permutation(len(arr))
                for start in range(0, len(arr), batch_size):
                    self.partial_fit(arr[order[start : start + batch_size]])
                    if callback is not None:
                        callback(self.last_step_)
        finally:
            self._in_fit = False
        self.labels_ = self._assign(arr)[0]
        return self

    # ----------------------------------------------------------------- inference
    def _check_fitted(self) -> None:
        if not self.__sklearn_is_fitted__():
            raise NotFittedError("the model has not seen any data yet: call fit or partial_fit")

    def _chunk_rows(self) -> int:
        """Rows per inference chunk: INFERENCE_ROWS, fewer when one sample's activations are big.

        A convolution keeps at most the input's spatial size, so ``numel(sample) * widest
        hidden layer`` bounds one sample's largest activation; an MLP's is its widest layer.
        """
        numel = math.prod(self.input_shape_)
        widest = max((*self.encoder_config_.hidden, 1))
        if len(self.input_shape_) == 1:
            per_sample = max(numel, widest, self.encoder_config_.latent_dim)
        else:
            per_sample = numel * widest
        return int(min(INFERENCE_ROWS, max(1, INFERENCE_BYTES // (4 * per_sample))))

    @torch.inference_mode()
    def _chunks(self, arr: np.ndarray) -> Iterator[tuple[slice, torch.Tensor, torch.Tensor]]:
        """Latents and squared distances to the served centroids, chunk by chunk."""
        self.encoder_.eval()
        centroids = self.reg_.serving_centroids(self.centroids_)
        step = self._chunk_rows()
        for start in range(0, len(arr), step):
            x = self._tensor(arr[start : start + step])
            if self.standardize:
                x = self.scaler_(x)
            z = self.encoder_(x)
            yield slice(start, start + len(x)), z, sq_distances(z, centroids)

    def _checked(self, X: Any) -> np.ndarray:
        self._check_fitted()
        return self._validated(X, reset=False)

    @torch.inference_mode()
    def _assign(self, arr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        labels = np.empty(len(arr), dtype=np.int64)
        dists = np.empty(len(arr), dtype=np.float64)
        head = self.reg_.serving_head()
        for rows, z, d in self._chunks(arr):
            lab, dist, _ = serve(z, d.double(), self.sigma, head)
            labels[rows], dists[rows] = lab.cpu().numpy(), dist.cpu().numpy()
        return labels, dists

    def transform(self, X: Any) -> np.ndarray:
        """Latents f(x), shape (N, latent_dim); float64 for float64 input, else float32."""
        arr = self._checked(X)
        out = np.empty((len(arr), self.latent_dim), dtype=_out_dtype(arr))
        for rows, z, _ in self._chunks(arr):
            out[rows] = z.cpu().numpy()
        return out

    def assign(self, X: Any) -> tuple[np.ndarray, np.ndarray]:
        """Served cluster and its squared distance to that serving centroid for each sample:
        the nearest centroid, or the method's own rule (CM/AE-CM: argmax gamma,
        :func:`model.regularisers.serve`)."""
        return self._assign(self._checked(X))

    def predict(self, X: Any) -> np.ndarray:
        """Served cluster of each sample (see :meth:`assign`), int64, shape (N,)."""
        return self.assign(X)[0]

    @torch.inference_mode()
    def soft_assign(self, X: Any) -> np.ndarray:
        """Soft assignments, float64, shape (N, K): softmax(-D / (2 sigma)), or the method's
        own (CM/AE-CM: gamma)."""
        arr = self._checked(X)
        out = np.empty((len(arr), self.n_clusters), dtype=np.float64)
        head = self.reg_.serving_head()
        for rows, z, d in self._chunks(arr):
            logits = serve(z, d.double(), self.sigma, head)[2]
            out[rows] = torch.softmax(logits.double(), dim=1).cpu().numpy()
        return out

    # ----------------------------------------------------------------- snapshots
    def to_snapshot(
        self,
        offsets: dict[str, int] | None = None,
        metrics: dict[str, float | list[float]] | None = None,
    ) -> Snapshot:
        """Weights, centroids, optimiser state and a manifest, ready for a store."""
        self._check_fitted()
        tensors: dict[str, torch.Tensor] = {"centroids": self.centroids_.data}
        tensors |= {f"encoder.{k}": v for k, v in self.encoder_.state_dict().items()}
        tensors |= {f"reg.{k}": v for k, v in self.reg_.state_dict().items()}
        tensors |= {f"scaler.{k}": v for k, v in self.scaler_.state_dict().items()}
        for i, p in enumerate(self._parameters()):
            for key, value in self.optimizer_.state.get(p, {}).items():
                tensors[f"optim.{i}.{key}"] = torch.as_tensor(value)
        manifest = {
            "regulariser": self.regulariser,
            "reg_params": dict(self.reg_params or {}),
            "n_clusters": int(self.n_clusters),
            "input_shape": list(self.input_shape_),
            "encoder": self.encoder_config_.to_dict(),
            "latent_dim": int(self.latent_dim),
            "sigma": float(self.sigma),
            "prior": self.prior_.tolist(),
            "prior_mode": resolve_prior(self.prior, self.n_clusters)[0],
            "prior_state": (
                self.prior_estimator_.state() if self.prior_estimator_ is not None else None
            ),
            "lr": float(self.lr),
            "standardize": bool(self.standardize),
            "init": self.init,
            "seed": self._seed,
            "samples_seen": self.samples_seen_,
            "steps": self.steps_,
            "offsets": dict(offsets or {}),
            "metrics": dict(metrics or {}),
        }
        return Snapshot.create(pack_tensors(tensors), manifest)

    @classmethod
    def from_snapshot(cls, snapshot: Snapshot, device: str = "auto") -> OnlineClusterer:
        """Rebuild a clusterer that predicts exactly as the one that made the snapshot."""
        snapshot.verify()
        m = snapshot.manifest
        try:
            enc = EncoderConfig.from_dict(m["encoder"])
            clf = cls(
                n_clusters=int(m["n_clusters"]),
                regulariser=str(m["regulariser"]),
                prior={"online": "online", "uniform": None}.get(m.get("prior_mode"), m["prior"]),
                sigma=float(m["sigma"]),
                latent_dim=enc.latent_dim,
                lr=float(m["lr"]),
                device=device,
                random_state=m.get("seed"),
                encoder=enc.kind,
                hidden=enc.hidden,
                standardize=bool(m["standardize"]),
                reg_params=m.get("reg_params") or None,
                latent_norm=enc.latent_norm,
                init=str(m.get("init", "kmeans")),
            ).validate_params()
        except (KeyError, TypeError, ValueError) as exc:
            raise SnapshotError(f"manifest is missing or has a bad field: {exc}") from exc
        clf._build(enc.input_shape)
        clf._load_tensors(unpack_tensors(snapshot.weights))
        if clf.prior_estimator_ is not None:
            try:
                state = m.get("prior_state") or {"counts": [0.0] * clf.n_clusters}
                clf.prior_estimator_ = OnlinePrior.from_state(clf.n_clusters, state)
            except (TypeError, ValueError, AttributeError) as exc:
                raise SnapshotError(f"manifest has a bad online prior state: {exc}") from exc
            clf._set_log_prior(clf.prior_estimator_.probs)
        clf.samples_seen_ = int(m.get("samples_seen", 0))
        clf.steps_ = int(m.get("steps", 0))
        return clf

    def _load_tensors(self, t: dict[str, torch.Tensor]) -> None:
        def part(prefix: str) -> dict[str, torch.Tensor]:
            return {k[len(prefix) :]: v for k, v in t.items() if k.startswith(prefix)}

        try:
            self.centroids_.data.copy_(t["centroids"])
            self.encoder_.load_state_dict(part("encoder."))
            self.reg_.load_state_dict(part("reg."))
            self.scaler_.load_state_dict(part("scaler."))
        except (KeyError, RuntimeError) as exc:
            raise SnapshotError(f"weights do not fit the manifest's model: {exc}") from exc
        for i, p in enumerate(self._parameters()):
            state = part(f"optim.{i}.")
            if state:
                state = {k: (v if k == "step" else v.to(self.device_)) for k, v in state.items()}
                self.optimizer_.state[p] = state
        self._centroids_ready = True
