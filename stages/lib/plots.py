"""Figures shared by stages: matplotlib through the Agg canvas (no pyplot global state),
PNG bytes without a timestamp, and image overlays drawn with numpy + Pillow."""
from __future__ import annotations

import io
import itertools

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from PIL import Image

from stages.lib.io import atomic_path
from stages.lib.labels import OKABE_ITO


def png_bytes(fig: Figure) -> bytes:
    buffer = io.BytesIO()
    FigureCanvasAgg(fig)  # Agg explicitly, without pyplot's global figure registry
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight", metadata={"Software": None})
    return buffer.getvalue()


def write_png(path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def save_image(path, image: Image.Image) -> None:
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")


def compact(count: float) -> str:
    for limit, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(count) >= limit:
            return f"{count / limit:.1f}{suffix}"
    return f"{int(count)}"


def confusion_figure(cm: np.ndarray, class_names: list[str], title: str) -> bytes:
    """Row-normalised heat-map (share of each ground-truth class) annotated with counts."""
    rows = cm.sum(axis=1, keepdims=True)
    share = np.divide(cm, rows, out=np.full(cm.shape, np.nan), where=rows > 0)
    k = len(class_names)
    fig = Figure(figsize=(1.05 * k + 2.0, 0.95 * k + 1.5))
    ax = fig.subplots()
    image = ax.imshow(share, cmap=colormaps["viridis"].with_extremes(bad="#d9d9d9"),
                      vmin=0, vmax=1)
    for i, j in itertools.product(range(k), range(k)):
        text = "no pixels" if np.isnan(share[i, j]) else f"{share[i, j]:.0%}\n{compact(cm[i, j])}"
        dark = np.isnan(share[i, j]) or share[i, j] > 0.6
        ax.text(j, i, text, ha="center", va="center", fontsize=8,
                color="black" if dark else "white")
    ax.set_xticks(range(k), class_names, rotation=30, ha="right")
    ax.set_yticks(range(k), class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("ground truth")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of the row")
    return png_bytes(fig)


def curves_figure(history: list[dict], title: str) -> Figure:
    """One training run's curves per epoch, from train's history records: train and val
    loss (left), val mIoU (right). Val points are drawn at the validated epochs only
    (train.val_every); an epoch where no class was present is a gap."""
    fig = Figure(figsize=(8, 3.2))
    loss_ax, miou_ax = fig.subplots(1, 2)
    epochs = [r["epoch"] for r in history]
    blue, orange = OKABE_ITO["blue"], OKABE_ITO["orange"]
    loss_ax.plot(epochs, [r["train_loss"] for r in history], "-o", color=blue, label="train")
    validated = [r for r in history if r["val_loss"] is not None]
    val_epochs = [r["epoch"] for r in validated]
    loss_ax.plot(val_epochs, [r["val_loss"] for r in validated], "--s", color=orange,
                 label="val")
    miou_ax.plot(val_epochs, [np.nan if r["val_miou"] is None else r["val_miou"]
                              for r in validated], "-s", color=orange, label="val")
    for ax, ylabel in ((loss_ax, "loss (training objective)"), (miou_ax, "val mIoU")):
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    return fig


def fit_width(image: Image.Image, width: int, nearest: bool = False,
              enlarge: bool = False) -> Image.Image:
    """The one "resize to a width keeping the aspect" of the figures and pages: scaled down
    to at most `width` pixels wide (and, with `enlarge`, a narrower image up to exactly
    `width`), the height rounded, at least 1. Label maps take `nearest` so that classes
    never blend; photographs Lanczos."""
    if image.width == width or (image.width < width and not enlarge):
        return image
    height = max(1, round(image.height * width / image.width))
    method = Image.Resampling.NEAREST if nearest else Image.Resampling.LANCZOS
    return image.resize((width, height), method)


def heat_overlay(rgb: np.ndarray, heat: np.ndarray, alpha: float = 0.5,
                 cmap: str = "viridis") -> np.ndarray:
    """uint8 RGB: `heat` (H, W, values in [0, 1]) coloured (dark violet low, yellow high) and
    blended over `rgb` (H, W, 3) with weight `alpha`, as Grad-CAM figures usually are.
    viridis rather than the usual jet/turbo: its lightness rises monotonically, so high and
    low stay apart in grey print and under the common colour-vision deficiencies."""
    heat = np.clip(np.nan_to_num(heat), 0, 1)
    colour = colormaps[cmap](heat)[..., :3] * 255
    return (rgb * (1 - alpha) + colour * alpha).round().clip(0, 255).astype(np.uint8)


def mask_overlay(rgb: np.ndarray, mask: np.ndarray, colour=(255, 0, 255),
                 alpha: float = 0.6) -> np.ndarray:
    """uint8 RGB with the pixels of a boolean mask tinted."""
    out = rgb.astype(np.float64).copy()
    out[mask] = out[mask] * (1 - alpha) + np.asarray(colour, float) * alpha
    return out.round().astype(np.uint8)


def side_by_side(panels: list[np.ndarray], gap: int = 4) -> Image.Image:
    """uint8 RGB panels of equal height in one row, separated by white gaps."""
    height = max(p.shape[0] for p in panels)
    width = sum(p.shape[1] for p in panels) + gap * (len(panels) - 1)
    canvas = np.full((height, width, 3), 255, np.uint8)
    x = 0
    for panel in panels:
        canvas[: panel.shape[0], x: x + panel.shape[1]] = panel
        x += panel.shape[1] + gap
    return Image.fromarray(canvas)
