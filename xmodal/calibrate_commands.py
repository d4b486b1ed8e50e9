"""``xmodal calibrate``: fit the match probabilities that label search results."""

from __future__ import annotations

import json
from pathlib import Path

import click

from xmodal.crossmodal.calibration import CALIBRATION_FILE
from xmodal.search.limits import DEFAULT_RERANK_K, MAX_RERANK_K

from .options import load_encoder, model_options

PAIRS_FILE = click.Path(exists=True, dir_okay=False)


@click.command("calibrate")
@click.option("--pairs", type=PAIRS_FILE, required=True, help="Validation pairs to fit on.")
@click.option("--check", type=PAIRS_FILE, help="Pairs to report the fitted error on (test).")
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    required=True,
    help=f"Where to write: a file, or a folder that gets {CALIBRATION_FILE} (the model's "
    "folder, or a bundle, whose calibration search uses first).",
)
@model_options
@click.option(
    "--rerank-k", type=click.IntRange(1, MAX_RERANK_K), default=DEFAULT_RERANK_K, show_default=True
)
@click.option("--max-queries", type=click.IntRange(1), default=None, help="Captions used, at most.")
@click.option("--json", "as_json", is_flag=True, help="Print the calibration as JSON.")
def calibrate_cmd(
    pairs: str,
    check: str | None,
    out: Path,
    model_name: str | None,
    pretrained: str | None,
    rerank_k: int,
    max_queries: int | None,
    as_json: bool,
) -> None:
    """Fit match probabilities (Platt scaling of the search score) on a validation pairs
    file: each caption is a query over its images, as search ranks them."""
    from xmodal.training import DEFAULT_MAX_QUERIES, fit_calibration

    encoder = load_encoder(model_name, pretrained)
    cal = fit_calibration(encoder, pairs, check, rerank_k, max_queries or DEFAULT_MAX_QUERIES)
    path = cal.save(out / CALIBRATION_FILE if out.is_dir() else out)
    if as_json:
        click.echo(json.dumps(cal.to_dict()))
        return
    fitted = cal.fitted_on
    line = f"wrote {path}: {fitted['queries']} queries, ECE cosine {fitted['ece_cosine']}"
    if "ece_reranked" in fitted:
        line += f", reranked {fitted['ece_reranked']}"
    if "check" in fitted:
        c = fitted["check"]
        line += f"; on {c['pairs']}: cosine {c['ece_cosine']}"
        if "ece_reranked" in c:
            line += f", reranked {c['ece_reranked']}"
    click.echo(line)


COMMANDS = [calibrate_cmd]
