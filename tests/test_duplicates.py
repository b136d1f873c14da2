"""Duplicates and leakage on the real sample: copies of train images planted into val are
found as exactly the pairs planted (same bytes, same pixels, resized or re-encoded), and the
160 untouched images give no pair."""
from __future__ import annotations

import shutil
from pathlib import Path

import imagehash
import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from conftest import ROOT, SAMPLE
from stages.lib import duplicates
from stages.lib.duplicates import PAIR_COLUMNS

# params.yaml's defaults: the values these tests find the planted copies with
DEFAULTS = yaml.safe_load((ROOT / "params.yaml").read_text())["analyze"]["duplicates"]
HASH_SIZE, HASH_RADIUS = DEFAULTS["hash_size"], DEFAULTS["hash_radius"]
LATENT_RADIUS = DEFAULTS["latent_radius"]
PLANTED = 990_000_000   # ids of planted copies: above every COCO id


def sample_paths() -> list[tuple[int, str, Path]]:
    return [(int(p.stem), split, p) for split in ("train", "val")
            for p in sorted((SAMPLE / f"{split}2017").glob("*.jpg"))]


def thumbnail_vector(path: Path) -> np.ndarray:
    """A cheap stand-in for a model latent: the 16 x 16 grey thumbnail, centred (its cosine
    distance is 1 - the thumbnails' correlation)."""
    with Image.open(path) as image:
        grey = np.asarray(image.convert("L").resize((16, 16), Image.BILINEAR), float).ravel()
    return grey - grey.mean()


def table(entries: list[tuple[int, str, Path]]) -> tuple[pd.DataFrame, np.ndarray]:
    rows = [{"image_id": i, "split": s, **duplicates.fingerprint(p, HASH_SIZE)}
            for i, s, p in entries]
    return pd.DataFrame(rows), np.array([thumbnail_vector(p) for _, _, p in entries])


@pytest.fixture(scope="module")
def sample() -> tuple[list, pd.DataFrame, np.ndarray]:
    entries = sample_paths()
    return (entries, *table(entries))


def with_copies(sample, copies: list[tuple[int, str, Path]]):
    entries, images, vectors = sample
    extra, extra_vectors = table(copies)
    return (pd.concat([images, extra], ignore_index=True),
            np.concatenate([vectors, extra_vectors]))


def train_path(sample, k: int) -> tuple[int, Path]:
    train = [(i, p) for i, s, p in sample[0] if s == "train"]
    return train[k]


def save_copy(source: Path, target: Path, scale: float = 1.0, **save) -> Path:
    with Image.open(source) as image:
        rgb = image.convert("RGB")
        if scale != 1.0:
            rgb = rgb.resize((round(rgb.width * scale), round(rgb.height * scale)),
                             Image.BILINEAR)
        rgb.save(target, **save)
    return target


def test_the_untouched_sample_has_no_pair_of_any_kind(sample):
    _, images, vectors = sample
    pairs = duplicates.find_pairs(images, HASH_SIZE, HASH_RADIUS, vectors, LATENT_RADIUS)
    assert list(pairs.columns) == PAIR_COLUMNS and len(pairs) == 0
    # The margin: the closest two of the 160 photographs are 16 bits apart (of 64).
    assert len(duplicates.near_hash_pairs(images, HASH_SIZE, 15)) == 0
    assert len(duplicates.near_hash_pairs(images, HASH_SIZE, 16)) > 0


def test_near_hash_pairs_are_the_hamming_pairs_counted_bit_by_bit(sample):
    _, images, _ = sample
    found = duplicates.near_hash_pairs(images, HASH_SIZE, 22)
    bits = np.array([imagehash.phash(Image.open(p).convert("RGB"), hash_size=HASH_SIZE)
                     .hash.ravel() for _, _, p in sample[0]])
    apart = (bits[:, None, :] != bits[None, :, :]).sum(-1)
    key = [(s, i) for i, s, _ in sample[0]]
    expected = {tuple(sorted([key[a], key[b]])) + (float(apart[a, b]),)
                for a, b in zip(*np.nonzero(np.triu(apart <= 22, k=1)))}
    got = {((r.split_a, r.image_id_a), (r.split_b, r.image_id_b), r.distance)
           for r in found.itertuples()}
    assert len(expected) > 20 and got == expected


def test_three_train_images_copied_into_val_are_exactly_the_leaks(sample, tmp_path):
    copies = []
    for k in range(3):
        image_id, path = train_path(sample, 5 * k)
        target = shutil.copyfile(path, tmp_path / f"{PLANTED + k}.jpg")
        copies.append((PLANTED + k, "val", target))
    val_id, val_path = next((i, p) for i, s, p in sample[0] if s == "val")
    twin = shutil.copyfile(val_path, tmp_path / "val_twin.jpg")   # within val: no leak
    images, vectors = with_copies(sample, copies + [(PLANTED + 9, "val", twin)])
    pairs = duplicates.find_pairs(images, HASH_SIZE, HASH_RADIUS, vectors, LATENT_RADIUS)
    train_ids = [train_path(sample, 5 * k)[0] for k in range(3)]
    expected = [(t, "train", PLANTED + k, "val", "exact_bytes", 0.0)
                for k, t in sorted(enumerate(train_ids), key=lambda kt: kt[1])]
    expected.append((val_id, "val", PLANTED + 9, "val", "exact_bytes", 0.0))
    assert [tuple(r) for r in pairs.itertuples(index=False)] == expected
    assert duplicates.leaked_val_ids(pairs) == [PLANTED, PLANTED + 1, PLANTED + 2]


def test_resized_reencoded_and_resaved_copies_are_found_by_kind(sample, tmp_path):
    sources = [train_path(sample, k) for k in (1, 2, 3, 4)]
    made = [save_copy(sources[0][1], tmp_path / "a.jpg", 0.7, quality=95),
            save_copy(sources[1][1], tmp_path / "b.jpg", quality=60),
            save_copy(sources[2][1], tmp_path / "c.jpg", 0.7, quality=60),
            save_copy(sources[3][1], tmp_path / "d.png")]    # other bytes, the same pixels
    copies = [(PLANTED + k, "val", path) for k, path in enumerate(made)]
    images, vectors = with_copies(sample, copies)
    pairs = duplicates.find_pairs(images, HASH_SIZE, HASH_RADIUS, vectors, LATENT_RADIUS)
    found = {(r.image_id_a, r.image_id_b): (r.kind, r.distance) for r in pairs.itertuples()}
    expected_kinds = ["near_hash", "near_hash", "near_hash", "exact_pixels"]
    assert set(found) == {(s[0], PLANTED + k) for k, s in enumerate(sources)}
    assert [found[(s[0], PLANTED + k)][0] for k, s in enumerate(sources)] == expected_kinds
    assert all(0 <= found[(s[0], PLANTED + k)][1] <= HASH_RADIUS for k, s in
               enumerate(sources[:3]))
    assert duplicates.leaked_val_ids(pairs) == [PLANTED + k for k in range(4)]
    assert duplicates.leaked_val_ids(pairs, kinds=("exact_bytes", "exact_pixels")) == [
        PLANTED + 3]


def test_latent_neighbours_alone_find_the_altered_copies(sample, tmp_path):
    sources = [train_path(sample, k) for k in (6, 7)]
    made = [save_copy(sources[0][1], tmp_path / "a.jpg", 0.7, quality=95),
            save_copy(sources[1][1], tmp_path / "b.jpg", 0.7, quality=60)]
    images, vectors = with_copies(sample, [(PLANTED + k, "val", p) for k, p in enumerate(made)])
    pairs = duplicates.near_latent_pairs(images, vectors, LATENT_RADIUS)
    assert [(r.image_id_a, r.split_a, r.image_id_b, r.split_b, r.kind) for r in
            pairs.itertuples()] == [(s[0], "train", PLANTED + k, "val", "near_latent")
                                    for k, s in enumerate(sources)]
    assert (pairs["distance"] < 0.002).all()
    # a latent match alone is no leak (distinct photos reach it too); asked for, it counts
    assert duplicates.leaked_val_ids(pairs) == []
    assert duplicates.leaked_val_ids(pairs, duplicates.KINDS) == [PLANTED, PLANTED + 1]


def test_hash_bits_unpack_the_perceptual_hash_of_imagehash(sample):
    _, images, _ = sample
    path = sample[0][0][2]
    bits = duplicates.hash_bits(images["phash"], HASH_SIZE * HASH_SIZE)
    assert bits.shape == (160, 64)
    expected = imagehash.phash(Image.open(path).convert("RGB"), hash_size=HASH_SIZE).hash
    assert np.array_equal(bits[0], expected.ravel())


def test_the_pixel_digest_sees_the_grid_not_the_bytes(tmp_path):
    flat = np.full((4, 6, 3), 7, np.uint8)
    Image.fromarray(flat).save(tmp_path / "a.png")
    Image.fromarray(flat).save(tmp_path / "b.png", compress_level=0)
    Image.fromarray(flat.reshape(6, 4, 3)).save(tmp_path / "c.png")
    a, b, c = (duplicates.fingerprint(tmp_path / n, HASH_SIZE) for n in ("a.png", "b.png",
                                                                          "c.png"))
    assert a["sha256"] != b["sha256"] and a["pixel_sha256"] == b["pixel_sha256"]
    assert c["pixel_sha256"] != a["pixel_sha256"]   # the same bytes of pixels, other shape


def test_latent_vectors_must_match_the_images():
    images = pd.DataFrame({"image_id": [1, 2], "split": ["val", "val"]})
    with pytest.raises(ValueError, match="3 vectors for 2 images"):
        duplicates.near_latent_pairs(images, np.ones((3, 4)), 0.1)


def test_cosine_distance_by_hand_and_zero_vectors_pair_with_nothing():
    images = pd.DataFrame({"image_id": [1, 2, 3, 4], "split": ["val", "train", "val", "train"]})
    vectors = np.array([[1.0, 0.0], [0.0, 0.0], [0.0, 0.0], [0.99, 0.141]])
    pairs = duplicates.near_latent_pairs(images, vectors, 0.02)
    assert [tuple(r) for r in pairs.itertuples(index=False)][0][:5] == (4, "train", 1, "val",
                                                                         "near_latent")
    assert len(pairs) == 1   # the two zero vectors have no direction: no pair
    assert pairs["distance"].iloc[0] == pytest.approx(1 - 0.99 / np.hypot(0.99, 0.141),
                                                      abs=1e-6)


def test_counts_by_kind_and_split_cover_every_cell_and_refuse_unknown_ones():
    """Hand-made pairs: each cell counted, zeros kept for every kind and split pair, an empty
    table all zeros; a split pair or kind find_pairs never writes is refused by name."""
    pairs = pd.DataFrame(
        [(1, "train", 2, "train", "exact_bytes", 0.0), (3, "train", 9, "val", "exact_bytes", 0.0),
         (4, "train", 8, "val", "exact_bytes", 0.0), (7, "val", 8, "val", "near_hash", 3.0),
         (5, "train", 7, "val", "near_latent", 0.001)], columns=PAIR_COLUMNS)
    zero = {"train-train": 0, "val-val": 0, "train-val": 0}
    assert duplicates.counts_by_kind_and_split(pairs) == {
        "exact_bytes": {"train-train": 1, "val-val": 0, "train-val": 2}, "exact_pixels": zero,
        "near_hash": {**zero, "val-val": 1}, "near_latent": {**zero, "train-val": 1}}
    empty = duplicates.counts_by_kind_and_split(pd.DataFrame(columns=PAIR_COLUMNS))
    assert empty == {k: zero for k in duplicates.KINDS}
    with pytest.raises(ValueError, match=r"^a pair of val-train: expected one of "):
        duplicates.counts_by_kind_and_split(pairs.iloc[[1]].assign(split_a="val",
                                                                   split_b="train"))
    with pytest.raises(ValueError, match=r"^a pair of near_colour: expected one of exact_bytes"):
        duplicates.counts_by_kind_and_split(pairs.assign(kind="near_colour"))
