"""A fitted clusterer's serving pipeline: the ``serving.*`` tensors of a snapshot and
:meth:`OnlineClusterer.export <model.clusterer.OnlineClusterer.export>`.

The compiled kernel (:mod:`oclust.model.kernel`) needs, besides the encoder's weights, the serving
centroids, the method's own linear head (CM/AE-CM) and the scaler's mean, std and clip; they are
written into every snapshot under :data:`model.inference.SERVING_PREFIX` so that a replica can
serve an MLP snapshot without torch. A head that is not one linear layer gives an empty tail:
such a model is served by torch.

Example:
    >>> import numpy as np
    >>> from oclust.model import OnlineClusterer
    >>> X = np.random.default_rng(0).normal(size=(64, 5)).astype("float32")
    >>> clf = OnlineClusterer(3, latent_dim=4, random_state=0, device="cpu").fit(X)
    >>> sorted(serving_tail(clf))
    ['centroids', 'scaler.clip', 'scaler.mean', 'scaler.std']
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING

import torch
from torch import nn

from oclust.model.inference import SERVING_PREFIX, CompiledInference, Inference
from oclust.model.inference_torch import TorchInference

if TYPE_CHECKING:
    from oclust.model.clusterer import OnlineClusterer

__all__ = ["export", "serving_tail"]


@torch.no_grad()
def serving_tail(clf: OnlineClusterer) -> dict[str, torch.Tensor]:
    """What the compiled kernel needs besides the encoder's weights; empty when it cannot run
    the served rule (a head that is not one linear layer)."""
    tail = {"centroids": clf.reg_.serving_centroids(clf.centroids_).detach().float()}
    head = clf.reg_.serving_head()
    if head is not None:
        if not isinstance(head, nn.Linear) or head.bias is None:
            return {}
        tail |= {"head.weight": head.weight.float(), "head.bias": head.bias.float()}
    stats = clf.scaler_.moments() if clf._as_built("standardize") else None
    if stats is not None:  # per feature for an MLP: what the kernel standardises with
        if clf.encoder_config_.kind == "mlp":  # of the flattened sample (per channel: repeated)
            shape = (1, *clf.input_shape_)
            stats = tuple(clf.scaler_._expand(s).expand(shape).reshape(-1) for s in stats)
        tail |= {"scaler.mean": stats[0].float(), "scaler.std": stats[1].float()}
        if clf.scaler_.clip is not None:  # the built model's (a later set_params builds nothing)
            tail["scaler.clip"] = torch.tensor([float(clf.scaler_.clip)])
    return {k: v.detach().cpu().contiguous() for k, v in tail.items()}


def export(clf: OnlineClusterer) -> Inference:
    """The frozen serving pipeline of a fitted ``clf``: the numba kernel for an MLP encoder,
    torch (deep copies of scaler, encoder and head) for the others."""
    clf._check_fitted()
    tail = serving_tail(clf)
    if clf.encoder_config_.kind == "mlp" and tail:
        arrays = {f"encoder.{k}": v.detach().cpu().numpy()
                  for k, v in clf.encoder_.state_dict().items()}
        arrays |= {SERVING_PREFIX + k: v.numpy() for k, v in tail.items()}
        return CompiledInference.from_arrays(clf.encoder_config_, clf.sigma_, arrays)
    with torch.no_grad():
        centroids = clf.reg_.serving_centroids(clf.centroids_).detach().clone()
    head = clf.reg_.serving_head()
    return TorchInference(
        copy.deepcopy(clf.scaler_) if clf._as_built("standardize") else None,
        copy.deepcopy(clf.encoder_).eval(),
        centroids,
        clf.sigma_,
        copy.deepcopy(head).eval() if head is not None else None,
        clf.input_shape_,
        clf.device_,
    )
