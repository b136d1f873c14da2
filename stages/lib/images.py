"""Decoding an image file with Pillow, the one way every stage reads a photo's pixels (masks'
colour statistics, the datasets of train, infer and analyze), so all see the same pixels.
No torch here: masks' worker processes import this."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from stages.lib.cli import StageError


def decode(path: str | Path, *, at_least: int | None = None, scale: int = 1,
           keep_grey: bool = False,
           failure: str = "cannot decode image") -> tuple[np.ndarray, tuple[int, int]]:
    """uint8 pixels H x W x 3 (RGB; CMYK, palette and grey made RGB) or, with keep_grey,
    H x W for a grey image; and the stored (height, width). Always the stored pixel grid:
    no EXIF rotation, because COCO annotations refer to that grid.

    A JPEG may be decoded reduced, by one of libjpeg's DCT scales 1/2, 1/4, 1/8 (Pillow's
    draft: about a block average; the whole stream is still entropy-decoded, so a damaged
    file fails as in full), with the same field of view: `at_least` N takes the smallest
    scale whose picture still covers N x N (a model input of that size follows); `scale` S
    takes about 1/S of the stored size. Other formats decode in full. A file that cannot be
    decoded is a StageError "<path>: <failure>: <reason>"."""
    try:
        with Image.open(path) as image:
            stored = (image.height, image.width)
            if at_least is not None:
                image.draft("RGB", (at_least, at_least))
            elif scale > 1:
                image.draft("RGB", (max(1, image.width // scale), max(1, image.height // scale)))
            mode = "L" if keep_grey and image.mode in ("L", "I;16") else "RGB"
            # np.array, not asarray: a writable copy, which torch.from_numpy wants
            return np.array(image if image.mode == mode else image.convert(mode)), stored
    except (OSError, ValueError) as exc:
        raise StageError(f"{path}: {failure}: {exc}") from None
