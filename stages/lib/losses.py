"""The training losses (train.loss) and the class weights the weighted ones use, computed from
the train split's label maps. Pixels labelled IGNORE_INDEX count for nothing anywhere."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from stages.lib.cli import StageError
from stages.lib.labels import IGNORE_INDEX, read_labels

LOSSES = ("ce", "weighted_ce", "ce_dice", "weighted_ce_dice")
WEIGHTINGS = ("median_frequency", "inverse_sqrt")


def pixel_counts(mask_paths: list[Path], num_classes: int) -> np.ndarray:
    """(images x classes) labelled-pixel counts, one row per label map; 255 left out. A value
    past the scheme's classes is the masks stage's error, named here rather than counted."""
    counts = np.zeros((len(mask_paths), num_classes), dtype=np.int64)
    for row, path in enumerate(mask_paths):
        labels = read_labels(path)
        values = np.bincount(labels[labels != IGNORE_INDEX].ravel(), minlength=num_classes)
        if len(values) > num_classes:
            raise StageError(f"{path}: label {len(values) - 1} outside 0..{num_classes - 1}")
        counts[row] = values
    return counts


def class_weights(totals: np.ndarray, method: str) -> np.ndarray:
    """One weight per class from its share f_c of the labelled train pixels:
    median_frequency (Eigen & Fergus): median(f) / f_c, the median over classes present;
    inverse_sqrt: 1 / sqrt(f_c), scaled so that the present classes' weights average 1.
    A class with no pixels gets 0: it never is a target, and its weight would be infinite."""
    totals = np.asarray(totals, dtype=np.float64)
    present = totals > 0
    if not present.any():
        return np.zeros_like(totals)
    freq = totals / totals.sum()
    weights = np.zeros_like(freq)
    if method == "median_frequency":
        weights[present] = np.median(freq[present]) / freq[present]
    elif method == "inverse_sqrt":
        weights[present] = 1 / np.sqrt(freq[present])
        weights[present] /= weights[present].mean()
    else:
        raise ValueError(f"unknown class weighting {method!r} (known: {', '.join(WEIGHTINGS)})")
    return weights


def balanced_image_weights(counts: np.ndarray) -> np.ndarray:
    """train.sampler class_balanced: each image's draw weight, from (images x classes) pixel
    counts. An image showing foreground classes weighs 1 / (images showing its rarest one);
    an image showing none, 1 / (such images). Every group then gets about the same share of
    an epoch's draws: the 10 car images of the sample as many as its 40 person images."""
    shows = counts[:, 1:] > 0
    per_class = shows.sum(0)
    none = ~shows.any(1)
    weights = np.where(shows, 1.0 / np.maximum(per_class, 1), 0.0).max(1, initial=0.0)
    weights[none] = 1.0 / none.sum() if none.any() else 0.0
    return weights


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """1 - soft Dice of the softmax against the one-hot target, per foreground class (1..K-1)
    over the whole batch, averaged over those classes; ignored pixels left out. Smoothed by 1
    so that a class absent from the batch and from the prediction costs 0, not 0/0."""
    probs = logits.float().softmax(1)
    keep = (target != IGNORE_INDEX).unsqueeze(1)
    onehot = F.one_hot(torch.where(keep[:, 0], target, 0), logits.shape[1]).permute(0, 3, 1, 2)
    probs, onehot = probs * keep, onehot * keep
    dims = (0, 2, 3)
    overlap = (probs * onehot).sum(dims)[1:]
    total = (probs.sum(dims) + onehot.sum(dims))[1:]
    return (1 - (2 * overlap + 1) / (total + 1)).mean()


class SegmentationLoss(nn.Module):
    """train.loss: cross-entropy, optionally class-weighted (`weights`), plus soft Dice on the
    foreground classes for the *_dice variants (both terms weigh 1)."""

    def __init__(self, name: str, weights: torch.Tensor | None = None):
        super().__init__()
        if name not in LOSSES:
            raise ValueError(f"unknown loss {name!r} (known: {', '.join(LOSSES)})")
        self.dice = name.endswith("_dice")
        self.ce = nn.CrossEntropyLoss(weight=weights if name.startswith("weighted") else None,
                                      ignore_index=IGNORE_INDEX)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        loss = self.ce(logits, target)
        return loss + soft_dice_loss(logits, target) if self.dice else loss
