"""stages/lib/data.py: reduced-scale JPEG decoding for model inputs."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

from conftest import SAMPLE
from stages.lib.cli import StageError
from stages.lib.data import read_image, read_image_reduced

JPEGS = sorted((SAMPLE / "val2017").iterdir())[:12]


@pytest.mark.parametrize("path", JPEGS, ids=lambda p: p.name)
def test_reduced_decode_keeps_the_stored_size_and_the_picture(path):
    full = read_image(path)
    reduced, stored = read_image_reduced(path, 128)
    assert stored == tuple(full.shape[-2:])
    assert min(reduced.shape[-2:]) >= 128                  # never below the model's input
    assert reduced.shape[-1] <= full.shape[-1]
    a = v2.functional.resize(full, [128, 128], antialias=True).float()
    b = v2.functional.resize(reduced, [128, 128], antialias=True).float()
    assert (a - b).abs().mean() < 3.0                       # same field of view, same picture


def test_reduced_decode_really_reduces_a_large_jpeg():
    path = next(p for p in JPEGS if min(Image.open(p).size) >= 256)
    reduced, stored = read_image_reduced(path, 128)
    assert reduced.shape[-2] < stored[0] and reduced.shape[-1] < stored[1]


def test_png_and_grayscale_decode_in_full(tmp_path):
    Image.fromarray(np.full((300, 200), 77, np.uint8)).save(tmp_path / "g.png")
    pixels, stored = read_image_reduced(tmp_path / "g.png", 64)
    assert stored == (300, 200) and pixels.shape == (3, 300, 200)
    assert torch.all(pixels == 77)


def test_unreadable_file_names_itself(tmp_path):
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8 nope")
    with pytest.raises(StageError, match="bad.jpg: cannot decode image"):
        read_image_reduced(tmp_path / "bad.jpg", 128)


@pytest.mark.parametrize("name", ["../../escape.jpg", "/etc/passwd", "a\0b.jpg", ".hidden.jpg"])
def test_list_samples_refuses_an_image_name_that_is_not_plain(tmp_path, name):
    # train, infer and analyze read raw images through list_samples: a raw folder not
    # written by download (or edited since) must not send them outside it
    import json

    from stages.lib.data import list_samples

    raw, masks = tmp_path / "raw", tmp_path / "masks"
    (raw / "annotations").mkdir(parents=True)
    (raw / "annotations" / "instances_val.json").write_text(
        json.dumps({"images": [{"id": 7, "file_name": name}]}))
    with pytest.raises(StageError,
                       match=r"instances_val.json: image 7: file name .* (has|starts|is)"):
        list_samples(raw, masks, "val")
