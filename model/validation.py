"""Input and parameter checks of the model library: clear ``ValueError``s, never a crash.

Only NumPy is imported at module level (scikit-learn when an estimator's input is checked), so
the combination-assignment kernel can use these checks without torch.

Example:
    >>> import numpy as np
    >>> from oclust.model.validation import check_finite
    >>> check_finite(np.array([[1.0, np.nan]]))
    Traceback (most recent call last):
    ...
    ValueError: input contains NaN, infinite or beyond-float32 values (samples [0])
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Container
from typing import Any

import numpy as np

from oclust.model.encoder_config import ENCODERS, HIDDEN_NORMS, MIN_LAYER_NORM_DIM
from oclust.model.encoder_config import LATENT_NORMS as ENCODER_LATENT_NORMS
from oclust.model.priors import SETTINGS, OnlinePrior, resolve_prior

__all__ = [
    "DEFAULT_BETAS",
    "FINITE_CHUNK_ROWS",
    "check_assignment_inputs",
    "check_finite",
    "check_input",
    "check_input_guide",
    "check_live_params",
    "check_params",
    "check_positive",
    "check_prior_params",
    "non_finite_distances",
    "out_dtype",
    "to_float64_array",
]

FINITE_CHUNK_ROWS = 4096  # rows converted at once when searching for the bad samples
_F32_MAX = float(np.finfo(np.float32).max)
_GENERATORS = (np.random.RandomState, np.random.Generator)
INITS = ("auto", "kmeans++", "kmeans", "inputs", "normal", "centred")
LATENT_NORMS = ("auto", *ENCODER_LATENT_NORMS)
MAX_CLIP = 1e6  # a larger clip of standardised inputs clips nothing a float32 model can take
DEFAULT_BETAS = (0.9, 0.99)  # Adam's (beta1, beta2) unless configured


def check_finite(arr: np.ndarray) -> None:
    """Raise ``ValueError`` naming the samples with NaN, inf or values beyond float32's range.

    ``min``/``max`` need no copy of the array; the per-sample search runs only on failure.
    """
    if arr.dtype.kind != "f":
        return
    lo, hi = float(arr.min()), float(arr.max())  # NaN propagates; float: no float16 overflow
    if lo >= -_F32_MAX and hi <= _F32_MAX:
        return
    bad: list[int] = []
    for start in range(0, len(arr), FINITE_CHUNK_ROWS):
        chunk = arr[start : start + FINITE_CHUNK_ROWS]
        with np.errstate(over="ignore"):
            ok = np.isfinite(chunk.astype(np.float32).reshape(len(chunk), -1)).all(axis=1)
        bad += (start + np.flatnonzero(~ok)).tolist()
        if len(bad) >= 5:
            break
    raise ValueError(
        f"input contains NaN, infinite or beyond-float32 values (samples {bad[:5]})"
    )


def check_positive(**counts: int | None) -> None:
    """Raise a ``ValueError`` naming the first count below 1; ``None`` passes (not set).

    Example:
        >>> check_positive(size=4, hop=None, patience=0)
        Traceback (most recent call last):
        ...
        ValueError: patience must be at least 1, got 0
    """
    for name, value in counts.items():
        if value is not None and value < 1:
            raise ValueError(f"{name} must be at least 1, got {value!r}")


def out_dtype(arr: np.ndarray) -> type[np.floating]:
    """float32 input gives float32 latents, anything else float64 (scikit-learn's rule)."""
    return np.float32 if arr.dtype == np.float32 else np.float64


def check_params(est: Any, regularisers: Container[str]) -> None:
    """Check an :class:`~oclust.model.clusterer.OnlineClusterer`'s parameters; ``ValueError`` if
    bad."""
    k = est.n_clusters
    if not _whole(k) or k < 1:
        raise ValueError(f"n_clusters must be a positive integer, got {k!r}")
    if not isinstance(est.regulariser, str) or est.regulariser not in regularisers:
        raise ValueError(
            f"unknown regulariser {est.regulariser!r}; "
            f"choose from {', '.join(sorted(regularisers))}"
        )
    if est.init not in INITS:
        raise ValueError(f"init must be one of {', '.join(INITS)}, got {est.init!r}")
    if est.latent_norm not in LATENT_NORMS:
        raise ValueError(
            f"latent_norm must be one of {', '.join(LATENT_NORMS)}, got {est.latent_norm!r}"
        )
    if est.hidden_norm not in HIDDEN_NORMS:
        raise ValueError(
            f"hidden_norm must be one of {', '.join(HIDDEN_NORMS)}, got {est.hidden_norm!r}"
        )
    check_live_params(est)
    if est.clip is not None and not _valid_clip(est.clip):
        raise ValueError(f"clip must be None or a number in (0, {MAX_CLIP:g}], got {est.clip!r}")
    if not _whole(est.latent_dim) or est.latent_dim < 1:
        raise ValueError(f"latent_dim must be a positive integer, got {est.latent_dim!r}")
    if est.latent_norm == "layer" and est.latent_dim < MIN_LAYER_NORM_DIM:
        raise ValueError(
            f"latent_dim must be at least {MIN_LAYER_NORM_DIM} with latent_norm 'layer', got "
            f"{est.latent_dim!r}: LayerNorm maps every latent of 1 or 2 dimensions onto 1 or 2 "
            "points (use latent_norm 'batch' or 'none')"
        )
    if not (isinstance(est.encoder, str) and est.encoder in ("auto", *ENCODERS)):
        raise ValueError(f"encoder must be 'auto' or one of {', '.join(ENCODERS)}, got "
                         f"{est.encoder!r}")
    hidden = est.hidden
    if hidden is not None and not (
        isinstance(hidden, (tuple, list)) and hidden and all(_whole(h) and h > 0 for h in hidden)
    ):
        raise ValueError(f"hidden must be None or a non-empty sequence of positive integers, got "
                         f"{hidden!r}")
    if not isinstance(est.device, str):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda[:i]', got {est.device!r}")
    if not isinstance(est.standardize, (bool, np.bool_)):
        raise ValueError(f"standardize must be True or False, got {est.standardize!r}")
    if not _positive_finite(est.lr):
        raise ValueError(f"lr must be a positive finite number, got {est.lr!r}")
    if not _valid_betas(est.betas):
        raise ValueError(f"betas must be two numbers in [0, 1), got {est.betas!r}")
    if est.reg_params is not None and not (
        isinstance(est.reg_params, dict) and all(isinstance(k, str) for k in est.reg_params)
    ):
        raise ValueError(f"reg_params must be a dict of keyword arguments or None, got "
                         f"{est.reg_params!r}")
    check_input_guide(est.input_guide, est.regulariser)
    resolve_prior(est.prior, int(k))  # raises ValueError for a bad prior
    check_prior_params(est.prior_params)
    for name in ("random_state", "seed"):
        state = getattr(est, name)
        if state is not None and not isinstance(state, (numbers.Integral, *_GENERATORS)):
            raise ValueError(f"{name} must be None, an int or a numpy generator, got {state!r}")


def check_input_guide(guide: Any, regulariser: str) -> None:
    """``ValueError`` unless ``guide`` is ``"auto"`` or a whole number of steps >= 0, and
    more than 0 only with CA, the assignment it leans on the inputs.

    >>> check_input_guide(5, "sk")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: input_guide leans CA's assignment on the inputs; regulariser 'sk' assigns ...
    """
    if guide == "auto":
        return
    if not (_whole(guide) and not isinstance(guide, bool) and guide >= 0):
        raise ValueError(f"input_guide must be 'auto' or a whole number of steps >= 0, got "
                         f"{guide!r}")
    if guide > 0 and regulariser != "ca":
        raise ValueError(f"input_guide leans CA's assignment on the inputs; regulariser "
                         f"{regulariser!r} assigns otherwise: leave it at its default, or set "
                         "it to 0")


def check_live_params(est: Any) -> None:
    """``ValueError`` unless ``sigma`` and ``views``, the parameters a built
    :class:`~oclust.model.clusterer.OnlineClusterer` follows live, are valid."""
    auto = isinstance(est.views, str) and est.views == "auto"
    if not (auto or isinstance(est.views, (bool, np.bool_))):
        raise ValueError(f"views must be 'auto', True or False, got {est.views!r}")
    if est.sigma is not None and not _positive_finite(est.sigma):
        raise ValueError(f"sigma must be None or a positive finite number, got {est.sigma!r}")


def clip_option(value: float) -> float | None:
    """The ``clip`` of a command-line value: ``inf`` turns clipping off (``None``); ``ValueError``
    outside (0, :data:`MAX_CLIP`].

    >>> clip_option(5.0), clip_option(float("inf"))
    (5.0, None)
    >>> clip_option(0)
    Traceback (most recent call last):
    ...
    ValueError: at most 1e+06 standard deviations and above 0, or inf (no clip); got 0
    """
    if value == math.inf:
        return None
    if not _valid_clip(value):
        raise ValueError(f"at most {MAX_CLIP:g} standard deviations and above 0, or inf "
                         f"(no clip); got {value}")
    return value


def check_prior_params(params: Any) -> None:
    """``ValueError`` unless ``params`` is None or valid keyword arguments of ``OnlinePrior``.

    >>> check_prior_params({"max_kl": -1})
    Traceback (most recent call last):
    ...
    ValueError: prior_params: max_kl must be non-negative, got -1
    """
    if params is None:
        return
    if not isinstance(params, dict):
        raise ValueError(f"prior_params must be a dict or None, got {params!r}")
    unknown = sorted(set(params) - set(SETTINGS))
    if unknown:
        raise ValueError(f"prior_params: unknown {', '.join(map(repr, unknown))}; "
                         f"choose from {', '.join(SETTINGS)}")
    try:
        OnlinePrior(2, **params)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"prior_params: {exc}") from None


def _valid_clip(x: Any) -> bool:
    """A clip of standardised inputs: a number in (0, :data:`MAX_CLIP`]."""
    return _positive_finite(x) and x <= MAX_CLIP


def _whole(x: Any) -> bool:
    """An integer, not a bool (``True`` is an ``Integral`` to Python)."""
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _positive_finite(x: Any) -> bool:
    """A real number (not a bool) in (0, inf).

    >>> _positive_finite(0.1), _positive_finite(float("inf")), _positive_finite(True)
    (True, False, False)
    """
    return isinstance(x, numbers.Real) and not isinstance(x, bool) and 0.0 < x < math.inf


def _valid_betas(betas: Any) -> bool:
    """Adam's (beta1, beta2): a pair of real numbers in [0, 1)."""
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        return False
    return all(
        isinstance(b, numbers.Real) and not isinstance(b, bool) and 0.0 <= b < 1.0 for b in betas
    )


def check_input(est: Any, X: Any, reset: bool) -> np.ndarray:
    """X checked as an (N, *input_shape) numeric array, in its own dtype and strides.

    ``est`` is a scikit-learn estimator with ``input_shape_`` once built (``_built``). Lists,
    DataFrames and other array-likes are converted; arrays are not copied. Raises
    ``ValueError`` with a clear message for non-numbers, NaN/inf (or values beyond float32's
    range), wrong shapes, empty batches, a single sample without its batch axis and, after a
    fit on a DataFrame, different column names.
    """
    from sklearn.utils.validation import validate_data

    shape = getattr(est, "input_shape_", None)
    fast = (  # a plain numeric batch of the fitted shape: skip scikit-learn's ~0.2 ms
        not reset
        and type(X) is np.ndarray
        and X.dtype.kind in "biuf"
        and len(X) > 0
        and X.shape[1:] == shape
        and not hasattr(est, "feature_names_in_")
    )
    if not reset and tuple(getattr(X, "shape", ())) == shape:
        raise ValueError(
            f"got one sample of shape {shape} without its batch axis. Reshape "
            "your data: X[None] or X.reshape(1, *X.shape) is a batch of that one sample"
        )
    if not reset and est._built and len(shape) > 1 and hasattr(X, "shape"):
        _check_sample_shape(tuple(X.shape), shape)  # before scikit-learn's "features" count
    try:
        arr = X if fast else validate_data(
            est, X, reset=reset, dtype="numeric", allow_nd=True, ensure_all_finite=False
        )
    except np.exceptions.DTypePromotionError as exc:  # e.g. a datetime column in a DataFrame
        raise ValueError(f"X must hold numbers only: {exc}") from None
    if not reset and est._built:
        _check_sample_shape(arr.shape, shape)
    check_finite(arr)
    return arr


def _check_sample_shape(got: tuple[int, ...], shape: tuple[int, ...]) -> None:
    """``ValueError`` unless ``got`` is a batch of samples of ``shape``."""
    if tuple(got[1:]) != tuple(shape):
        raise ValueError(
            f"expected samples of shape {shape} (a batch (N, "
            f"{', '.join(map(str, shape))})), got an array of shape {got}"
        )


def to_float64_array(x: Any, name: str, fortran: bool = False) -> np.ndarray:
    """Convert a NumPy array, torch tensor (any device) or nested sequence to float64 NumPy,
    C-contiguous; with ``fortran``, 2-D data comes Fortran-ordered when it already is (NumPy)
    or has to be copied anyway (a tensor: one transposing cast to the host)."""
    if hasattr(x, "detach") and hasattr(x, "to"):  # torch.Tensor, duck-typed: no torch import
        if x.is_complex():
            raise ValueError(f"{name} must be real numbers, got dtype {x.dtype}")
        try:
            import torch  # only reached when a tensor was passed, so torch is installed

            if fortran and x.dim() == 2:
                x = x.detach().T.to("cpu", torch.float64, memory_format=torch.contiguous_format)
                return x.numpy().T
            x = x.detach().to("cpu", torch.float64).numpy()
        except (TypeError, RuntimeError) as exc:
            raise ValueError(f"{name}: cannot convert tensor to float64: {exc}") from exc
    arr = np.asarray(x)
    if arr.dtype.kind not in "biuf":
        raise ValueError(f"{name} must be real numbers, got dtype {arr.dtype}")
    if fortran:
        arr = np.asarray(arr, dtype=np.float64)
        if arr.flags.f_contiguous and arr.flags.writeable:
            return arr
    return np.ascontiguousarray(arr, dtype=np.float64)


def check_assignment_inputs(
    distances: Any, sigma: float, log_prior: Any, fast: bool = False
) -> tuple[np.ndarray, float, np.ndarray]:
    """Distances (float64 N x K), sigma and log prior (float64, length K; zeros for ``None``)
    for :func:`oclust.model.assign.combination_assignment`.

    Raises ``ValueError`` naming the problem: ``distances`` not 2-D, with no column, or with
    inf/nan; ``sigma`` not a number, negative or not finite; ``log_prior`` of the wrong length
    or not finite. ``fast`` (the kernel's own call) leaves the distances' finiteness to the
    caller (which then raises :func:`non_finite_distances`) and gives them Fortran-ordered
    where that costs no extra copy (an N x K view of cluster-major K x N costs).

    >>> check_assignment_inputs([[0.0, 1.0]], 2, None)[1:]
    (2.0, array([0., 0.]))
    """
    d = to_float64_array(distances, "distances", fortran=fast)
    if d.ndim != 2:
        raise ValueError(f"distances must be a 2-D N x K array, got shape {d.shape}")
    n_clusters = d.shape[1]
    if n_clusters == 0:
        raise ValueError("distances must have at least one column (cluster)")
    try:
        sigma_f = float(sigma)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"sigma must be a real number, got {sigma!r}") from exc
    if not math.isfinite(sigma_f) or sigma_f < 0.0:
        raise ValueError(f"sigma must be finite and >= 0, got {sigma!r}")
    if log_prior is None:
        lp = np.zeros(n_clusters, dtype=np.float64)
    else:
        lp = to_float64_array(log_prior, "log_prior")
        if lp.shape != (n_clusters,):
            raise ValueError(
                f"log_prior must have shape ({n_clusters},) to match distances' K, "
                f"got {lp.shape}"
            )
        if not np.isfinite(lp).all():
            raise ValueError("log_prior must be finite (a zero prior gives -inf)")
    if not fast and not np.isfinite(d).all():
        raise non_finite_distances(d)
    return d, sigma_f, lp


def non_finite_distances(d: np.ndarray) -> ValueError:
    """The error for N x K distances with an inf or NaN: its value, row and column."""
    bad = np.argwhere(~np.isfinite(d))[0]
    return ValueError(
        f"distances must be finite; found {d[tuple(bad)]} at row {bad[0]}, column {bad[1]}"
    )
