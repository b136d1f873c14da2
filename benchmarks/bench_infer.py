"""infer: the infer stage's images/s end to end against the raw model forward at the same
size and batch (the stage's overhead; goal <= 15%), the forward in eager, channels_last and
torch.compile form, and torchvision's lraspp_mobilenet_v3_large as a peer: its forward
speed, and its val mIoU on the sample after the same training budget as segflow's model.

The stage runs on an untrained model saved as the train stage saves one (speed does not
depend on the weights); the peer comparison trains both models with the train stage's own
epoch and validation functions, same data, optimiser, schedule and epochs.
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from benchmarks.common import default_params, images_per_split, prepare_sample, steady_rate


SMOKE = 0.1


class OutOnly(nn.Module):
    """torchvision's segmentation models return {'out': logits}; the train loop wants logits."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)["out"]


def segflow_model() -> nn.Module:
    from stages.lib.model import build_model

    torch.manual_seed(0)
    return build_model(3, "none", False, 0.0)


def lraspp_model() -> nn.Module:
    from torchvision.models.segmentation import lraspp_mobilenet_v3_large

    torch.manual_seed(0)
    return OutOnly(lraspp_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=3))


def forward_rate(model: nn.Module, batch: int, size: int, repeats: int,
                 memory_format=torch.contiguous_format, warmup: int = 2) -> float:
    model = model.eval().to(memory_format=memory_format)
    x = torch.randn(batch, 3, size, size).contiguous(memory_format=memory_format)

    def step() -> int:
        with torch.inference_mode():
            model(x)
        return batch

    return steady_rate(step, warmup=warmup, repeats=repeats)


def compiled_rate(batch: int, size: int, repeats: int) -> tuple[float | None, float | None, str]:
    """torch.compile (inductor) forward rate and compile time, or why it could not run."""
    try:
        model = torch.compile(segflow_model().eval())
        started = time.perf_counter()
        with torch.inference_mode():
            model(torch.randn(batch, 3, size, size))
        compile_s = time.perf_counter() - started
        return forward_rate(model, batch, size, repeats, warmup=1), compile_s, ""
    except Exception as exc:  # a missing compiler, an unsupported op: report, don't crash
        return None, None, f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"


def stage_rate(params: dict, raw: Path, masks: Path, work: Path) -> tuple[float, dict]:
    """Images/s of stages.infer.run over the whole val split, model loading excluded."""
    from stages import infer
    from stages.lib.io import atomic_dir
    from stages.lib.model import checkpoint_payload

    model_dir = work / "model"
    with atomic_dir(model_dir) as tmp:
        torch.save(checkpoint_payload(segflow_model(), ["background", "person", "car"],
                                      params["train"]["image_size"], params["model"]), tmp / "model.pt")
    started = time.perf_counter()
    timing = infer.run(params, model_dir, raw, masks, work / "pred")
    seconds = time.perf_counter() - started
    return timing["images"] / seconds, timing


def trained_miou(make_model, params: dict, raw: Path, masks: Path, epochs: int) -> tuple[float, float]:
    """Val mIoU (train-size confusion matrix, as the train stage validates) after `epochs`."""
    from stages import train
    from stages.lib.metrics import scores

    cfg = {**params["train"], "epochs": epochs}
    cpu = torch.device("cpu")
    train_loader = train._loader(raw, masks, "train", cfg, train=True, device=cpu)
    val_loader = train._loader(raw, masks, "val", cfg, train=False, device=cpu)
    model = make_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    started = time.perf_counter()
    for epoch in range(epochs):
        train_loader.sampler.set_epoch(epoch)
        train.train_epoch(model, train_loader, optimizer, scaler, cpu)
        scheduler.step()
    seconds = time.perf_counter() - started
    _, cm = train.validate(model, val_loader, cpu, 3)
    return float(scores(cm)["miou"]), seconds


def run(scale: float) -> dict:
    params = default_params()
    size, batch = params["train"]["image_size"], params["infer"]["batch_size"]
    repeats = max(2, round(10 * scale))
    epochs = max(1, round(params["train"]["epochs"] * scale))
    with tempfile.TemporaryDirectory(prefix="bench_infer.") as tmp:
        tmp = Path(tmp)
        raw, masks, params = prepare_sample(tmp, params, images_per_split(scale))
        stage, timing = stage_rate(params, raw, masks, tmp)
        eager = forward_rate(segflow_model(), batch, size, repeats)
        channels_last = forward_rate(segflow_model(), batch, size, repeats, torch.channels_last)
        compiled, compile_s, why = compiled_rate(batch, size, repeats) if scale >= SMOKE else \
            (None, None, f"skipped below scale {SMOKE} (a smoke run; compiling takes a minute)")
        peer = forward_rate(lraspp_model(), batch, size, repeats)
        ours_miou, ours_s = trained_miou(segflow_model, params, raw, masks, epochs)
        peer_miou, peer_s = trained_miou(lraspp_model, params, raw, masks, epochs)
        n_train = len(list((raw / "images" / "train").iterdir()))
    row = lambda what, rate, miou=None, train_s=None: {  # noqa: E731
        "measurement": what, "images/s": rate if rate is not None else "n/a",
        "vs raw forward (eager)": round(rate / eager, 2) if rate is not None else "n/a",
        f"val mIoU after {epochs} epoch(s)": round(miou, 3) if miou is not None else "",
        "training s": round(train_s, 1) if train_s is not None else ""}
    rows = [
        row("infer stage, end to end (val split)", stage),
        row("segflow model forward, eager", eager, ours_miou, ours_s),
        row("segflow model forward, channels_last", channels_last),
        row("segflow model forward, torch.compile", compiled),
        row("peer: lraspp_mobilenet_v3_large forward, eager", peer, peer_miou, peer_s),
    ]
    overhead = eager / stage - 1
    notes = [
        f"Batch {batch} (infer.batch_size) at {size}x{size} px, {torch.get_num_threads()} torch "
        f"threads, {timing['images']} val images; forwards timed over {repeats} batches after "
        "warm-up, on random inputs of the same shape.",
        f"Infer stage overhead over the raw forward: {overhead:+.0%} (goal <= 15%). The stage "
        "also decodes and resizes each JPEG, resizes the logits to the image's own size, takes "
        "log-softmax and argmax there, scores against the ground truth, pools latents and "
        "writes a PNG per image.",
        (f"torch.compile took {compile_s:.0f} s to compile on first call." if compile_s is not None
         else f"torch.compile could not run here: {why}"),
        f"Peer trained from scratch like segflow's model (no pretrained weights offline): "
        f"{epochs} epoch(s) on the sample's {n_train} train images, AdamW lr {params['train']['lr']}, "
        "cosine schedule, same augmentation; mIoU from the val confusion matrix at training "
        f"size. With {n_train} images both are far from converged: the mIoU columns compare budgets, "
        "not architectures at their best.",
    ]
    return {"title": "infer: stage vs raw forward, compile modes, LRASPP peer", "table": rows,
            "notes": notes}
