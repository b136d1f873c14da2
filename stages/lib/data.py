"""Images + label masks as torch datasets, with joint transforms from torchvision v2
(masks are tv_tensors.Mask, so every resize of a label map is nearest-neighbour)."""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler
from torchvision import tv_tensors
from torchvision.transforms import v2

from stages.lib.cli import StageError
from stages.lib.images import decode
from stages.lib.labels import read_labels
from stages.lib.names import check_plain_name


@dataclass(frozen=True)
class Sample:
    image_id: int
    stem: str
    image_path: Path
    mask_path: Path


def list_samples(raw: Path, masks: Path, split: str) -> list[Sample]:
    """Pair each downloaded image of a split with its mask; a missing mask is an error."""
    ann_file = raw / "annotations" / f"instances_{split}.json"
    if not ann_file.is_file():
        raise StageError(f"{ann_file}: missing (is {raw} a folder written by download?)")
    images = json.loads(ann_file.read_text())["images"]
    samples = []
    for image in sorted(images, key=lambda im: im["id"]):
        check_plain_name(image["file_name"], f"{ann_file}: image {image['id']}")
        stem = Path(image["file_name"]).stem
        mask_path = masks / split / f"{stem}.png"
        if not mask_path.is_file():
            raise StageError(f"{mask_path}: mask missing for image {image['file_name']} "
                             f"(listed in {ann_file})")
        samples.append(Sample(image["id"], stem, raw / "images" / split / image["file_name"],
                              mask_path))
    if not samples:
        raise StageError(f"{ann_file}: no images in split {split}")
    return samples


def read_image(path: Path) -> torch.Tensor:
    """uint8 CHW RGB on the stored pixel grid (stages.lib.images.decode, as in the masks
    stage, so both see the same pixels)."""
    return torch.from_numpy(decode(path)[0]).permute(2, 0, 1)


def read_image_reduced(path: Path, size: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """uint8 CHW RGB for a model input of size x size, and the stored (height, width). A
    JPEG is decoded at the smallest DCT scale that still covers size x size: the resize to
    the model's input follows anyway, and a 640 x 480 COCO image decodes about twice as
    fast at 1/2 scale."""
    pixels, stored = decode(path, at_least=size)
    return torch.from_numpy(pixels).permute(2, 0, 1), stored


def joint_transform(size: int, mean, std, train: bool, hflip: bool) -> v2.Compose:
    steps = [v2.Resize((size, size), antialias=True)]
    if train and hflip:
        steps.append(v2.RandomHorizontalFlip())
    steps += [v2.ToDtype({tv_tensors.Image: torch.float32, "others": None}, scale=True),
              v2.Normalize(mean, std)]
    return v2.Compose(steps)


def derived_seed(*keys: int) -> int:
    """A well-mixed seed from non-negative keys: (seed, epoch) orders an epoch,
    (seed, epoch, index) augments one sample in it."""
    return int(np.random.SeedSequence(list(keys)).generate_state(1)[0])


class EpochSampler(Sampler):
    """Yields (epoch, index) keys in an order fixed by (seed, epoch) alone, sharded over DDP
    ranks like DistributedSampler. With the per-sample seeds of SegmentationDataset, every
    batch is the same whatever the number of workers, whether they persist, whether the run
    was resumed from a checkpoint, and over how many processes it is split. With `weights`
    (one per sample), an epoch draws n samples with replacement in proportion to them
    (WeightedRandomSampler's draw, seeded the same way) instead of a permutation."""

    def __init__(self, n: int, seed: int, shuffle: bool, rank: int = 0, world: int = 1,
                 weights: torch.Tensor | None = None):
        self.n, self.seed, self.shuffle, self.rank, self.world = n, seed, shuffle, rank, world
        self.weights = weights
        self.epoch = 0
        self.per_rank = -(-n // world)  # ceil: ranks take equal shares, padding by wrapping

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.per_rank

    def __iter__(self):
        generator = torch.Generator().manual_seed(derived_seed(self.seed, self.epoch))
        if self.shuffle and self.weights is not None:
            order = torch.multinomial(self.weights.double(), self.n, replacement=True,
                                      generator=generator).tolist()
        elif self.shuffle:
            order = torch.randperm(self.n, generator=generator).tolist()
        else:
            order = list(range(self.n))
        order += order[: self.per_rank * self.world - self.n]
        for index in order[self.rank::self.world]:
            yield (self.epoch, index)


class SegmentationDataset(Dataset):
    """(normalised image, long mask) pairs at a fixed square size. A key is an index or an
    (epoch, index) pair from EpochSampler; random augmentation is seeded from the pair, so
    it does not depend on which process draws the sample or on what it drew before."""

    def __init__(self, samples: list[Sample], transform: v2.Compose, seed: int = 0,
                 decode_size: int | None = None):
        """decode_size: the transform's output size, to decode JPEGs at a reduced scale (the
        transform must then resize to a fixed size first, as joint_transform does: image and
        mask arrive at different sizes, and any size-dependent step would refuse them)."""
        self.samples = samples
        self.transform = transform
        self.seed = seed
        self.decode_size = decode_size

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key) -> tuple[torch.Tensor, torch.Tensor]:
        epoch, index = key if isinstance(key, tuple) else (0, key)
        sample = self.samples[index]
        if self.decode_size:
            pixels, stored = read_image_reduced(sample.image_path, self.decode_size)
        else:
            pixels = read_image(sample.image_path)
            stored = tuple(pixels.shape[-2:])
        image = tv_tensors.Image(pixels)
        mask = tv_tensors.Mask(torch.from_numpy(read_labels(sample.mask_path)))
        if stored != tuple(mask.shape[-2:]):
            raise StageError(f"{sample.mask_path}: mask size {tuple(mask.shape)} differs from "
                             f"image {sample.image_path} {stored}")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derived_seed(self.seed, epoch, index))
            image, mask = self.transform(image, mask)
        return image.as_subclass(torch.Tensor), mask.as_subclass(torch.Tensor).long()


class InferenceDataset(Dataset):
    """Resized normalised image plus what is needed to map the prediction back."""

    def __init__(self, samples: list[Sample], size: int, mean, std):
        self.samples = samples
        self.size = size
        self.transform = v2.Compose([v2.Resize((size, size), antialias=True),
                                     v2.ToDtype(torch.float32, scale=True),
                                     v2.Normalize(mean, std)])

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict:
        sample = self.samples[index]
        pixels, stored = read_image_reduced(sample.image_path, self.size)
        gt = torch.from_numpy(read_labels(sample.mask_path))
        if stored != tuple(gt.shape):
            raise StageError(f"{sample.mask_path}: mask size {tuple(gt.shape)} differs from "
                             f"image {sample.image_path} {stored}")
        image = self.transform(tv_tensors.Image(pixels)).as_subclass(torch.Tensor)
        return {"index": index, "image": image, "gt": gt, "size": stored}


def collate_inference(items: list[dict]) -> dict:
    return {"index": [it["index"] for it in items], "gt": [it["gt"] for it in items],
            "size": [it["size"] for it in items],
            "image": torch.stack([it["image"] for it in items])}


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
