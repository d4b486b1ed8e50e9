"""Model commands: the demo corpus, the real-photo set, training the encoder and the
reranker, evaluation.

The options' defaults are the fields of the settings dataclasses (``CorpusSpec``,
``TrainConfig``, ``RerankTrainConfig``) and the search limits, defined once there.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

# Cheap to import (no torch): what the options' defaults and ranges come from.
from xmodal.crossmodal.registry import LOCAL_DIR
from xmodal.search.limits import DEFAULT_RERANK_K, MAX_RERANK_K
from xmodal.training.config import RerankTrainConfig, TrainConfig
from xmodal.training.corpus import CorpusSpec

from .options import FiniteFloat, load_encoder, model_options


def _count_option(name: str, field: str, low: int = 1, help: str | None = None) -> Any:
    """A whole-number option for ``CorpusSpec.field`` from ``low`` up, its default shown."""
    return click.option(
        name,
        field,
        type=click.IntRange(low),
        default=getattr(CorpusSpec, field),
        show_default=True,
        help=help,
    )


@click.command("demo-corpus")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Output folder.")
@click.option("--seed", type=int, default=CorpusSpec.seed, show_default=True)
@_count_option("--size", "train_size", help="Training images.")
@_count_option("--val-size", "val_size")
@_count_option("--test-size", "test_size")
@_count_option(
    "--test-shifted-size",
    "test_shifted_size",
    low=0,
    help="Images rendered in the held-out style with held-out synonyms (0: none).",
)
@click.option(
    "--style",
    type=click.Choice(CorpusSpec.STYLES),
    default=CorpusSpec.style,
    show_default=True,
    help="flat: the shipped shapes model's rendering; varied: randomised styles, "
    "synonyms, paraphrases and partial captions.",
)
@click.option("--workers", type=click.IntRange(1), default=None, help="Rendering processes.")
def demo_corpus(out: Path, workers: int | None, **fields: Any) -> None:
    """Write the synthetic demo corpus (images + train/val/test/test-shifted JSONL pairs)."""
    from xmodal.crossmodal.threads import default_threads
    from xmodal.training.corpus import write_corpus

    spec = CorpusSpec(**fields)  # the options are named after its fields
    counts = write_corpus(out, spec, workers=workers or default_threads())
    click.echo(
        f"wrote {out}: "
        + ", ".join(f"{k} {v} images ({out / (k + '.jsonl')})" for k, v in counts.items())
    )


@click.command()
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
@click.option(
    "--pretrained", default=None, help=f"Start from these weights (tag/file/{LOCAL_DIR})."
)
@click.option("--lock-text", is_flag=True, help="Freeze the text tower (LiT).")
@click.option("--lock-image", is_flag=True, help="Freeze the image tower.")
@click.option("--epochs", type=click.IntRange(1), default=TrainConfig.epochs, show_default=True)
@click.option(
    "--batch-size", type=click.IntRange(2), default=TrainConfig.batch_size, show_default=True
)
@click.option("--lr", type=FiniteFloat(0, min_open=True), default=TrainConfig.lr, show_default=True)
@click.option(
    "--weight-decay", type=FiniteFloat(0), default=TrainConfig.weight_decay, show_default=True
)
@click.option("--seed", type=int, default=TrainConfig.seed, show_default=True)
@click.option("--device", default=TrainConfig.device, show_default=True, help="auto, cpu or cuda.")
@click.option(
    "--limit-images", type=click.IntRange(1), default=TrainConfig.limit_images, help="Quick runs."
)
def train(**kwargs: Any) -> None:
    """Contrastive (CLIP) training on an image-caption pairs file."""
    from xmodal.training import train_model as run

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


@click.command("train-reranker")
@click.option("--pairs", type=click.Path(exists=True, dir_okay=False), required=True)
@click.option("--val", type=click.Path(exists=True, dir_okay=False), default=None)
@click.option("--out", type=click.Path(file_okay=False), required=True)
@model_options
@click.option(
    "--images",
    type=click.IntRange(1),
    default=RerankTrainConfig.images,
    show_default=True,
    help="Training images used (their token features are held in memory).",
)
@click.option(
    "--captions-per-image",
    type=click.IntRange(1),
    default=RerankTrainConfig.captions_per_image,
    show_default=True,
)
@click.option(
    "--epochs", type=click.IntRange(1), default=RerankTrainConfig.epochs, show_default=True
)
@click.option(
    "--batch-size", type=click.IntRange(2), default=RerankTrainConfig.batch_size, show_default=True
)
@click.option(
    "--lr", type=FiniteFloat(0, min_open=True), default=RerankTrainConfig.lr, show_default=True
)
@click.option(
    "--layers", type=click.IntRange(1), default=RerankTrainConfig.layers, show_default=True
)
@click.option(
    "--width", type=click.IntRange(16), default=RerankTrainConfig.width, show_default=True
)
@click.option(
    "--rerank-k",
    type=click.IntRange(1, MAX_RERANK_K),
    default=RerankTrainConfig.rerank_k,
    show_default=True,
)
@click.option(
    "--counterfactual/--no-counterfactual",
    default=RerankTrainConfig.counterfactual,
    show_default=True,
    help="Also train on rendered twins of demo-corpus images with their binding changed.",
)
@click.option(
    "--listwise",
    type=FiniteFloat(0),
    default=RerankTrainConfig.listwise,
    show_default=True,
    help="Weight of a listwise loss beside ITM (each caption's image ranked against "
    "the images it was shown with, and each image's caption likewise).",
)
@click.option(
    "--partial-truth/--no-partial-truth",
    default=RerankTrainConfig.partial_truth,
    show_default=True,
    help="On a demo corpus: true partial texts (queries of what each scene holds) are "
    "positives, and negatives are only images and texts a text is false of.",
)
@click.option(
    "--val-queries",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    help="Queries file (over --val's images) whose mAP@100 chooses the fusion weight "
    "[default: queries-val.jsonl beside --val, where there is one].",
)
@click.option(
    "--fusion-by",
    type=click.Choice(["queries", "recall"]),
    default=RerankTrainConfig.fusion_by,
    show_default=True,
    help="What chooses the fusion weight: the val queries' mAP@100 (among weights near "
    "the best val R@1), or val R@1 alone.",
)
@click.option("--seed", type=int, default=RerankTrainConfig.seed, show_default=True)
def train_reranker_cmd(model_name: str | None, **kwargs: Any) -> None:
    """Train the cross-attention reranker over a frozen dual encoder (ITM loss)."""
    from xmodal.training.rerank_train import train_reranker

    metrics = train_reranker(RerankTrainConfig(model=model_name, **kwargs))
    click.echo(f"saved {kwargs['out']}")
    if metrics["val"]:
        v = metrics["val"]
        click.echo(
            f"val R@1 text->image {v['dual']['text_to_image']['R@1']:.3f} -> "
            f"{v['reranked']['text_to_image']['R@1']:.3f}, image->text "
            f"{v['dual']['image_to_text']['R@1']:.3f} -> "
            f"{v['reranked']['image_to_text']['R@1']:.3f} (w = {v['fusion_weight']})"
        )


@click.command("photo-set")
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help="Output folder (e.g. data/photos).",
)
@click.option(
    "--wallpapers/--no-wallpapers",
    default=False,
    help="Add the photographs Debian's wallpaper packages ship (apt-get install "
    "lomiri-wallpapers-16.04 lomiri-wallpapers-20.04 plasma-workspace-wallpapers), "
    "captioned after the photo model was fixed, and queries over all.",
)
def photo_set_cmd(out: Path, wallpapers: bool) -> None:
    """Write the real-photo benchmark: photos that installed packages ship (scikit-image,
    scikit-learn, matplotlib, mahotas, PyWavelets; with --wallpapers, Debian's wallpaper
    packages too), val/test captions and a query set."""
    from xmodal.training import build_photo_set

    counts = build_photo_set(out, wallpapers=wallpapers)
    files = counts["files"]
    click.echo(
        f"wrote {out}: {counts['images']} images ({files['images']}), "
        f"{counts['val']} val captions ({files['val']}), "
        f"{counts['test']} test captions ({files['test']}), "
        f"{counts['queries']} queries ({files['queries']})"
    )


@click.command("build-photo-model")
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("data/models/xmodal-photo"),
    show_default=True,
    help="Model folder to write (config, class file, class embeddings).",
)
@click.option(
    "--classes",
    "classes_file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="Class file (TSV: index, wnid, name, definition). Default: the built-in model's.",
)
def build_photo_model_cmd(out: Path, classes_file: Path | None) -> None:
    """Rebuild the built-in photo model's folder: embeds each ImageNet class's prompts with
    the frozen MiniLM text tower (nothing is trained; same packages, same result)."""
    from xmodal.training import build_photo_model

    folder = build_photo_model(out, classes_file)
    click.echo(f"wrote {folder}")


@click.command("eval")
@click.option("--pairs", type=click.Path(exists=True, dir_okay=False), required=True)
@click.option(
    "--queries",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    help='Also a query set: JSONL lines {"query": text, "relevant": [image paths as in the '
    'pairs file], "kind": optional label}; each query ranks all the pairs file\'s images: '
    "mAP@100, P@10, nDCG@10, R-precision, overall and by kind. With --rerank also as "
    "search reranks them (the dual top --rerank-k re-scored), beside the dual ranking.",
)
@model_options
@click.option("--batch-size", type=click.IntRange(1), default=64, show_default=True)
@click.option(
    "--rerank", is_flag=True, help="Also rerank the top k with cross-attention (pairs and queries)."
)
@click.option(
    "--rerank-k", type=click.IntRange(1, MAX_RERANK_K), default=DEFAULT_RERANK_K, show_default=True
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def eval_cmd(
    pairs: str,
    queries: str | None,
    model_name: str | None,
    pretrained: str | None,
    batch_size: int,
    rerank: bool,
    rerank_k: int,
    as_json: bool,
) -> None:
    """Image-text retrieval recall (R@1/5/10, both directions) on a pairs file, and with
    --queries the ranking metrics of a query set over its images."""
    from xmodal.search.evaluate import evaluate_pairs, format_table
    from xmodal.training.evaluate import evaluate_reranked

    encoder = load_encoder(model_name, pretrained)
    if rerank:
        # The query set first: a bad queries file fails before the long reranking.
        query_result = None
        if queries:
            from xmodal.training import query_eval

            query_result = query_eval.evaluate_queries_reranked(
                encoder, pairs, queries, rerank_k, progress=not as_json
            )
        result = evaluate_reranked(encoder, pairs, rerank_k)
        if query_result is not None:
            result["queries"] = query_result
    else:
        result = evaluate_pairs(
            encoder, pairs, batch_size=batch_size, progress=not as_json, queries_path=queries
        )
    if as_json:
        click.echo(json.dumps(result))
    else:
        click.echo(format_table(result))


COMMANDS = [demo_corpus, train, train_reranker_cmd, eval_cmd, photo_set_cmd, build_photo_model_cmd]
