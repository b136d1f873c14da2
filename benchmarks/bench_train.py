"""train: the data loader's images/s alone against the train step's images/s alone (the
loader must not be the bottleneck), CPU eager (contiguous) against channels_last, one real
epoch of both together, and the model's FLOPs per image, from which full-COCO projections
are made.

Everything runs in this process on the embedded sample at params.yaml's train settings
(image size, batch size); train steps run on batches held in memory so that they measure
the model alone.
"""
from __future__ import annotations

import copy
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from benchmarks.common import default_params, images_per_split, prepare_sample, steady_rate

COCO2014_TRAIN = 82_783
COCO2014_VAL = 40_504
# Assumptions for the GPU projection, stated beside it in the notes.
GPU_SUSTAINED_TFLOPS = 30.0      # ~10% of an A100's dense bf16 peak: MobileNetV2 is memory-bound
GPU_HOST_LOADER_CORES = 16


def flops_per_image(size: int) -> float:
    """Forward FLOPs of one image at size x size (torch's FlopCounterMode; a multiply-add
    counts as two)."""
    from torch.utils.flop_counter import FlopCounterMode

    from stages.lib.model import build_model

    model = build_model(3, "none", False, 0.0).eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.randn(1, 3, size, size))
    return float(counter.get_total_flops())


def loader_rate(loader, epochs: int) -> float:
    started, items = time.perf_counter(), 0
    for epoch in range(epochs):
        loader.sampler.set_epoch(epoch)
        for images, _ in loader:
            items += len(images)
    return items / (time.perf_counter() - started)


def step_rate(batches: list, memory_format: torch.memory_format, repeats: int) -> float:
    from stages.lib.labels import IGNORE_INDEX
    from stages.lib.model import build_model

    torch.manual_seed(0)
    model = build_model(3, "none", False, 0.0).to(memory_format=memory_format).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    criterion = nn.CrossEntropyLoss(ignore_index=IGNORE_INDEX)
    cycle = iter(())

    def step() -> int:
        nonlocal cycle
        try:
            images, masks = next(cycle)
        except StopIteration:
            cycle = iter(batches)
            images, masks = next(cycle)
        loss = criterion(model(images.contiguous(memory_format=memory_format)), masks)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return len(images)

    return steady_rate(step, warmup=2, repeats=repeats)


def epoch_rate(loader, epochs: int) -> float:
    from stages import train
    from stages.lib.model import build_model

    model = build_model(3, "none", False, 0.0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    started, items = time.perf_counter(), 0
    for epoch in range(epochs):
        loader.sampler.set_epoch(epoch)
        train.train_epoch(model, loader, optimizer, scaler, torch.device("cpu"))
        items += len(loader.sampler)
    return items / (time.perf_counter() - started)


def run(scale: float) -> dict:
    from stages import train

    params = default_params()
    cfg = params["train"]
    epochs = max(1, round(2 * scale))
    repeats = max(3, round(20 * scale))
    cpu = torch.device("cpu")
    with tempfile.TemporaryDirectory(prefix="bench_train.") as tmp:
        raw, masks, params = prepare_sample(Path(tmp), params, images_per_split(scale))
        loaders = {}
        for workers in sorted({cfg["num_workers"], 2}):
            loaders[workers] = train.data_loader(raw, masks, "train",
                                                 {**cfg, "num_workers": workers},
                                                 train=True, device=cpu)
        load = {w: loader_rate(loader, epochs) for w, loader in loaders.items()}
        batches = [copy.deepcopy(b) for b in loaders[cfg["num_workers"]]]
        eager = step_rate(batches, torch.contiguous_format, repeats)
        channels_last = step_rate(batches, torch.channels_last, repeats)
        together = epoch_rate(loaders[cfg["num_workers"]], epochs)
        n_train = len(loaders[cfg["num_workers"]].dataset)
    fwd = flops_per_image(cfg["image_size"])
    rows = [{"measurement": f"data loader alone, num_workers={w}", "images/s": rate,
             "ratio to train step (eager)": round(rate / eager, 2)} for w, rate in load.items()]
    rows += [
        {"measurement": "train step alone, eager (contiguous)", "images/s": eager,
         "ratio to train step (eager)": 1.0},
        {"measurement": "train step alone, channels_last", "images/s": channels_last,
         "ratio to train step (eager)": round(channels_last / eager, 2)},
        {"measurement": f"train epoch (loader num_workers={cfg['num_workers']} + step)",
         "images/s": together, "ratio to train step (eager)": round(together / eager, 2)},
    ]
    return {"title": "train: loader vs step, eager vs channels_last (CPU)", "table": rows,
            "notes": notes(cfg, n_train, epochs, repeats, fwd, eager, load),
            "forward_gflop_per_image": fwd / 1e9, "image_size": cfg["image_size"]}


def notes(cfg: dict, n_train: int, epochs: int, repeats: int, fwd: float, eager: float,
          load: dict) -> list[str]:
    size, threads = cfg["image_size"], torch.get_num_threads()
    train_flops = 3 * fwd        # backward costs about twice the forward
    cpu_epoch_h = COCO2014_TRAIN / eager / 3600
    gpu_compute_s = COCO2014_TRAIN * train_flops / (GPU_SUSTAINED_TFLOPS * 1e12)
    gpu_loader_s = COCO2014_TRAIN / (load[min(load)] * GPU_HOST_LOADER_CORES)
    return [
        f"{n_train} train images of the sample at {size}x{size} px, batch {cfg['batch_size']}, "
        f"{threads} torch threads; loaders timed over {epochs} epoch(s), steps over {repeats} "
        "batches after 2 warm-up steps.",
        f"Forward: {fwd / 1e9:.2f} GFLOP per image at {size} px (FlopCounterMode); a train "
        f"step costs about 3x: {train_flops / 1e9:.2f} GFLOP per image, so this CPU sustains "
        f"{eager * train_flops / 1e9:.1f} GFLOP/s in training.",
        "The loader must outpace the step: a ratio above 1 for the loader rows means it is "
        "not the bottleneck.",
        f"Projection, full COCO 2014 train ({COCO2014_TRAIN:,} images) on this machine: "
        f"{cpu_epoch_h:.1f} h per epoch at the eager step rate.",
        f"Projection on one modern GPU: {COCO2014_TRAIN:,} x {train_flops / 1e9:.2f} GFLOP = "
        f"{COCO2014_TRAIN * train_flops / 1e15:.2f} PFLOP per epoch, {gpu_compute_s:.0f} s of "
        f"compute at an assumed sustained {GPU_SUSTAINED_TFLOPS:g} TFLOP/s; decoding its "
        f"JPEGs at this machine's measured per-process loader rate ({load[min(load)]:.0f} "
        f"images/s) on {GPU_HOST_LOADER_CORES} host cores takes {gpu_loader_s:.0f} s, so an "
        f"epoch is loader-bound at about {max(gpu_compute_s, gpu_loader_s) / 60:.1f} min.",
    ]
