"""train.augment keeps image and mask aligned: a mask drawn from a real sample image (its
brightest 30%, on a smoothed copy so that the region is a few blobs) must still mark the
brightest pixels of the transformed image after every step of the training transform."""
from __future__ import annotations

import pytest
import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from conftest import SAMPLE
from stages.lib.augment import (
    FitTogether, RareClassCrop, is_plain, rare_pixel, train_transform, work_size,
)
from stages.lib.data import joint_transform, read_image
from stages.lib.model import IMAGENET_MEAN, IMAGENET_STD

IMAGE = SAMPLE / "train2017" / "000000024577.jpg"
JITTER = {"brightness": 0.3, "contrast": 0.3, "saturation": 0.3, "hue": 0.05}
ALIGNED = 0.93   # measured: 0.95 and above aligned, 0.58 with the mask flipped (this image)


def augment(resize="squash", crop=(0.3, 1.0), jitter=None, rare_crop=0.0) -> dict:
    return {"resize": resize, "crop_scale": list(crop), "rare_crop": rare_crop,
            "colour_jitter": jitter or dict.fromkeys(JITTER, 0.0)}


def agreement(image: torch.Tensor, mask: torch.Tensor) -> float:
    """Share of pixels where 'among the image's brightest (mask share) pixels' equals the
    mask: 1 when the mask marks exactly the brightest region of the image."""
    gray = image.float().mean(0)
    threshold = torch.quantile(gray.flatten(), 1 - mask.float().mean().item())
    return ((gray > threshold) == mask.bool()).float().mean().item()


@pytest.fixture(scope="module")
def drawn():
    image = read_image(IMAGE)
    height, width = image.shape[-2:]
    image = TF.resize(TF.resize(image, [height // 16, width // 16], antialias=True),
                      [height, width])
    gray = image.float().mean(0)
    mask = (gray > torch.quantile(gray.flatten(), 0.7)).to(torch.uint8)
    assert agreement(image, mask) == 1.0
    assert agreement(image, mask.flip(-1)) < 0.6  # the check sees a misplaced mask
    return tv_tensors.Image(image), tv_tensors.Mask(mask)


@pytest.mark.parametrize("resize", ["squash", "aspect"])
def test_every_step_keeps_the_mask_on_the_image(drawn, resize):
    transform = train_transform(128, IMAGENET_MEAN, IMAGENET_STD,
                                augment(resize, jitter=JITTER), hflip=True)
    kinds = [type(step).__name__ for step in transform.transforms]
    assert kinds == ["FitTogether", "RandomResizedCrop", "RandomHorizontalFlip", "ColorJitter",
                     "ToDtype", "Normalize"]
    flips, misplaced = set(), []
    for seed in range(8):
        torch.manual_seed(seed)
        image, mask = drawn
        for step in transform.transforms:
            before = mask
            image, mask = step(image, mask)
            assert agreement(image, mask) >= ALIGNED, (seed, type(step).__name__)
            assert set(mask.unique().tolist()) <= {0, 1}  # nearest-neighbour: no new labels
            if isinstance(step, v2.RandomHorizontalFlip):
                flips.add(torch.equal(mask, before))
            if isinstance(step, v2.ColorJitter):
                assert torch.equal(mask, before)  # photometric: the mask is untouched
        assert image.shape == (3, 128, 128) and mask.shape == (128, 128)
        misplaced.append(agreement(image, mask.flip(-1)))
    assert flips == {True, False}                     # both outcomes happened
    assert sum(m < ALIGNED for m in misplaced) >= 6   # and a flipped mask would be caught


def test_aspect_keeps_the_ratio_and_squash_does_not(drawn):
    image, mask = drawn
    height, width = mask.shape
    fitted_image, fitted_mask = FitTogether(100, aspect=True)(image, mask)
    assert fitted_mask.shape == (100, round(width * 100 / height))
    assert fitted_image.shape[-2:] == fitted_mask.shape
    assert FitTogether(100, aspect=False)(image, mask)[1].shape == (100, 100)


def test_an_image_decoded_at_a_reduced_scale_fits_its_full_size_mask(drawn):
    image, mask = drawn
    half = tv_tensors.Image(TF.resize(image, [s // 2 for s in image.shape[-2:]]))
    fitted_image, fitted_mask = FitTogether(64, aspect=True)(half, mask)
    assert fitted_image.shape[-2:] == fitted_mask.shape
    assert agreement(fitted_image, fitted_mask) >= ALIGNED


def test_crop_work_size_keeps_the_smallest_crop_at_the_input_size():
    assert work_size(128, augment(crop=(0.25, 1.0))) == 256   # a quarter of 256^2 is 128^2
    assert work_size(128, augment(crop=(1.0, 1.0))) == 128


def assert_same_draws(ours, theirs, image, mask) -> None:
    """Both transforms give the same image and mask from the same torch seed (4 seeds)."""
    for seed in range(4):
        torch.manual_seed(seed)
        a = ours(image, mask)
        torch.manual_seed(seed)
        b = theirs(image, mask)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]), seed


def test_the_studys_recipe_is_the_plain_training_transform(drawn):
    plain = augment(crop=(1.0, 1.0))
    assert is_plain(plain) and not is_plain(augment(jitter=JITTER))
    image, mask = drawn
    ours = train_transform(64, IMAGENET_MEAN, IMAGENET_STD, plain, hflip=True)
    theirs = joint_transform(64, IMAGENET_MEAN, IMAGENET_STD, train=True, hflip=True)
    assert_same_draws(ours, theirs, image, mask)


def test_rare_pixel_is_a_pixel_of_the_least_present_foreground_class():
    mask = torch.zeros(6, 6, dtype=torch.uint8)
    mask[0, :5] = 1                 # 5 pixels of class 1
    mask[4, 2], mask[5, 5] = 2, 2   # 2 pixels of class 2: the rarest
    mask[3, 3] = 255                # ignored (a crowd region): never a centre
    torch.manual_seed(0)
    picks = {rare_pixel(mask) for _ in range(50)}
    assert picks == {(4, 2), (5, 5)}
    assert rare_pixel(torch.where(mask == 255, 255, 0).to(torch.uint8)) is None
    assert rare_pixel(torch.zeros(3, 3, dtype=torch.uint8)) is None


def test_rare_class_crop_without_p_places_the_crop_as_random_resized_crop(drawn):
    image, mask = drawn
    ours = RareClassCrop(64, (0.3, 1.0), p=0.0)
    theirs = v2.RandomResizedCrop((64, 64), scale=(0.3, 1.0), antialias=True)
    assert_same_draws(ours, theirs, image, mask)


def test_rare_class_crop_keeps_a_small_rare_region_in_view_and_the_mask_on_the_image(drawn):
    """The drawn mask (class 1: the brightest 30% of the photograph) plus a 12 x 12 block of
    class 2 near a corner: centred crops of 30-50% of the area always show class 2, and
    keep the mask on the image; random ones mostly miss it."""
    image, mask = drawn
    mask = mask.clone()
    mask[20:32, 20:32] = 2
    mask = tv_tensors.Mask(mask)
    shown = {}
    for p in (1.0, 0.0):
        crop, shown[p] = RareClassCrop(128, (0.3, 0.5), p=p), 0
        for seed in range(20):
            torch.manual_seed(seed)
            out_image, out_mask = crop(image, mask)
            assert out_image.shape == (3, 128, 128) and out_mask.shape == (128, 128)
            assert set(out_mask.unique().tolist()) <= {0, 1, 2}
            shown[p] += bool((out_mask == 2).any())
            assert agreement(out_image, (out_mask == 1).to(torch.uint8)) >= ALIGNED - 0.05
    assert shown[1.0] == 20
    assert shown[0.0] <= 6


def test_train_transform_uses_the_rare_class_crop_only_when_asked():
    kinds = [type(step).__name__ for step in train_transform(
        64, IMAGENET_MEAN, IMAGENET_STD, augment(rare_crop=0.5), hflip=False).transforms]
    assert kinds == ["FitTogether", "RareClassCrop", "ToDtype", "Normalize"]
    kinds = [type(step).__name__ for step in train_transform(
        64, IMAGENET_MEAN, IMAGENET_STD, augment(rare_crop=0.0), hflip=False).transforms]
    assert kinds == ["FitTogether", "RandomResizedCrop", "ToDtype", "Normalize"]
