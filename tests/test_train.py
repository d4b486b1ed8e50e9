"""Short real training runs: the loss goes down and the output loads back."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from click.testing import CliRunner
from xmodal.crossmodal.encoder import Encoder
from xmodal.crossmodal.loading import load_model
from xmodal.crossmodal.registry import BUILTIN_MODELS
from xmodal.training import TrainConfig, train_model

from xmodal.cli import main


def test_training_lowers_the_loss_and_writes_a_loadable_model(
    small_corpus: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    metrics = train_model(
        TrainConfig(
            pairs=str(small_corpus / "train.jsonl"),
            val=str(small_corpus / "val.jsonl"),
            out=str(out),
            model="xmodal-tiny",
            epochs=4,
            batch_size=32,
            lr=3e-3,
            warmup_steps=1,
            seed=0,
        )
    )
    losses = [h["loss"] for h in metrics["history"]]
    assert losses[-1] < losses[0]
    assert metrics["train_images"] == 96 and metrics["train_captions"] == 96 * 4
    assert set(metrics["best_val"]) == {"text_to_image", "image_to_text"}
    assert {p.name for p in out.iterdir()} >= {
        "open_clip_config.json",
        "open_clip_model.safetensors",
        "metrics.json",
    }
    assert json.loads((out / "metrics.json").read_text())["best_epoch"] == metrics["best_epoch"]
    # The folder is an open_clip local-dir: plain open_clip loads it too.
    import open_clip

    model = open_clip.create_model(f"local-dir:{out}")
    enc = Encoder.load(f"local-dir:{out}")
    assert enc.identity.name == "xmodal-tiny"
    state = load_model(f"local-dir:{out}").model.state_dict()
    for key, value in model.state_dict().items():
        np.testing.assert_array_equal(value.numpy(), state[key].numpy())


def test_same_seed_same_weights(small_corpus: Path, tmp_path: Path) -> None:
    def run(name: str) -> bytes:
        cfg = TrainConfig(
            pairs=str(small_corpus / "train.jsonl"),
            out=str(tmp_path / name),
            model="xmodal-tiny",
            epochs=1,
            batch_size=32,
            seed=5,
        )
        train_model(cfg)
        return (tmp_path / name / "open_clip_model.safetensors").read_bytes()

    assert run("a") == run("b")


def test_locked_minilm_text_tower_is_left_out_of_the_weights(
    small_corpus: Path, tmp_path: Path
) -> None:
    """The default model's recipe in miniature: a frozen MiniLM tower, features cached."""
    config = tmp_path / "mini-minilm.json"
    config.write_text(
        json.dumps(
            {
                "embed_dim": 32,
                "vision_cfg": {
                    "image_size": 32,
                    "patch_size": 8,
                    "width": 32,
                    "layers": 1,
                    "head_width": 16,
                },
                "text_cfg": {
                    "hf_model_name": "sentence-transformers/all-MiniLM-L6-v2",
                    "hf_tokenizer_name": "sentence-transformers/all-MiniLM-L6-v2",
                    "hf_pooler_type": "mean_pooler",
                    "hf_proj_type": "linear",
                    "context_length": 32,
                },
            }
        )
    )
    out = tmp_path / "run"
    result = CliRunner().invoke(
        main,
        [
            "train",
            "--pairs",
            str(small_corpus / "train.jsonl"),
            "--out",
            str(out),
            "--config",
            str(config),
            "--lock-text",
            "--epochs",
            "2",
            "--batch-size",
            "32",
            "--limit-images",
            "48",
        ],
    )
    assert result.exit_code == 0, result.output
    doc = json.loads((out / "open_clip_config.json").read_text())
    assert doc["xmodal"]["omitted_prefixes"] == ["text.transformer."]
    # The 90 MB MiniLM weights come from their package, not from this file.
    assert (out / "open_clip_model.safetensors").stat().st_size < 1_000_000
    enc = Encoder.load(f"local-dir:{out}")
    emb = enc.encode_texts(["a small red circle on a white background"])
    assert emb.shape == (1, 32)
    assert abs(float(np.linalg.norm(emb)) - 1.0) < 1e-5


def test_train_cli_needs_a_model(small_corpus: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(
        main, ["train", "--pairs", str(small_corpus / "train.jsonl"), "--out", str(tmp_path)]
    )
    assert result.exit_code != 0
    assert "--model NAME or --config FILE" in result.output


def test_model_folders_name_packaged_text_towers_by_hub_id() -> None:
    """A model folder must load on any machine: no path of this one in its config.

    open_clip's registered copy of a shipped config points the MiniLM tower at this
    machine's package folder; what `xmodal train --model NAME` writes must not.
    """
    hub_id = "sentence-transformers/all-MiniLM-L6-v2"
    loaded = load_model("xmodal-minilm-cnn")
    assert loaded.model_cfg["text_cfg"]["hf_model_name"] == hub_id
    for folder in BUILTIN_MODELS.values():
        shipped = json.loads((folder / "open_clip_config.json").read_text())
        assert shipped["model_cfg"]["text_cfg"]["hf_model_name"] == hub_id
        assert shipped["model_cfg"]["text_cfg"]["hf_tokenizer_name"] == hub_id
