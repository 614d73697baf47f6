"""What an encoder is, without torch: :class:`EncoderConfig` (stored in the snapshot manifest)
and, for the MLP, the layer program its weights make (:func:`mlp_program`), which
:mod:`oclust.model.inference` runs without torch. :mod:`oclust.model.encoders` builds the torch
modules.

Example:
    >>> cfg = EncoderConfig.for_shape((64,), latent_dim=16)
    >>> cfg.kind, [op for op, _ in mlp_program(cfg)]
    ('mlp', ['linear', 'batchnorm', 'relu', 'linear', 'layernorm'])
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

__all__ = [
    "DEFAULT_HIDDEN", "ENCODERS", "HIDDEN_NORMS", "IMAGE_KINDS", "LATENT_NORMS",
    "MIN_LAYER_NORM_DIM", "NORM_EPS", "WINDOW_KINDS", "EncoderConfig", "mlp_program",
]

ENCODERS = ("mlp", "conv1d", "cnn", "convnet", "lenet", "lenet1d")
IMAGE_KINDS = ("cnn", "convnet", "lenet")  # encoders of (H, W) or (C, H, W) images
WINDOW_KINDS = ("conv1d", "lenet1d")  # encoders of (C, T) sensor windows
DEFAULT_HIDDEN = {
    "mlp": (512,), "conv1d": (32, 64), "cnn": (32, 64), "convnet": (16, 32), "lenet": (6, 16),
    "lenet1d": (32, 64),
}
LATENT_NORMS = ("layer", "batch", "none")
HIDDEN_NORMS = ("batch", "none")  # after each hidden layer; "none" only for the MLP
NORM_EPS = 1e-5  # eps of the latent LayerNorm / BatchNorm1d
# LayerNorm (no affine) maps every latent of 1 dimension to 0 and of 2 to (-1, 1) or (1, -1)
MIN_LAYER_NORM_DIM = 3


@dataclass(frozen=True)
class EncoderConfig:
    """Everything needed to rebuild an encoder (stored in the snapshot manifest)."""

    kind: str
    input_shape: tuple[int, ...]
    latent_dim: int = 128
    hidden: tuple[int, ...] = field(default=(512,))
    latent_norm: str = "layer"  # "layer" | "batch" | "none": keeps latents from shrinking
    # BatchNorm after each hidden layer: every encoder has it, except MLPs saved before the
    # field existed (their manifests lack it: "none")
    hidden_norm: str = "batch"

    def __post_init__(self) -> None:
        if self.hidden_norm not in HIDDEN_NORMS:
            raise ValueError(f"hidden_norm must be one of {', '.join(HIDDEN_NORMS)}, got "
                             f"{self.hidden_norm!r}")
        if self.hidden_norm == "none" and self.kind != "mlp":
            raise ValueError(f"hidden_norm 'none' is for the MLP only: the {self.kind!r} "
                             "encoder always has BatchNorm")

    @classmethod
    def for_shape(
        cls,
        input_shape: tuple[int, ...],
        latent_dim: int = 128,
        kind: str = "auto",
        hidden: tuple[int, ...] | None = None,
        latent_norm: str = "layer",
        hidden_norm: str = "batch",
    ) -> EncoderConfig:
        """Pick the encoder family from the per-sample shape (``kind="auto"``), and its latent
        normalisation (``latent_norm="auto"``: raw latents, ``"none"``, for the image encoders
        of :data:`IMAGE_KINDS`, with centred centroids and sigma 50, see
        :func:`oclust.model.clusterer.resolve_init` and ``resolve_sigma``; ``"layer"`` for vectors
        and windows).

        (D,) is a vector (``mlp``); (C, T) with C <= 32 channels and more readings than
        channels, T > C, is a sensor window (``conv1d``); any other (H, W), and every
        (C, H, W), is an image (``convnet``). A wide image such as (28, 32) therefore reads as a
        window: send it as (1, 28, 32), or pass ``kind="convnet"``. The MLP takes any shape
        (flattened); ``ValueError`` for a kind that does not take the shape, and for LayerNorm
        latents of fewer than :data:`MIN_LAYER_NORM_DIM` dimensions.

        >>> [EncoderConfig.for_shape(s).kind for s in [(64,), (6, 128), (28, 28), (28, 32),
        ...                                            (1, 28, 32)]]
        ['mlp', 'conv1d', 'convnet', 'conv1d', 'convnet']
        >>> [EncoderConfig.for_shape(s, latent_norm="auto").latent_norm
        ...  for s in [(64,), (6, 128), (28, 28)]]
        ['layer', 'layer', 'none']
        """
        shape = tuple(int(s) for s in input_shape)
        if kind == "auto":
            if len(shape) == 1:
                kind = "mlp"
            elif len(shape) == 2 and shape[0] <= 32 and shape[1] > shape[0]:
                kind = "conv1d"  # channels × time
            elif len(shape) in (2, 3):
                kind = "convnet"
            else:
                raise ValueError(f"no encoder for per-sample shape {shape}")
        if kind not in ENCODERS:
            raise ValueError(f"unknown encoder {kind!r}; choose from {', '.join(ENCODERS)}")
        ranks = (2,) if kind in WINDOW_KINDS else (2, 3) if kind in IMAGE_KINDS else None
        if ranks is not None and len(shape) not in ranks:
            takes = "windows (C, T)" if kind in WINDOW_KINDS else "images (H, W) or (C, H, W)"
            raise ValueError(f"encoder {kind!r} takes {takes}, got per-sample shape {shape}")
        if latent_norm == "auto":
            latent_norm = "none" if kind in IMAGE_KINDS else "layer"
        if latent_norm == "layer" and latent_dim < MIN_LAYER_NORM_DIM:
            raise ValueError(
                f"latent_dim must be at least {MIN_LAYER_NORM_DIM} with LayerNorm latents (the "
                f"default for vectors and windows), got {latent_dim}: LayerNorm maps every latent "
                "of 1 or 2 dimensions onto 1 or 2 points (use latent_norm 'batch' or 'none')"
            )
        default_hidden = DEFAULT_HIDDEN[kind]
        return cls(
            kind, shape, int(latent_dim), tuple(hidden) if hidden else default_hidden, latent_norm,
            hidden_norm,
        )

    def to_dict(self) -> dict[str, object]:
        """JSON-able form for the manifest."""
        d = asdict(self)
        d["input_shape"] = list(self.input_shape)
        d["hidden"] = list(self.hidden)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, object]) -> EncoderConfig:
        """Inverse of :meth:`to_dict`. Manifests written before a field existed read as the
        encoder they were saved from: no latent normalisation, and an MLP without BatchNorm."""
        kind = str(d["kind"])
        return cls(
            kind,
            tuple(int(s) for s in d["input_shape"]),  # type: ignore[union-attr]
            int(d["latent_dim"]),  # type: ignore[arg-type]
            tuple(int(h) for h in d["hidden"]),  # type: ignore[union-attr]
            str(d.get("latent_norm", "none")),
            str(d.get("hidden_norm", "none" if kind == "mlp" else "batch")),
        )


def mlp_program(cfg: EncoderConfig) -> list[tuple[str, tuple[str, ...]]]:
    """The MLP encoder as (op, state-dict keys of its parameters), in order of application.

    Ops: ``linear`` (weight (out, in), bias), ``relu``, ``layernorm`` (no parameters) and
    ``batchnorm`` (running mean and variance, then weight and bias for the hidden layers' affine
    BatchNorm; eval mode). The keys are those of
    ``oclust.model.encoders.build_encoder(cfg).state_dict()``: the body is wrapped in a
    ``Sequential`` with its latent normalisation unless that is ``"none"``.
    """
    if cfg.kind != "mlp":
        raise ValueError(f"no MLP program for a {cfg.kind!r} encoder")
    if cfg.latent_norm not in LATENT_NORMS:
        raise ValueError(f"unknown latent_norm {cfg.latent_norm!r}")
    body = "" if cfg.latent_norm == "none" else "0."
    ops: list[tuple[str, tuple[str, ...]]] = []
    step = 3 if cfg.hidden_norm == "batch" else 2  # Linear, [BatchNorm,] ReLU per hidden layer
    for i in range(len(cfg.hidden)):
        layer = f"{body}net.{step * i}"
        ops.append(("linear", (f"{layer}.weight", f"{layer}.bias")))
        if cfg.hidden_norm == "batch":
            bn = f"{body}net.{step * i + 1}."
            keys = ("running_mean", "running_var", "weight", "bias")
            ops.append(("batchnorm", tuple(bn + k for k in keys)))
        ops.append(("relu", ()))
    last = f"{body}net.{step * len(cfg.hidden)}"
    ops.append(("linear", (f"{last}.weight", f"{last}.bias")))
    if cfg.latent_norm == "layer":
        ops.append(("layernorm", ()))
    elif cfg.latent_norm == "batch":
        ops.append(("batchnorm", ("1.running_mean", "1.running_var")))
    return ops
