"""infer: timing with the warm-up left out, the layout of the latent vectors, and a small
stage run on the real sample (download -> masks -> train 1 epoch -> infer at 64 px)."""
from __future__ import annotations

import json
import logging
import os
import re
import statistics
import subprocess
import sys
import threading
import time
import warnings
import weakref
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from PIL import Image

from conftest import ROOT, SAMPLE, small_params
from damaged_files import DAMAGE, MODEL_REASONS, NOT_A_MODEL, damaged_model
from stages import download, infer, masks, train
from stages.lib.data import collate_inference
from stages.lib.io import json_safe
from stages.lib.model import SegNet, full_size_probs, pooled_latent

SCHEME = "person_car"
N_TRAIN, N_VAL, SIZE, INFER_BATCH = 8, 4, 64, 3
COLD_S = 0.5  # the stage run's first forward pass sleeps this long
OLD_TIMING_KEYS = {"images", "device", "batch_size", "latency_ms", "wall_s", "throughput_img_s"}

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ---------------------------------------------------------------- timing_summary

def test_timing_summary_hand_checked():
    timing = infer.timing_summary([0.010, 0.020, 0.030, 0.100], wall_s=2.0, device="cpu",
                                  batch_size=2, image_size=128, warmup_batches=1,
                                  torch_threads=1)
    assert set(timing) >= OLD_TIMING_KEYS | {"image_size", "warmup_batches",
                                             "latency_definition"}
    assert (timing["images"], timing["device"], timing["batch_size"]) == (4, "cpu", 2)
    assert (timing["image_size"], timing["warmup_batches"], timing["torch_threads"]) == (128, 1, 1)
    lat = timing["latency_ms"]
    assert set(lat) == {"total", "mean", "variance", "median"}
    # ms 10, 20, 30, 100: mean 40; squared deviations 900+400+100+3600 = 5000, /4 (population)
    assert lat["total"] == pytest.approx(160)
    assert lat["mean"] == pytest.approx(40)
    assert lat["variance"] == pytest.approx(1250)
    assert lat["median"] == pytest.approx(25)
    assert timing["wall_s"] == 2.0 and timing["throughput_img_s"] == pytest.approx(2.0)
    for key in ("latency_definition", "warmup_definition", "throughput_definition"):
        assert isinstance(timing[key], str) and len(timing[key]) > 40, key
    assert "1 batch" in timing["warmup_definition"]
    json.dumps(json_safe(timing), allow_nan=False)  # what write_json does


def test_timing_summary_odd_count_median_and_zero_wall():
    timing = infer.timing_summary([0.003, 0.001, 0.002], wall_s=0.0, device="cuda:0",
                                  batch_size=8)
    assert timing["latency_ms"]["median"] == pytest.approx(2)
    assert timing["latency_ms"]["variance"] == pytest.approx(2 / 3)
    assert timing["throughput_img_s"] is None


# ---------------------------------------------------------------- warm-up, with a fake clock

class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class FakeModel:
    """forward_with_latents advances the clock: COLD seconds on the first call, WARM after.
    Features have 7, 1 and 4 channels (not a SegNet's, so nothing can be hard-coded)."""
    COLD, WARM = 1000.0, 6.0

    def __init__(self, clock: FakeClock):
        self.clock, self.calls = clock, []

    def forward_with_latents(self, images):
        self.calls.append(images[:, 0, 0, 0].tolist())
        self.clock.now += self.COLD if len(self.calls) == 1 else self.WARM
        n = images.shape[0]
        base = images[:, :1, :4, :4]
        feats = [base.expand(n, c, 4, 4) * (k + 1) for k, c in enumerate((7, 1, 4))]
        logits = torch.cat([base, -base, base * 0], dim=1)  # 3 classes at 4x4
        return logits, feats


def _batches(sizes: list[int]) -> list[dict]:
    """Images whose first pixel is their dataset index; ground truth and size per image."""
    batches, index = [], 0
    for size in sizes:
        items = []
        for _ in range(size):
            image = torch.rand(3, 4, 4)
            image[0, 0, 0] = index
            gt = torch.zeros(6, 5, dtype=torch.uint8)
            items.append({"index": index, "image": image, "gt": gt, "size": (6, 5)})
            index += 1
        batches.append(collate_inference(items))
    return batches


def _run_fake(warmup_batches: int, consumer_s: float = 0.5):
    clock = FakeClock()
    model = FakeModel(clock)
    inference = infer.TimedInference(model, torch.device("cpu"), warmup_batches, clock=clock)
    predictions = []
    for p in inference(_batches([2, 2, 1])):
        clock.now += consumer_s  # scoring and writing: in wall_s, not in latency
        predictions.append(p)
    return inference, model, predictions


def test_warm_up_batch_runs_untimed_and_every_image_is_timed_after():
    inference, model, predictions = _run_fake(warmup_batches=1)
    # one untimed pass over batch 0, then batches 0, 1, 2 timed
    assert model.calls == [[0, 1], [0, 1], [2, 3], [4]]
    assert [p.index for p in predictions] == [0, 1, 2, 3, 4]
    # the batch's forward time shared by its images; the cold first call is in none of them
    assert inference.latencies_s == pytest.approx([3, 3, 3, 3, 6])
    assert [p.latency_s for p in predictions] == inference.latencies_s
    assert inference.wall_s == pytest.approx(3 * FakeModel.WARM + 5 * 0.5)
    timing = infer.timing_summary(inference.latencies_s, inference.wall_s, "cpu", 2,
                                  warmup_batches=inference.warmup_batches)
    assert timing["images"] == 5 and timing["warmup_batches"] == 1
    # ms 3000 x4, 6000: mean 3600, variance (4 * 600^2 + 2400^2) / 5 = 1 440 000, median 3000
    assert timing["latency_ms"] == pytest.approx(
        {"total": 18000, "mean": 3600, "variance": 1_440_000, "median": 3000})
    assert timing["throughput_img_s"] == pytest.approx(5 / 20.5)


def test_without_warm_up_the_cold_call_is_timed():
    """The contrast that shows the test above can fail: no warm-up, cold call counted."""
    inference, model, _ = _run_fake(warmup_batches=0)
    assert model.calls == [[0, 1], [2, 3], [4]]
    assert inference.latencies_s == pytest.approx([500, 500, 3, 3, 6])


def test_predictions_stream_one_sample_at_a_time():
    clock = FakeClock()
    model = FakeModel(clock)
    stream = infer.TimedInference(model, torch.device("cpu"), clock=clock)(_batches([2, 2, 1]))
    first = next(stream)
    assert len(model.calls) == 2          # warm-up and batch 0 only: nothing read ahead
    assert first.log_probs.shape == (3, 6, 5) and first.pred.shape == (6, 5)
    assert first.pred.dtype == torch.uint8 and first.gt.shape == (6, 5)
    assert torch.allclose(first.log_probs.exp().sum(0), torch.ones(6, 5))
    assert torch.equal(first.pred, first.log_probs.argmax(0).to(torch.uint8))
    assert first.confidence == pytest.approx(float(first.log_probs.exp().max(0).values.mean()))
    gone = weakref.ref(first.log_probs)
    del first
    next(stream)
    next(stream)
    assert gone() is None                 # nothing keeps the full-size maps of past samples
    assert len(list(stream)) == 2


def test_warm_up_reads_each_batch_once_so_one_shot_iterators_work():
    """Warm-up repeats the forward only: a DataLoader is iterated once (no second decode)."""
    clock = FakeClock()
    model = FakeModel(clock)
    reads = []

    def one_shot():
        for batch in _batches([2, 2, 1]):
            reads.append(batch["index"])
            yield batch

    predictions = list(infer.TimedInference(model, torch.device("cpu"), clock=clock)(one_shot()))
    assert reads == [[0, 1], [2, 3], [4]]
    assert model.calls == [[0, 1], [0, 1], [2, 3], [4]]
    assert [p.index for p in predictions] == [0, 1, 2, 3, 4]


def test_overlapped_keeps_order_and_bounds_work_in_flight():
    consumed, gaps = [], []

    def work(item):
        time.sleep(0.05 if item % 3 == 0 else 0)  # uneven work must not reorder results
        return item * 10

    def items():
        for i in range(12):
            gaps.append(i - len(consumed))  # handed out but not yet returned to the caller
            yield i

    for result in infer.overlapped(work, items()):
        consumed.append(result)
    assert consumed == [10 * i for i in range(12)]
    assert max(gaps) == infer.IN_FLIGHT  # never more than IN_FLIGHT maps waiting


def test_overlapped_with_several_writer_threads_keeps_order():
    seen_threads = set()

    def work(item):
        seen_threads.add(threading.get_ident())
        time.sleep(0.02 * (item % 4 == 0))  # slow items finish after later fast ones
        return item

    assert list(infer.overlapped(work, iter(range(40)), threads=3, in_flight=9)) == list(range(40))
    assert len(seen_threads) > 1


def test_overlapped_raises_the_work_error():
    def work(item):
        if item == 2:
            raise ValueError("bad sample 2")
        return item

    with pytest.raises(ValueError, match="bad sample 2"):
        list(infer.overlapped(work, iter(range(5))))


def test_fake_latents_and_layout():
    inference, _, predictions = _run_fake(warmup_batches=1)
    names, slices = inference.layout
    assert names == ["bottleneck", "decoder1", "decoder2"]
    assert slices.tolist() == [[0, 7], [7, 8], [8, 12]]
    for p in predictions:
        assert p.latent.shape == (12,)
        pixel = float(p.latent[0])
        for k, (start, stop) in enumerate(slices):
            assert np.allclose(p.latent[start:stop], pixel * (k + 1))


# ---------------------------------------------------------------- layout of a real SegNet

@torch.no_grad()
def test_latent_layout_of_segnet_matches_pooled_latent():
    _, features = SegNet(3).eval().forward_with_latents(torch.randn(2, 3, 64, 96))
    latent = pooled_latent(features)
    names, slices = infer.latent_layout(features)
    assert names == ["bottleneck", "decoder1", "decoder2", "decoder3", "decoder4"]
    assert slices.dtype == np.int64 and slices.shape == (5, 2)
    assert (slices[:, 1] - slices[:, 0]).tolist() == [320, 512, 256, 128, 64]
    assert slices[0, 0] == 0 and slices[-1, 1] == latent.shape[1] == 1280
    assert (slices[1:, 0] == slices[:-1, 1]).all()          # contiguous, in order
    for feature, (start, stop) in zip(features, slices):
        assert torch.allclose(latent[:, start:stop], feature.mean(dim=(2, 3)))


# ---------------------------------------------------------------- small stage run

@pytest.fixture(scope="module")
def chain(tmp_path_factory, default_params):
    """download 8 train / 4 val images of the sample, masks, train 1 epoch at 64 px, infer in
    batches of 3 (so 2 batches). The model's first forward pass sleeps COLD_S: the warm-up
    must keep that out of every latency."""
    root = tmp_path_factory.mktemp("infer_chain")
    base = json.loads(json.dumps(default_params))
    base["data"]["base_url"] = str(SAMPLE)
    params = small_params(base, train=N_TRAIN, val=N_VAL, size=SIZE, epochs=1)
    params["train"]["device"] = params["infer"]["device"] = "cpu"
    params["infer"]["batch_size"] = INFER_BATCH
    p = root / "params.yaml"
    p.write_text(yaml.safe_dump(params, sort_keys=False))
    paths = {"raw": root / "raw", "masks": root / "masks", "model": root / "model",
             "pred": root / "pred", "params": params}
    calls = []
    real_forward = SegNet.forward_with_latents

    def slow_first_forward(self, x):
        calls.append(x.shape[0])
        if len(calls) == 1:
            time.sleep(COLD_S)
        return real_forward(self, x)

    deterministic = torch.are_deterministic_algorithms_enabled()
    codes = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)  # DVCLive writes relative to the working directory
        codes["download"] = download.main(["--params", str(p), "--out", str(paths["raw"])])
        codes["masks"] = masks.main(["--params", str(p), "--scheme", SCHEME, "--raw",
                                     str(paths["raw"]), "--out", str(paths["masks"])])
        codes["train"] = train.main(["--params", str(p), "--scheme", SCHEME, "--seed", "0", "--raw",
                                     str(paths["raw"]), "--masks", str(paths["masks"]),
                                     "--out", str(paths["model"]),
                                     "--live", str(root / "live")])
        mp.setattr(SegNet, "forward_with_latents", slow_first_forward)
        codes["infer"] = infer.main(["--params", str(p), "--model", str(paths["model"]),
                                     "--raw", str(paths["raw"]), "--masks", str(paths["masks"]),
                                     "--out", str(paths["pred"])])
    torch.use_deterministic_algorithms(deterministic)  # train.run switches it on globally
    paths["codes"], paths["forward_calls"] = codes, calls
    return paths



def test_stage_exit_codes(chain):
    assert chain["codes"] == {"download": 0, "masks": 0, "train": 0, "infer": 0}


def test_stage_timing_json(chain):
    timing = json.loads((chain["pred"] / "timing.json").read_text())
    assert set(timing) >= OLD_TIMING_KEYS | {"image_size", "warmup_batches", "latency_definition",
                                             "warmup_definition", "throughput_definition"}
    assert (timing["images"], timing["device"], timing["batch_size"]) == (N_VAL, "cpu",
                                                                         INFER_BATCH)
    assert timing["image_size"] == SIZE                  # from the checkpoint
    assert timing["warmup_batches"] == 1
    assert timing["torch_threads"] == 1
    # warm-up: batch of 3, then the timed batches of 3 and 1; then the 8 train images in
    # batches of 3, 3 and 2 (embedded batch by batch, never one image at a time)
    assert chain["forward_calls"] == [3, 3, 1, 3, 3, 2]
    per_image = pd.read_csv(chain["pred"] / "samples.csv")["latency_ms"]
    assert (per_image > 0).all()
    assert per_image.max() < COLD_S * 1000               # the cold sleep is in no latency
    lat = timing["latency_ms"]
    assert lat["total"] == pytest.approx(per_image.sum(), rel=1e-9)
    assert lat["median"] == pytest.approx(statistics.median(per_image), rel=1e-9)
    assert lat["variance"] == pytest.approx(statistics.pvariance(per_image), rel=1e-6)
    assert lat["total"] <= timing["wall_s"] * 1000
    assert timing["throughput_img_s"] == pytest.approx(N_VAL / timing["wall_s"], rel=1e-9)
    embedding = timing["train_embedding"]
    assert set(embedding) == {"images", "wall_s", "throughput_img_s", "definition"}
    assert embedding["images"] == N_TRAIN and embedding["wall_s"] > 0
    assert embedding["throughput_img_s"] == pytest.approx(N_TRAIN / embedding["wall_s"],
                                                          rel=1e-9)


def test_stage_latents_layout(chain):
    table = pd.read_csv(chain["pred"] / "samples.csv")
    with np.load(chain["pred"] / "latents.npz", allow_pickle=False) as npz:
        assert sorted(npz.files) == ["image_ids", "latents", "layer_names", "layer_slices"]
        ids, latents = npz["image_ids"], npz["latents"]
        names, slices = npz["layer_names"], npz["layer_slices"]
    assert ids.tolist() == table["image_id"].tolist()
    assert names.dtype.kind == "U"
    assert names.tolist() == ["bottleneck", "decoder1", "decoder2", "decoder3", "decoder4"]
    assert slices.shape == (5, 2) and slices.dtype.kind == "i"
    assert slices.tolist() == [[0, 320], [320, 832], [832, 1088], [1088, 1216], [1216, 1280]]
    assert latents.shape == (N_VAL, 1280) and latents.dtype == np.float32
    assert np.isfinite(latents).all()
    # decoder blocks end in a ReLU: their pooled activations are never negative
    for name, (start, stop) in zip(names, slices):
        if name.startswith("decoder"):
            assert (latents[:, start:stop] >= 0).all(), name


def test_stage_latents_match_a_fresh_forward_pass(chain):
    """Row i of latents.npz is the pooled latent of val image i, batch by batch."""
    from stages.lib.data import InferenceDataset, list_samples
    from stages.lib.model import load_trained

    model, meta = load_trained(chain["model"] / "model.pt", torch.device("cpu"))
    samples = list_samples(chain["raw"], chain["masks"], "val")
    dataset = InferenceDataset(samples, meta["image_size"], meta["mean"], meta["std"])
    with torch.inference_mode():
        images = torch.stack([dataset[i]["image"] for i in range(len(dataset))])
        _, features = model.forward_with_latents(images)
        expected = pooled_latent(features).numpy()
    with np.load(chain["pred"] / "latents.npz") as npz:
        latents, slices = npz["latents"], npz["layer_slices"]
    assert np.allclose(latents, expected, atol=1e-4)
    bottleneck = slices[0]
    assert np.allclose(latents[:, bottleneck[0]:bottleneck[1]],
                       features[0].mean(dim=(2, 3)).numpy(), atol=1e-4)


def test_stage_train_latents_are_each_train_images_own_forward_pass(chain):
    """latents_train.npz: latents.npz's format for the train split, row i the pooled latent
    of train image i (by id) from its own one-image forward pass; no PNG or table of it."""
    from stages.lib.data import InferenceDataset, list_samples
    from stages.lib.model import load_trained

    assert sorted(p.name for p in chain["pred"].iterdir()) == [
        "latents.npz", "latents_train.npz", "samples.csv", "timing.json", "val"]
    assert len(list((chain["pred"] / "val").iterdir())) == N_VAL
    model, meta = load_trained(chain["model"] / "model.pt", torch.device("cpu"))
    listed = json.loads((chain["raw"] / "annotations" / "instances_train.json")
                               .read_text())["images"]
    samples = list_samples(chain["raw"], chain["masks"], "train")
    dataset = InferenceDataset(samples, meta["image_size"], meta["mean"], meta["std"])
    with torch.inference_mode():
        expected = np.concatenate([pooled_latent(model.forward_with_latents(
            dataset[i]["image"][None])[1]).numpy() for i in range(len(dataset))])
    with np.load(chain["pred"] / "latents_train.npz", allow_pickle=False) as npz, \
            np.load(chain["pred"] / "latents.npz", allow_pickle=False) as val:
        assert sorted(npz.files) == ["image_ids", "latents", "layer_names", "layer_slices"]
        assert npz["image_ids"].tolist() == sorted(image["id"] for image in listed)
        assert len(listed) == N_TRAIN
        assert npz["latents"].shape == (N_TRAIN, 1280) and npz["latents"].dtype == np.float32
        np.testing.assert_allclose(npz["latents"], expected, atol=1e-4)
        assert npz["layer_names"].tolist() == val["layer_names"].tolist()
        assert npz["layer_slices"].tolist() == val["layer_slices"].tolist()


def test_stage_loss_is_cross_entropy_of_a_fresh_forward_pass(chain):
    """samples.csv's loss is torch's cross_entropy (ignore_index=255, mean over the kept
    pixels) of the model's logits, resized bilinearly to the mask's size, on each val image;
    its confidence the mean max-softmax of the same logits (not only a value in [1/3, 1])."""
    import torch.nn.functional as F

    from stages.lib.data import InferenceDataset, list_samples
    from stages.lib.model import load_trained

    model, meta = load_trained(chain["model"] / "model.pt", torch.device("cpu"))
    samples = list_samples(chain["raw"], chain["masks"], "val")
    dataset = InferenceDataset(samples, meta["image_size"], meta["mean"], meta["std"])
    table = pd.read_csv(chain["pred"] / "samples.csv").set_index("image_id")
    assert len(dataset) == N_VAL
    with torch.inference_mode():
        for i in range(len(dataset)):
            item = dataset[i]
            logits, _ = model.forward_with_latents(item["image"][None])
            big = F.interpolate(logits.float(), size=tuple(item["gt"].shape), mode="bilinear",
                                align_corners=False)
            expected = F.cross_entropy(big, item["gt"][None].long(), ignore_index=255)
            assert table.loc[samples[i].image_id, "loss"] == pytest.approx(float(expected),
                                                                         rel=1e-4)
            # confidence: the mean over all pixels of the largest softmax probability
            confidence = big.softmax(1).max(1).values.mean()
            assert table.loc[samples[i].image_id, "confidence"] == pytest.approx(
                float(confidence), rel=1e-4)


def test_sample_scores_hand_computed():
    """Three pixels, two classes, gt [0, 1, ignore]: pixel 1 has logits (0, 0), p = 1/2;
    pixel 2 has (0, ln 3), p(class 1) = 3/4; pixel 3 is ignored whatever its logits.
    Loss = (ln 2 + ln 4/3) / 2 = ln(8/3) / 2; both predictions: pixel 1 ties -> argmax 0."""
    import math

    logits = torch.tensor([[[0.0, 0.0, 0.0]], [[0.0, math.log(3), 10.0]]], dtype=torch.float64)
    log_probs = logits.log_softmax(0)
    gt = torch.tensor([[0, 1, 255]], dtype=torch.uint8)
    pred = torch.tensor([[0, 1, 1]], dtype=torch.uint8)
    row = infer.sample_scores(log_probs, pred, gt, ["background", "person"])
    assert row["loss"] == pytest.approx(math.log(8 / 3) / 2, rel=1e-12)
    assert row["pixel_accuracy"] == 1.0
    # confidence: mean max-softmax over all three pixels, ignored one included
    p3 = math.exp(10) / (1 + math.exp(10))
    assert row["confidence"] == pytest.approx((0.5 + 0.75 + p3) / 3, rel=1e-12)
    assert (row["iou_background"], row["iou_person"]) == (1.0, 1.0)


def test_sample_scores_of_an_all_ignore_mask_are_nan_not_an_error():
    """No labelled pixel: the loss and pixel accuracy have no pixel to average over (NaN,
    like the IoUs of classes absent from both maps), rather than a division by zero."""
    log_probs = torch.zeros(2, 1, 3, dtype=torch.float64).log_softmax(0)
    gt = torch.full((1, 3), 255, dtype=torch.uint8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no numpy 0/0 RuntimeWarning in the stage's log
        row = infer.sample_scores(log_probs, torch.zeros(1, 3, dtype=torch.uint8), gt,
                                  ["background", "person"])
    assert set(row) == {"loss", "pixel_accuracy", "confidence", "miou", "iou_background",
                        "iou_person"}
    assert all(np.isnan(row[k]) for k in ("loss", "pixel_accuracy", "miou", "iou_background",
                                          "iou_person"))
    assert row["confidence"] == pytest.approx(0.5, rel=1e-12)


def test_sample_scores_refuses_a_prediction_outside_the_classes():
    """A prediction of class 2 with two class names is a model/scheme mismatch: the scores
    must not be computed over a wider matrix that silently drops it."""
    log_probs = torch.zeros(2, 1, 2, dtype=torch.float64).log_softmax(0)
    gt = torch.tensor([[0, 1]], dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"^label values \[2\] outside 0\.\.1$"):
        infer.sample_scores(log_probs, torch.tensor([[0, 2]], dtype=torch.uint8), gt,
                            ["background", "person"])


def test_full_size_probs_by_hand():
    """Logits of one 1x2 image resized to 2x4 (half-pixel bilinear, as F.interpolate with
    align_corners=False): along a row, output pixel i samples the input at x = (i + .5) / 2
    - .5 = -.25, .25, .75, 1.25, clamped to [0, 1], so class 0's logits (0, 4) become
    (0, 1, 3, 4); class 1 stays 0. Then the log-softmax over the classes, by hand:
    log p0 = x - ln(e^x + 1), log p1 = -ln(e^x + 1). Half-precision logits come back float32."""
    logits = torch.tensor([[[0.0, 4.0]], [[0.0, 0.0]]], dtype=torch.float16)
    out = full_size_probs(logits, (2, 4), log=True)
    assert out.dtype == torch.float32 and out.shape == (2, 2, 4)
    x = np.array([0.0, 1.0, 3.0, 4.0])
    expected = np.stack([np.tile(x - np.log(np.exp(x) + 1), (2, 1)),
                         np.tile(-np.log(np.exp(x) + 1), (2, 1))])
    np.testing.assert_allclose(out.numpy(), expected, rtol=0, atol=1e-6)
    # without log: the probabilities themselves, e^x / (e^x + 1) and 1 / (e^x + 1)
    probs = full_size_probs(logits, (2, 4))
    assert probs.dtype == torch.float32
    np.testing.assert_allclose(probs.numpy(), np.exp(expected), rtol=0, atol=1e-6)

def test_stage_miou_is_the_mean_of_the_defined_ious_of_each_image(chain):
    """samples.csv's miou, by hand from the PNGs on disk: per class, intersection over union
    of the predicted and labelled pixels (label 255 left out), classes in neither left out,
    then the plain mean; and equal to the mean of the row's own iou_* columns (NaN skipped)."""
    table = pd.read_csv(chain["pred"] / "samples.csv")
    ious = table[[c for c in table.columns if c.startswith("iou_")]]
    assert len(table) == N_VAL and ious.shape[1] == 3
    for row in table.itertuples(index=False):
        stem = f"{row.stem:012d}"
        gt = np.asarray(Image.open(chain["masks"] / "val" / f"{stem}.png"))
        pred = np.asarray(Image.open(chain["pred"] / "val" / f"{stem}.png"))
        keep = gt != 255
        by_class = []
        for k in range(3):
            union = np.sum(((gt == k) | (pred == k)) & keep)
            if union:
                by_class.append(np.sum((gt == k) & (pred == k) & keep) / union)
        assert row.miou == pytest.approx(sum(by_class) / len(by_class), rel=1e-12)
    np.testing.assert_allclose(table["miou"], ious.mean(axis=1, skipna=True), rtol=1e-12)
    assert list(table.columns).index("miou") == list(table.columns).index("confidence") + 1


def test_image_miou_skips_undefined_classes():
    assert infer.image_miou(np.array([0.5, np.nan, 0.25])) == 0.375
    assert np.isnan(infer.image_miou(np.array([np.nan, np.nan])))


# ---------------------------------------------------------------- damaged model.pt

def _infer_dirs(tmp_path, bad: bytes, default_params) -> tuple[list[str], Path]:
    """A model folder holding `bad` as model.pt, empty raw and masks folders, params."""
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "model.pt").write_bytes(bad)
    for folder in ("raw", "masks"):
        (tmp_path / folder).mkdir()
    params = json.loads(json.dumps(default_params))
    params["infer"]["device"] = "cpu"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    argv = ["--params", str(tmp_path / "params.yaml"), "--model", str(tmp_path / "model"),
            "--raw", str(tmp_path / "raw"), "--masks", str(tmp_path / "masks"),
            "--out", str(tmp_path / "pred")]
    return argv, tmp_path / "model" / "model.pt"


def _tree(root: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(root)): p.read_bytes() if p.is_file() else None
            for p in sorted(root.rglob("*"))}


@pytest.mark.parametrize("kind", DAMAGE + NOT_A_MODEL)
def test_damaged_model_exits_2_with_one_line_naming_it(tmp_path, caplog, default_params, kind):
    argv, model_pt = _infer_dirs(tmp_path, damaged_model(kind, tmp_path / "pwned"), default_params)
    before = _tree(tmp_path)
    assert infer.main(argv) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "\n" not in errors[0]
    assert re.fullmatch(rf"{re.escape(str(model_pt))}: not a PyTorch state dict saved by "
                        rf"segflow's train stage \({MODEL_REASONS[kind]}\)", errors[0])
    assert _tree(tmp_path) == before  # nothing written, model.pt as it was


def test_hostile_pickle_as_model_is_one_stderr_line_from_the_command(tmp_path, default_params):
    """The whole command, as the engines run it: exit code 2, one line, no traceback."""
    argv, model_pt = _infer_dirs(tmp_path, damaged_model("os_system_pickle", tmp_path / "pwned"),
                                 default_params)
    result = subprocess.run([sys.executable, "-m", "stages.infer", *argv], cwd=ROOT,
                            capture_output=True, text=True, env={**os.environ,
                                                                 "OMP_NUM_THREADS": "1"})
    assert result.returncode == 2, result.stderr[-3000:]
    line, = result.stderr.splitlines()
    assert line.endswith(f" infer ERROR {model_pt}: not a PyTorch state dict saved by segflow's "
                         "train stage (UnpicklingError: Trying to load unsupported GLOBAL "
                         "posix.system whose module posix is blocked)")
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "pred").exists()


def test_analyze_with_a_damaged_model_exits_2_naming_it(chain, tmp_path, caplog):
    """analyze loads model.pt through the same function: the same one line."""
    from stages import analyze

    model_pt = tmp_path / "model" / "model.pt"
    model_pt.parent.mkdir()
    model_pt.write_bytes(damaged_model("truncated", tmp_path / "pwned"))
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(chain["params"], sort_keys=False))
    code = analyze.main(["--params", str(params), "--predictions", str(chain["pred"]),
                         "--masks", str(chain["masks"]), "--model", str(model_pt.parent),
                         "--raw", str(chain["raw"]), "--out", str(tmp_path / "analysis")])
    assert code == 2
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == [f"{model_pt}: not a PyTorch state dict saved by segflow's train stage "
                      "(RuntimeError: PytorchStreamReader failed reading zip archive: failed "
                      "finding central directory)"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "params.yaml"]
