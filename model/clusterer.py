"""The online deep clusterer: encoder + K centroids + a partition-support regulariser.

Example:
    >>> import numpy as np
    >>> from model import OnlineClusterer
    >>> X = np.random.default_rng(0).normal(size=(256, 8)).astype("float32")
    >>> clf = OnlineClusterer(n_clusters=3, latent_dim=8, seed=0)
    >>> report = clf.partial_fit(X)
    >>> report.labels.shape, clf.predict(X[0]).shape
    ((256,), (1,))
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from model import metrics
from model.encoders import IMAGE_KINDS, EncoderConfig, build_encoder
from model.priors import OnlinePrior, resolve_prior
from model.regularisers import REGULARISERS, Batch, make_regulariser, sq_distances
from model.snapshot import Snapshot, SnapshotError, pack_tensors, unpack_tensors

__all__ = ["OnlineClusterer", "StepReport"]

DEFAULT_SIGMA = 10.0
DEFAULT_LATENT_DIM = 128


@dataclass(frozen=True)
class StepReport:
    """What one ``partial_fit`` step did."""

    labels: np.ndarray  # hard training labels of the batch (from the regulariser)
    loss: float
    hard_entropy: float  # entropy of the batch's label histogram, nats (max log K)
    kl_star: float  # KL(batch label histogram || prior), nats
    n: int


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


def _scaler_for(cfg: EncoderConfig) -> RunningScaler:
    shape = cfg.input_shape
    if len(shape) == 1:  # per feature
        return RunningScaler(shape, (0,))
    if cfg.kind in IMAGE_KINDS and len(shape) == 2:  # single-channel image: one global statistic
        return RunningScaler((), (0, 1, 2))
    return RunningScaler((shape[0],), (0, *range(2, len(shape) + 1)))  # per channel


class OnlineClusterer:
    """Encoder f, centroids mu and a regulariser, trained one batch at a time.

    Parameters follow scikit-learn conventions: they are stored as given, nothing is built until
    the first batch arrives (which fixes the per-sample input shape).

    Args:
        n_clusters: K.
        regulariser: name of a registered regulariser (``ca``, ``sk``, ``ent``, ``ss``, ``varm``,
            ``none``, ...).
        prior: ``None`` or ``"uniform"``, a probability vector of length K, or ``"online"``:
            estimated from the stream (:class:`model.priors.OnlinePrior`, updated every step,
            fed back as ``log_prior`` and saved in the snapshot manifest).
        sigma: isotropic variance; CA trades distance against ``2 sigma log(n_k + 1)``.
        latent_dim: size of the latent space.
        lr: Adam learning rate (betas (0.9, 0.99), as in the paper).
        device: ``"auto"`` (CUDA when present), ``"cpu"`` or ``"cuda[:i]"``.
        seed: makes CPU training deterministic.
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
    """

    def __init__(
        self,
        n_clusters: int = 10,
        regulariser: str = "ca",
        prior: np.ndarray | list[float] | str | None = None,
        sigma: float = DEFAULT_SIGMA,
        latent_dim: int = DEFAULT_LATENT_DIM,
        lr: float = 1e-3,
        device: str = "auto",
        seed: int | None = None,
        encoder: str = "auto",
        hidden: tuple[int, ...] | None = None,
        standardize: bool = True,
        reg_params: dict[str, float] | None = None,
        latent_norm: str = "layer",
        init: str = "kmeans",
    ) -> None:
        self.n_clusters = n_clusters
        self.regulariser = regulariser
        self.prior = prior
        self.sigma = sigma
        self.latent_dim = latent_dim
        self.lr = lr
        self.device = device
        self.seed = seed
        self.encoder = encoder
        self.hidden = hidden
        self.standardize = standardize
        self.reg_params = reg_params
        self.latent_norm = latent_norm
        self.init = init
        self._check_params()
        self._built = False
        self.samples_seen_ = 0
        self.steps_ = 0

    # ----------------------------------------------------------------- validation
    def _check_params(self) -> None:
        if not isinstance(self.n_clusters, int) or self.n_clusters < 1:
            raise ValueError(f"n_clusters must be a positive integer, got {self.n_clusters!r}")
        if self.regulariser not in REGULARISERS:
            raise ValueError(
                f"unknown regulariser {self.regulariser!r}; "
                f"choose from {', '.join(sorted(REGULARISERS))}"
            )
        if self.init not in ("kmeans++", "kmeans", "normal"):
            raise ValueError(f"init must be 'kmeans++', 'kmeans' or 'normal', got {self.init!r}")
        if not self.sigma > 0:
            raise ValueError(f"sigma must be positive, got {self.sigma!r}")
        resolve_prior(self.prior, self.n_clusters)  # raises ValueError for a bad prior

    @property
    def is_fitted(self) -> bool:
        """True once the first batch has built the network."""
        return self._built

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

    def validate_batch(self, X: Any) -> np.ndarray:
        """Return X as a float32 batch (N, *input_shape); a single sample gains a batch axis.

        Raises ``ValueError`` with a clear message for non-numbers, NaN/inf, wrong shapes and
        empty batches.
        """
        try:
            arr = np.asarray(X, dtype=np.float32)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"input must be an array of numbers: {exc}") from None
        if arr.size == 0:
            raise ValueError("empty batch: need at least one sample")
        if self._built:
            shape = self.input_shape_
            if arr.shape == shape:
                arr = arr[None]
            elif arr.shape[1:] != shape:
                raise ValueError(
                    f"expected samples of shape {shape} (or a batch of them), got {arr.shape}"
                )
        elif arr.ndim < 2:
            raise ValueError(f"expected a batch (N, ...) of samples, got shape {arr.shape}")
        if not np.isfinite(arr).all():
            bad = np.flatnonzero(~np.isfinite(arr.reshape(len(arr), -1)).all(axis=1))
            raise ValueError(f"input contains NaN or infinite values (samples {bad[:5].tolist()})")
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
        with torch.random.fork_rng(devices=[]):
            if self.seed is not None:
                torch.manual_seed(self.seed)
            self.encoder_ = build_encoder(self.encoder_config_).to(self.device_)
            self.reg_ = make_regulariser(self.regulariser, **(self.reg_params or {}))
            self.reg_.build(self.input_shape_, self.latent_dim, self.n_clusters)
            self.reg_.to(self.device_)
        self.centroids_ = nn.Parameter(torch.zeros(self.n_clusters, self.latent_dim))
        self.centroids_.data = self.centroids_.data.to(self.device_)
        self.scaler_ = _scaler_for(self.encoder_config_).to(self.device_)
        online = resolve_prior(self.prior, self.n_clusters)[0] == "online"
        self.prior_estimator_ = OnlinePrior(self.n_clusters) if online else None
        self.log_prior_ = torch.log(torch.as_tensor(self.prior_, dtype=torch.float32)).to(
            self.device_
        )
        self.optimizer_ = torch.optim.Adam(self._parameters(), lr=self.lr, betas=(0.9, 0.99))
        self._rng = np.random.default_rng(self.seed)
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
        return torch.from_numpy(arr).to(self.device_)

    def partial_fit(self, X: Any) -> StepReport:
        """Train one step on one batch and report its hard labels, loss, entropy and KL*."""
        arr = self.validate_batch(X)
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
        out = self.reg_(batch)
        self.optimizer_.zero_grad(set_to_none=True)
        out.loss.backward()
        self.optimizer_.step()
        self.reg_.after_step(self.centroids_.detach())
        self.samples_seen_ += len(arr)
        self.steps_ += 1
        labels = out.labels.detach().cpu().numpy().astype(np.int64)
        hist = metrics.cluster_distribution(labels, self.n_clusters)
        report = StepReport(
            labels=labels,
            loss=float(out.loss.detach()),
            hard_entropy=metrics.entropy(hist),
            kl_star=metrics.kl_star(hist, self.prior_),
            n=len(arr),
        )
        if self.prior_estimator_ is not None:  # online prior: fold in this batch's labels
            self._set_log_prior(self.prior_estimator_.update(labels))
        return report

    def _set_log_prior(self, prior: np.ndarray) -> None:
        self.log_prior_ = torch.log(torch.as_tensor(prior, dtype=torch.float32)).to(self.device_)

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder_(x)

    def fit(
        self,
        X: Any,
        epochs: int = 1,
        batch_size: int = 256,
        callback: Callable[[StepReport], None] | None = None,
    ) -> OnlineClusterer:
        """Stream the shuffled data in batches for ``epochs`` passes (one step per batch)."""
        arr = self.validate_batch(X)
        rng = np.random.default_rng(self.seed)
        for _ in range(epochs):
            order = rng.permutation(len(arr))
            for start in range(0, len(arr), batch_size):
                report = self.partial_fit(arr[order[start : start + batch_size]])
                if callback is not None:
                    callback(report)
        return self

    # ----------------------------------------------------------------- inference
    def _check_fitted(self) -> None:
        if not self._built or not self._centroids_ready:
            raise ValueError("the model has not seen any data yet: call partial_fit first")

    @torch.inference_mode()
    def _distances(self, X: Any) -> tuple[torch.Tensor, torch.Tensor]:
        self._check_fitted()
        x = self._tensor(self.validate_batch(X))
        if self.standardize:
            x = self.scaler_(x)
        self.encoder_.eval()
        z = self.encoder_(x)
        return z, sq_distances(z, self.reg_.serving_centroids(self.centroids_))

    def transform(self, X: Any) -> np.ndarray:
        """Latents f(x), shape (N, latent_dim)."""
        return self._distances(X)[0].cpu().numpy()

    def assign(self, X: Any) -> tuple[np.ndarray, np.ndarray]:
        """Nearest centroid and its squared distance for each sample (no regulariser)."""
        d = self._distances(X)[1]
        dist, labels = d.min(dim=1)
        return labels.cpu().numpy().astype(np.int64), dist.double().cpu().numpy()

    def predict(self, X: Any) -> np.ndarray:
        """Nearest-centroid cluster of each sample; a single sample is accepted."""
        return self.assign(X)[0]

    def soft_assign(self, X: Any) -> np.ndarray:
        """Responsibilities softmax(-D / (2 sigma)), shape (N, K)."""
        d = self._distances(X)[1]
        return torch.softmax(-d.double() / (2.0 * self.sigma), dim=1).cpu().numpy()

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
            "n_clusters": self.n_clusters,
            "input_shape": list(self.input_shape_),
            "encoder": self.encoder_config_.to_dict(),
            "latent_dim": self.latent_dim,
            "sigma": self.sigma,
            "prior": self.prior_.tolist(),
            "prior_mode": resolve_prior(self.prior, self.n_clusters)[0],
            "prior_state": (
                self.prior_estimator_.state() if self.prior_estimator_ is not None else None
            ),
            "lr": self.lr,
            "standardize": self.standardize,
            "init": self.init,
            "seed": self.seed,
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
                seed=m.get("seed"),
                encoder=enc.kind,
                hidden=enc.hidden,
                standardize=bool(m["standardize"]),
                reg_params=m.get("reg_params") or None,
                latent_norm=enc.latent_norm,
                init=str(m.get("init", "kmeans")),
            )
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

    def __repr__(self) -> str:
        return (
            f"OnlineClusterer(n_clusters={self.n_clusters}, regulariser={self.regulariser!r}, "
            f"sigma={self.sigma}, latent_dim={self.latent_dim})"
        )


def max_entropy(k: int) -> float:
    """log K, the largest possible hard entropy."""
    return math.log(k)
