"""Contrastive (CLIP) training of an open_clip model on an image-caption pairs file.

``xmodal train`` runs this. The whole training set is decoded once into memory at the
model's resolution (uint8); with a locked Hugging Face text tower the frozen pooled
text features of every distinct caption are computed once, so a step costs one image
tower pass plus a projection. Each epoch visits every image once with one of its
captions drawn at random. Captions shared by two images in a batch (the same scene
twice) make both pairs positives, so duplicates are not pushed apart.

Output (open_clip's local-dir format, loadable with ``--pretrained local-dir:OUT``)::

    OUT/open_clip_config.json   model_cfg + preprocess_cfg (+ an "xmodal" section)
    OUT/open_clip_model.safetensors   best epoch by val recall
    OUT/metrics.json            settings, per-epoch loss and val recall, timings
"""

from __future__ import annotations

import json
import math
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm
from xmodal.crossmodal.errors import ModelError
from xmodal.crossmodal.loading import (
    CONFIG_FILE,
    LOCAL_DIR,
    WEIGHTS_FILE,
    ensure_known_model,
    load_model,
    quiet_model_build,
    read_local_dir_config,
)
from xmodal.crossmodal.metrics import retrieval_recall
from xmodal.crossmodal.pair_images import load_pair_images
from xmodal.crossmodal.pairs import PairSet, read_pairs
from xmodal.crossmodal.registry import model_config, register_config

from .config import TrainConfig
from .loop import seed_all, set_lr, warmup_cosine

FROZEN_TEXT_PREFIX = "text.transformer."


@dataclass
class EpochLog:
    """One line of the training history."""

    epoch: int
    loss: float
    seconds: float
    val: dict[str, dict[str, float]] = field(default_factory=dict)


def _read_config_file(path: Path) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """(name, model_cfg, preprocess_cfg) from a plain or local-dir style JSON config."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelError(f"cannot read model config {path}: {exc}") from exc
    model_cfg = data.get("model_cfg", data)
    for key in ("embed_dim", "vision_cfg", "text_cfg"):
        if key not in model_cfg:
            raise ModelError(f"model config {path} lacks {key!r}")
    return path.stem, model_cfg, data.get("preprocess_cfg", {})


def build_model(cfg: TrainConfig) -> tuple[torch.nn.Module, Any, str, dict, dict]:
    """(model in train mode, eval preprocess, name, model_cfg, preprocess_cfg)."""
    import open_clip

    if cfg.pretrained:
        loaded = load_model(cfg.model, cfg.pretrained)
        model = loaded.model
        for p in model.parameters():
            p.requires_grad_(True)
        pre_cfg = {}
        if cfg.pretrained.startswith(LOCAL_DIR):
            folder = Path(cfg.pretrained.removeprefix(LOCAL_DIR))
            pre_cfg = read_local_dir_config(folder).get("preprocess_cfg", {})
        return model.train(), loaded.preprocess, loaded.identity.name, loaded.model_cfg, pre_cfg
    if cfg.config:
        name, model_cfg, pre_cfg = _read_config_file(Path(cfg.config))
        register_config(name, model_cfg)
    elif cfg.model:
        name = cfg.model
        ensure_known_model(name)
        model_cfg, pre_cfg = model_config(name), {}
    else:
        raise ModelError("say what to train: --model NAME or --config FILE")
    with quiet_model_build():
        model, _, preprocess = open_clip.create_model_and_transforms(
            name,
            image_mean=pre_cfg.get("mean"),
            image_std=pre_cfg.get("std"),
            image_interpolation=pre_cfg.get("interpolation"),
            image_resize_mode=pre_cfg.get("resize_mode"),
        )
    return model.train(), preprocess, name, model_cfg, pre_cfg


def _split_preprocess(preprocess: Any) -> tuple[Any, torch.Tensor, torch.Tensor]:
    """open_clip's eval transform without its final Normalize, plus that norm's mean/std."""
    from torchvision import transforms as T

    steps = list(preprocess.transforms)
    norm = steps[-1]
    if not isinstance(norm, T.Normalize):
        raise ModelError("unexpected preprocess pipeline: it does not end with Normalize")
    mean = torch.tensor(norm.mean, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(norm.std, dtype=torch.float32).view(1, 3, 1, 1)
    return T.Compose(steps[:-1]), mean, std


def load_images(
    pairs: PairSet, preprocess: Any, workers: int, desc: str
) -> tuple[torch.Tensor, list[int], list[str]]:
    """Decode every image to uint8 [N, 3, H, W]; returns (tensor, kept indices, failures)."""
    resize, _, _ = _split_preprocess(preprocess)

    def to_uint8(image: Any) -> torch.Tensor:
        img = resize(image)  # float [3, H, W] in [0, 1]
        return (img * 255.0 + 0.5).clamp(0, 255).to(torch.uint8)

    images, kept, failures = load_pair_images(pairs, to_uint8, workers, desc)
    return images, kept, [str(f) for f in failures]


class TextSide:
    """Text embeddings for training: frozen features computed once, or the live tower."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any, captions: list[str], frozen: bool):
        self.model = model
        self.tokenizer = tokenizer
        self.captions = captions
        text = getattr(model, "text", None)
        self.hf = text is not None and hasattr(text, "pooler") and hasattr(text, "proj")
        self.cached: torch.Tensor | None = None
        if frozen:
            self.cached = self._precompute()

    @torch.inference_mode()
    def _precompute(self) -> torch.Tensor:
        # HF tower: cache pooled features before the (trainable) projection.
        # Other towers: cache the final embeddings (the whole text side is frozen).
        order = sorted(range(len(self.captions)), key=lambda i: len(self.captions[i]))
        feats: torch.Tensor | None = None
        bar = tqdm(total=len(order), desc="text features", unit="cap")
        for start in range(0, len(order), 256):
            idx = order[start : start + 256]
            ids = self.tokenizer([self.captions[i] for i in idx])
            if self.hf:
                text = self.model.text
                mask = (ids != text.config.pad_token_id).long()
                keep = int(mask.sum(1).max())
                ids, mask = ids[:, :keep], mask[:, :keep]
                out = text.transformer(input_ids=ids, attention_mask=mask)
                f = text.pooler(out, mask)
            else:
                f = self.model.encode_text(ids)
            if feats is None:
                feats = torch.empty(len(self.captions), f.shape[-1])
            feats[idx] = f.float()
            bar.update(len(idx))
        bar.close()
        assert feats is not None
        return feats

    def embed(self, caption_ids: torch.Tensor) -> torch.Tensor:
        """[B] caption indices -> [B, D] unnormalised text embeddings."""
        if self.cached is not None:
            f = self.cached[caption_ids]
            return self.model.text.proj(f) if self.hf else f
        ids = self.tokenizer([self.captions[i] for i in caption_ids.tolist()])
        return self.model.encode_text(ids)


def contrastive_loss(
    image_emb: torch.Tensor, text_emb: torch.Tensor, positives: torch.Tensor, scale: torch.Tensor
) -> torch.Tensor:
    """Symmetric InfoNCE with several positives per row (soft targets).

    image_emb, text_emb: [B, D] unit vectors; positives: [B, B] bool, [text, image].
    """
    logits = scale * text_emb @ image_emb.T  # [B texts, B images]
    target = positives.float()
    t2i = -(target / target.sum(1, keepdim=True) * logits.log_softmax(1)).sum(1).mean()
    i2t = -(target.T / target.T.sum(1, keepdim=True) * logits.T.log_softmax(1)).sum(1).mean()
    return 0.5 * (t2i + i2t)


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        # Norms, biases, embeddings and the temperature are not decayed (CLIP practice).
        if p.ndim < 2 or "embedding" in name or "logit_scale" in name or "class_emb" in name:
            no_decay.append(p)
        else:
            decay.append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


@torch.inference_mode()
def evaluate_split(
    model: torch.nn.Module,
    images: torch.Tensor,
    mean: torch.Tensor,
    std: torch.Tensor,
    text: TextSide,
    caption_image: np.ndarray,
    device: torch.device,
) -> dict[str, dict[str, float]]:
    """Retrieval recall of the current model on in-memory images and captions."""
    was_training = model.training
    model.eval()
    img_emb = []
    for i in range(0, len(images), 256):
        x = (images[i : i + 256].float().div_(255.0) - mean) / std
        out = model.visual(x.to(device))
        out = out[0] if isinstance(out, tuple) else out
        img_emb.append(F.normalize(out.float(), dim=-1).cpu())
    txt_emb = []
    ids = torch.arange(len(text.captions))
    for i in range(0, len(ids), 1024):
        out = text.embed(ids[i : i + 1024])
        out = out[0] if isinstance(out, tuple) else out
        txt_emb.append(F.normalize(out.float(), dim=-1).cpu())
    model.train(was_training)
    return retrieval_recall(torch.cat(img_emb).numpy(), torch.cat(txt_emb).numpy(), caption_image)


def _score(val: dict[str, dict[str, float]]) -> float:
    return 0.5 * (val["text_to_image"]["R@1"] + val["image_to_text"]["R@1"])


def save_model(
    model: torch.nn.Module,
    out: Path,
    name: str,
    model_cfg: dict,
    preprocess_cfg: dict,
    omit_prefixes: tuple[str, ...],
    state: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write the local-dir folder: weights (minus omitted frozen towers) + config."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    state = state if state is not None else model.state_dict()
    tensors = {
        k: v.detach().cpu().contiguous()
        for k, v in state.items()
        if not k.startswith(omit_prefixes)
    }
    weights = out / WEIGHTS_FILE
    tmp = weights.with_suffix(".tmp")
    save_file(tensors, str(tmp))
    tmp.replace(weights)
    pre = dict(preprocess_cfg)
    visual = model.visual
    size = getattr(visual, "image_size", None)
    if size is not None:
        pre.setdefault("size", list(size) if isinstance(size, tuple) else size)
    pre.setdefault(
        "mean", list(getattr(visual, "image_mean", None) or (0.48145466, 0.4578275, 0.40821073))
    )
    pre.setdefault(
        "std", list(getattr(visual, "image_std", None) or (0.26862954, 0.26130258, 0.27577711))
    )
    doc = {
        "model_cfg": model_cfg,
        "preprocess_cfg": pre,
        "xmodal": {"name": name, "omitted_prefixes": list(omit_prefixes)},
    }
    (out / CONFIG_FILE).write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    return weights


def train_model(cfg: TrainConfig) -> dict[str, Any]:
    """Run training; returns the metrics that are also written to OUT/metrics.json."""
    import open_clip

    started = time.time()
    seed_all(cfg.seed)
    device = torch.device(
        ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
    )
    out = Path(cfg.out)
    model, preprocess, name, model_cfg, pre_cfg = build_model(cfg)
    if cfg.lock_text:
        model.lock_text_tower()
    if cfg.lock_image:
        model.lock_image_tower()
    model.to(device)
    tokenizer = open_clip.get_tokenizer(name)
    is_hf_text = hasattr(getattr(model, "text", None), "pooler")
    omit = (FROZEN_TEXT_PREFIX,) if (cfg.lock_text and is_hf_text and not cfg.pretrained) else ()

    train_pairs = read_pairs(cfg.pairs, limit_images=cfg.limit_images)
    images, kept, failed = load_images(train_pairs, preprocess, cfg.workers, "train images")
    train_pairs = train_pairs.subset_images(kept)
    _, mean, std = _split_preprocess(preprocess)
    mean, std = mean.to(device), std.to(device)
    text = TextSide(model, tokenizer, train_pairs.captions, frozen=cfg.lock_text)
    caps_of = train_pairs.captions_of()
    # Two captions are interchangeable positives when their texts are equal.
    text_id = {t: i for i, t in enumerate(dict.fromkeys(train_pairs.captions))}
    caption_text = np.array([text_id[c] for c in train_pairs.captions])
    image_texts = [frozenset(caption_text[c].tolist()) for c in caps_of]

    val = None
    if cfg.val:
        val_pairs = read_pairs(cfg.val)
        val_images, vkept, vfailed = load_images(val_pairs, preprocess, cfg.workers, "val images")
        val_pairs = val_pairs.subset_images(vkept)
        failed += vfailed
        val = (
            val_images,
            TextSide(model, tokenizer, val_pairs.captions, frozen=cfg.lock_text),
            val_pairs,
        )

    params = _param_groups(model, cfg.weight_decay)
    if not any(g["params"] for g in params):
        raise ModelError("nothing to train: both towers are locked")
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6)
    n = len(images)
    steps_per_epoch = max(1, n // cfg.batch_size)
    total_steps = steps_per_epoch * cfg.epochs
    warmup = min(cfg.warmup_steps, max(1, total_steps // 10))
    rng = np.random.default_rng(cfg.seed)
    history: list[EpochLog] = []
    best: tuple[float, int, dict[str, torch.Tensor]] | None = None
    prep_seconds = time.time() - started
    step = 0
    for epoch in range(1, cfg.epochs + 1):
        t0 = time.time()
        perm = rng.permutation(n)
        losses = []
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch}/{cfg.epochs}", unit="step")
        for b in bar:
            lr = warmup_cosine(step, cfg.lr, total_steps, warmup)
            set_lr(opt, lr)
            idx = perm[b * cfg.batch_size : (b + 1) * cfg.batch_size]
            cap = np.array([caps_of[i][rng.integers(len(caps_of[i]))] for i in idx])
            positives = torch.tensor(
                [[caption_text[c] in image_texts[j] for j in idx] for c in cap], device=device
            )
            x = (images[idx].to(device).float().div_(255.0) - mean) / std
            v_out = model.visual(x)
            img_emb = F.normalize((v_out[0] if isinstance(v_out, tuple) else v_out), dim=-1)
            t_out = text.embed(torch.as_tensor(cap))
            txt_emb = F.normalize((t_out[0] if isinstance(t_out, tuple) else t_out), dim=-1)
            loss = contrastive_loss(img_emb, txt_emb, positives, model.logit_scale.exp())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, math.log(100))  # CLIP's cap on the temperature
            losses.append(loss.item())
            step += 1
            if b % 10 == 0:
                bar.set_postfix(loss=f"{np.mean(losses[-50:]):.3f}", lr=f"{lr:.2e}")
        bar.close()
        log = EpochLog(epoch, float(np.mean(losses)), time.time() - t0)
        if val is not None:
            v_images, v_text, v_pairs = val
            log.val = evaluate_split(
                model, v_images, mean, std, v_text, v_pairs.caption_image, device
            )
            print(
                f"epoch {epoch}: loss {log.loss:.4f}  val text->image R@1 "
                f"{log.val['text_to_image']['R@1']:.3f}  image->text R@1 "
                f"{log.val['image_to_text']['R@1']:.3f}",
                flush=True,
            )
        else:
            print(f"epoch {epoch}: loss {log.loss:.4f}", flush=True)
        history.append(log)
        score = _score(log.val) if log.val else -log.loss
        if best is None or score > best[0]:
            state = {k: v.detach().clone().cpu() for k, v in model.state_dict().items()}
            best = (score, epoch, state)
    assert best is not None
    save_model(model, out, name, model_cfg, pre_cfg, omit, state=best[2])
    metrics = {
        "model": name,
        "settings": asdict(cfg),
        "train_images": n,
        "train_captions": len(train_pairs.captions),
        "failed_images": failed,
        "best_epoch": best[1],
        "best_val": next(h.val for h in history if h.epoch == best[1]) if val else None,
        "history": [asdict(h) for h in history],
        "seconds": {"prepare": round(prep_seconds, 1), "total": round(time.time() - started, 1)},
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "device": str(device),
        },
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    return metrics
