"""train.schedule: the learning rate per epoch, as a torch.optim.lr_scheduler stepped once
after each epoch (a checkpoint's scheduler then stands at its epoch count)."""
from __future__ import annotations

import math

import torch

SCHEDULES = ("constant", "cosine", "warmup_cosine", "onecycle")


def lr_factor(schedule: str, epoch: int, epochs: int, warmup: int) -> float:
    """The multiple of train.lr used in epoch `epoch` (0-based) for the LambdaLR schedules.
    cosine: from 1 down to 0 over the epochs (CosineAnnealingLR's curve); warmup_cosine:
    linear from 1/(warmup+1) to 1 over `warmup` epochs, then that cosine over the rest."""
    if schedule == "constant":
        return 1.0
    if schedule == "warmup_cosine" and epoch < warmup:
        return (epoch + 1) / (warmup + 1)
    start = warmup if schedule == "warmup_cosine" else 0
    return 0.5 * (1 + math.cos(math.pi * (epoch - start) / max(epochs - start, 1)))


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: dict
                   ) -> torch.optim.lr_scheduler.LRScheduler:
    """onecycle is torch's OneCycleLR (peak train.lr, also cycling Adam's beta1) over the
    epochs, cosine CosineAnnealingLR; the others a LambdaLR of lr_factor."""
    schedule, epochs = cfg["schedule"], cfg["epochs"]
    if schedule == "onecycle":
        # total_steps + 1: OneCycleLR refuses a step past its last, and the loop steps after
        # the last epoch too.
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=cfg["lr"],
                                                   total_steps=epochs + 1)
    if schedule == "cosine":  # the closed form of lr_factor's cosine, as train always had it
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r} (known: {', '.join(SCHEDULES)})")
    warmup = cfg["warmup"]
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda epoch: lr_factor(schedule, epoch, epochs, warmup))
