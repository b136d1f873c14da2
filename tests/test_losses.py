"""train.loss and its class statistics against numbers worked out by hand: each loss on a
few pixels whose softmax is exact, the class weights and the sampler's image weights of a
3-mask split counted by hand."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from stages.lib.cli import StageError
from stages.lib.labels import save_labels
from stages.lib.losses import (SegmentationLoss, balanced_image_weights, class_weights,
                               pixel_counts, soft_dice_loss)

LN2, LN3 = math.log(2), math.log(3)


def _logits(*pixels: tuple[float, ...]) -> torch.Tensor:
    """One image, one row of pixels: (1, K, 1, N)."""
    return torch.tensor(pixels, dtype=torch.float32).T.reshape(1, len(pixels[0]), 1, len(pixels))


def test_ce_and_weighted_ce_by_hand_and_ignored_pixels_count_for_nothing():
    # pixel 0: logits (0, 0), target 1: p = 1/2, -log p = ln 2
    # pixel 1: logits (ln 3, 0), target 0: p = 3/4, -log p = ln(4/3)
    # pixel 2: ignored (255), logits that would cost a lot
    logits = _logits((0.0, 0.0), (LN3, 0.0), (-9.0, 9.0))
    target = torch.tensor([[[1, 0, 255]]])
    assert SegmentationLoss("ce")(logits, target).item() == pytest.approx(
        (LN2 + math.log(4 / 3)) / 2, abs=1e-6)
    # weights (1, 3): sum of w * (-log p) over the sum of the targets' weights
    weighted = SegmentationLoss("weighted_ce", torch.tensor([1.0, 3.0]))(logits, target)
    assert weighted.item() == pytest.approx((3 * LN2 + math.log(4 / 3)) / 4, abs=1e-6)
    # ce ignores the weights it is given
    assert SegmentationLoss("ce", torch.tensor([1.0, 3.0]))(logits, target).item() == \
        pytest.approx((LN2 + math.log(4 / 3)) / 2, abs=1e-6)


def test_soft_dice_and_ce_dice_by_hand():
    # three classes, logits all 0: every probability 1/3. Targets 1, 0 and one ignored pixel.
    logits = _logits((0.0, 0.0, 0.0), (0.0, 0.0, 0.0), (5.0, -5.0, 7.0))
    target = torch.tensor([[[1, 0, 255]]])
    # class 1: overlap 1/3, sum p 2/3, sum g 1: 1 - (2/3 + 1) / (2/3 + 1 + 1) = 3/8
    # class 2: overlap 0, sum p 2/3, sum g 0:   1 - 1 / (2/3 + 1)           = 2/5
    dice = (3 / 8 + 2 / 5) / 2
    assert soft_dice_loss(logits, target).item() == pytest.approx(dice, abs=1e-6)
    assert SegmentationLoss("ce_dice")(logits, target).item() == pytest.approx(LN3 + dice,
                                                                               abs=1e-6)
    weights = torch.tensor([1.0, 2.0, 5.0])  # CE of ln 3 at every pixel: any weights keep it
    assert SegmentationLoss("weighted_ce_dice", weights)(logits, target).item() == \
        pytest.approx(LN3 + dice, abs=1e-6)


def test_soft_dice_is_zero_for_a_confident_right_answer_and_has_a_gradient():
    target = torch.tensor([[[1, 0]]])
    right = _logits((-20.0, 20.0, -20.0), (20.0, -20.0, -20.0))
    assert soft_dice_loss(right, target).item() == pytest.approx(0.0, abs=1e-6)
    leaf = _logits((0.0, 0.0, 0.0), (0.0, 0.0, 0.0)).requires_grad_()
    soft_dice_loss(leaf, target).backward()
    assert leaf.grad[0, 1, 0, 0] < 0  # raising class 1 where it is the target lowers the loss


def test_unknown_loss_is_refused():
    with pytest.raises(ValueError, match="unknown loss 'focal' "
                                         r"\(known: ce, weighted_ce, ce_dice, weighted_ce_dice\)"):
        SegmentationLoss("focal")


@pytest.fixture
def tiny_split(tmp_path):
    """Three 2 x 2 label maps: 8 background, 2 class-1 and 1 class-2 pixels, one ignored."""
    maps = [np.array([[0, 0], [1, 255]]), np.array([[0, 0], [0, 0]]), np.array([[2, 1], [0, 0]])]
    paths = []
    for index, labels in enumerate(maps):
        paths.append(tmp_path / f"{index}.png")
        save_labels(paths[-1], labels.astype(np.uint8))
    return paths


def test_pixel_counts_and_class_weights_equal_a_hand_count(tiny_split):
    counts = pixel_counts(tiny_split, 3)
    assert counts.tolist() == [[2, 1, 0], [4, 0, 0], [2, 1, 1]]
    totals = counts.sum(0)
    assert totals.tolist() == [8, 2, 1]
    # shares 8/11, 2/11, 1/11; the median share is 2/11
    assert class_weights(totals, "median_frequency") == pytest.approx([2 / 8, 1.0, 2.0])
    inverse_sqrt = np.array([math.sqrt(11 / 8), math.sqrt(11 / 2), math.sqrt(11)])
    assert class_weights(totals, "inverse_sqrt") == pytest.approx(
        inverse_sqrt / inverse_sqrt.mean())
    # a class with no pixel: weight 0, the others from the present ones only
    assert class_weights(np.array([8, 0, 2]), "median_frequency") == pytest.approx(
        [(0.5 * (8 + 2) / 10) / (8 / 10), 0.0, (0.5 * (8 + 2) / 10) / (2 / 10)])
    with pytest.raises(ValueError, match="unknown class weighting 'log'"):
        class_weights(totals, "log")


def test_class_balanced_image_weights_equal_a_hand_count(tiny_split):
    # class 1 is shown by maps 0 and 2, class 2 by map 2 alone; map 1 shows no class:
    # map 0 weighs 1/2, map 2 weighs max(1/2, 1/1), map 1 (the only class-less map) 1
    weights = balanced_image_weights(pixel_counts(tiny_split, 3))
    assert weights.tolist() == [0.5, 1.0, 1.0]


def test_a_label_past_the_scheme_is_named(tmp_path):
    path = tmp_path / "bad.png"
    save_labels(path, np.array([[0, 3]], dtype=np.uint8))
    with pytest.raises(StageError) as err:
        pixel_counts([path], 3)
    assert str(err.value) == f"{path}: label 3 outside 0..2"
