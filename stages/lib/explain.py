"""What the model sees: per-pixel probabilities streamed one image at a time, label
quality from them (cleanlab), activation maps of a layer and Grad-CAM.

Memory: probabilities exist at full image size for one image at a time (a batch of
model-size logits plus one (K, H, W) map), never for the whole split.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from stages.lib.labels import IGNORE_INDEX
from stages.lib.model import LATENT_LAYERS, full_size_probs


def layer_module(model: torch.nn.Module, name: str) -> torch.nn.Module:
    """The module whose output is the named latent layer of stages.lib.model.SegNet (the
    same tensors, channel for channel, that infer pools into latents.npz)."""
    if name == "bottleneck":
        return model.encoder[len(model.encoder) - 1]
    if name in LATENT_LAYERS:
        return model.ups[LATENT_LAYERS.index(name) - 1]
    raise ValueError(f"unknown layer {name!r} (known: {', '.join(LATENT_LAYERS)})")


def forward_capturing(forward: Callable[[torch.Tensor], torch.Tensor], module: torch.nn.Module,
                      x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and the output of `module` during one forward pass."""
    store: dict[str, torch.Tensor] = {}
    handle = module.register_forward_hook(lambda _m, _i, out: store.__setitem__("out", out))
    try:
        logits = forward(x)
    finally:
        handle.remove()
    return logits, store["out"]


# ---------------------------------------------------------------- label quality

def label_quality(probs: np.ndarray, labels: np.ndarray, temperature: float = 0.1) -> float:
    """cleanlab.segmentation's softmin label-quality score of one image (0 worst, 1 best),
    over its labelled pixels only. cleanlab has no ignore index, and its softmin pools the
    per-pixel self-confidences of an image without looking at where they are, so the
    labelled pixels are handed over as an image one pixel high: the score is exactly
    cleanlab's, with ignore pixels left out rather than given a made-up label."""
    from cleanlab.segmentation.rank import get_label_quality_scores

    valid = labels != IGNORE_INDEX
    if not valid.any():
        return float("nan")
    strip_labels = labels[valid].astype(np.int64)[None, None, :]
    strip_probs = np.ascontiguousarray(probs[:, valid], dtype=np.float64)[None, :, None, :]
    scores, _ = get_label_quality_scores(strip_labels, strip_probs, method="softmin",
                                         verbose=False, temperature=temperature)
    return float(scores[0])


class ClassThresholds:
    """Confident learning's per-class thresholds, accumulated image by image: t_k is the
    mean predicted probability of class k over the pixels labelled k."""

    def __init__(self, num_classes: int):
        self.sums = np.zeros(num_classes)
        self.counts = np.zeros(num_classes, np.int64)

    def update(self, probs: np.ndarray, labels: np.ndarray) -> None:
        for k in range(len(self.sums)):
            where = labels == k
            self.counts[k] += int(where.sum())
            self.sums[k] += float(probs[k][where].sum())

    def values(self) -> np.ndarray:
        """NaN for a class no pixel is labelled with (it can then never be 'confident')."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.counts > 0, self.sums / np.maximum(self.counts, 1), np.nan)


def disagreement(probs: np.ndarray, labels: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """Boolean (H, W): labelled pixels where the model predicts another class than the label
    with at least that class's threshold (confident learning's 'confidently class j')."""
    pred = probs.argmax(0)
    confidence = np.take_along_axis(probs, pred[None], 0)[0]
    limit = np.nan_to_num(thresholds[pred], nan=np.inf)
    return (labels != IGNORE_INDEX) & (pred != labels) & (confidence >= limit)


# ---------------------------------------------------------------- streaming the split

@dataclass
class ImageProbs:
    index: int              # into the dataset
    probs: np.ndarray       # (K, H, W) float32 at the image's own size
    labels: np.ndarray      # (H, W) uint8 ground truth


def stream_probs(model: torch.nn.Module, batches, device: torch.device) -> Iterator[ImageProbs]:
    """One ImageProbs at a time from batches of stages.lib.data.collate_inference."""
    with torch.inference_mode():
        for batch in batches:
            logits = model(batch["image"].to(device)).cpu()
            for j, index in enumerate(batch["index"]):
                probs = full_size_probs(logits[j], batch["size"][j]).numpy()
                yield ImageProbs(index, probs, batch["gt"][j].numpy())


# ---------------------------------------------------------------- heat-maps

def normalise(heat: np.ndarray) -> np.ndarray:
    """Scale to [0, 1] by the map's own range (all zeros when it is flat)."""
    low, high = float(np.min(heat)), float(np.max(heat))
    return (heat - low) / (high - low) if high > low else np.zeros_like(heat)


def upsample(heat: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    return F.interpolate(heat[None, None].float().cpu(), size=size, mode="bilinear",
                         align_corners=False)[0, 0].numpy()


def channel_maps(model: torch.nn.Module, layer: str, image: torch.Tensor,
                 channels: list[int]) -> torch.Tensor:
    """(h, w): the mean over `channels` of the layer's activation for one image (1,3,H,W)."""
    with torch.inference_mode():
        _, act = forward_capturing(model, layer_module(model, layer), image)
    return act[0, channels].float().mean(0)


def grad_cam(forward: Callable[[torch.Tensor], torch.Tensor], module: torch.nn.Module,
             image: torch.Tensor, classes: list[int]) -> dict[int, tuple[torch.Tensor, str]]:
    """Grad-CAM (Selvaraju et al. 2017) for segmentation, per class: the target is the sum
    of the class's logits over the pixels predicted as that class (pytorch-grad-cam's
    SemanticSegmentationTarget), or over all pixels when none is; channel weights are the
    spatially averaged gradients of the target with respect to the module's output, and the
    map is ReLU(sum_k w_k A_k) at that module's resolution. Returns {class: (map, target)}."""
    x = image.detach().clone().requires_grad_(True)  # gradients even through a frozen encoder
    with torch.enable_grad():
        logits, act = forward_capturing(forward, module, x)
        pred = logits.argmax(1)
        out = {}
        for c in classes:
            mask = pred == c
            target_kind = "predicted pixels" if mask.any() else "all pixels"
            weight = mask if mask.any() else torch.ones_like(mask)
            target = (logits[:, c] * weight).sum()
            grads, = torch.autograd.grad(target, act, retain_graph=True)
            weights = grads.mean(dim=(2, 3), keepdim=True)
            cam = torch.relu((weights * act).sum(dim=1))[0]
            out[c] = (cam.detach(), target_kind)
    return out
