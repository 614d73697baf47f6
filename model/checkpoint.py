"""Snapshot (de)serialisation of an :class:`~oclust.model.clusterer.OnlineClusterer`.

The tensors (centroids, ``encoder.*``, ``reg.*``, ``scaler.*`` and the Adam state
``optim.{i}.*``) go to safetensors; everything needed to rebuild the model goes to the typed
:class:`~oclust.model.snapshot.Manifest`. ``OnlineClusterer.to_snapshot`` and ``from_snapshot`` call
these functions.

Example:
    >>> import numpy as np
    >>> from oclust.model import OnlineClusterer
    >>> from oclust.model.checkpoint import from_snapshot, to_snapshot
    >>> X = np.random.default_rng(0).normal(size=(64, 4)).astype("float32")
    >>> clf = OnlineClusterer(2, latent_dim=4, random_state=0, device="cpu").partial_fit(X)
    >>> snap = to_snapshot(clf, offsets={"t:0": 64})
    >>> snap.meta.offsets, snap.meta.samples_seen
    ({'t:0': 64}, 64)
    >>> (from_snapshot(OnlineClusterer, snap).predict(X) == clf.predict(X)).all()
    np.True_
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from oclust.model.encoders import EncoderConfig
from oclust.model.exporting import serving_tail
from oclust.model.inference import SERVING_PREFIX
from oclust.model.priors import OnlinePrior, resolve_prior
from oclust.model.snapshot import (
    Manifest,
    OffsetState,
    Snapshot,
    SnapshotError,
    check_finite_weights,
    pack_tensors,
    unpack_tensors,
)
from oclust.model.validation import DEFAULT_BETAS

if TYPE_CHECKING:
    from oclust.model.clusterer import OnlineClusterer

__all__ = ["from_snapshot", "load_tensors", "manifest_of", "to_snapshot"]

log = logging.getLogger(__name__)


def manifest_of(
    clf: OnlineClusterer,
    offsets: dict[str, int] | None = None,
    metrics: dict[str, Any] | None = None,
    offset_state: OffsetState | None = None,
) -> Manifest:
    """The manifest of a built clusterer (the envelope is stamped by ``Snapshot.create``)."""
    built = clf._as_built  # the model as built: a later set_params changes nothing in it
    return Manifest(
        regulariser=built("regulariser"),
        reg_params=dict(built("reg_params") or {}),
        n_clusters=len(clf.centroids_),
        input_shape=tuple(clf.input_shape_),
        encoder=clf.encoder_config_.to_dict(),
        latent_dim=clf.encoder_config_.latent_dim,
        sigma=clf.sigma_,
        prior=clf.prior_.tolist(),
        prior_mode=resolve_prior(built("prior"), len(clf.centroids_))[0],
        prior_state=(
            clf.prior_estimator_.state() if clf.prior_estimator_ is not None else None
        ),
        lr=float(clf.optimizer_.param_groups[0]["lr"]),  # as built (set_params does not
        betas=[float(b) for b in clf.optimizer_.param_groups[0]["betas"]],  # move the optimiser)
        standardize=bool(built("standardize")),
        clip=None if clf.scaler_.clip is None else float(clf.scaler_.clip),  # as built
        init=clf.init_,
        views=clf.views_,
        input_guide=clf.input_guide_,
        seed=clf._seed,
        feature_names=(
            [str(n) for n in clf.feature_names_in_] if hasattr(clf, "feature_names_in_") else None
        ),
        samples_seen=clf.samples_seen_,
        steps=clf.steps_,
        offsets=dict(offsets or {}),
        offset_state=dict(offset_state or {}),
        metrics=dict(metrics or {}),
    )


def to_snapshot(
    clf: OnlineClusterer,
    offsets: dict[str, int] | None = None,
    metrics: dict[str, Any] | None = None,
    offset_state: OffsetState | None = None,
) -> Snapshot:
    """Weights, centroids, optimiser state and a manifest, ready for a store."""
    clf._check_fitted()
    tensors: dict[str, torch.Tensor] = {"centroids": clf.centroids_.data}
    tensors |= {f"encoder.{k}": v for k, v in clf.encoder_.state_dict().items()}
    tensors |= {f"reg.{k}": v for k, v in clf.reg_.state_dict().items()}
    tensors |= {f"scaler.{k}": v for k, v in clf.scaler_.state_dict().items()}
    tensors |= {SERVING_PREFIX + k: v for k, v in serving_tail(clf).items()}
    if clf.guide_ is not None and clf.steps_ < clf.guide_.steps:  # still guiding
        tensors |= {f"guide.{k}": v for k, v in clf.guide_.state().items()}
    check_finite_weights({k: v.detach().cpu().numpy() for k, v in tensors.items()
                          if v.is_floating_point()})  # a blown-up model is never published
    probe = getattr(clf, "_probe", None)  # the latest trained batch had finite distances
    if probe is not None and not np.isfinite(clf._assign(probe)[1]).all():  # checked input
        raise SnapshotError(
            "the model answers NaN or infinite distances on its latest training batch (weights "
            "blown up, e.g. by a learning rate far too high): it is not snapshotted"
        )
    for i, p in enumerate(clf._parameters()):
        for key, value in clf.optimizer_.state.get(p, {}).items():
            tensors[f"optim.{i}.{key}"] = torch.as_tensor(value)
    return Snapshot.create(pack_tensors(tensors), manifest_of(clf, offsets, metrics, offset_state))


def from_snapshot(
    cls: type[OnlineClusterer], snapshot: Snapshot, device: str = "auto", verify: bool = True
) -> OnlineClusterer:
    """Rebuild a clusterer that predicts exactly as the one that made the snapshot.

    ``verify=False`` skips the checksum of a snapshot that was verified already.
    """
    if verify:
        snapshot.verify()
    try:
        m = snapshot.meta
        enc = EncoderConfig.from_dict(m.required("encoder"))
        prior = m.required("prior")
        clf = cls(
            n_clusters=m.required("n_clusters"),
            regulariser=m.required("regulariser"),
            prior={"online": "online", "uniform": None}.get(m.prior_mode or "", prior),
            sigma=m.required("sigma"),
            latent_dim=enc.latent_dim,
            lr=m.required("lr"),
            betas=tuple(m.betas) if m.betas is not None else DEFAULT_BETAS,
            device=device,
            random_state=m.seed,
            encoder=enc.kind,
            hidden=enc.hidden,
            standardize=m.required("standardize"),
            clip=m.clip,
            reg_params=m.reg_params or None,
            latent_norm=enc.latent_norm,
            hidden_norm=enc.hidden_norm,
            init=m.init,
            views=m.views,
            input_guide=m.input_guide,
        ).validate_params()
    except (KeyError, TypeError, ValueError) as exc:
        raise SnapshotError(f"manifest is missing or has a bad field: {exc}") from exc
    try:
        clf._build(enc.input_shape)
    except (TypeError, ValueError) as exc:  # e.g. reg_params the regulariser does not take
        raise SnapshotError(f"manifest describes a model that cannot be built: {exc}") from exc
    load_tensors(clf, unpack_tensors(snapshot.weights), m.steps)
    clf.n_features_in_ = enc.input_shape[0]  # as the fitted model had them: inference checks
    if m.feature_names is not None:  # a DataFrame's columns by their names
        if len(m.feature_names) != clf.n_features_in_:
            raise SnapshotError(f"manifest has {len(m.feature_names)} feature names for "
                                f"{clf.n_features_in_} features")
        clf.feature_names_in_ = np.asarray(m.feature_names, dtype=object)
    if clf.prior_estimator_ is not None:
        try:
            state = m.prior_state or {"counts": [0.0] * clf.n_clusters}
            clf.prior_estimator_ = OnlinePrior.from_state(clf.n_clusters, state)
        except (TypeError, ValueError, AttributeError) as exc:
            raise SnapshotError(f"manifest has a bad online prior state: {exc}") from exc
        clf.prior_params = clf.prior_estimator_.settings()  # the saved ones, not the defaults
        clf._params_at_build["prior_params"] = dict(clf.prior_params)  # what it is built with
        clf._set_log_prior(clf.prior_estimator_.probs)
    clf.samples_seen_ = m.samples_seen
    clf.steps_ = m.steps
    return clf


def _check_adam_state(i: int, p: torch.Tensor, state: dict[str, torch.Tensor]) -> None:
    """:class:`SnapshotError` unless ``state`` is Adam's for parameter ``p``: a scalar step and
    moments of ``p``'s shape (else the first step after loading fails on a shape mismatch)."""
    moments = {"exp_avg", "exp_avg_sq"}
    if set(state) != {"step", *moments} or state["step"].numel() != 1 or any(
        state[k].shape != p.shape for k in moments
    ):
        shapes = {k: tuple(v.shape) for k, v in state.items()}
        raise SnapshotError(f"optimiser state {i} does not fit its parameter of shape "
                            f"{tuple(p.shape)}: {shapes}")


def _adam_state_usable(state: dict[str, torch.Tensor]) -> bool:
    """Whether Adam's ``state`` can be stepped on: finite moments, a finite second moment and
    step count that are not negative (a NaN there turns the parameter NaN at its first step).

    >>> ok = {"step": torch.tensor(3.0), "exp_avg": torch.zeros(2), "exp_avg_sq": torch.ones(2)}
    >>> _adam_state_usable(ok), _adam_state_usable({**ok, "exp_avg": torch.tensor([0, torch.nan])})
    (True, False)
    >>> _adam_state_usable({**ok, "exp_avg_sq": -torch.ones(2)})
    False
    """
    avg, sq, step = (state[k].double() for k in ("exp_avg", "exp_avg_sq", "step"))
    return bool(avg.isfinite().all() and sq.isfinite().all() and (sq >= 0).all()
                and step.isfinite().all() and (step >= 0).all())


def load_tensors(clf: OnlineClusterer, t: dict[str, torch.Tensor], steps: int = 0) -> None:
    """Load a snapshot's tensors into a built clusterer (``SnapshotError`` if they do not fit);
    ``steps``: the steps the snapshot's model had trained (a model still in its input guide's
    steps must hold the guide's state)."""

    def part(prefix: str) -> dict[str, torch.Tensor]:
        return {k[len(prefix) :]: v for k, v in t.items() if k.startswith(prefix)}

    check_finite_weights({k: v.numpy() for k, v in t.items()})
    try:
        if t["centroids"].shape != clf.centroids_.shape:  # copy_ would broadcast one row to K
            raise RuntimeError(f"centroids of shape {tuple(t['centroids'].shape)}, expected "
                               f"{tuple(clf.centroids_.shape)}")
        clf.centroids_.data.copy_(t["centroids"])
        clf.encoder_.load_state_dict(part("encoder."))
        clf.reg_.load_state_dict(part("reg."))
        clf.scaler_.load_state_dict(part("scaler."))
        if clf.guide_ is not None:
            guide = part("guide.")
            if not guide and 0 < steps < clf.guide_.steps:  # still guiding: kept
                raise ValueError(f"the model is in its guided steps ({steps} of "
                                 f"{clf.guide_.steps}) but the weights hold no input guide")
            size = int(np.prod(clf.input_shape_))
            clf.guide_.load(guide, (clf.n_clusters, size), clf.device_)
    except (KeyError, RuntimeError, ValueError) as exc:
        raise SnapshotError(f"weights do not fit the manifest's model: {exc}") from exc
    dropped = 0
    for i, p in enumerate(clf._parameters()):
        state = part(f"optim.{i}.")
        if state:
            _check_adam_state(i, p, state)
            if not _adam_state_usable(state):  # its first step would make p NaN: start afresh
                dropped += 1
                continue
            state = {k: (v if k == "step" else v.to(clf.device_)) for k, v in state.items()}
            clf.optimizer_.state[p] = state
    if dropped:
        log.warning("the snapshot's Adam state of %d parameter(s) holds NaN, infinite or negative "
                    "values: those parameters train on with fresh moments", dropped)
    clf._centroids_ready = True
