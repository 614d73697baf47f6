"""``oclust eval``: the paper-style comparison of regularisers on a bundled dataset.

Example:
    $ oclust eval --dataset digits --regulariser ca,sk,none --seeds 3
"""

from __future__ import annotations

import json
import math
import sys
from typing import Annotated

import typer

from service.options import SettingsCommand

HEADERS = {"acc": "ACC", "nmi": "NMI", "ari": "ARI", "kl_star_hard": "KL* hard",
           "kl_star_soft": "KL* soft"}


def _cell(mean: float, std: float) -> str:
    return "—" if math.isnan(mean) else f"{mean:.3f} ({std:.3f})"


def eval_command(
    dataset: Annotated[str, typer.Option(help="digits, segments or basic_motions")] = "digits",
    regulariser: Annotated[
        str, typer.Option("--regulariser", "-r", help="comma-separated regularisers")
    ] = "ca",
    seeds: Annotated[int, typer.Option(min=1, help="runs per regulariser (seeds 0..N-1)")] = 3,
    epochs: Annotated[int | None, typer.Option(
        min=1, help="passes over the shuffled data (default: the evaluation protocol's)"
    )] = None,
    batch_size: Annotated[int, typer.Option(min=2)] = 256,
    sigma: Annotated[float | None, typer.Option(help="override the default sigma")] = None,
    latent_dim: Annotated[int | None, typer.Option(help="override the latent size")] = None,
    imbalance: Annotated[
        str | None,
        typer.Option(help="subsample by the paper's profile: imb1, imb2 or imb3 (per seed)"),
    ] = None,
    prior: Annotated[
        str, typer.Option(help="cluster prior: uniform, true (class frequencies) or online")
    ] = "uniform",
    as_json: Annotated[
        bool, typer.Option("--json", help="print one JSON object of means, nothing else")
    ] = False,
) -> None:
    """Stream a dataset through each regulariser and print ACC, NMI, ARI and KL* per method."""
    from rich.console import Console
    from rich.table import Table
    from tqdm import tqdm

    from model import datasets
    from model.evaluation import (
        DEFAULT_EPOCHS,
        IMBALANCE_PROFILES,
        METRICS,
        PRIOR_CHOICES,
        evaluate,
        subsample_imbalanced,
        summarise,
    )
    from model.regularisers import REGULARISERS

    epochs = epochs or DEFAULT_EPOCHS
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
    params = {k: v for k, v in {"sigma": sigma, "latent_dim": latent_dim}.items() if v is not None}
    try:
        X, y = datasets.load(dataset)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--dataset") from None
    n = len(X) if imbalance is None else len(subsample_imbalanced(X, y, imbalance, 0)[1])
    steps = len(names) * seeds * epochs * math.ceil(n / batch_size)
    with tqdm(total=steps, desc=f"eval {dataset}", unit="step", file=sys.stderr) as bar:
        results = evaluate(
            dataset, names, seeds=seeds, epochs=epochs, batch_size=batch_size,
            reference=not as_json, on_step=lambda: bar.update(1), imbalance=imbalance,
            prior=prior, **params,
        )
    summary = {name: summarise(runs) for name, runs in results.items()}
    if as_json:
        out = {name: {m: s[m][0] for m in METRICS} for name, s in summary.items()}
        typer.echo(json.dumps(out))
        return
    setting = "" if imbalance is None else f", {imbalance}, prior {prior}"
    if imbalance is None and prior != "uniform":
        setting = f", prior {prior}"
    table = Table(title=f"{dataset}{setting}: {seeds} seed(s), {epochs} epoch(s), mean (std)")
    table.add_column("method")
    for m in METRICS:
        table.add_column(HEADERS[m], justify="right")
    for name, s in summary.items():
        table.add_row(name, *(_cell(*s[m]) for m in METRICS))
    console = Console()
    console.width = max(console.width, 110)  # keep "mean (std)" cells on one line in pipes
    console.print(table)


def register(app: typer.Typer) -> None:
    """Add ``eval`` to the CLI."""
    app.command("eval", cls=SettingsCommand)(eval_command)
