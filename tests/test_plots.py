"""stages.lib.plots.fit_width: the one resize to a width keeping the aspect."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from stages.lib import plots
from stages.lib.plots import fit_width


def _stripes(width: int, height: int) -> Image.Image:
    # label-like: columns alternate between classes 1 and 2
    return Image.fromarray(((np.arange(width) % 2) + 1).astype(np.uint8)[None].repeat(height, 0))


@pytest.mark.parametrize("size, width, expected", [
    ((640, 480), 320, (320, 240)),
    ((640, 427), 200, (200, 133)),    # 133.4375 rounds down
    ((500, 333), 300, (300, 200)),    # 199.8 rounds up
    ((3000, 1), 300, (300, 1)),       # never below one row
    ((100, 50), 100, (100, 50)),
])
def test_a_wider_image_is_scaled_down_keeping_the_aspect(size, width, expected):
    assert fit_width(Image.new("RGB", size), width).size == expected


def test_a_narrower_image_is_left_alone_unless_enlarging():
    small = Image.new("RGB", (80, 60))
    assert fit_width(small, 200) is small
    assert fit_width(small, 200, enlarge=True).size == (200, 150)
    same = Image.new("RGB", (200, 7))
    assert fit_width(same, 200, enlarge=True) is same


def test_nearest_keeps_label_values_and_lanczos_blends():
    labels = _stripes(64, 8)
    for enlarge, width in ((False, 32), (True, 96)):
        values = set(np.unique(np.asarray(fit_width(labels, width, nearest=True,
                                                    enlarge=enlarge))))
        assert values <= {1, 2}
    edge = Image.fromarray(np.repeat(np.repeat([[0, 200]], 4, 0), 32, 1).astype(np.uint8))
    blended = set(np.unique(np.asarray(fit_width(edge, 20))))
    assert not blended <= {0, 200}                                      # Lanczos: in between
    assert set(np.unique(np.asarray(fit_width(edge, 20, nearest=True)))) == {0, 200}
    # the same call as Pillow's resize with the method named
    expected = labels.resize((32, 4), Image.Resampling.NEAREST)
    assert np.array_equal(np.asarray(fit_width(labels, 32, nearest=True)), np.asarray(expected))


def test_training_curves_draw_the_history_as_recorded():
    history = [{"epoch": 1, "train_loss": 1.5, "val_loss": 1.7, "val_miou": 0.1},
               {"epoch": 2, "train_loss": 1.2, "val_loss": 1.6, "val_miou": None},
               {"epoch": 3, "train_loss": 0.9, "val_loss": 1.4, "val_miou": 0.3}]
    fig = plots.curves_figure(history, "person_car: training curves")
    loss_ax, miou_ax = fig.axes
    train, val = loss_ax.lines
    assert list(train.get_xdata()) == [1, 2, 3] and list(train.get_ydata()) == [1.5, 1.2, 0.9]
    assert list(val.get_ydata()) == [1.7, 1.6, 1.4]
    [miou] = miou_ax.lines
    np.testing.assert_array_equal(miou.get_ydata(), [0.1, np.nan, 0.3])  # no class: a gap
    assert fig._suptitle.get_text() == "person_car: training curves"
    assert plots.png_bytes(fig).startswith(b"\x89PNG\r\n\x1a\n")
