"""``oclust eval``: the paper-style comparison of regularisers on a bundled dataset.

Example:
    $ oclust eval --dataset digits --regulariser ca,sk,none --seeds 3
    $ oclust eval --dataset fashion_mnist --protocol paper -r ca,none --seeds 1 --epochs 2
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Iterable
from typing import Annotated

import typer

from oclust.service.options import SettingsCommand, fail

HEADERS = {"acc": "ACC", "nmi": "NMI", "ari": "ARI", "kl_star_hard": "KL* hard",
           "kl_star_soft": "KL* soft", "linear_probe": "linear probe", "knn_probe": "KNN probe"}
MODEL_OPTIONS = {"sigma": "'--sigma'", "latent_dim": "'--latent-dim'", "views": "'--views'",
                 "init": "'--init'", "clip": "'--input-clip'",
                 "input_guide": "'--input-guide'"}  # model parameter: its option


def model_option(exc: ValueError, given: Iterable[str] = MODEL_OPTIONS) -> str | None:
    """The option behind a model parameter's ``ValueError`` (its message starts with the
    parameter's name), among the parameters ``given``; None when none is named."""
    return next((MODEL_OPTIONS[n] for n in given if n in MODEL_OPTIONS
                 and str(exc).startswith(n)), None)


def _cell(mean: float, std: float) -> str:
    return "—" if math.isnan(mean) else f"{mean:.3f} ({std:.3f})"


def eval_command(
    dataset: Annotated[
        str, typer.Option(help="digits, segments, basic_motions, fashion_mnist or hapt")
    ] = "digits",
    regulariser: Annotated[
        str, typer.Option("--regulariser", "-r", help="comma-separated regularisers")
    ] = "ca",
    seeds: Annotated[int, typer.Option(min=1, help="runs per regulariser (seeds 0..N-1)")] = 3,
    epochs: Annotated[int | None, typer.Option(
        min=1, help="passes over the shuffled data (default: about 400 steps, at most 40 "
        "epochs: 2 for FashionMNIST; 10 under --protocol paper)"
    )] = None,
    batch_size: Annotated[int, typer.Option(min=2)] = 256,
    sigma: Annotated[float | None, typer.Option(
        help="override the protocol's sigma (default: 10 for vectors, 50 for images, and for "
        "windows 50 with ca, 10 with the others; paper: 50), in "
        "oclust's parametrisation: the CA cost is D/(2 sigma) + log(n+1), so the authors' "
        "code's sigma 100 is 50 here"
    )] = None,
    latent_dim: Annotated[int | None, typer.Option(
        min=1, help="override the latent size")] = None,
    views: Annotated[bool | None, typer.Option(
        "--views/--no-views", help="override the protocol's augmented views (default: on for "
        "images with CA; paper: off)"
    )] = None,
    init: Annotated[str | None, typer.Option(
        help="override the centroid seeding: auto, kmeans, inputs (a balanced k-means of the "
        "first batch's inputs), kmeans++, normal or centred (default: the protocol's)"
    )] = None,
    input_clip: Annotated[float | None, typer.Option(
        help="clip the standardised inputs at ± this many standard deviations (default: the "
        "protocol's, 5 under default, none under paper; inf: no clip)"
    )] = None,
    input_guide: Annotated[int | None, typer.Option(
        min=0, help="steps over which CA's assignment also weighs each input's distance to "
        "its cluster's mean input, blended out (default: the protocol's: 200 for vectors "
        "under default, 0 otherwise and under paper)"
    )] = None,
    imbalance: Annotated[
        str | None,
        typer.Option(help="subsample by the paper's profile: imb1, imb2 or imb3 (per seed)"),
    ] = None,
    prior: Annotated[
        str, typer.Option(help="cluster prior: uniform, true (class frequencies) or online")
    ] = "uniform",
    protocol: Annotated[
        str, typer.Option(help="default (the shipped config) or paper (the CA paper's setup)")
    ] = "default",
    limit: Annotated[
        int | None, typer.Option(min=10, help="a seeded random subset of this many points")
    ] = None,
    probes: Annotated[
        bool, typer.Option("--probes", help="add linear and KNN (k=10) probes of the latents")
    ] = False,
    reference: Annotated[
        bool, typer.Option(help="add KMeans and MiniBatchKMeans rows on the same data")
    ] = True,
    as_json: Annotated[
        bool, typer.Option("--json", help="print one JSON object of means, nothing else")
    ] = False,
) -> None:
    """Stream a dataset through each regulariser and print ACC, NMI, ARI and KL* per method."""
    from rich.console import Console
    from rich.table import Table
    from tqdm import tqdm

    from oclust.model import datasets
    from oclust.model.evaluation import (
        IMBALANCE_PROFILES,
        METRICS,
        PRIOR_CHOICES,
        PROBES,
        check_model_params,
        check_reference_batches,
        default_epochs,
        evaluate,
        subsample_imbalanced,
        subset,
        summarise,
    )
    from oclust.model.presets import PRESETS
    from oclust.model.regularisers import REGULARISERS
    from oclust.model.validation import clip_option
    from oclust.training_worker.settings import check_init

    names = [n.strip() for n in regulariser.split(",") if n.strip()]
    unknown = [n for n in names if n not in REGULARISERS]
    if unknown or not names:
        raise typer.BadParameter(
            f"unknown regulariser(s) {unknown}; choose from {', '.join(sorted(REGULARISERS))}",
            param_hint="--regulariser",
        )
    if imbalance is not None and imbalance not in IMBALANCE_PROFILES:
        raise typer.BadParameter(
            f"unknown profile {imbalance!r}; choose from {', '.join(IMBALANCE_PROFILES)}",
            param_hint="--imbalance",
        )
    if prior not in PRIOR_CHOICES:
        raise typer.BadParameter(
            f"unknown prior {prior!r}; choose from {', '.join(PRIOR_CHOICES)}",
            param_hint="--prior",
        )
    if protocol not in PRESETS:
        raise typer.BadParameter(
            f"unknown protocol {protocol!r}; choose from {', '.join(PRESETS)}",
            param_hint="--protocol",
        )
    if sigma is not None and not 0 < sigma < math.inf:
        raise typer.BadParameter(f"must be positive and finite, got {sigma}", param_hint="--sigma")
    if init is not None:
        try:
            check_init(init)
        except ValueError as exc:
            raise typer.BadParameter(str(exc), param_hint="--init") from None
    given = {"sigma": sigma, "latent_dim": latent_dim, "views": views, "init": init,
             "input_guide": input_guide}
    params = {k: v for k, v in given.items() if v is not None}
    if input_clip is not None:
        try:
            params["clip"] = clip_option(input_clip)
        except ValueError as exc:
            raise typer.BadParameter(str(exc), param_hint="--input-clip") from None
    try:
        X, y = datasets.load(dataset)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--dataset") from None
    if key_of(dataset) == "daphnet":
        raise typer.BadParameter(
            "daphnet is a reading stream: window it with the worker, not eval",
            param_hint="--dataset",
        )
    try:
        X, y = subset(X, y, limit)  # the points evaluate() will take
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--limit") from None
    k = int(y.max()) + 1
    try:  # the model is built at its first batch: a bad parameter failed after loading
        for name in names:
            check_model_params(protocol, X, k, regulariser=name, **params)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint=model_option(exc, params)) from None
    try:
        if reference:
            check_reference_batches(batch_size, len(X), k)
    except ValueError as exc:
        hint = "--batch-size" if batch_size < k else "--limit"
        raise typer.BadParameter(f"{exc} (or pass --no-reference)", param_hint=hint) from None
    epochs = epochs or default_epochs(protocol, len(X), batch_size)
    n = len(X) if imbalance is None else len(subsample_imbalanced(X, y, imbalance, 0)[1])
    steps = len(names) * seeds * epochs * math.ceil(n / batch_size)
    try:
        with tqdm(total=steps, desc=f"eval {dataset}", unit="step", file=sys.stderr) as bar:
            results = evaluate(
                dataset, names, seeds=seeds, epochs=epochs, batch_size=batch_size,
                reference=reference, on_step=lambda: bar.update(1), imbalance=imbalance,
                prior=prior, protocol=protocol, limit=limit, probes=probes, **params,
            )
    except ValueError as exc:
        raise fail(str(exc)) from None
    summary = {name: summarise(runs) for name, runs in results.items()}
    columns = METRICS + (PROBES if probes else ())
    if as_json:  # NaN (no soft assignment, no latents) becomes null
        out = {
            name: {m: None if math.isnan(s[m][0]) else s[m][0] for m in columns}
            for name, s in summary.items()
        }
        typer.echo(json.dumps(out))
        return
    setting = "" if imbalance is None else f", {imbalance}, prior {prior}"
    if imbalance is None and prior != "uniform":
        setting = f", prior {prior}"
    if protocol != "default":
        setting += f", {protocol} protocol"
    table = Table(title=f"{dataset}{setting}: {seeds} seed(s), {epochs} epoch(s), mean (std)")
    table.add_column("method")
    for m in columns:
        table.add_column(HEADERS[m], justify="right")
    for name, s in summary.items():
        table.add_row(name, *(_cell(*s[m]) for m in columns))
    console = Console()
    console.width = max(console.width, 110)  # keep "mean (std)" cells on one line in pipes
    console.print(table)


def key_of(dataset: str) -> str:
    """The canonical name of a dataset (aliases resolved)."""
    from oclust.model import datasets

    name = dataset.lower()
    return datasets.ALIASES.get(name, name)


def register(app: typer.Typer) -> None:
    """Add ``eval`` to the CLI."""
    app.command("eval", cls=SettingsCommand)(eval_command)
