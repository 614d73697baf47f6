"""Inference of the online clusterer: latents, served clusters, distances and soft assignments.

:class:`~oclust.model.clusterer.OnlineClusterer` inherits these methods (``transform`` it defines
itself: scikit-learn's ``set_output`` wraps only methods of the estimator's own class). Every
one runs the encoder in chunks of bounded memory (at most ``INFERENCE_ROWS`` samples, fewer
when one sample's activations are big) and applies the served rule of
:func:`oclust.model.regularisers.serve`.

Example:
    >>> import numpy as np
    >>> from oclust.model import OnlineClusterer
    >>> X = np.random.default_rng(0).normal(size=(64, 4)).astype("float32")
    >>> clf = OnlineClusterer(2, latent_dim=4, random_state=0, device="cpu").fit(X)
    >>> clf.transform(X).shape, clf.soft_assign(X).shape, clf.assign(X)[1].dtype
    ((64, 4), (64, 2), dtype('float64'))
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from sklearn.exceptions import NotFittedError

from oclust.model.regularisers import serve, sq_distances

__all__ = ["INFERENCE_BYTES", "INFERENCE_ROWS", "InferenceMixin"]

INFERENCE_ROWS = 4096  # most samples pushed through the encoder at once by predict & co.
INFERENCE_BYTES = 32 * 2**20  # and a bound on one chunk's widest activation, in bytes


class InferenceMixin:
    """``assign``, ``predict`` and ``soft_assign`` of a built clusterer, and the chunked
    forward pass ``transform`` uses.

    The host class provides the fitted attributes (``encoder_``, ``encoder_config_``,
    ``centroids_``, ``reg_``, ``scaler_``, ``input_shape_``), ``_tensor``, ``_validated``,
    ``_as_built`` (a parameter as the model was built with it) and ``__sklearn_is_fitted__``.
    """

    # the host's fitted attributes, declared for readers and type checkers
    sigma_: float
    input_shape_: tuple[int, ...]
    encoder_: torch.nn.Module
    centroids_: torch.nn.Parameter
    reg_: Any
    scaler_: torch.nn.Module
    encoder_config_: Any
    _as_built: Callable[[str], Any]

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
        standardize = self._as_built("standardize")  # a later set_params changes nothing
        for start in range(0, len(arr), step):
            x = self._tensor(arr[start : start + step])
            if standardize:
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
            lab, dist, _ = serve(z, d.double(), self.sigma_, head)
            labels[rows], dists[rows] = lab.cpu().numpy(), dist.cpu().numpy()
        return labels, dists

    def assign(self, X: Any) -> tuple[np.ndarray, np.ndarray]:
        """Served cluster and its squared distance to that serving centroid for each sample:
        the nearest centroid, or the method's own rule (CM/AE-CM: argmax gamma,
        :func:`oclust.model.regularisers.serve`)."""
        return self._assign(self._checked(X))

    def predict(self, X: Any) -> np.ndarray:
        """Served cluster of each sample (see :meth:`assign`), int64, shape (N,)."""
        return self.assign(X)[0]

    @torch.inference_mode()
    def soft_assign(self, X: Any) -> np.ndarray:
        """Soft assignments, float64, shape (N, K): softmax(-D / (2 sigma)), or the method's
        own (CM/AE-CM: gamma)."""
        arr = self._checked(X)
        out = np.empty((len(arr), len(self.centroids_)), dtype=np.float64)
        head = self.reg_.serving_head()
        for rows, z, d in self._chunks(arr):
            logits = serve(z, d.double(), self.sigma_, head)[2]
            out[rows] = torch.softmax(logits.double(), dim=1).cpu().numpy()
        return out
