"""The shared ViT-B-32 checkpoint as the two ONNX files rclip runs (visual.onnx,
textual.onnx: input "input", output "output", batch dimension dynamic) plus the BPE
vocabulary its tokenizer reads; run by bench/peers.py in the onnx-export venv."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import open_clip
import torch


class _Tower(torch.nn.Module):
    """One tower of the model as a module of its own (the exporter traces forward)."""

    def __init__(self, model: torch.nn.Module, image: bool) -> None:
        super().__init__()
        self.model, self.image = model, image

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(x) if self.image else self.model.encode_text(x)


def main(ckpt: str, out: str) -> None:
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    # Gradients stay on: without them torch takes the fused attention op ONNX lacks.
    model = open_clip.create_model("ViT-B-32", pretrained=ckpt).eval()
    towers = {
        "visual.onnx": (True, torch.randn(2, 3, 224, 224)),
        "textual.onnx": (False, torch.zeros(2, 77, dtype=torch.long)),
    }
    for name, (image, example) in towers.items():
        torch.onnx.export(
            _Tower(model, image),
            (example,),
            str(out_dir / f"{name}.tmp"),
            input_names=["input"],
            output_names=["output"],
            dynamic_axes={"input": {0: "n"}, "output": {0: "n"}},
            opset_version=17,
            dynamo=False,
        )
        (out_dir / f"{name}.tmp").rename(out_dir / name)
    vocab = Path(open_clip.__file__).with_name("bpe_simple_vocab_16e6.txt.gz")
    shutil.copy(vocab, out_dir / vocab.name)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
