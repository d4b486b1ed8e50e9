"""The ``xmodal`` command: the one entry point that reads flags and environment variables.

It decides thread counts (``--threads`` or ``XMODAL_THREADS``) before any work and turns
the library's specific errors into one-line messages with a non-zero exit status.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from crossmodal.errors import DataError, ModelError
from crossmodal.images import ImageDecodeError


def _friendly(fn: Callable) -> Callable:
    """Report our errors as 'error: ...' instead of a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (ModelError, DataError, ImageDecodeError) as exc:
            raise click.ClickException(str(exc)) from exc

    return wrapper


def _model_options(fn: Callable) -> Callable:
    fn = click.option(
        "--pretrained",
        default=None,
        help="Pretrained tag (e.g. laion2b_s34b_b79k), checkpoint file, or local-dir:FOLDER.",
    )(fn)
    fn = click.option(
        "--model",
        "model_name",
        default=None,
        help="open_clip model name (e.g. ViT-B-32). Default: the built-in xmodal model.",
    )(fn)
    return fn


def load_encoder(model_name: str | None, pretrained: str | None) -> Any:
    """The encoder the user asked for; a bare name without weights is refused."""
    from crossmodal.encoder import Encoder

    if model_name and not pretrained and not model_name.startswith("local-dir:"):
        raise click.UsageError(
            f"--model {model_name} needs --pretrained (a tag such as laion2b_s34b_b79k, "
            "a checkpoint file, or local-dir:FOLDER)"
        )
    return Encoder.load(model_name, pretrained)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--threads",
    type=click.IntRange(1, 256),
    default=lambda: int(os.environ["XMODAL_THREADS"]) if os.environ.get("XMODAL_THREADS") else None,
    help="Threads for torch and FAISS (default: all cores; env XMODAL_THREADS).",
)
@click.version_option(package_name="xmodal")
def main(threads: int | None) -> None:
    """xmodal: cross-modal search over images and captions."""
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    from crossmodal.threads import configure_threads

    configure_threads(threads)


@main.command("demo-corpus")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Output folder.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option(
    "--size", type=click.IntRange(1), default=20_000, show_default=True, help="Training images."
)
@click.option("--val-size", type=click.IntRange(1), default=1_000, show_default=True)
@click.option("--test-size", type=click.IntRange(1), default=1_000, show_default=True)
@click.option("--workers", type=click.IntRange(1), default=None, help="Rendering processes.")
@_friendly
def demo_corpus(
    out: Path, seed: int, size: int, val_size: int, test_size: int, workers: int | None
) -> None:
    """Write the synthetic demo corpus (images + train/val/test JSONL pairs)."""
    from crossmodal.corpus import CorpusSpec, write_corpus
    from crossmodal.threads import default_threads

    spec = CorpusSpec(seed=seed, train_size=size, val_size=val_size, test_size=test_size)
    counts = write_corpus(out, spec, workers=workers or default_threads())
    click.echo(
        f"wrote {out}: "
        + ", ".join(f"{k} {v} images ({out / (k + '.jsonl')})" for k, v in counts.items())
    )


@main.command()
@click.option("--pairs", type=click.Path(exists=True, dir_okay=False), required=True)
@click.option("--val", type=click.Path(exists=True, dir_okay=False), default=None)
@click.option("--out", type=click.Path(file_okay=False), required=True)
@click.option("--model", "model_name", default=None, help="open_clip or xmodal config name.")
@click.option(
    "--config",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    help="JSON model config.",
)
@click.option("--pretrained", default=None, help="Start from these weights (tag/file/local-dir:).")
@click.option("--lock-text", is_flag=True, help="Freeze the text tower (LiT).")
@click.option("--lock-image", is_flag=True, help="Freeze the image tower.")
@click.option("--epochs", type=click.IntRange(1), default=10, show_default=True)
@click.option("--batch-size", type=click.IntRange(2), default=256, show_default=True)
@click.option("--lr", type=click.FloatRange(0, min_open=True), default=1e-3, show_default=True)
@click.option("--weight-decay", type=click.FloatRange(0), default=0.05, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda.")
@click.option("--limit-images", type=click.IntRange(1), default=None, help="Quick runs.")
@_friendly
def train(**kwargs: Any) -> None:
    """Contrastive (CLIP) training on an image-caption pairs file."""
    from crossmodal.train import TrainConfig
    from crossmodal.train import train as run

    if not kwargs["model_name"] and not kwargs["config"] and not kwargs["pretrained"]:
        raise click.UsageError("say what to train: --model NAME or --config FILE")
    kwargs["model"] = kwargs.pop("model_name")
    metrics = run(TrainConfig(**kwargs))
    best = metrics["best_val"]
    click.echo(f"saved {kwargs['out']} (best epoch {metrics['best_epoch']})")
    if best:
        click.echo(
            f"val text->image R@1 {best['text_to_image']['R@1']:.3f}  "
            f"image->text R@1 {best['image_to_text']['R@1']:.3f}"
        )


@main.command("eval")
@click.option("--pairs", type=click.Path(exists=True, dir_okay=False), required=True)
@_model_options
@click.option("--batch-size", type=click.IntRange(1), default=64, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@_friendly
def eval_cmd(
    pairs: str, model_name: str | None, pretrained: str | None, batch_size: int, as_json: bool
) -> None:
    """Image-text retrieval recall (R@1/5/10, both directions) on a pairs file."""
    from search.evaluate import evaluate_pairs, format_table

    encoder = load_encoder(model_name, pretrained)
    result = evaluate_pairs(encoder, pairs, batch_size=batch_size, progress=not as_json)
    if as_json:
        click.echo(json.dumps(result))
    else:
        click.echo(format_table(result))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
