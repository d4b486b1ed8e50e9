"""Bundle commands: index, search, info, verify, serve."""

from __future__ import annotations

import functools
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from .options import friendly_errors, load_encoder, model_options


def _bundle_option(fn: Callable) -> Callable:
    fn = click.option(
        "--db",
        "db_url",
        default=lambda: os.environ.get("XMODAL_DB"),
        help="Catalog database URL (default: SQLite inside the bundle; env XMODAL_DB).",
    )(fn)
    return click.option(
        "--bundle",
        type=click.Path(file_okay=False, path_type=Path),
        required=True,
        help="The index bundle folder.",
    )(fn)


def _bundle_errors(fn: Callable) -> Callable:
    """Bundle, catalog and query problems as one-line errors."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from indexer.bundle import BundleError
        from indexer.catalog import CatalogError
        from indexer.pipeline import IndexRunError
        from search.engine import QueryError

        try:
            return fn(*args, **kwargs)
        except (BundleError, CatalogError, IndexRunError, QueryError) as exc:
            raise click.ClickException(str(exc)) from exc

    return wrapper


@click.command()
@click.argument("paths", nargs=-1, type=click.Path(path_type=Path))
@_bundle_option
@click.option(
    "--captions",
    "caption_files",
    multiple=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Caption corpus (CSV/TSV with a 'caption' column, JSONL, TXT); repeatable.",
)
@model_options
@click.option("--batch-size", type=click.IntRange(1, 4096), default=64, show_default=True)
@click.option(
    "--workers",
    type=click.IntRange(0, 64),
    default=None,
    help="Decoding processes (default: one per core; 0 decodes in-process).",
)
@click.option(
    "--timeout",
    "timeout_s",
    type=click.FloatRange(0.1),
    default=30.0,
    show_default=True,
    help="Seconds one file may take to decode before it is failed.",
)
@click.option(
    "--index-factory", default=None, help="FAISS factory string (default: by collection size)."
)
@click.option(
    "--max-failures",
    type=click.IntRange(0),
    default=None,
    help="Exit non-zero when more files than this fail (default: never for failures).",
)
@click.option(
    "--allow-empty", is_flag=True, help="Accept a root that became empty (drops its entries)."
)
@click.option(
    "--token-cache-mb",
    type=click.IntRange(0),
    default=4096,
    show_default=True,
    help="Bound on the reranker's token caches in the bundle (0: recompute at query time).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the run report as JSON.")
@friendly_errors
@_bundle_errors
def index(
    paths: tuple[Path, ...],
    bundle: Path,
    db_url: str | None,
    caption_files: tuple[Path, ...],
    model_name: str | None,
    pretrained: str | None,
    batch_size: int,
    workers: int | None,
    timeout_s: float,
    index_factory: str | None,
    max_failures: int | None,
    allow_empty: bool,
    token_cache_mb: int,
    as_json: bool,
) -> None:
    """Index photo folders and caption files into a bundle (incremental)."""
    from crossmodal.threads import default_threads
    from indexer.bundle import read_manifest
    from indexer.pipeline import IndexOptions, run_index
    from search.engine import encoder_for_bundle
    from search.rerank import reranker_folder

    if not paths and not caption_files:
        raise click.UsageError("give folders to index and/or --captions files")
    if model_name or pretrained or not (bundle / "manifest.json").exists():
        encoder = load_encoder(model_name, pretrained)
    else:  # an existing bundle: its own model
        from indexer.bundle import Bundle

        read_manifest(bundle)
        encoder = encoder_for_bundle(Bundle(bundle, db_url))
    opts = IndexOptions(
        bundle=bundle,
        roots=list(paths),
        captions=list(caption_files),
        db_url=db_url,
        batch_size=batch_size,
        workers=default_threads() if workers is None else workers,
        timeout_s=timeout_s,
        index_factory=index_factory,
        allow_empty_roots=allow_empty,
        progress=not as_json,
        # Token features for the model's cross-attention reranker, if it has one.
        cache_tokens=reranker_folder(encoder) is not None and token_cache_mb > 0,
        token_cache_mb=token_cache_mb,
    )
    report = run_index(encoder, opts)
    c = report.counts
    if as_json:
        click.echo(json.dumps({"bundle": str(bundle), **report.to_dict()}))
    else:
        seen = c["seen"]
        click.echo(
            f"seen {seen} = indexed {c['indexed']} + unchanged {c['unchanged']} + "
            f"failed {c['failed']} + excluded {c['excluded']}"
            + (f"; removed {c['removed']}" if c["removed"] else "")
            + (f"; renamed {c['renamed']}" if c["renamed"] else "")
            + (f"; reused {c['reused']} copies" if c["reused"] else "")
        )
        if caption_files:
            click.echo(
                f"captions: {c['caption_rows']} rows, {c['captions_indexed']} new, "
                f"{c['captions_unchanged']} known, {c['caption_duplicates']} duplicates, "
                f"{c['caption_links']} linked to images, {c['caption_rows_skipped']} skipped"
            )
        for path, reason in report.failures[:50]:
            click.echo(f"failed: {path}: {reason}")
        if len(report.failures) > 50:
            click.echo(f"... and {len(report.failures) - 50} more (xmodal info --failures)")
        for problem in report.problems[:50]:
            click.echo(f"skipped: {problem}")
        click.echo(f"bundle {bundle}: generation {report.generation}, {report.seconds:.1f} s")
    if max_failures is not None and c["failed"] > max_failures:
        raise click.ClickException(
            f"{c['failed']} files failed, more than --max-failures {max_failures}"
        )


@click.command()
@click.argument("query", required=False)
@_bundle_option
@click.option("--image", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--target",
    type=click.Choice(["images", "captions"]),
    default=None,
    help="What to find (default: images for text, images for --image).",
)
@click.option("-k", "k", type=click.IntRange(1, 1000), default=10, show_default=True)
@click.option("--min-score", type=float, default=None, help="Minimum dual-encoder cosine.")
@click.option(
    "--rerank/--no-rerank",
    default=None,
    help="Re-score the top candidates with cross-attention (default: on when the model "
    "has a reranker; text->images and image->captions).",
)
@click.option("--rerank-k", type=click.IntRange(1, 200), default=32, show_default=True)
@click.option("--json", "as_json", is_flag=True)
@friendly_errors
@_bundle_errors
def search(
    query: str | None,
    bundle: Path,
    db_url: str | None,
    image: Path | None,
    target: str | None,
    k: int,
    min_score: float | None,
    rerank: bool | None,
    rerank_k: int,
    as_json: bool,
) -> None:
    """Search a bundle with text or with an image."""
    from crossmodal.images import decode_image
    from search.engine import SearchEngine

    if (query is None) == (image is None):
        raise click.UsageError("give either a QUERY text or --image FILE")
    engine = SearchEngine(bundle, db_url=db_url, rerank=rerank)
    target = target or "images"
    if image is not None:
        picture = decode_image(image)
        label: str = str(image)
        if target == "captions":
            results = engine.image_to_captions(picture, k, min_score, rerank, rerank_k)
        else:
            results = engine.image_to_images(picture, k, min_score)
    else:
        label = query
        if target == "captions":
            results = engine.text_to_captions(query, k, min_score)
        else:
            results = engine.text_to_images(query, k, min_score, rerank, rerank_k)
    if as_json:
        click.echo(json.dumps({"query": label, "results": [r.to_dict() for r in results]}))
        return
    if not results:
        click.echo("no results")
    for r in results:
        click.echo(f"{r.score:7.4f}  {r.path if r.path is not None else r.caption}")


@click.command()
@_bundle_option
@click.option("--failures", "show_failures", is_flag=True, help="List every failed file.")
@click.option("--json", "as_json", is_flag=True)
@friendly_errors
@_bundle_errors
def info(bundle: Path, db_url: str | None, show_failures: bool, as_json: bool) -> None:
    """Model, counts, index types and sizes, last run and failures of a bundle."""
    from search.status import bundle_status

    status = bundle_status(bundle, db_url, failures_limit=None if show_failures else 20)
    if as_json:
        click.echo(json.dumps(status, default=str))
        return
    m = status["model"]
    click.echo(f"bundle      {status['bundle']} (generation {status['generation']})")
    click.echo(f"model       {m['name']} ({m['pretrained']}), dim {m['embed_dim']}")
    click.echo(f"catalog     {status['catalog']}")
    for kind, idx in status["indexes"].items():
        click.echo(
            f"{kind:<11} {idx['count']} vectors, {idx['factory']} {idx['params'] or ''} "
            f"{idx['bytes'] / 1e6:.1f} MB"
        )
    c = status["counts"]
    click.echo(
        f"files       {c.get('images_indexed', 0)} indexed, {c.get('images_failed', 0)} failed, "
        f"{c.get('images_excluded', 0)} excluded; captions {c.get('captions', 0)}"
    )
    run = status["last_run"]
    if run:
        click.echo(f"last run    #{run['id']} {run['status']} {run['started_at']}")
    for f in status["failures"]:
        click.echo(f"failed      {f['path']}: {f['reason']}")


@click.command()
@_bundle_option
@model_options
@click.option("--json", "as_json", is_flag=True)
@friendly_errors
@_bundle_errors
def verify(
    bundle: Path,
    db_url: str | None,
    model_name: str | None,
    pretrained: str | None,
    as_json: bool,
) -> None:
    """Check a bundle: FAISS ids vs catalog ids, counts, manifest, model identity."""
    from indexer.verify import verify_bundle

    identity = None
    if model_name or pretrained:
        identity = load_encoder(model_name, pretrained).identity
    report = verify_bundle(bundle, db_url, identity)
    if as_json:
        click.echo(
            json.dumps(
                {"ok": report.ok, "problems": report.problems, "facts": report.facts}, default=str
            )
        )
    else:
        for key, value in report.facts.items():
            if key != "model":
                click.echo(f"{key}: {value}")
        for problem in report.problems:
            click.echo(f"PROBLEM: {problem}")
        click.echo("OK" if report.ok else f"{len(report.problems)} problems")
    if not report.ok:
        sys.exit(1)


@click.command()
@_bundle_option
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=click.IntRange(0, 65535), default=5000, show_default=True)
@click.option(
    "--threads",
    "server_threads",
    type=click.IntRange(1, 64),
    default=None,
    help="Request threads (default: one per core; each runs the model on one core).",
)
@click.option("--max-upload-mb", type=click.FloatRange(0.1, 1024), default=16.0, show_default=True)
@friendly_errors
@_bundle_errors
def serve(
    bundle: Path,
    db_url: str | None,
    host: str,
    port: int,
    server_threads: int | None,
    max_upload_mb: float,
) -> None:
    """Serve the web pages and JSON API with a production WSGI server (waitress)."""
    import waitress

    from crossmodal.threads import configure_threads, default_threads
    from web import create_app

    threads = server_threads or default_threads()
    # Each request thread runs torch and FAISS on one core: N requests in parallel
    # instead of N pools fighting over the same cores.
    configure_threads(1)
    app = create_app(
        {"BUNDLE": bundle, "DB_URL": db_url, "MAX_CONTENT_LENGTH": int(max_upload_mb * 2**20)}
    )
    shown = "localhost" if host in ("127.0.0.1", "0.0.0.0", "::") else host
    click.echo(f"serving {bundle} on http://{shown}:{port}/  ({threads} threads; Ctrl+C stops)")
    waitress.serve(
        app,
        host=host,
        port=port,
        threads=threads,
        ident="xmodal",
        # Bodies up to 4x the upload cap reach the app, which answers 413 in JSON;
        # larger ones waitress itself refuses before buffering them.
        max_request_body_size=int(max_upload_mb * 2**20) * 4 + 2**20,
        clear_untrusted_proxy_headers=True,
    )


COMMANDS = [index, search, info, verify, serve]
