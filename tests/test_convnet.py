"""The convolutional image tower: a timm model open_clip configs name, with token grids."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from rerank_fixtures import tiny_rerank_config
from xmodal.crossmodal.convnet import ConvNetConfig
from xmodal.crossmodal.encoder import Encoder
from xmodal.training.rerank_train import train_reranker

from xmodal.cli import main


def test_timm_builds_it_with_a_feature_grid_and_a_pooled_head() -> None:
    net = timm.create_model("xmodal_convnet").eval()
    x = torch.randn(2, 3, 64, 64)
    fmap = net.forward_features(x)
    assert fmap.shape == (2, 192, 8, 8)  # 64 px / reduction 8: the ViT's 8 x 8 grid
    assert ConvNetConfig().reduction == 8
    torch.testing.assert_close(net(x), fmap.mean(dim=(2, 3)))
    net.reset_classifier(5)
    assert net(x).shape == (2, 5)
    small = timm.create_model("xmodal_convnet", channels=(8, 16), num_classes=3)
    assert small.forward_features(torch.randn(1, 3, 32, 32)).shape == (1, 16, 16, 16)  # r = 2
    with pytest.raises(ValueError, match="no pretrained weights"):
        timm.create_model("xmodal_convnet", pretrained=True)
    with pytest.raises(TypeError, match="unexpected arguments"):
        timm.create_model("xmodal_convnet", depth=3)


@pytest.fixture(scope="module")
def tiny_cnn_dir(small_corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny ConvNet model trained by the CLI, as a user would."""
    out = tmp_path_factory.mktemp("tiny-cnn") / "model"
    args = ["train", "--pairs", str(small_corpus / "train.jsonl")]
    args += ["--val", str(small_corpus / "val.jsonl"), "--out", str(out)]
    args += ["--model", "xmodal-tiny-cnn", "--epochs", "2", "--batch-size", "32"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    return out


def test_a_trained_cnn_model_loads_back_and_gives_grid_tokens(tiny_cnn_dir: Path) -> None:
    doc = json.loads((tiny_cnn_dir / "open_clip_config.json").read_text())
    assert doc["model_cfg"]["vision_cfg"]["timm_model_name"] == "xmodal_convnet"
    enc = Encoder.load(f"local-dir:{tiny_cnn_dir}")
    assert enc.has_image_tokens and enc.describe()["image_tokens"]
    x = torch.randn(3, 3, 32, 32)
    emb, tokens = enc.image_tokens(x)
    assert tokens.shape == (3, 16, 192)  # 32 px: a 4 x 4 grid of 192 features
    # The pooled embedding is the model's own: split trunk == open_clip's forward.
    with torch.no_grad():
        ref = F.normalize(enc.model.encode_image(x), dim=-1).numpy()
    np.testing.assert_allclose(emb, ref, atol=1e-5)
    np.testing.assert_allclose(enc.encode_image_tensors(x), ref, atol=1e-5)
    # The encoder runs the tower's convolutions channels-last (faster on oneDNN); the
    # vectors above are those of plain open_clip's contiguous layout below.
    convs = [m for m in enc.model.visual.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(c.weight.is_contiguous(memory_format=torch.channels_last) for c in convs)
    # Plain open_clip loads the folder too, once the tower is registered with timm.
    import open_clip
    import xmodal.crossmodal.convnet  # noqa: F401

    plain = open_clip.create_model(f"local-dir:{tiny_cnn_dir}").eval()
    with torch.no_grad():
        again = F.normalize(plain.encode_image(x), dim=-1).numpy()
    np.testing.assert_allclose(again, ref, atol=1e-5)


def test_the_reranker_trains_over_a_cnn_tower(
    tiny_cnn_dir: Path, small_corpus: Path, tmp_path: Path
) -> None:
    metrics = train_reranker(
        tiny_rerank_config(small_corpus, tiny_cnn_dir, tmp_path / "rr", counterfactual=False)
    )
    losses = [h["loss"] for h in metrics["history"]]
    assert losses[-1] < losses[0]
    doc = json.loads((tmp_path / "rr" / "reranker_config.json").read_text())
    assert doc["config"]["image_positions"] == 16 and doc["config"]["image_width"] == 192
