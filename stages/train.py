"""train: fit the MobileNetV2 + pix2pix model on one scheme's train masks; validate on
val each epoch. Writes --out/model.pt (state dict + what rebuilds the model, loadable with
torch.load(weights_only=True)) and --out/dvclive/ (loss and mIoU per epoch)."""
from __future__ import annotations

import contextlib
import io
import logging
import time
from pathlib import Path

import numpy as np
import torch
from dvclive import Live
from torch import nn
from torch.utils.data import DataLoader

from stages.lib.cli import run_main, stage_parser
from stages.lib.data import (SegmentationDataset, joint_transform, list_samples, seed_everything,
                             seed_worker)
from stages.lib.io import atomic_dir, atomic_path
from stages.lib.labels import IGNORE_INDEX
from stages.lib.metrics import confusion_matrix, scores
from stages.lib.model import (IMAGENET_MEAN, IMAGENET_STD, build_model, checkpoint_payload,
                              resolve_device)
from stages.lib.params import load_params, scheme_class_names

log = logging.getLogger("train")


# ---------------------------------------------------------------- pure core

def autocast_for(device: torch.device) -> contextlib.AbstractContextManager:
    """Mixed precision on CUDA only (bf16 where the GPU has it, else fp16); fp32 on CPU."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast("cuda", dtype=dtype)


def needs_grad_scaler(device: torch.device) -> bool:
    return device.type == "cuda" and not torch.cuda.is_bf16_supported()


def train_epoch(model: nn.Module, loader: DataLoader, optimizer: torch.optim.Optimizer,
                scaler: torch.amp.GradScaler, device: torch.device) -> float:
    model.train()
    criterion = nn.CrossEntropyLoss(ignore_index=IGNORE_INDEX)
    total, count = 0.0, 0
    for images, masks in loader:
        images = images.to(device, non_blocking=True, memory_format=_memory_format(device))
        masks = masks.to(device, non_blocking=True)
        with autocast_for(device):
            loss = criterion(model(images), masks)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        if torch.isfinite(loss):
            total += loss.item() * len(images)
            count += len(images)
    return total / max(count, 1)


@torch.no_grad()
def validate(model: nn.Module, loader: DataLoader, device: torch.device,
             num_classes: int) -> tuple[float, np.ndarray]:
    """Mean CE loss over non-ignored pixels and the confusion matrix, at training size."""
    model.eval()
    criterion = nn.CrossEntropyLoss(ignore_index=IGNORE_INDEX, reduction="sum")
    loss_sum, pixels = 0.0, 0
    cm = np.zeros((num_classes, num_classes), np.int64)
    for images, masks in loader:
        images = images.to(device, memory_format=_memory_format(device))
        masks = masks.to(device)
        with autocast_for(device):
            logits = model(images)
        loss_sum += criterion(logits.float(), masks).item()
        pixels += int((masks != IGNORE_INDEX).sum())
        cm += confusion_matrix(masks.cpu().numpy(), logits.argmax(1).cpu().numpy(), num_classes)
    return loss_sum / max(pixels, 1), cm


def _memory_format(device: torch.device) -> torch.memory_format:
    return torch.channels_last if device.type == "cuda" else torch.contiguous_format


# ---------------------------------------------------------------- run

def run(params: dict, scheme: str, raw: Path, masks: Path, out: Path) -> dict:
    device = resolve_device(params["train"]["device"])
    generator = seed_everything(params["train"]["seed"])
    with _deterministic(device.type == "cpu"):
        return _run_seeded(params, scheme, raw, masks, out, device, generator)


@contextlib.contextmanager
def _deterministic(enabled: bool):
    """Deterministic kernels on CPU (bit-identical reruns), restoring the caller's setting."""
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(enabled or before)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before)


def _run_seeded(params, scheme, raw, masks, out, device, generator) -> dict:
    cfg, model_cfg = params["train"], params["model"]
    class_names = scheme_class_names(params, scheme)
    train_loader = _loader(raw, masks, "train", cfg, generator, train=True, device=device)
    val_loader = _loader(raw, masks, "val", cfg, generator, train=False, device=device)
    model = build_model(len(class_names), model_cfg["encoder_weights"], model_cfg["freeze_encoder"],
                        model_cfg["dropout"]).to(device, memory_format=_memory_format(device))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                                  lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg["epochs"])
    scaler = torch.amp.GradScaler(device.type, enabled=needs_grad_scaler(device))
    log.info("%s: %d train / %d val images, %d classes, device %s", scheme,
             len(train_loader.dataset), len(val_loader.dataset), len(class_names), device)
    with atomic_dir(out) as tmp:
        summary = _fit(model, train_loader, val_loader, optimizer, scheduler, scaler, device,
                       cfg["epochs"], class_names, tmp / "dvclive")
        # Through a buffer: torch.save names the zip's root folder after the file, so a
        # temporary file name would make identical weights give different bytes (and DVC
        # would see a changed model).
        buffer = io.BytesIO()
        torch.save(checkpoint_payload(model, class_names, cfg["image_size"], model_cfg), buffer)
        with atomic_path(tmp / "model.pt") as model_tmp:
            model_tmp.write_bytes(buffer.getvalue())
    return summary


def _fit(model, train_loader, val_loader, optimizer, scheduler, scaler, device, epochs,
         class_names, live_dir: Path) -> dict:
    summary: dict = {}
    with Live(dir=str(live_dir), save_dvc_exp=False, dvcyaml=None, report=None) as live:
        for epoch in range(epochs):
            start = time.perf_counter()
            train_loss = train_epoch(model, train_loader, optimizer, scaler, device)
            val_loss, cm = validate(model, val_loader, device, len(class_names))
            scheduler.step()
            val = scores(cm)
            summary = {"epoch": epoch + 1, "train_loss": train_loss, "val_loss": val_loss,
                       "val_miou": val["miou"]}
            live.log_metric("train/loss", train_loss)
            live.log_metric("val/loss", val_loss)
            if np.isfinite(val["miou"]):
                live.log_metric("val/miou", float(val["miou"]))
            for name, iou in zip(class_names, val["iou"]):
                if np.isfinite(iou):  # a class absent from val has no IoU, not an IoU of 0
                    live.log_metric(f"val/iou/{name}", float(iou))
            live.next_step()
            log.info("epoch %d/%d train_loss %.4f val_loss %.4f val_mIoU %.3f (%.1fs)", epoch + 1,
                     epochs, train_loss, val_loss, val["miou"], time.perf_counter() - start)
    return summary


def _loader(raw, masks, split, cfg, generator, train: bool, device) -> DataLoader:
    transform = joint_transform(cfg["image_size"], IMAGENET_MEAN, IMAGENET_STD, train, cfg["hflip"])
    dataset = SegmentationDataset(list_samples(raw, masks, split), transform)
    workers = cfg["num_workers"]
    # BatchNorm cannot train on a batch of one image (one value per channel at the
    # bottleneck): drop a last batch of one, and only then.
    drop_last = train and len(dataset) % cfg["batch_size"] == 1 and len(dataset) > 1
    return DataLoader(dataset, batch_size=cfg["batch_size"], shuffle=train, drop_last=drop_last,
                      num_workers=workers, persistent_workers=workers > 0, generator=generator,
                      worker_init_fn=seed_worker, pin_memory=device.type == "cuda")


def main(argv: list[str] | None = None) -> int:
    parser = stage_parser("train", __doc__.splitlines()[0])
    parser.add_argument("--scheme", required=True)
    parser.add_argument("--raw", required=True, type=Path, help="folder written by download")
    parser.add_argument("--masks", required=True, type=Path, help="folder written by masks")
    parser.add_argument("--out", required=True, type=Path, help="model folder to create")
    args = parser.parse_args(argv)
    return run_main("train", lambda: run(load_params(args.params), args.scheme, args.raw,
                                         args.masks, args.out))


if __name__ == "__main__":
    raise SystemExit(main())
