"""Bundle commands: index, search, info, verify, serve."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

# Both cheap to import (no torch, no Flask): the options' ranges and defaults.
from xmodal.indexer.options import ENGINES, RAY_LOCAL, IndexOptions
from xmodal.search.limits import DEFAULT_K, DEFAULT_RERANK_K, MAX_K, MAX_RERANK_K
from xmodal.web import DEFAULTS as WEB_DEFAULTS

from .options import (
    FiniteFloat,
    env_note,
    load_encoder,
    model_options,
    printable,
)

DB_ENV = "XMODAL_DB"


def _db_url(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """A parseable SQLAlchemy URL, or None (the bundle's SQLite catalog)."""
    if not value:
        return None
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        make_url(value)
    except ArgumentError:
        raise click.BadParameter(
            f"not a database URL{env_note(ctx, param)}: {value!r} (expected e.g. "
            "sqlite:////path/catalog.sqlite or postgresql+psycopg://user@host/dbname)",
            ctx,
            param,
        ) from None
    return value


def _caption_files(
    ctx: click.Context, param: click.Parameter, value: tuple[Path, ...]
) -> tuple[Path, ...]:
    """Caption files of a known type that are regular files within the size limit.

    Checked before the run starts (cheap, nothing read): a FIFO or ``/dev/zero`` given
    as a corpus then fails at once instead of after the images are indexed.
    """
    from xmodal.crossmodal.errors import DataError
    from xmodal.indexer.captions import check_caption_file

    for path in value:
        try:
            check_caption_file(path)
        except DataError as exc:
            raise click.BadParameter(printable(str(exc)), ctx, param) from None
    return value


def _bundle_option(fn: Callable) -> Callable:
    fn = click.option(
        "--db",
        "db_url",
        envvar=DB_ENV,
        default=None,
        callback=_db_url,
        help=f"Catalog database URL (default: SQLite inside the bundle; env {DB_ENV}).",
    )(fn)
    return click.option(
        "--bundle",
        type=click.Path(file_okay=False, path_type=Path),
        required=True,
        help="The index bundle folder.",
    )(fn)


def _warn_model_advice(bundle: Any, db_url: str | None = None) -> None:
    """Print the bundle's model advice (e.g. the shapes model over photos) to stderr."""
    from xmodal.indexer.bundle import Bundle
    from xmodal.search.status import model_advice

    opened = bundle if isinstance(bundle, Bundle) else Bundle(Path(bundle), db_url)
    try:
        advice = model_advice(opened)
    finally:
        if opened is not bundle:
            opened.close()
    if advice:
        click.echo(f"warning: {printable(advice)}", err=True)


def _check_index_budget(
    value: str | None, index_factory: str | None, vector_store: str | None
) -> int | None:
    """--max-index-memory in bytes, refused beside a named factory or a database store."""
    from xmodal.indexer import MemoryBudgetError, parse_memory

    if value is None:
        return None
    if index_factory:
        raise click.UsageError("give --max-index-memory or --index-factory, not both")
    if vector_store and vector_store != "faiss":
        raise click.UsageError("--max-index-memory applies to FAISS indexes, not --vector-store")
    try:
        return parse_memory(value)
    except MemoryBudgetError as exc:
        raise click.BadParameter(str(exc), param_hint="--max-index-memory") from exc


def _check_vector_store(url: str | None) -> None:
    """Refuse an unknown --vector-store URL before a model is loaded."""
    from xmodal.indexer import StoreError, store_kind

    try:
        store_kind(url)
    except StoreError as exc:
        raise click.BadParameter(str(exc), param_hint="--vector-store") from None


@click.command()
@click.argument("paths", nargs=-1, type=click.Path(path_type=Path))
@_bundle_option
@click.option(
    "--captions",
    "caption_files",
    multiple=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    callback=_caption_files,
    help="Caption corpus (CSV/TSV with a 'caption' column, JSONL, TXT); repeatable.",
)
@model_options
@click.option(
    "--batch-size",
    type=click.IntRange(1, 4096),
    default=IndexOptions.batch_size,
    show_default=True,
)
@click.option(
    "--workers",
    type=click.IntRange(0, 64),
    default=None,
    help="Decoding processes (default: one per core; 0 decodes in-process).",
)
@click.option(
    "--timeout",
    "timeout_s",
    type=FiniteFloat(0.1),
    default=IndexOptions.timeout_s,
    show_default=True,
    help="Seconds one file may take to decode before it is failed.",
)
@click.option(
    "--index-factory", default=None, help="FAISS factory string (default: by collection size)."
)
@click.option(
    "--max-index-memory",
    default=None,
    metavar="SIZE",
    help="Memory budget of each FAISS index (e.g. 2GB): past it, a compressed IVF-PQ index "
    "whose shortlist is re-scored with the exact stored vectors; a later run that names "
    "none keeps the bundle's index type.",
)
@click.option(
    "--vector-store",
    default=None,
    help="Where the vectors live: faiss (default), milvus://host:19530/collection, "
    "milvus-lite:///abs/file.db/collection, or postgresql+psycopg://user@host/db "
    "(pgvector); a later run that names none keeps the bundle's.",
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
    default=IndexOptions.token_cache_mb,
    show_default=True,
    help="Bound on the reranker's token caches in the bundle (0: recompute at query time).",
)
@click.option(
    "--engine",
    type=click.Choice(ENGINES),
    default=IndexOptions.engine,
    show_default=True,
    help="Where images are decoded and encoded: this machine, or a Ray cluster "
    "(pip install 'xmodal[ray]').",
)
@click.option(
    "--ray-address",
    default=RAY_LOCAL,
    show_default=True,
    help="--engine ray: local (a Ray instance for this run, on 127.0.0.1), auto (the "
    "running cluster), HOST:PORT of a head, or ray://HOST:PORT.",
)
@click.option(
    "--gpus-per-worker",
    type=FiniteFloat(0.0),
    default=IndexOptions.gpus_per_worker,
    show_default=True,
    help="--engine ray: GPUs each encoder actor holds (0: encode on CPUs).",
)
@click.option(
    "--decode-workers",
    type=click.IntRange(1, 4096),
    default=None,
    help="--engine ray with --gpus-per-worker: concurrent decode tasks on the CPUs "
    "(default: the CPUs the encoders leave); on CPUs the encoder actors decode.",
)
@click.option(
    "--encode-workers",
    type=click.IntRange(1, 4096),
    default=None,
    help="--engine ray: encoder actors, each loading the model once (default: one per "
    "--gpus-per-worker GPUs, else one per CPU, decoding its own batches).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the run report as JSON.")
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
    max_index_memory: str | None,
    vector_store: str | None,
    max_failures: int | None,
    allow_empty: bool,
    token_cache_mb: int,
    engine: str,
    ray_address: str,
    gpus_per_worker: float,
    decode_workers: int | None,
    encode_workers: int | None,
    as_json: bool,
) -> None:
    """Index photo folders and caption files into a bundle (incremental)."""
    from xmodal.crossmodal.threads import default_threads
    from xmodal.indexer.lock import writer_pid
    from xmodal.indexer.pipeline import run_index
    from xmodal.search.engine import encoder_for_bundle
    from xmodal.search.rerank import reranker_folder

    if not paths and not caption_files:
        raise click.UsageError("give folders to index and/or --captions files")
    _check_vector_store(vector_store)
    budget = _check_index_budget(max_index_memory, index_factory, vector_store)
    if engine == "ray":  # refuse before loading a model
        from xmodal.indexer.ray_cluster import check_address, import_ray

        import_ray()
        check_address(ray_address)
    if (holder := writer_pid(bundle)) is not None:  # refuse before loading a model
        raise click.ClickException(
            f"bundle {bundle} is being indexed by pid {holder}; wait for that run to finish"
        )
    if model_name or pretrained or not (bundle / "manifest.json").exists():
        encoder = load_encoder(model_name, pretrained)
    else:  # an existing bundle: its own model (read from the manifest alone, so a
        # damaged index file does not stop the run that rebuilds it)
        encoder = encoder_for_bundle(bundle)
    opts = IndexOptions(
        bundle=bundle,
        roots=list(paths),
        captions=list(caption_files),
        db_url=db_url,
        batch_size=batch_size,
        workers=default_threads() if workers is None else workers,
        timeout_s=timeout_s,
        index_factory=index_factory,
        vector_store=vector_store,
        max_index_memory=budget,
        allow_empty_roots=allow_empty,
        progress=not as_json,
        # Token features for the model's cross-attention reranker, if it has one.
        cache_tokens=reranker_folder(encoder) is not None and token_cache_mb > 0,
        token_cache_mb=token_cache_mb,
        engine=engine,
        ray_address=ray_address,
        gpus_per_worker=gpus_per_worker,
        decode_workers=decode_workers,
        encode_workers=encode_workers,
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
            click.echo(f"failed: {printable(str(path))}: {printable(str(reason))}")
        if len(report.failures) > 50:
            click.echo(f"... and {len(report.failures) - 50} more (xmodal info --failures)")
        for problem in report.problems[:50]:
            click.echo(f"skipped: {printable(problem)}")
        click.echo(
            f"bundle {printable(str(bundle))}: generation {report.generation}, "
            f"{report.seconds:.1f} s"
        )
    _warn_model_advice(bundle, db_url)
    if max_failures is not None and c["failed"] > max_failures:
        raise click.ClickException(
            f"{c['failed']} files failed, more than --max-failures {max_failures}"
        )


# The search command's flag for each filter (the API's parameter names).
_FILTER_FLAGS = {
    "folder": "--folder",
    "type": "--type",
    "taken_after": "--after",
    "taken_before": "--before",
    "min_width": "--min-width",
}


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
@click.option("-k", "k", type=click.IntRange(1, MAX_K), default=DEFAULT_K, show_default=True)
@click.option("--min-score", type=FiniteFloat(), default=None, help="Minimum dual-encoder cosine.")
@click.option(
    "--rerank/--no-rerank",
    default=None,
    help="Re-score the top candidates with cross-attention (default: on when the model "
    "has a reranker; text->images and image->captions).",
)
@click.option(
    "--rerank-k", type=click.IntRange(1, MAX_RERANK_K), default=DEFAULT_RERANK_K, show_default=True
)
@click.option("--folder", help="Only images under this folder (relative to an indexed one).")
@click.option("--type", "types", help="Only these image types, comma-separated (jpeg,png).")
@click.option("--after", help="Only images taken on or after this date (2019-07-14).")
@click.option("--before", help="Only images taken before this date (exclusive).")
@click.option("--min-width", help="Only images at least this many pixels wide.")
@click.option("--json", "as_json", is_flag=True)
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
    folder: str | None,
    types: str | None,
    after: str | None,
    before: str | None,
    min_width: str | None,
    as_json: bool,
) -> None:
    """Search a bundle with text or with an image.

    Image results can be filtered by folder, type, date taken (EXIF, else the file's
    modification time) and width, inside the index search: k results whenever k pass.
    """
    from xmodal.crossmodal.images import ImageDecodeError, decode_image
    from xmodal.indexer.captions import read_regular_file
    from xmodal.indexer.decode import MAX_FILE_BYTES
    from xmodal.indexer.filters import FilterError, ImageFilter
    from xmodal.search.engine import SearchEngine

    if (query is None) == (image is None):
        raise click.UsageError("give either a QUERY text or --image FILE")
    try:
        filters = ImageFilter.parse(folder, types, after, before, min_width)
    except FilterError as exc:
        flag = _FILTER_FLAGS.get(exc.param or "", "a filter")
        raise click.BadParameter(exc.problem, param_hint=flag) from None
    if filters.active and target == "captions":
        raise click.UsageError("filters apply to image results only, not to --target captions")
    # Read (a regular file, bounded: a FIFO would block) before loading the model.
    data = None if image is None else read_regular_file(image, MAX_FILE_BYTES, "image")
    engine = SearchEngine(bundle, db_url=db_url, rerank=rerank)
    _warn_model_advice(engine.bundle)
    target = target or "images"
    if image is not None:
        assert data is not None
        try:
            picture = decode_image(data)
        except ImageDecodeError as exc:
            raise ImageDecodeError(f"{image}: {exc}") from exc
        label: str = str(image)
        if target == "captions":
            results = engine.image_to_captions(picture, k, min_score, rerank, rerank_k)
        else:
            results = engine.image_to_images(picture, k, min_score, filters=filters)
    else:
        label = query
        if target == "captions":
            results = engine.text_to_captions(query, k, min_score)
        else:
            results = engine.text_to_images(query, k, min_score, rerank, rerank_k, filters=filters)
    if as_json:
        click.echo(json.dumps({"query": label, "results": [r.to_dict() for r in results]}))
        return
    if not results:
        click.echo("no results")
    for r in results:
        # One result, one line: a newline in a file name or caption must not forge another.
        shown = r.path if r.path is not None else r.caption or ""
        how = f"  {r.match_label:<7} {r.match_probability:6.1%}" if r.match_label else ""
        click.echo(f"{r.score:7.4f}{how}  {printable(shown)}")


@click.command()
@_bundle_option
@click.option("--failures", "show_failures", is_flag=True, help="List every failed file.")
@click.option("--json", "as_json", is_flag=True)
def info(bundle: Path, db_url: str | None, show_failures: bool, as_json: bool) -> None:
    """Model, counts, index types and sizes, last run and failures of a bundle."""
    from xmodal.search.status import bundle_status

    status = bundle_status(bundle, db_url, failures_limit=None if show_failures else 20)
    if as_json:
        click.echo(json.dumps(status, default=str))
        return
    m = status["model"]
    click.echo(f"bundle      {status['bundle']} (generation {status['generation']})")
    second = f", visual space dim {m['visual_dim']}" if m.get("visual_dim") else ""
    click.echo(f"model       {m['name']} ({m['pretrained']}), dim {m['embed_dim']}{second}")
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
        click.echo(f"failed      {printable(str(f['path']))}: {printable(str(f['reason']))}")
    if status["warning"]:
        click.echo(f"warning: {status['warning']}", err=True)


@click.command()
@_bundle_option
@model_options
@click.option("--json", "as_json", is_flag=True)
def verify(
    bundle: Path,
    db_url: str | None,
    model_name: str | None,
    pretrained: str | None,
    as_json: bool,
) -> None:
    """Check that a bundle's parts agree; exit 1 and list each problem found.

    \b
    Checks, in order:
    - the manifest is UTF-8 JSON and every field has its type and range (model identity,
      index entries, search parameters, counts)
    - the model given with --model/--pretrained is the one that built the bundle
    - SQLite's integrity check finds no damaged page in the catalog file
    - the catalog opens, its schema version is known, and it belongs to this bundle
      (same bundle id as the manifest)
    - every vector in the catalog has the model's dimension, is finite and of unit
      length, and every indexed image has one
    - each index file named by the manifest exists, loads, has the sha256 recorded at
      publication, holds the stated count and the model's dimension, and takes its
      search parameters (nprobe)
    - every vector in the index files is finite and of unit length
    - FAISS ids and catalog ids (indexed rows with vectors) are the same set, without
      duplicates
    - each vector store the manifest names (Milvus, pgvector) answers, holds the
      catalog's ids (checked as FAISS ids are) and, on a sample, the catalog's own vectors
    - on a sample, exact indexes hold the catalog's own vectors
    - token caches have one width per kind, rows of the right size, and only indexed
      owners
    - the manifest's counts match the catalog's
    - every run's stored report is JSON; unfinished runs and stray index files are noted
    """
    from xmodal.indexer.verify import verify_bundle

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


# Server limits (waitress), chosen on purpose; web/server.py says why.
CONNECTION_LIMIT = 500  # open connections; each is a file descriptor (1024 usual per process)
CHANNEL_TIMEOUT_S = 30  # a connection silent this long (mid-request or idle) is closed
CLEANUP_INTERVAL_S = 5  # how often silent connections are looked for


@click.command()
@_bundle_option
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option(
    "--port", type=click.IntRange(0, 65535), default=5000, show_default=True, help="0: any free."
)
@click.option(
    "--threads",
    "server_threads",
    type=click.IntRange(1, 64),
    default=None,
    help="Request threads (default: one per core; each runs the model on one core).",
)
@click.option(
    "--max-upload-mb",
    type=click.FloatRange(0.1, 1024),
    default=WEB_DEFAULTS["MAX_UPLOAD_BYTES"] / 2**20,
    show_default=True,
    help="Largest image file a search may upload (a file of exactly this size passes); "
    "larger ones get a 413, JSON under /api.",
)
@click.option(
    "--connection-limit",
    type=click.IntRange(10, 10_000),
    default=CONNECTION_LIMIT,
    show_default=True,
    help="Open connections at most; more wait to be accepted. Keep it under the "
    "process's file descriptor limit (ulimit -n).",
)
@click.option(
    "--channel-timeout",
    "channel_timeout_s",
    type=click.IntRange(1, 3600),
    default=CHANNEL_TIMEOUT_S,
    show_default=True,
    help="Seconds a connection may stay silent (a half-sent request, an idle keep-alive) "
    "before it is closed. Slow clients that keep sending a byte now and then are not "
    "caught: on an untrusted network put a reverse proxy in front.",
)
def serve(
    bundle: Path,
    db_url: str | None,
    host: str,
    port: int,
    server_threads: int | None,
    max_upload_mb: float,
    connection_limit: int,
    channel_timeout_s: int,
) -> None:
    """Serve the web pages and JSON API with a production WSGI server (waitress).

    A slow client holds one of --connection-limit connections for at most
    --channel-timeout seconds of silence; uploads are capped by --max-upload-mb and
    decoded small, a few at a time.
    """
    import logging

    from xmodal.crossmodal.threads import configure_threads, default_threads
    from xmodal.web import create_app
    from xmodal.web.server import make_server

    threads = server_threads or default_threads()
    # Each request thread runs torch and FAISS on one core: N requests in parallel
    # instead of N pools fighting over the same cores.
    configure_threads(1)
    app = create_app(
        {"BUNDLE": bundle, "DB_URL": db_url, "MAX_UPLOAD_BYTES": int(max_upload_mb * 2**20)}
    )
    server = make_server(
        app,
        host=host,
        port=port,
        threads=threads,
        connection_limit=connection_limit,
        channel_timeout_s=channel_timeout_s,
        cleanup_interval_s=CLEANUP_INTERVAL_S,
    )
    logging.basicConfig()  # the app's warnings (a manifest it cannot load) reach stderr
    port = getattr(server, "effective_port", port)
    shown = "localhost" if host in ("127.0.0.1", "0.0.0.0", "::") else host
    click.echo(f"serving {bundle} on http://{shown}:{port}/  ({threads} threads; Ctrl+C stops)")
    server.run()


COMMANDS = [index, search, info, verify, serve]
