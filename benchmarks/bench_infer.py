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


def save_model(model: nn.Module, params: dict, model_dir: Path) -> None:
    """As the train stage saves it, so that the infer stage loads it its own way."""
    from stages.lib.io import atomic_dir
    from stages.lib.model import checkpoint_payload

    with atomic_dir(model_dir) as tmp:
        torch.save(checkpoint_payload(model, ["background", "person", "car"],
                                      params["train"]["image_size"], params["model"]),
                   tmp / "model.pt")


def stage_rate(params: dict, raw: Path, masks: Path, work: Path, model_dir: Path,
               num_workers: int) -> tuple[float, dict]:
    """Images/s of stages.infer.run over the whole val split, end to end: model loading,
    warm-up, data-loader start-up and the final writes included; not the train split's
    embedding, which the stage times itself (bench_embed measures it)."""
    from stages import infer

    params = {**params, "infer": {**params["infer"], "num_workers": num_workers}}
    started = time.perf_counter()
    timing = infer.run(params, model_dir, raw, masks, work)
    seconds = time.perf_counter() - started - timing["train_embedding"]["wall_s"]
    return timing["images"] / seconds, timing


def part_costs(model: nn.Module, params: dict, raw: Path, masks: Path,
               work: Path) -> dict[str, float]:
    """Milliseconds per val image of each piece of work the stage adds to the forward, run
    one after the other in this process, on the trained model's own predictions (how fast
    a PNG compresses depends on what it shows): where the overhead comes from."""
    from stages import infer
    from stages.lib.data import InferenceDataset, list_samples
    from stages.lib.io import atomic_dir
    from stages.lib.labels import save_labels
    from stages.lib.model import IMAGENET_MEAN, IMAGENET_STD, full_size_probs

    samples = list_samples(raw, masks, "val")
    dataset = InferenceDataset(samples, params["train"]["image_size"], IMAGENET_MEAN, IMAGENET_STD)
    names = ["background", "person", "car"]
    spent = dict.fromkeys(["decode + resize (loader)", "resize logits + log-softmax + max",
                           "score (loss, confusion matrix)", "write PNG"], 0.0)
    model = model.eval()
    # Inside an atomic_dir, as the stage writes: no fsync per file there.
    with atomic_dir(work) as folder, torch.inference_mode():
        for i in range(len(dataset)):
            t0 = time.perf_counter()
            item = dataset[i]
            t1 = time.perf_counter()
            logits = model(item["image"][None])[0]
            t2 = time.perf_counter()
            log_probs = full_size_probs(logits, item["size"], log=True)
            best = log_probs.max(0)
            pred = best.indices.to(torch.uint8)
            confidence = float(best.values.exp().mean())
            t3 = time.perf_counter()
            infer.sample_scores(log_probs, pred, item["gt"], names, confidence)
            t4 = time.perf_counter()
            save_labels(folder / f"{i}.png", pred.numpy(), infer.PNG_LEVEL)
            t5 = time.perf_counter()
            for key, dt in zip(spent, (t1 - t0, t3 - t2, t4 - t3, t5 - t4)):
                spent[key] += dt
    return {key: 1000 * total / len(dataset) for key, total in spent.items()}


def trained_miou(make_model, params: dict, raw: Path, masks: Path,
                 epochs: int) -> tuple[float, float, nn.Module]:
    """Val mIoU (train-size confusion matrix, as the train stage validates) after `epochs`,
    the training seconds and the trained model."""
    from stages import train
    from stages.lib.metrics import scores

    cfg = {**params["train"], "epochs": epochs}
    cpu = torch.device("cpu")
    train_loader = train.data_loader(raw, masks, "train", cfg, train=True, device=cpu)
    val_loader = train.data_loader(raw, masks, "val", cfg, train=False, device=cpu)
    model = make_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg["lr"],
                                  weight_decay=cfg["weight_decay"])
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    started = time.perf_counter()
    for epoch in range(epochs):
        train_loader.sampler.set_epoch(epoch)
        train.train_epoch(model, train_loader, optimizer, scaler, cpu)
        scheduler.step()
    seconds = time.perf_counter() - started
    _, cm = train.validate(model, val_loader, cpu, 3)
    return float(scores(cm)["miou"]), seconds, model


def run(scale: float) -> dict:
    params = default_params()
    size, batch = params["train"]["image_size"], params["infer"]["batch_size"]
    workers = params["infer"]["num_workers"]
    repeats = max(2, round(10 * scale))
    epochs = max(1, round(params["train"]["epochs"] * scale))
    with tempfile.TemporaryDirectory(prefix="bench_infer.") as tmp:
        tmp = Path(tmp)
        raw, masks, params = prepare_sample(tmp, params, images_per_split(scale))
        ours_miou, ours_s, trained = trained_miou(segflow_model, params, raw, masks, epochs)
        save_model(trained, params, tmp / "model")
        eager = forward_rate(segflow_model(), batch, size, repeats)
        stage0, timing0 = stage_rate(params, raw, masks, tmp / "pred0", tmp / "model", 0)
        stage, timing = stage_rate(params, raw, masks, tmp / "pred", tmp / "model", 2)
        eager_after = forward_rate(segflow_model(), batch, size, repeats)
        parts = part_costs(trained, params, raw, masks, tmp / "parts")
        channels_last = forward_rate(segflow_model(), batch, size, repeats, torch.channels_last)
        compiled, compile_s, why = compiled_rate(batch, size, repeats) if scale >= SMOKE else \
            (None, None, f"skipped below scale {SMOKE} (a smoke run; compiling takes a minute)")
        peer = forward_rate(lraspp_model(), batch, size, repeats)
        peer_miou, peer_s, _ = trained_miou(lraspp_model, params, raw, masks, epochs)
        n_train = len(list((raw / "images" / "train").iterdir()))
    # The forward is timed right before and right after the stages: their mean is the
    # reference, so a load change on a shared machine shows as the spread between the two.
    eager_ref = (eager + eager_after) / 2
    row = lambda what, rate, miou=None, train_s=None, goal="": {  # noqa: E731
        "measurement": what, "images/s": rate if rate is not None else "n/a",
        "vs raw forward (eager)": round(rate / eager_ref, 2) if rate is not None else "n/a",
        f"val mIoU after {epochs} epoch(s)": round(miou, 3) if miou is not None else "",
        "training s": round(train_s, 1) if train_s is not None else "", "goal": goal}
    overhead, overhead0 = eager_ref / stage - 1, eager_ref / stage0 - 1
    steady0 = timing0["throughput_img_s"]
    verdict = lambda o: f"overhead {o:+.0%}: goal <= +15% " + ("met" if o <= 0.15 else "missed")  # noqa: E731
    chosen = " (params.yaml)"
    rows = [
        row(f"infer stage, end to end, num_workers=0{chosen if workers == 0 else ''}", stage0,
            goal=verdict(overhead0)),
        row(f"infer stage, end to end, num_workers=2 + 2 writer threads"
            f"{chosen if workers == 2 else ''}", stage, goal=verdict(overhead)),
        row("infer stage, timed pass only (no model load, warm-up), num_workers=0", steady0,
            goal=verdict(eager_ref / steady0 - 1)),
        row("segflow model forward, eager", eager_ref, ours_miou, ours_s),
        row("segflow model forward, channels_last", channels_last),
        row("segflow model forward, torch.compile", compiled),
        row("peer: lraspp_mobilenet_v3_large forward, eager", peer, peer_miou, peer_s),
    ]
    forward_ms = 1000 / eager_ref
    extra_ms = sum(parts.values())
    host_ms = extra_ms - parts["resize logits + log-softmax + max"]
    notes = [
        f"Batch {batch} (infer.batch_size) at {size}x{size} px, {torch.get_num_threads()} torch "
        f"threads, {timing['images']} val images; forwards timed over {repeats} batches after "
        f"warm-up, on random inputs of the same shape, before and after the stage runs "
        f"({eager:.1f} and {eager_after:.1f} images/s; the table shows their mean).",
        f"Infer stage overhead over the raw forward: {overhead0:+.0%} with the loader in the "
        f"main process, {overhead:+.0%} with 2 loader workers (goal <= +15%); writer threads "
        "(one per loader worker, at least one) score and write. params.yaml has "
        f"infer.num_workers: {workers}. The "
        "end-to-end time includes loading the model, one warm-up forward and starting the "
        "loader workers, not the train split's embedding (issue 17: bench_embed); the 'timed "
        "pass only' row is the stage's own throughput_img_s "
        f"(timing.json) over the same run, {timing0['images']} images. The stage runs the "
        f"model trained for the mIoU column (the PNGs' content sets their write time).",
        "Where the overhead comes from, in ms per val image, each part alone in one process: "
        + ", ".join(f"{k} {v:.1f}" for k, v in parts.items())
        + f"; {extra_ms:.1f} ms in all against {forward_ms:.1f} ms of forward per image. "
        "Every part but the forward works at the image's own size (about 640x480), the forward "
        f"at {size}x{size}, so on this CPU they cost about {extra_ms / forward_ms:.0%} of the "
        "forward, and with both cores already busy in the forward's own threads, overlapping "
        "them (loader workers, writer threads) cannot hide them: the goal is out of reach here "
        "without dropping work the issue asks for (full-size maps, per-sample scores, PNGs).",
        f"On a GPU the forward and the full-size resize/log-softmax/max move to the device, "
        f"leaving {host_ms:.1f} ms of host work per image (decode, score, PNG) spread over "
        "infer.num_workers loader processes and as many writer threads. The stage then keeps "
        f"pace with a forward of R images/s only with about R x {host_ms / 1000:.4f} host cores "
        f"(50 cores at R = {50 / (host_ms / 1000):,.0f}): the 15% goal holds where the forward "
        "is the slow part (larger models or inputs, or a host with the cores), not for this "
        "small model at 128 px.",
        (f"torch.compile took {compile_s:.0f} s to compile on first call." if compile_s is not None
         else f"torch.compile could not run here: {why}"),
        f"Peer trained from scratch like segflow's model (no pretrained weights offline): "
        f"{epochs} epoch(s) on the sample's {n_train} train images, "
        f"AdamW lr {params['train']['lr']}, "
        "cosine schedule, same augmentation; mIoU from the val confusion matrix at training "
        f"size. With {n_train} images both are far from converged: the mIoU columns compare "
        "budgets, "
        "not architectures at their best.",
    ]
    return {"title": "infer: stage vs raw forward, compile modes, LRASPP peer", "table": rows,
            "notes": notes, "parts_ms_per_image": parts, "host_ms_per_image": host_ms}
