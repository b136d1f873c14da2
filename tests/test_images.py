"""stages.lib.images.decode: full and DCT-reduced decoding, grey kept or made RGB, errors."""
from __future__ import annotations

import re

import numpy as np
import pytest
from PIL import Image

from stages.lib.cli import StageError
from stages.lib.images import decode

# 4 x 3 tiles of 16 x 16 pixels, each one flat colour: block-aligned, so every DCT scale
# of it is the same colours on smaller tiles (up to JPEG's rounding).
COLOURS = np.array([[(200, 30, 30), (30, 200, 30), (30, 30, 200), (220, 220, 40)],
                    [(40, 220, 220), (220, 40, 220), (128, 128, 128), (10, 10, 10)],
                    [(250, 250, 250), (90, 160, 60), (160, 60, 90), (60, 90, 160)]], np.uint8)


@pytest.fixture
def tiles(tmp_path):
    path = tmp_path / "tiles.jpg"
    Image.fromarray(COLOURS.repeat(16, axis=0).repeat(16, axis=1)).save(path, quality=95,
                                                                        subsampling=0)
    return path


def expected(tile: int) -> np.ndarray:
    return COLOURS.repeat(tile, axis=0).repeat(tile, axis=1).astype(int)


@pytest.mark.parametrize("kwargs, tile", [
    ({}, 16),
    ({"at_least": 48}, 16),      # 64 // 48 = 1: no reduction would still cover 48 x 48
    ({"at_least": 24}, 8),       # min(64 // 24, 48 // 24) = 2: half
    ({"at_least": 12}, 4),       # min(5, 4) = 4: a quarter
    ({"at_least": 1}, 2),        # never below libjpeg's 1/8
    ({"scale": 1}, 16),
    ({"scale": 2}, 8),
    ({"scale": 4}, 4),
    ({"scale": 8}, 2),
])
def test_a_jpeg_decodes_at_the_scale_asked_for_with_the_same_picture(tiles, kwargs, tile):
    pixels, stored = decode(tiles, **kwargs)
    assert stored == (48, 64)
    assert pixels.dtype == np.uint8 and pixels.shape == (3 * tile, 4 * tile, 3)
    assert np.abs(pixels.astype(int) - expected(tile)).max() <= 4
    assert pixels.flags.writeable   # torch.from_numpy takes it without a warning


def test_grey_is_kept_as_one_channel_only_when_asked(tmp_path):
    path = tmp_path / "grey.jpg"
    Image.fromarray(np.full((40, 24), 77, np.uint8)).save(path, quality=95)
    grey, stored = decode(path, keep_grey=True, scale=2)
    assert stored == (40, 24) and grey.shape == (20, 12)
    assert np.abs(grey.astype(int) - 77).max() <= 1
    rgb, _ = decode(path, scale=2)
    assert rgb.shape == (20, 12, 3) and (rgb == grey[..., None]).all()


def test_palette_and_cmyk_are_made_rgb_and_a_png_is_never_reduced(tmp_path):
    palette = Image.new("P", (30, 20))
    palette.putpalette([0, 0, 0, 10, 200, 90] + [0] * 762)
    palette.paste(1, (0, 0, 30, 20))
    palette.save(tmp_path / "p.png")
    pixels, stored = decode(tmp_path / "p.png", at_least=2, keep_grey=True)
    assert stored == (20, 30) and pixels.shape == (20, 30, 3)
    assert (pixels == (10, 200, 90)).all()
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(tmp_path / "c.jpg", quality=95)
    pixels, _ = decode(tmp_path / "c.jpg", keep_grey=True)
    assert pixels.shape == (16, 16, 3)
    assert np.abs(pixels.astype(int) - (255, 0, 0)).max() <= 3


@pytest.mark.parametrize("failure", [None, "cannot read image"])
def test_an_undecodable_file_is_one_stage_error_naming_it(tmp_path, tiles, failure):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(tiles.read_bytes()[:300])   # a truncated stream fails while decoding
    kwargs = {"failure": failure} if failure else {}
    with pytest.raises(StageError) as info:
        decode(bad, scale=4, **kwargs)
    message = str(info.value)
    assert re.fullmatch(rf"{re.escape(str(bad))}: {failure or 'cannot decode image'}: .+",
                        message) and "\n" not in message
