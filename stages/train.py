"""train: fit the MobileNetV2 + pix2pix model on one scheme's train masks; validate on val
every train.val_every epochs and after the last. Writes --out/model.pt (state dict + what
rebuilds the model, loadable with torch.load(weights_only=True)), --out/train.json (device,
precision, epochs, wall time, torch version, the model's sha256, image counts, what the
encoder was pretrained on) and --live (DVCLive: loss and IoU per epoch). With --checkpoints,
saves the whole training state after every epoch (last.pt, the one before kept as prev.pt);
a run killed at any point resumes from it and ends with the same weights as an uninterrupted
run. A damaged checkpoint is named in a warning, renamed aside (last.pt.corrupt-<UTC time>,
never deleted) and the previous one, else a fresh start, used."""
from __future__ import annotations

import contextlib
import copy
import fcntl
import hashlib
import io
import json
import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import ClassVar, NamedTuple

import numpy as np
import torch
import torch.distributed as dist
from dvclive import Live
from torch import nn
from torch.utils.data import DataLoader

from stages.lib.augment import train_transform, work_size
from stages.lib.cli import StageError, run_main, seed_value, stage_parser
from stages.lib.data import (EpochSampler, SegmentationDataset, joint_transform, list_samples,
                             seed_everything)
from stages.lib.io import atomic_dir, atomic_path, write_json
from stages.lib.labels import IGNORE_INDEX
from stages.lib.losses import (SegmentationLoss, balanced_image_weights, class_weights,
                               pixel_counts)
from stages.lib.metrics import scores
from stages.lib.model import (IMAGENET_MEAN, IMAGENET_STD, build_model, checkpoint_payload,
                              load_failure, load_weights_file, resolve_device,
                              state_dict_mismatch)
from stages.lib.params import load_params, scheme_class_names, select
from stages.lib.plots import curves_figure, png_bytes, write_png
from stages.lib.schedule import make_scheduler

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


def precision_name(device: torch.device) -> str:
    """The dtype train computes in on `device`: autocast's ("bfloat16", "float16") when
    autocast_for enables it, else "float32". Read from autocast_for itself, so the record
    cannot drift from what training does."""
    context = autocast_for(device)
    dtype = getattr(context, "fast_dtype", torch.float32)
    return str(dtype).removeprefix("torch.")


IMAGENET_PRETRAINING = "ImageNet-1k (torchvision MobileNet_V2_Weights.IMAGENET1K_V1)"
NO_PRETRAINING = "nothing (trained from scratch)"


def encoder_pretraining(spec: str, base_dir: Path = Path(".")) -> str:
    """What the encoder's starting weights were trained on, in words, for train.json: the
    report's provenance cannot tell ImageNet features from a local file's otherwise. A local
    file is named with its sha256, since its name says nothing of what it holds."""
    if spec == "imagenet":
        return IMAGENET_PRETRAINING
    if spec == "none":
        return NO_PRETRAINING
    with open(base_dir / spec, "rb") as handle:
        digest = hashlib.file_digest(handle, "sha256").hexdigest()
    return f"the local file {spec} (sha256 {digest})"


def train_record(model_file: Path, device: torch.device, epochs: int, wall_s: float,
                 train_images: int, val_images: int) -> dict:
    """train.json, written beside `model_file` (model.pt): the facts of the run the report
    shows, so that nothing reads them back from the log. `epochs` counts every epoch the
    weights went through (those of a resumed checkpoint included), `wall_s` this process's
    training time only."""
    with open(model_file, "rb") as handle:
        digest = hashlib.file_digest(handle, "sha256").hexdigest()
    return {"device": str(device), "precision": precision_name(device), "epochs": int(epochs),
            "wall_s": float(wall_s), "torch_version": torch.__version__,
            "model_sha256": digest, "train_images": int(train_images),
            "val_images": int(val_images)}


class EpochResult(NamedTuple):
    loss: float       # mean training loss over the epoch's batches (every rank's samples)
    cm: np.ndarray    # confusion matrix of the training batches' predictions, as trained


def confusion_counts(gt: torch.Tensor, pred: torch.Tensor, num_classes: int) -> torch.Tensor:
    """metrics.confusion_matrix on the tensors' own device (int64, rows ground truth): a
    batch's counts are added there, and the matrix reaches the host once per epoch, since on
    a GPU every .cpu() waits for the queued kernels. Targets outside 0..K-1 (other than
    IGNORE_INDEX) never get here: the CE loss refuses them first."""
    keep = gt != IGNORE_INDEX
    pairs = gt[keep].long() * num_classes + pred[keep].long()
    return torch.bincount(pairs, minlength=num_classes ** 2).reshape(num_classes, num_classes)


def train_epoch(model: nn.Module, loader: DataLoader, optimizer: torch.optim.Optimizer,
                scaler: torch.amp.GradScaler, device: torch.device,
                num_classes: int | None = None,
                criterion: nn.Module | None = None) -> EpochResult:
    """One pass over the loader. With num_classes, the predictions made for the loss are also
    counted into a confusion matrix: a running train mIoU (augmented inputs, weights changing
    within the epoch) at the cost of an argmax per batch, not a second pass. The loss sum
    and the matrix stay on the device until the epoch ends (no per-batch synchronisation);
    the sum is float64, as the Python float it replaces, so the figures are the same.
    `criterion` is train.loss's (SegmentationLoss, on `device`); plain CE without it."""
    model.train()
    criterion = criterion or nn.CrossEntropyLoss(ignore_index=IGNORE_INDEX)
    total = torch.zeros((), dtype=torch.float64, device=device)
    count = torch.zeros((), dtype=torch.int64, device=device)
    cm = torch.zeros((num_classes or 0,) * 2, dtype=torch.int64, device=device)
    for images, masks in loader:
        images = images.to(device, non_blocking=True, memory_format=_memory_format(device))
        masks = masks.to(device, non_blocking=True)
        with autocast_for(device):
            logits = model(images)
            loss = criterion(logits, masks)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        finite = torch.isfinite(loss.detach())  # a skipped (inf/nan) step counts for nothing
        total += torch.where(finite, loss.detach().double() * len(images), 0.0)
        count += finite * len(images)
        if num_classes:
            cm += confusion_counts(masks, logits.detach().argmax(1), num_classes)
    sums = torch.stack([total, count.double()])
    if dist.is_initialized():  # the epoch's loss and matrix over every rank's samples, reduced
        dist.all_reduce(sums)  # where they are (NCCL takes GPU tensors, gloo CPU ones)
        dist.all_reduce(cm)
    total, count = sums.tolist()
    return EpochResult(total / max(count, 1), cm.cpu().numpy())


@torch.no_grad()
def validate(model: nn.Module, loader: DataLoader, device: torch.device,
             num_classes: int) -> tuple[float, np.ndarray]:
    """Mean CE loss over non-ignored pixels and the confusion matrix, at training size
    (summed on the device, as in train_epoch, and read once at the end)."""
    model.eval()
    criterion = nn.CrossEntropyLoss(ignore_index=IGNORE_INDEX, reduction="sum")
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    pixels = torch.zeros((), dtype=torch.int64, device=device)
    cm = torch.zeros((num_classes, num_classes), dtype=torch.int64, device=device)
    for images, masks in loader:
        images = images.to(device, memory_format=_memory_format(device))
        masks = masks.to(device)
        with autocast_for(device):
            logits = model(images)
        loss_sum += criterion(logits.float(), masks).double()
        pixels += (masks != IGNORE_INDEX).sum()
        cm += confusion_counts(masks, logits.argmax(1), num_classes)
    return loss_sum.item() / max(pixels.item(), 1), cm.cpu().numpy()


def _memory_format(device: torch.device) -> torch.memory_format:
    return torch.channels_last if device.type == "cuda" else torch.contiguous_format


class Recipe(NamedTuple):
    """What train.loss and train.sampler need from the train split's label maps."""

    criterion: nn.Module
    class_weights: dict[str, float] | None   # the weighted losses' weights, by class name
    image_weights: torch.Tensor | None       # class_balanced: each train image's draw weight


def class_statistics(raw: Path, masks: Path, cfg: dict, class_names: list[str]) -> Recipe:
    """The loss and sampling weights of train.loss / class_weights / sampler, from the
    train label maps' pixel counts (read only when a weighted loss or sampler needs them)."""
    loss, sampler = cfg["loss"], cfg["sampler"]
    weighted = loss.startswith("weighted")
    if not weighted and sampler == "uniform":
        return Recipe(SegmentationLoss(loss), None, None)
    samples = list_samples(raw, masks, "train")
    counts = pixel_counts([s.mask_path for s in samples], len(class_names))
    weights = class_weights(counts.sum(0), cfg["class_weights"]) if weighted else None
    if weights is not None:
        log.info("class weights (%s): %s", cfg["class_weights"],
                 ", ".join(f"{n} {w:.3f}" for n, w in zip(class_names, weights)))
    images = (torch.from_numpy(balanced_image_weights(counts))
              if sampler == "class_balanced" else None)
    criterion = SegmentationLoss(loss, None if weights is None
                                 else torch.tensor(weights, dtype=torch.float32))
    return Recipe(criterion, None if weights is None
                  else {n: float(w) for n, w in zip(class_names, weights)}, images)


def recipe_record(cfg: dict, recipe: Recipe) -> dict:
    """The recipe's keys of train.json: what the model was trained with, the class weights as
    computed from this run's train split (null when the loss weighs no class)."""
    augment = cfg["augment"]
    return {"seed": int(cfg["seed"]), "loss": cfg["loss"],
            "class_weighting": cfg["class_weights"] if recipe.class_weights else None,
            "class_weights": recipe.class_weights,
            "sampler": cfg["sampler"],
            "schedule": {"name": cfg["schedule"], "lr": float(cfg["lr"]),
                         "warmup": int(cfg["warmup"]) if cfg["schedule"] == "warmup_cosine"
                         else 0},
            "augment": {"resize": augment["resize"],
                        "crop_scale": [float(v) for v in augment["crop_scale"]],
                        "rare_crop": float(augment["rare_crop"]),
                        "hflip": bool(cfg["hflip"]),
                        "colour_jitter": {k: float(v)
                                          for k, v in augment["colour_jitter"].items()}}}


# ---------------------------------------------------------------- checkpoints

def run_fingerprint(params: dict, scheme: str, raw: Path, masks: Path, seed: int = 0) -> str:
    """What a checkpoint must match to be resumed: every value that shapes the training
    (not num_workers: batches do not depend on it; the training seed, not the list of
    seeds) and the identity of its data."""
    values = {"scheme": params["schemes"][scheme], "model": params["model"], "seed": int(seed),
              "train": {k: v for k, v in params["train"].items()
                        if k not in ("num_workers", "seeds", "seed")}}
    digest = hashlib.sha256(json.dumps(values, sort_keys=True).encode())
    for path in (raw / "manifest.json", masks / "metadata.csv"):
        digest.update(path.read_bytes() if path.is_file() else b"-")
    for split in ("train", "val"):
        for mask in sorted((masks / split).glob("*.png")):
            digest.update(f"{split}/{mask.name}:{mask.stat().st_size};".encode())
    return digest.hexdigest()


CHECKPOINT_FILE = "a training checkpoint saved by segflow's train stage"
PREVIOUS = "prev.pt"  # beside last.pt: the checkpoint last.pt replaced, one epoch older
HISTORY_KEYS = ("epoch", "train_loss", "val_loss", "val_miou", "val_iou")


class CheckpointError(StageError):
    """A checkpoint that cannot be read, or is not one train wrote: set aside, never fatal."""


@dataclass
class TrainState:
    """The objects a checkpoint saves and restores, in that order: the bare model (not its
    DDP wrapper: its state dict has no "module." prefix), its optimiser, learning-rate
    schedule and gradient scaler."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler

    PARTS: ClassVar[tuple[str, ...]] = ("model", "optimizer", "scheduler", "scaler")

    @classmethod
    def create(cls, model: nn.Module, cfg: dict, device: torch.device) -> "TrainState":
        """A fresh state for `model` (already on `device`) from params.yaml's train section."""
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                                      lr=cfg["lr"], weight_decay=cfg["weight_decay"])
        scheduler = make_scheduler(optimizer, cfg)
        scaler = torch.amp.GradScaler(device.type, enabled=needs_grad_scaler(device))
        return cls(model, optimizer, scheduler, scaler)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def state_dicts(self) -> dict[str, dict]:
        return {part: getattr(self, part).state_dict() for part in self.PARTS}

    def load_state_dicts(self, states: dict[str, dict]) -> None:
        for part in self.PARTS:
            getattr(self, part).load_state_dict(states[part])


def previous_checkpoint(last: Path) -> Path:
    return last.with_name(PREVIOUS)


def save_checkpoint(path: Path, fingerprint: str, history: list[dict],
                    state: TrainState) -> None:
    """The training state as `path` (last.pt). The checkpoint it replaces is kept as prev.pt
    by a rename (no second write): a last.pt damaged later costs one epoch, not the run, and
    at every moment one of the two names holds a complete checkpoint."""
    saved = {"fingerprint": fingerprint, "epoch": len(history), "history": history,
             **state.state_dicts(), "torch_rng": torch.get_rng_state()}
    _save_torch(saved, path, keep_old_as=previous_checkpoint(path))


def resume(path: Path, fingerprint: str, state: TrainState, set_aside: bool = True) -> list[dict]:
    """Restore the newest usable checkpoint of this very run, `path` (last.pt) else prev.pt;
    return the epochs it had finished ([]: train from scratch). A damaged one is logged and
    renamed aside (by the main rank only, `set_aside`: every rank reads the same files and
    so decides alike), and the next one tried."""
    candidates = [c for c in (path, previous_checkpoint(path)) if c.is_file()]
    for candidate in candidates:
        try:
            history = restore_checkpoint(candidate, fingerprint, state)
        except CheckpointError as exc:
            if set_aside:
                log.warning("%s; moved aside to %s", exc, set_aside_file(candidate).name)
            continue
        if history is not None:
            log.info("resuming from %s after epoch %d", candidate, len(history))
            return history
    if candidates:
        log.info("%s: no usable checkpoint of this run, training from epoch 1", path.parent)
    return []


def restore_checkpoint(path: Path, fingerprint: str, state: TrainState) -> list[dict] | None:
    """Load `path` into the training state and return its history; None, changing
    nothing, for a checkpoint of other params or data. Any load or structure failure is one
    CheckpointError naming the file, with every object (and torch's RNG) as it was."""
    saved = load_weights_file(path, CHECKPOINT_FILE, error=CheckpointError)
    if not isinstance(saved, dict) or not isinstance(saved.get("fingerprint"), str):
        raise CheckpointError(f"{path}: not {CHECKPOINT_FILE} (no fingerprint)")
    if saved["fingerprint"] != fingerprint:
        log.warning("%s: made with other params or data, not resumed", path)
        return None
    problem = checkpoint_problem(saved, state)
    if problem:
        raise CheckpointError(f"{path}: not {CHECKPOINT_FILE} ({problem})")
    with _undone_on_error(state):
        try:
            state.load_state_dicts(saved)
            torch.set_rng_state(saved["torch_rng"])
        except Exception as exc:  # what the structure checks cannot foresee
            raise CheckpointError(f"{path}: not {CHECKPOINT_FILE} "
                                  f"({load_failure(exc)})") from None
    return saved["history"]


def checkpoint_problem(saved: dict, state: TrainState) -> str | None:
    """What keeps the checkpoint `saved` from being restored into `state`, or None.
    The history must be whole: the DVCLive curves are written from it at the end."""
    missing = [k for k in ("epoch", "history", "model", "optimizer", "scheduler", "scaler",
                           "torch_rng") if k not in saved]
    if missing:
        return f"missing keys {missing}"
    epoch, history = saved["epoch"], saved["history"]
    if not isinstance(epoch, int) or isinstance(epoch, bool) or epoch < 1:
        return f"epoch {epoch!r} is not a positive integer"
    if not isinstance(history, list) or len(history) != epoch or not all(
            isinstance(r, dict) and all(k in r for k in HISTORY_KEYS) and r["epoch"] == i + 1
            for i, r in enumerate(history)):
        return f"history is not the {epoch} epoch records its epoch says"
    if not all(isinstance(saved[k], dict) for k in TrainState.PARTS):
        return "model, optimizer, scheduler and scaler are not all state dicts"
    if saved["scheduler"].get("last_epoch") != epoch:
        return f"scheduler at epoch {saved['scheduler'].get('last_epoch')!r}, not {epoch}"
    rng = saved["torch_rng"]
    if not (isinstance(rng, torch.Tensor) and rng.dtype == torch.uint8
            and rng.shape == torch.get_rng_state().shape):
        return "torch_rng is not a torch RNG state"
    mismatch = state_dict_mismatch(state.model.state_dict(), saved["model"])
    return (f"model: {mismatch}" if mismatch
            else _optimizer_problem(saved["optimizer"], state.optimizer))


def _optimizer_problem(saved: dict, optimizer: torch.optim.Optimizer) -> str | None:
    """load_state_dict checks the group sizes; per-parameter moments of the wrong shape would
    only fail at the first step, mid-epoch."""
    groups, per_param = saved.get("param_groups"), saved.get("state")
    if not (isinstance(groups, list) and isinstance(per_param, dict)
            and len(groups) == len(optimizer.param_groups)
            and all(isinstance(g, dict) and isinstance(g.get("params"), list) for g in groups)):
        return "optimizer: not the state of this model's optimizer"
    for group, live in zip(groups, optimizer.param_groups):
        if len(group["params"]) != len(live["params"]):
            return "optimizer: parameter groups of other sizes"
        for key, param in zip(group["params"], live["params"]):
            moments = per_param.get(key, {})
            if not isinstance(moments, dict) or any(
                    isinstance(v, torch.Tensor) and v.dim() and v.shape != param.shape
                    for v in moments.values()):
                return f"optimizer: state of parameter {key!r} does not fit its shape"
    return None


@contextlib.contextmanager
def _undone_on_error(state: TrainState):
    """Put the state and torch's RNG back as they were if a restore fails halfway: the
    next checkpoint, or a fresh start, must begin from exactly the fresh state."""
    before = copy.deepcopy(state.state_dicts())
    rng = torch.get_rng_state()
    try:
        yield
    except BaseException:
        state.load_state_dicts(before)
        torch.set_rng_state(rng)
        raise


def set_aside_file(path: Path) -> Path:
    """Rename a damaged file to <name>.corrupt-<UTC time> in its folder (never deleted, never
    overwriting an earlier one): what went wrong can still be looked at."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    for attempt in range(1000):
        aside = path.with_name(f"{path.name}.corrupt-{stamp}" + (f"-{attempt}" if attempt else ""))
        if not aside.exists():
            break
    try:
        os.rename(path, aside)
    except OSError as exc:
        raise StageError(f"{path}: damaged and cannot be moved aside to {aside.name} "
                         f"({exc.strerror})") from None
    return aside


def _save_torch(obj: object, path: Path, keep_old_as: Path | None = None) -> None:
    # Through a buffer: torch.save names the zip's root folder after the file, so a
    # temporary file name would make identical weights give different bytes (and DVC
    # would see a changed model).
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    with atomic_path(path) as tmp:
        tmp.write_bytes(buffer.getvalue())
        if keep_old_as is not None and path.is_file():
            os.replace(path, keep_old_as)  # only once the new file is whole


# ---------------------------------------------------------------- run

@dataclass(frozen=True)
class Ranks:
    """Where this process stands in a torchrun job (rank 0 of 1 when run alone)."""

    rank: int = 0
    world: int = 1
    local: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls) -> "Ranks":
        env = os.environ
        return cls(int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)),
                   int(env.get("LOCAL_RANK", 0)))


def per_rank_batch(batch_size: int, world: int) -> int:
    """train.batch_size is the global batch: each of `world` processes takes an equal part."""
    if batch_size % world:
        raise StageError(f"train.batch_size {batch_size} must be a multiple of train.nproc {world}")
    return batch_size // world


# The params this stage reads: run() sees only these (stages.lib.params.select), and dvc.yaml's
# and the rule's `params:` list the same keys. The scheme's classes, the model and every
# training setting but train.seeds: a job trains for the one seed on its command line, so
# adding a seed to the list adds jobs and reruns none of those already trained.
PARAMS = ("schemes.{scheme}", "model", "train.device", "train.nproc", "train.image_size",
          "train.epochs", "train.batch_size", "train.lr", "train.weight_decay",
          "train.num_workers", "train.hflip", "train.loss", "train.class_weights",
          "train.sampler", "train.schedule", "train.warmup", "train.augment",
          "train.val_every", "train.cpu_threads")


def run(params: dict, scheme: str, raw: Path, masks: Path, out: Path,
        checkpoints: Path | None = None, live: Path | None = None, seed: int = 0) -> dict:
    params = select(params, PARAMS, scheme=scheme)
    params["train"]["seed"] = seed   # select() built this dict: the caller's is untouched
    ranks = Ranks.from_env()
    device = resolve_device(params["train"]["device"])
    if device.type == "cuda" and ranks.world > 1:
        device = torch.device("cuda", ranks.local)
        torch.cuda.set_device(device)
    if device.type == "cpu":  # both engines alike: float sums depend on the thread count
        torch.set_num_threads(params["train"]["cpu_threads"])
    seed_everything(params["train"]["seed"])
    torch.backends.cudnn.benchmark = device.type == "cuda"
    with _process_group(ranks, device), _deterministic(device.type == "cpu"):
        return _run_seeded(params, scheme, raw, masks, out, device, checkpoints, live, ranks)


@contextlib.contextmanager
def _process_group(ranks: Ranks, device: torch.device):
    """NCCL between GPUs, gloo between CPU processes; nothing when run alone."""
    if ranks.world == 1:
        yield
        return
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        yield
    finally:
        dist.destroy_process_group()


@contextlib.contextmanager
def _deterministic(enabled: bool):
    """Deterministic kernels on CPU (bit-identical reruns), restoring the caller's setting."""
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(enabled or before)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before)


def _run_seeded(params, scheme, raw, masks, out, device, checkpoints, live, ranks) -> dict:
    cfg, model_cfg = params["train"], params["model"]
    class_names = scheme_class_names(params, scheme)
    recipe = class_statistics(raw, masks, cfg, class_names)
    train_loader = data_loader(raw, masks, "train", cfg, train=True, device=device, ranks=ranks,
                               image_weights=recipe.image_weights, seed=cfg["seed"])
    val_loader = data_loader(raw, masks, "val", cfg, train=False, device=device,
                             seed=cfg["seed"])
    model = build_model(len(class_names), model_cfg["encoder_weights"], model_cfg["freeze_encoder"],
                        model_cfg["dropout"])
    if ranks.world > 1 and device.type == "cuda":
        # Per-GPU batches are small: BatchNorm statistics over the global batch. (SyncBatchNorm
        # runs on GPUs only; CPU ranks keep per-process statistics.)
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = model.to(device, memory_format=_memory_format(device))
    state = TrainState.create(model, cfg, device)
    log.info("%s: %d train / %d val images, %d classes, device %s", scheme,
             len(train_loader.dataset), len(val_loader.dataset), len(class_names), device)
    checkpoint = checkpoints / "last.pt" if checkpoints else None
    fingerprint = run_fingerprint(params, scheme, raw, masks, cfg["seed"])
    history = resume(checkpoint, fingerprint, state, set_aside=ranks.main) if checkpoint else []
    trained = _wrap_ddp(model, device, ranks)

    def after_epoch(records: list[dict]) -> None:
        if checkpoint and ranks.main:
            save_checkpoint(checkpoint, fingerprint, records, state)

    started = time.perf_counter()
    history = _fit(state, trained, (train_loader, val_loader), (cfg["epochs"], cfg["val_every"]),
                   class_names, history, after_epoch, recipe.criterion.to(device))
    wall_s = time.perf_counter() - started
    if not ranks.main:
        return history[-1] if history else {}
    if live:
        with atomic_dir(live) as tmp:
            _write_dvclive(tmp, history, class_names)
    with atomic_dir(out) as tmp:
        _save_torch(checkpoint_payload(model, class_names, cfg["image_size"], model_cfg),
                    tmp / "model.pt")
        write_json(tmp / "train.json", train_record(
            tmp / "model.pt", device, len(history), wall_s, len(train_loader.dataset),
            len(val_loader.dataset)) | recipe_record(cfg, recipe)
            | {"encoder_pretraining": encoder_pretraining(model_cfg["encoder_weights"])})
        write_png(tmp / "curves.png",
                  png_bytes(curves_figure(history, f"{scheme}: training curves")))
    if checkpoint:
        for done in (checkpoint, previous_checkpoint(checkpoint)):
            done.unlink(missing_ok=True)  # finished: a rerun must train, not resume
    return history[-1] if history else {}


def _wrap_ddp(model: nn.Module, device: torch.device, ranks: Ranks) -> nn.Module:
    if ranks.world == 1:
        return model
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


def validates(epoch: int, epochs: int, val_every: int) -> bool:
    """Whether 1-based `epoch` of `epochs` is validated: every `val_every`-th and always the
    last, so that the model written is the one the last record scores."""
    return epoch % val_every == 0 or epoch == epochs


def _fit(state: TrainState, trained: nn.Module, loaders: tuple[DataLoader, DataLoader],
         schedule: tuple[int, int], class_names: list[str], history: list[dict], after_epoch,
         criterion: nn.Module | None = None) -> list[dict]:
    """`trained` is the model as optimised (DDP-wrapped under torchrun), state.model the bare
    one validated (every rank validates the whole val split alike: no collective needed).
    `loaders` are the train and val loaders; `schedule` is (epochs, val_every): an epoch not
    validated has null val fields in its record. `criterion` the training loss (validation
    always reports plain CE, comparable between recipes)."""
    train_loader, val_loader = loaders
    (epochs, val_every), device, num_classes = schedule, state.device, len(class_names)
    history = list(history)
    for epoch in range(len(history), epochs):
        start = time.perf_counter()
        train_loader.sampler.set_epoch(epoch)
        train_loss, train_cm = train_epoch(trained, train_loader, state.optimizer, state.scaler,
                                           device, num_classes, criterion)
        state.scheduler.step()
        record = {"epoch": epoch + 1, "train_loss": train_loss,
                  "train_miou": _finite_or_none(scores(train_cm)["miou"])}
        if validates(epoch + 1, epochs, val_every):
            record |= _validation_record(state.model, val_loader, device, class_names)
        else:
            record |= {"val_loss": None, "val_miou": None, "val_iou": None}
        history.append(record)
        after_epoch(history)
        log.info("epoch %d/%d train_loss %.4f train_mIoU %.3f val_loss %s val_mIoU %s (%.1fs)",
                 epoch + 1, epochs, train_loss, scores(train_cm)["miou"],
                 _shown(record["val_loss"], 4), _shown(record["val_miou"], 3),
                 time.perf_counter() - start)
    return history


def _validation_record(model: nn.Module, loader: DataLoader, device: torch.device,
                       class_names: list[str]) -> dict:
    val_loss, cm = validate(model, loader, device, len(class_names))
    val = scores(cm)
    return {"val_loss": val_loss, "val_miou": _finite_or_none(val["miou"]),
            "val_iou": {n: _finite_or_none(v) for n, v in zip(class_names, val["iou"])}}


def _shown(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def dvc_root(start: Path) -> Path | None:
    """The DVC repository DVCLive writes its signal files under: $DVC_ROOT, else the nearest
    folder from `start` up holding .dvc (as dvclive's own lookup); None outside one."""
    if os.environ.get("DVC_ROOT"):
        return Path(os.environ["DVC_ROOT"])
    return next((p for p in (start, *start.parents) if (p / ".dvc").is_dir()), None)


@contextlib.contextmanager
def one_dvclive_at_a_time(start: Path):
    """Every Live in a repository shares one signal file for VS Code
    (.dvc/tmp/exps/run/DVCLIVE_STEP_COMPLETED), and Live.end() checks for it, then removes
    it: two trainings ending together (Snakemake runs the schemes side by side) race there,
    and the loser fails with FileNotFoundError after all its work. An exclusive lock
    (fcntl.flock, released when the descriptor closes, also when the process dies) on the
    repository's .dvc folder lets one Live at a time write; outside a repository there is
    no signal file and no lock."""
    root = dvc_root(start)
    if root is None or not (root / ".dvc").is_dir():
        yield
        return
    fd = os.open(root / ".dvc", os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _write_dvclive(live_dir: Path, history: list[dict], class_names: list[str]) -> None:
    """Per-epoch curves for `dvc plots`, written from the history so that a resumed run
    logs every epoch, including those before the interruption."""
    with one_dvclive_at_a_time(Path.cwd()), \
            Live(dir=str(live_dir), save_dvc_exp=False, dvcyaml=None, report=None) as live:
        for record in history:
            live.log_metric("train/loss", record["train_loss"])
            if record.get("train_miou") is not None:
                live.log_metric("train/miou", record["train_miou"])
            if record["val_loss"] is None:  # an epoch train.val_every skipped
                live.next_step()
                continue
            live.log_metric("val/loss", record["val_loss"])
            if record["val_miou"] is not None:
                live.log_metric("val/miou", record["val_miou"])
            for name in class_names:  # a class absent from val has no IoU, not an IoU of 0
                if record["val_iou"][name] is not None:
                    live.log_metric(f"val/iou/{name}", record["val_iou"][name])
            live.next_step()


def _finite_or_none(value: float) -> float | None:
    return float(value) if np.isfinite(value) else None


def data_loader(raw: Path, masks: Path, split: str, cfg: dict, train: bool,
                device: torch.device, ranks: Ranks = Ranks(),
                image_weights: torch.Tensor | None = None, seed: int = 0) -> DataLoader:
    """The batches the stage trains (`train`: augmented as train.augment says, shuffled per
    epoch, this rank's share of the global batch; drawn in proportion to `image_weights` if
    given) or validates on, for one split of download's `raw` and masks' `masks` folders, as
    params.yaml's train section `cfg` sets them. Call loader.sampler.set_epoch(epoch) before
    each epoch: the order depends on `seed` (the training seed) and epoch."""
    size = cfg["image_size"]
    if train:
        augment = cfg["augment"]
        transform = train_transform(size, IMAGENET_MEAN, IMAGENET_STD, augment, cfg["hflip"])
        decode = work_size(size, augment)
    else:
        transform, decode = joint_transform(size, IMAGENET_MEAN, IMAGENET_STD, False, False), size
    dataset = SegmentationDataset(list_samples(raw, masks, split), transform, seed,
                                  decode_size=decode)
    sampler = EpochSampler(len(dataset), seed, shuffle=train, rank=ranks.rank,
                           world=ranks.world, weights=image_weights if train else None)
    batch = per_rank_batch(cfg["batch_size"], ranks.world) if train else cfg["batch_size"]
    workers = cfg["num_workers"]
    # BatchNorm cannot train on a batch of one image (one value per channel at the
    # bottleneck): drop a last batch of one, and only then.
    drop_last = train and len(sampler) % batch == 1 and len(sampler) > 1
    return DataLoader(dataset, batch_size=batch, sampler=sampler, drop_last=drop_last,
                      num_workers=workers, persistent_workers=workers > 0,
                      pin_memory=device.type == "cuda")


def main(argv: list[str] | None = None) -> int:
    parser = stage_parser("train", __doc__)
    parser.add_argument("--scheme", required=True)
    parser.add_argument("--seed", required=True, type=seed_value,
                        help="the training seed (one of train.seeds: the engines run one job "
                             "per scheme and seed)")
    parser.add_argument("--raw", required=True, type=Path, help="folder written by download")
    parser.add_argument("--masks", required=True, type=Path, help="folder written by masks")
    parser.add_argument("--out", required=True, type=Path, help="model folder to create")
    parser.add_argument("--live", required=True, type=Path,
                        help="DVCLive folder to create (loss and IoU per epoch, for dvc plots)")
    parser.add_argument("--checkpoints", type=Path, default=None,
                        help="folder for the per-epoch checkpoints an interrupted run resumes "
                             "from (kept outside both engines' outputs, deleted on success; "
                             "damaged ones are renamed aside, never deleted)")
    args = parser.parse_args(argv)
    nproc = _requested_processes(args.params)
    if nproc > 1 and "WORLD_SIZE" not in os.environ:
        return launch(nproc, sys.argv[1:] if argv is None else list(argv))
    # Checked before training, not after: the first checkpoint comes after a whole epoch.
    checkpoint = args.checkpoints / "last.pt" if args.checkpoints else None
    return run_main("train", lambda: run(load_params(args.params), args.scheme, args.raw,
                                         args.masks, args.out, args.checkpoints, args.live,
                                         args.seed),
                    outputs=(args.out, args.live, checkpoint))


def launch(nproc: int, argv: list[str]) -> int:
    """Rerun this stage as `nproc` DDP processes under torchrun (the same command line for
    Snakemake and DVC: train.nproc in params.yaml decides)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={nproc}", "-m", "stages.train", *argv]
    return subprocess.call(command)


def _requested_processes(params_path: str) -> int:
    try:
        return int(load_params(params_path)["train"]["nproc"])
    except Exception:  # invalid params: run() reports them properly in this process
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
