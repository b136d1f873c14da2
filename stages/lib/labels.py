"""Label masks as palette PNGs: pixel value = class index, 255 = ignore, still viewable."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from stages.lib.io import atomic_path

IGNORE_INDEX = 255

# Okabe-Ito: eight colours that stay apart under the common colour-vision deficiencies, in
# their published order. The one list every figure and page draws categories with (each
# use picks its own order by name).
OKABE_ITO = {"black": "#000000", "orange": "#E69F00", "sky_blue": "#56B4E9",
             "bluish_green": "#009E73", "yellow": "#F0E442", "blue": "#0072B2",
             "vermillion": "#D55E00", "reddish_purple": "#CC79A7"}

# Classes: the Okabe-Ito colours in order (background black), then grey.
_CLASS_COLOURS = [tuple(bytes.fromhex(colour[1:])) for colour in OKABE_ITO.values()] + [
    (153, 153, 153)]


def palette_colours() -> np.ndarray:
    """A 256x3 uint8 palette: fixed colours first, then a deterministic spread, ignore white."""
    rng = np.random.default_rng(0)
    colours = rng.integers(40, 256, size=(256, 3), dtype=np.uint8)
    colours[: len(_CLASS_COLOURS)] = _CLASS_COLOURS
    colours[IGNORE_INDEX] = (255, 255, 255)
    return colours


_PALETTE = palette_colours()


def label_image(labels: np.ndarray) -> Image.Image:
    if labels.dtype != np.uint8 or labels.ndim != 2:
        raise ValueError(f"labels must be a 2-D uint8 array, got {labels.dtype} {labels.shape}")
    image = Image.fromarray(labels, mode="P")
    image.putpalette(_PALETTE.tobytes())
    return image


def save_labels(path: str | Path, labels: np.ndarray, compress_level: int = 6) -> None:
    """compress_level is zlib's (Pillow's default 6). A noisy map, such as an undertrained
    model's prediction, takes several times longer to write at 6 than at 1 (see BENCHMARKS.md,
    bench_infer, which writes at infer.PNG_LEVEL)."""
    with atomic_path(path) as tmp:
        label_image(labels).save(tmp, format="PNG", optimize=False, compress_level=compress_level)


def read_labels(path: str | Path) -> np.ndarray:
    """Class indices exactly as stored; refuses PNGs that are not palette/grey label maps."""
    with Image.open(path) as image:
        if image.mode not in ("P", "L"):
            raise ValueError(f"{path}: label PNG must be palette or grey, got mode {image.mode}")
        return np.asarray(image, dtype=np.uint8).copy()


def colourise(labels: np.ndarray) -> np.ndarray:
    """RGB rendering of a label map (for figures)."""
    return _PALETTE[labels]
