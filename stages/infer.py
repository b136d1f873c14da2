"""infer: predict the val split with a trained model. Writes under --out:
  val/{stem}.png   predicted class indices as palette PNGs at each image's own size
  samples.csv      per sample: loss, pixel accuracy, confidence, mIoU, per-class IoU, latency
  latents.npz      image_ids, pooled latent vectors (bottleneck + decoder blocks) and their
                   layout: layer_names[i] occupies columns layer_slices[i] = [start, stop)
  latents_train.npz  the same for the train split (the same model and pooling; no
                   prediction, loss or PNG): analyze places val against train with it
  timing.json      per-image latency total/mean/variance/median, throughput, device, batch
                   size, model input size; warm-up excluded (see its *_definition keys); the
                   train split's embedding time and images/s
"""
from __future__ import annotations

import itertools
import logging
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from torchvision import tv_tensors

from stages.lib.cli import StageError, run_main, stage_parser
from stages.lib.data import (InferenceDataset, collate_inference, list_samples,
                             read_image_reduced)
from stages.lib.io import atomic_dir, atomic_path, write_csv, write_json
from stages.lib.labels import IGNORE_INDEX, save_labels
from stages.lib.metrics import confusion_matrix, per_class_iou
from stages.lib.model import (LATENT_LAYERS, full_size_probs, load_trained, pooled_latent,
                              resolve_device)
from stages.lib.names import check_plain_name, inside
from stages.lib.parallel import ordered_map
from stages.lib.params import load_params, select

log = logging.getLogger("infer")

WARMUP_BATCHES = 1
IN_FLIGHT = 4  # predictions waiting for the writer thread (each a full-size map)
# zlib level 1: predictions are rewritten on every run, and an undertrained model's noisy
# maps took longer to compress at the default 6 than the forward pass; real maps come out
# somewhat larger and are written faster (see BENCHMARKS.md, bench_infer).
PNG_LEVEL = 1
LATENCY_DEFINITION = (
    "Per image: the forward pass of its batch (copy to the device included) divided by the "
    "number of images in the batch, plus its own post-processing (logits resized to the "
    "image's size, log-softmax, argmax, copy back to the CPU). Not included: reading, "
    "decoding and resizing the image (data loader), scoring against the ground truth, "
    "writing the PNG.")
WARMUP_DEFINITION = (
    "The forward pass of the first {n} batch(es) was run once, untimed, before the timed pass "
    "(first-call allocation and kernel selection); the timed pass then times every image, "
    "those included.")
THROUGHPUT_DEFINITION = (
    "throughput_img_s = images / wall_s; wall_s is the timed pass after warm-up, end to end "
    "(data loading, inference, scoring and writing predictions, until the last PNG is "
    "written).")
TRAIN_EMBEDDING_DEFINITION = (
    "The train split's pooled latents (latents_train.npz), after the val pass: images / "
    "wall_s, wall_s from the first batch's loading to the last batch's latents on the CPU "
    "(reading, decoding, resizing, the forward in batches of batch_size, pooling).")


# ---------------------------------------------------------------- pure core

def sample_scores(log_probs: torch.Tensor, pred: torch.Tensor, gt: torch.Tensor,
                  class_names: list[str], confidence: float | None = None) -> dict:
    """Loss (mean CE over non-ignored pixels), pixel accuracy, confidence (mean max-softmax;
    pass it when already known), mIoU (image_miou) and per-class IoU. log_probs may live on
    the GPU; pred and gt are CPU tensors."""
    valid = gt != IGNORE_INDEX
    n_valid = int(valid.sum())
    target = gt.to(log_probs.device, non_blocking=True)[None].long()
    nll = F.nll_loss(log_probs[None], target, ignore_index=IGNORE_INDEX, reduction="sum")
    cm = confusion_matrix(gt.numpy(), pred.numpy(), len(class_names))
    if confidence is None:
        confidence = float(log_probs.max(0).values.exp().mean())
    row = {
        "loss": float(nll) / n_valid if n_valid else float("nan"),
        "pixel_accuracy": float(np.trace(cm) / n_valid) if n_valid else float("nan"),
        "confidence": confidence,
    }
    ious = per_class_iou(cm)
    row["miou"] = image_miou(ious)
    row.update({f"iou_{name}": float(v) for name, v in zip(class_names, ious)})
    return row


def image_miou(ious: np.ndarray) -> float:
    """An image's mIoU: the mean of its per-class IoUs over the classes defined for it (NaN,
    a class absent from both its labels and the prediction, left out); NaN if none is."""
    defined = ious[np.isfinite(ious)]
    return float(defined.mean()) if len(defined) else float("nan")


def timing_summary(latencies_s: list[float], wall_s: float, device: str, batch_size: int,
                   image_size: int | None = None, warmup_batches: int = 0,
                   torch_threads: int | None = None) -> dict:
    """timing.json from the per-image latencies of the timed pass (warm-up already left out:
    every latency given here is counted). Variance is the population variance."""
    ms = [1000 * t for t in latencies_s]
    return {
        "images": len(ms), "device": device, "batch_size": batch_size,
        "latency_ms": {"total": sum(ms), "mean": statistics.fmean(ms),
                       "variance": statistics.pvariance(ms), "median": statistics.median(ms)},
        "wall_s": wall_s, "throughput_img_s": len(ms) / wall_s if wall_s > 0 else None,
        "image_size": image_size, "torch_threads": torch_threads,
        "warmup_batches": warmup_batches,
        "warmup_definition": WARMUP_DEFINITION.format(n=warmup_batches),
        "latency_definition": LATENCY_DEFINITION,
        "throughput_definition": THROUGHPUT_DEFINITION,
    }


def latent_layout(features: list[torch.Tensor]) -> tuple[list[str], np.ndarray]:
    """Names and [start, stop) columns of each layer in pooled_latent(features), in its
    concatenation order (forward_with_latents: bottleneck, then the decoder blocks from the
    deepest, decoder1, to the shallowest), from the tensors' own channel counts."""
    if len(features) > len(LATENT_LAYERS):
        raise ValueError(f"{len(features)} latent layers, but only {len(LATENT_LAYERS)} names")
    names = list(LATENT_LAYERS[: len(features)])
    stops = np.cumsum([int(f.shape[1]) for f in features])
    starts = np.concatenate([[0], stops[:-1]])
    return names, np.stack([starts, stops], axis=1).astype(np.int64)


@dataclass
class Prediction:
    index: int                  # into the dataset
    log_probs: torch.Tensor     # (K, H, W) at the image's own size, on the model's device
    pred: torch.Tensor          # (H, W) uint8 class indices, on the CPU
    confidence: float           # mean max-softmax over the image
    gt: torch.Tensor            # (H, W) ground-truth labels, as the batch carried them
    latent: np.ndarray          # pooled latent vector
    latency_s: float


class TimedInference:
    """Warm-up forwards run untimed, then a timed pass that yields one Prediction at a time
    (full-size maps exist for the sample at hand only, never for a whole batch or the split;
    the caller scores and writes each before asking for the next). After the pass: `latencies_s`,
    `wall_s` (from the end of warm-up to the end of the pass, consumer's work included) and
    the latent `layout`."""

    def __init__(self, model: torch.nn.Module, device: torch.device,
                 warmup_batches: int = WARMUP_BATCHES,
                 clock: Callable[[], float] = time.perf_counter):
        self.model, self.device, self.warmup_batches, self.clock = (
            model, device, warmup_batches, clock)
        self.latencies_s: list[float] = []
        self.started: float | None = None
        self.wall_s: float | None = None
        self.layout: tuple[list[str], np.ndarray] | None = None

    def __call__(self, batches: Iterable[dict]) -> Iterator[Prediction]:
        """The first batches are read once: their forward runs untimed (first-call allocation,
        cudnn.benchmark's kernel search), then again, timed, with the rest. Neither their
        decoding nor their post-processing is repeated, so warm-up costs one forward each."""
        batches = iter(batches)
        held = list(itertools.islice(batches, self.warmup_batches))
        for batch in held:
            self._timed_forward(batch["image"])
        start = self.started = self.clock()
        for batch in itertools.chain(held, batches):
            for prediction in self._predict(batch):
                self.latencies_s.append(prediction.latency_s)
                yield prediction
        self.wall_s = self.clock() - start

    def _predict(self, batch: dict) -> Iterator[Prediction]:
        forward_s, logits, feats = self._timed_forward(batch["image"])
        latents = pooled_latent(feats).cpu().numpy()
        self.layout = latent_layout(feats)
        share = forward_s / len(batch["index"])
        for j, index in enumerate(batch["index"]):
            post_start = self.clock()
            # Full-size maps are made where the logits are (on a GPU, the CPU would otherwise
            # resize and normalise every image while the GPU idles); only labels come back.
            log_probs = full_size_probs(logits[j], batch["size"][j], log=True)
            # max(0), not argmax(0): the same first-maximum indices, but torch's CPU argmax
            # over the leading (strided) dimension is several times slower at full image size.
            best = log_probs.max(0)
            pred = best.indices.to(torch.uint8).cpu()
            confidence = float(best.values.exp().mean())
            latency = share + self.clock() - post_start
            yield Prediction(index, log_probs, pred, confidence, batch["gt"][j], latents[j],
                             latency)

    def _timed_forward(self, images: torch.Tensor):
        _sync(self.device)
        start = self.clock()
        images = images.to(self.device, non_blocking=True)
        logits, feats = self.model.forward_with_latents(images)
        _sync(self.device)
        return self.clock() - start, logits, feats


class EmbeddingDataset(InferenceDataset):
    """The model input of each image without its labels: the train split is only embedded
    (no loss, no prediction), so its masks are never read."""

    def __getitem__(self, index: int) -> dict:
        pixels, _ = read_image_reduced(self.samples[index].image_path, self.size)
        image = self.transform(tv_tensors.Image(pixels)).as_subclass(torch.Tensor)
        return {"index": index, "image": image}


def embed(model: torch.nn.Module, loader: DataLoader, device: torch.device,
          n: int) -> np.ndarray:
    """(n, D) float32 pooled latents of the loader's images, row = dataset index: one forward
    per batch on the device, only the pooled vectors brought back."""
    latents = None
    for batch in loader:
        _, feats = model.forward_with_latents(batch["image"].to(device, non_blocking=True))
        pooled = pooled_latent(feats).cpu().numpy()
        if latents is None:
            latents = np.empty((n, pooled.shape[1]), np.float32)
        latents[batch["index"].numpy()] = pooled
    return latents if latents is not None else np.empty((0, 0), np.float32)


def save_latents(path: Path, image_ids, latents: np.ndarray, layout) -> None:
    """latents.npz's format (image_ids, latents, layer_names, layer_slices), atomically."""
    names, slices = layout
    with atomic_path(path) as npz_tmp:
        with open(npz_tmp, "wb") as handle:
            np.savez(handle, image_ids=np.asarray(image_ids, np.int64),
                     latents=latents.astype(np.float32), layer_names=np.array(names),
                     layer_slices=slices)


# ---------------------------------------------------------------- run

# The params this stage reads: run() sees only these (stages.lib.params.select), and dvc.yaml's
# and the rule's `params:` list the same keys. Its own section; the model's settings come from
# models/<scheme>.
PARAMS = ("infer",)


def run(params: dict, model_dir: Path, raw: Path, masks: Path, out: Path) -> dict:
    params = select(params, PARAMS)
    cfg = params["infer"]
    device = resolve_device(cfg["device"])
    model, meta = load_trained(model_dir / "model.pt", device)
    class_names = meta["class_names"]
    samples = list_samples(raw, masks, "val")
    # Named as masks names the ground truth (evaluate pairs them by name), checked up front.
    names = [check_plain_name(f"{s.stem}.png", f"{masks}: image {s.image_id}") for s in samples]
    dataset = InferenceDataset(samples, meta["image_size"], meta["mean"], meta["std"])
    loader = DataLoader(dataset, batch_size=cfg["batch_size"], collate_fn=collate_inference,
                        num_workers=cfg["num_workers"], pin_memory=device.type == "cuda")
    inference = TimedInference(model, device)
    latents = []
    with atomic_dir(out) as tmp, torch.inference_mode():
        (tmp / "val").mkdir()

        def score_and_write(p: Prediction) -> dict:
            sample = samples[p.index]
            with torch.inference_mode():  # thread-local: the writer thread needs its own
                save_labels(inside(tmp / "val", names[p.index]), p.pred.numpy(), PNG_LEVEL)
                return {"image_id": sample.image_id, "stem": sample.stem,
                        **sample_scores(p.log_probs, p.pred, p.gt, class_names, p.confidence)}

        def predictions() -> Iterator[Prediction]:
            for p in inference(loader):
                latents.append(p.latent)
                yield p

        # As many writers as loader workers: on a GPU both sides of the device are host
        # work that must keep pace with it (decoding, scoring and writing: the host time per
        # image in BENCHMARKS.md, bench_infer).
        writers = max(1, cfg["num_workers"])
        rows = list(overlapped(score_and_write, predictions(), writers, IN_FLIGHT * writers))
        wall_s = time.perf_counter() - inference.started  # the last writes included
        table = pd.DataFrame(rows)
        table["latency_ms"] = np.array(inference.latencies_s) * 1000
        write_csv(tmp / "samples.csv", table)
        save_latents(tmp / "latents.npz", table["image_id"], np.stack(latents),
                     inference.layout)
        timing = timing_summary(inference.latencies_s, wall_s, str(device),
                                cfg["batch_size"], image_size=int(meta["image_size"]),
                                warmup_batches=inference.warmup_batches,
                                torch_threads=torch.get_num_threads())
        timing["train_embedding"] = embed_train(model, meta, cfg, device, raw, masks,
                                                tmp / "latents_train.npz", inference.layout)
        write_json(tmp / "timing.json", timing)
    log.info("%d images, mean loss %.4f, %.1f ms/image (after %d warm-up batch(es)), "
             "%.1f images/s end to end; %d train images embedded at %.1f images/s", len(table),
             table["loss"].mean(), timing["latency_ms"]["mean"], inference.warmup_batches,
             timing["throughput_img_s"], timing["train_embedding"]["images"],
             timing["train_embedding"]["throughput_img_s"] or 0.0)
    return timing


def embed_train(model: torch.nn.Module, meta: dict, cfg: dict, device: torch.device,
                raw: Path, masks: Path, path: Path, layout) -> dict:
    """Writes latents_train.npz (train images by id, as list_samples orders them) and returns
    timing.json's train_embedding block."""
    samples = list_samples(raw, masks, "train")
    dataset = EmbeddingDataset(samples, meta["image_size"], meta["mean"], meta["std"])
    loader = DataLoader(dataset, batch_size=cfg["batch_size"], num_workers=cfg["num_workers"],
                        pin_memory=device.type == "cuda")
    started = time.perf_counter()
    with torch.inference_mode():
        latents = embed(model, loader, device, len(samples))
    wall_s = time.perf_counter() - started
    save_latents(path, [s.image_id for s in samples], latents, layout)
    return {"images": len(samples), "wall_s": wall_s,
            "throughput_img_s": len(samples) / wall_s if wall_s > 0 else None,
            "definition": TRAIN_EMBEDDING_DEFINITION}


def overlapped(work: Callable[[Prediction], dict], items: Iterable[Prediction],
               threads: int = 1, in_flight: int = IN_FLIGHT) -> Iterator[dict]:
    """work(item) for each item on background threads, results in order. Scoring and PNG
    encoding (numpy, zlib, torch ops: all release the GIL) then run while the next batch is
    decoded and predicted; at most `in_flight` full-size maps wait at any time."""
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="infer-writer") as writer:
        # in_flight wait besides the one handed over: ordered_map counts that one too
        yield from ordered_map(work, items, writer, in_flight + 1,
                               named_errors=(StageError,))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv: list[str] | None = None) -> int:
    parser = stage_parser("infer", __doc__)
    parser.add_argument("--model", required=True, type=Path, help="folder written by train")
    parser.add_argument("--raw", required=True, type=Path, help="folder written by download")
    parser.add_argument("--masks", required=True, type=Path, help="folder written by masks")
    parser.add_argument("--out", required=True, type=Path, help="prediction folder to create")
    args = parser.parse_args(argv)
    return run_main("infer", lambda: run(load_params(args.params), args.model, args.raw,
                                         args.masks, args.out), outputs=(args.out,))


if __name__ == "__main__":
    raise SystemExit(main())
