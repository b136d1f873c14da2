"""The training transform of train.augment: joint image/mask steps from torchvision v2 (the
mask is a tv_tensors.Mask, so every geometric step moves it with the image, nearest-
neighbour). With no crop, no jitter and squash, it is data.joint_transform's training
transform exactly (the study's recipe: resize to a square, optional flip)."""
from __future__ import annotations

import math

import torch
from torchvision import transforms, tv_tensors
from torchvision.transforms import v2

from stages.lib.data import joint_transform
from stages.lib.labels import IGNORE_INDEX

JITTER_KEYS = ("brightness", "contrast", "saturation", "hue")


def is_plain(augment: dict) -> bool:
    return (augment["resize"] == "squash" and list(augment["crop_scale"]) == [1, 1]
            and not any(augment["colour_jitter"][k] for k in JITTER_KEYS))


class RareClassCrop:
    """A random resized crop (area and aspect drawn as RandomResizedCrop draws them) that,
    with probability `p`, is placed so that a random pixel of the image's least-present
    foreground class lies at its centre (the box shifted back inside the image where it
    would stick out); otherwise, or when the image shows no foreground class, placed at
    random as RandomResizedCrop places it. torchvision has no class-aware crop: a rare class
    (a car filling 1% of a photograph) is otherwise mostly cropped away or shrunk."""

    RATIO = (3 / 4, 4 / 3)

    def __init__(self, size: int, scale: tuple[float, float], p: float):
        self.size, self.scale, self.p = size, tuple(scale), p

    def __call__(self, image: tv_tensors.Image, mask: tv_tensors.Mask):
        top, left, height, width = transforms.RandomResizedCrop.get_params(
            mask, self.scale, self.RATIO)
        if self.p and torch.rand(()) < self.p:
            centre = rare_pixel(mask)
            if centre is not None:
                top = min(max(centre[0] - height // 2, 0), mask.shape[-2] - height)
                left = min(max(centre[1] - width // 2, 0), mask.shape[-1] - width)
        size = [self.size, self.size]
        return (v2.functional.resized_crop(image, top, left, height, width, size, antialias=True),
                v2.functional.resized_crop(mask, top, left, height, width, size))


def rare_pixel(mask: torch.Tensor) -> tuple[int, int] | None:
    """(row, column) of a random pixel of the foreground class with the fewest pixels in
    `mask` (ties: the lower class index), or None when it shows none."""
    labels = mask[(mask > 0) & (mask != IGNORE_INDEX)]
    if not labels.numel():
        return None
    classes, counts = labels.unique(return_counts=True)
    rows, columns = torch.nonzero(mask == classes[counts.argmin()], as_tuple=True)
    pick = int(torch.randint(len(rows), ()))
    return int(rows[pick]), int(columns[pick])


def work_size(size: int, augment: dict) -> int:
    """The side (squash) or short side (aspect) images are resized to before the crop: big
    enough that a crop of the smallest area still has about `size` pixels across."""
    return max(size, math.ceil(size / math.sqrt(min(augment["crop_scale"]))))


class FitTogether:
    """Resize image and mask to one size computed from the mask's (the stored grid's): the
    image may have been decoded at a reduced JPEG scale, and a crop needs both equal.
    squash: side x side; aspect: the short side to `side`, the aspect ratio kept."""

    def __init__(self, side: int, aspect: bool):
        self.side, self.aspect = side, aspect

    def __call__(self, image: tv_tensors.Image, mask: tv_tensors.Mask):
        height, width = mask.shape[-2:]
        if self.aspect:
            scale = self.side / min(height, width)
            target = [max(self.side, round(height * scale)), max(self.side, round(width * scale))]
        else:
            target = [self.side, self.side]
        return (v2.functional.resize(image, target, antialias=True),
                v2.functional.resize(mask, target))


def train_transform(size: int, mean, std, augment: dict, hflip: bool) -> v2.Compose:
    """size x size training inputs: fit (squash or aspect), random resized crop of
    crop_scale of the area (aspect ratios 3/4..4/3; a share rare_crop of them centred on the
    image's rarest foreground class), flip, colour jitter, then to float and normalised."""
    if is_plain(augment):
        return joint_transform(size, mean, std, train=True, hflip=hflip)
    low, high = augment["crop_scale"]
    steps = [FitTogether(work_size(size, augment), augment["resize"] == "aspect")]
    if [low, high] != [1, 1] and augment["rare_crop"]:
        steps.append(RareClassCrop(size, (low, high), augment["rare_crop"]))
    elif [low, high] != [1, 1]:
        steps.append(v2.RandomResizedCrop((size, size), scale=(low, high), antialias=True))
    else:  # aspect without crop: a random square of the short side
        steps.append(v2.RandomCrop((size, size)))
    if hflip:
        steps.append(v2.RandomHorizontalFlip())
    jitter = {k: augment["colour_jitter"][k] for k in JITTER_KEYS}
    if any(jitter.values()):
        steps.append(v2.ColorJitter(**jitter))  # photometric: the mask passes through
    steps += [v2.ToDtype({tv_tensors.Image: torch.float32, "others": None}, scale=True),
              v2.Normalize(mean, std)]
    return v2.Compose(steps)
