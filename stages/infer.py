"""infer: predict the val split with a trained model. Writes under --out:
  val/{stem}.png   predicted class indices as palette PNGs at each image's own size
  samples.csv      per sample: loss, pixel accuracy, confidence, per-class IoU, latency
  latents.npz      image_ids and pooled latent vectors (bottleneck + decoder blocks)
  timing.json      per-image latency total/mean/variance/median, throughput, device, batch
"""
from __future__ import annotations

import logging
import statistics
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from stages.lib.cli import run_main, stage_parser
from stages.lib.data import InferenceDataset, collate_inference, list_samples
from stages.lib.io import atomic_dir, atomic_path, write_csv, write_json
from stages.lib.labels import IGNORE_INDEX, save_labels
from stages.lib.metrics import confusion_matrix, per_class_iou
from stages.lib.model import load_trained, pooled_latent, resolve_device
from stages.lib.params import load_params

log = logging.getLogger("infer")


# ---------------------------------------------------------------- pure core

def full_size_log_probs(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of one sample's logits (K,h,w) to its image size, then log-softmax
    (resizing logits, not labels, keeps boundaries smooth; labels are never interpolated)."""
    resized = F.interpolate(logits[None].float(), size=size, mode="bilinear", align_corners=False)
    return resized[0].log_softmax(0)


def sample_scores(log_probs: torch.Tensor, pred: torch.Tensor, gt: torch.Tensor,
                  class_names: list[str]) -> dict:
    """Loss (mean CE over non-ignored pixels), pixel accuracy, confidence, per-class IoU."""
    valid = gt != IGNORE_INDEX
    n_valid = int(valid.sum())
    nll = F.nll_loss(log_probs[None], gt[None].long(), ignore_index=IGNORE_INDEX, reduction="sum")
    cm = confusion_matrix(gt.numpy(), pred.numpy(), len(class_names))
    row = {
        "loss": float(nll) / n_valid if n_valid else float("nan"),
        "pixel_accuracy": float(np.trace(cm) / n_valid) if n_valid else float("nan"),
        "confidence": float(log_probs.max(0).values.exp().mean()),
    }
    row.update({f"iou_{name}": float(v) for name, v in zip(class_names, per_class_iou(cm))})
    return row


def timing_summary(latencies_s: list[float], wall_s: float, device: str, batch_size: int) -> dict:
    ms = [1000 * t for t in latencies_s]
    return {
        "images": len(ms), "device": device, "batch_size": batch_size,
        "latency_ms": {"total": sum(ms), "mean": statistics.fmean(ms),
                       "variance": statistics.pvariance(ms), "median": statistics.median(ms)},
        "wall_s": wall_s, "throughput_img_s": len(ms) / wall_s if wall_s > 0 else None,
    }


# ---------------------------------------------------------------- run

def run(params: dict, model_dir: Path, raw: Path, masks: Path, out: Path) -> dict:
    cfg = params["infer"]
    device = resolve_device(cfg["device"])
    model, meta = load_trained(model_dir / "model.pt", device)
    class_names = meta["class_names"]
    samples = list_samples(raw, masks, "val")
    dataset = InferenceDataset(samples, meta["image_size"], meta["mean"], meta["std"])
    loader = DataLoader(dataset, batch_size=cfg["batch_size"], collate_fn=collate_inference,
                        pin_memory=device.type == "cuda")
    rows, latents, latencies = [], [], []
    start = time.perf_counter()
    with atomic_dir(out) as tmp, torch.inference_mode():
        (tmp / "val").mkdir()
        for batch in loader:
            forward_s, logits, feats = _timed_forward(model, batch["image"], device)
            latents.append(pooled_latent(feats).cpu().numpy())
            for j, index in enumerate(batch["index"]):
                post_start = time.perf_counter()
                log_probs = full_size_log_probs(logits[j].cpu(), batch["size"][j])
                pred = log_probs.argmax(0).to(torch.uint8)
                sample = samples[index]
                save_labels(tmp / "val" / f"{sample.stem}.png", pred.numpy())
                rows.append({"image_id": sample.image_id, "stem": sample.stem,
                             **sample_scores(log_probs, pred, batch["gt"][j], class_names)})
                latencies.append(forward_s / len(batch["index"]) + time.perf_counter() - post_start)
        wall = time.perf_counter() - start
        table = pd.DataFrame(rows)
        table["latency_ms"] = np.array(latencies) * 1000
        write_csv(tmp / "samples.csv", table)
        with atomic_path(tmp / "latents.npz") as npz_tmp:
            with open(npz_tmp, "wb") as handle:
                np.savez(handle, image_ids=table["image_id"].to_numpy(),
                         latents=np.concatenate(latents).astype(np.float32))
        timing = timing_summary(latencies, wall, str(device), cfg["batch_size"])
        write_json(tmp / "timing.json", timing)
    log.info("%d images, mean loss %.4f, %.1f ms/image", len(table), table["loss"].mean(),
             timing["latency_ms"]["mean"])
    return timing


def _timed_forward(model, images: torch.Tensor, device: torch.device):
    images = images.to(device, non_blocking=True)
    _sync(device)
    start = time.perf_counter()
    logits, feats = model.forward_with_latents(images)
    _sync(device)
    return time.perf_counter() - start, logits, feats


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv: list[str] | None = None) -> int:
    parser = stage_parser("infer", __doc__.splitlines()[0])
    parser.add_argument("--model", required=True, type=Path, help="folder written by train")
    parser.add_argument("--raw", required=True, type=Path, help="folder written by download")
    parser.add_argument("--masks", required=True, type=Path, help="folder written by masks")
    parser.add_argument("--out", required=True, type=Path, help="prediction folder to create")
    args = parser.parse_args(argv)
    return run_main("infer", lambda: run(load_params(args.params), args.model, args.raw,
                                         args.masks, args.out))


if __name__ == "__main__":
    raise SystemExit(main())
