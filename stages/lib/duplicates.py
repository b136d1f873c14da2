"""Duplicates and leakage between the splits: could the data the model saw overlap the data
it is scored on?

Four kinds of pair, strongest first (a pair is listed once, under the first kind that finds
it, so an exact copy is not also listed as a near one):
  exact_bytes   the same file bytes: download's manifest.json records each image's sha256
  exact_pixels  the same decoded RGB pixels under other bytes (re-saved, other metadata)
  near_hash     perceptual hashes (imagehash.phash: DCT of a 32 x 32 grey thumbnail) at most
                `hash_radius` bits apart: resized, re-encoded or slightly edited copies
  near_latent   latent vectors at most `latent_radius` apart in cosine distance: the same
                scene as the model sees it

Pairs are sought among all images at once, so a pair may lie within a split or across train
and val; only train-val pairs of the first three kinds leak (leaked_val_ids, LEAK_KINDS).
Nothing here loops over pairs in Python: exact kinds are a self-join on the digest, near
kinds a radius search of scikit-learn's NearestNeighbors (brute force in BLAS, in
memory-bounded chunks).

Memory per image, measured at 122,000 images (COCO 2017's train + val; synthetic hashes
and 50-dimensional vectors; peak of tracemalloc over the call): near_hash 77 MiB, 660 B per
image (the +-1 index is 256 B of it at hash_size 8, the rest the bits and hex strings),
72 s on 2 shared cores; near_latent 118 MiB, 1 kB per image at 50 dims, 49 s; the exact
kinds 0.04 s. At 12,200 images: 8 and 12 MiB. Memory grows linearly with the images (10x:
about 0.8 and 1.2 GiB), time quadratically (brute force: 10x is about 100x the time).
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import imagehash
import numpy as np
import pandas as pd
from PIL import Image
from sklearn.neighbors import NearestNeighbors

from stages.lib.embeddings import unit_vectors
from stages.lib.images import decode

KINDS = ("exact_bytes", "exact_pixels", "near_hash", "near_latent")
# The kinds that compare the photographs themselves: a val image with a train twin of one of
# these leaks. A latent match is the same scene as the model sees it, which distinct
# photographs reach too (on the sample, with params.yaml's model: a chef in a kitchen and a
# computer desk at cosine distance 0.012, nearer than most resized copies of one photo), so
# it is listed for a look, not taken as a copy: no metrics are recomputed over it.
LEAK_KINDS = ("exact_bytes", "exact_pixels", "near_hash")
PAIR_COLUMNS = ["image_id_a", "split_a", "image_id_b", "split_b", "kind", "distance"]
# the split pairs a pair's sides make: canonical() puts train before val
SPLIT_PAIRS = ("train-train", "val-val", "train-val")
DIGESTS = {"exact_bytes": "sha256", "exact_pixels": "pixel_sha256"}


def fingerprint(path: str | Path, hash_size: int) -> dict[str, str]:
    """What one image contributes to the search, from one read of its file: `sha256` of the
    bytes, `pixel_sha256` of the decoded RGB grid (its shape included, so two sizes of the
    same flat colour differ) and `phash`, the perceptual hash's hash_size^2 bits packed as
    hex. Decodes at full size: the pixel digest must see every pixel."""
    rgb, _ = decode(path)
    pixels = hashlib.sha256(np.asarray(rgb.shape, np.int64).tobytes())
    pixels.update(np.ascontiguousarray(rgb).tobytes())
    bits = imagehash.phash(Image.fromarray(rgb), hash_size=hash_size).hash.ravel()
    with open(path, "rb") as handle:   # hashlib, not stages.lib.fetch: no download code here
        digest = hashlib.file_digest(handle, "sha256").hexdigest()
    return {"sha256": digest, "pixel_sha256": pixels.hexdigest(),
            "phash": np.packbits(bits).tobytes().hex()}


def hash_bits(phash: pd.Series, n_bits: int) -> np.ndarray:
    """(N, n_bits) bool from fingerprint's hex strings, unpacked in one numpy call."""
    packed = np.frombuffer(bytes.fromhex("".join(phash)), np.uint8)
    return np.unpackbits(packed.reshape(len(phash), -1), axis=1)[:, :n_bits].astype(bool)


def canonical(images: pd.DataFrame) -> pd.DataFrame:
    """The images in the order pairs are written: by split, then id, so that a train-val
    pair always has train as its `a` side. Keeps `row`, each image's position in the input."""
    keyed = images.reset_index(drop=True).assign(row=np.arange(len(images)))
    return keyed.sort_values(["split", "image_id"], kind="stable").reset_index(drop=True)


def _pairs(images: pd.DataFrame, first: np.ndarray, second: np.ndarray, kind: str,
           distance: np.ndarray) -> pd.DataFrame:
    """Pair rows from positions into `images` (canonical order); keeps first < second."""
    keep = first < second
    a, b = images.iloc[first[keep]], images.iloc[second[keep]]
    return pd.DataFrame({"image_id_a": a["image_id"].to_numpy(), "split_a": a["split"].to_numpy(),
                         "image_id_b": b["image_id"].to_numpy(), "split_b": b["split"].to_numpy(),
                         "kind": kind, "distance": np.asarray(distance, float)[keep]},
                        columns=PAIR_COLUMNS)


def exact_pairs(images: pd.DataFrame, kind: str) -> pd.DataFrame:
    """Every pair of images sharing the digest of `kind` (exact_bytes: `sha256`,
    exact_pixels: `pixel_sha256`): a self-join on the digest, restricted to the digests that
    occur twice or more, so its cost is that of the duplicates, not of all pairs."""
    ordered = canonical(images)
    column = DIGESTS[kind]
    ordered = ordered.assign(position=np.arange(len(ordered)))
    repeated = ordered[ordered.duplicated(column, keep=False)][[column, "position"]]
    joined = repeated.merge(repeated, on=column, suffixes=("_a", "_b"))
    return _pairs(ordered, joined["position_a"].to_numpy(), joined["position_b"].to_numpy(),
                  kind, np.zeros(len(joined)))


def radius_pairs(vectors: np.ndarray, radius: float) -> tuple[np.ndarray, ...]:
    """(first, second, distance) of every pair of rows at most `radius` apart in Euclidean
    distance, each pair in both orders. NearestNeighbors' brute Euclidean radius search runs
    in scikit-learn's chunked reduction: a block of rows' distances at a time, only the hits
    kept."""
    if len(vectors) < 2:
        return np.array([], int), np.array([], int), np.array([])
    index = NearestNeighbors(radius=radius, algorithm="brute").fit(vectors)
    distances, neighbours = index.radius_neighbors(vectors)
    counts = np.fromiter((len(n) for n in neighbours), int, len(neighbours))
    first = np.repeat(np.arange(len(vectors)), counts)
    return first, np.concatenate(neighbours), np.concatenate(distances)


def near_hash_pairs(images: pd.DataFrame, hash_size: int, radius: int) -> pd.DataFrame:
    """Pairs whose perceptual hashes differ in at most `radius` bits (distance: the bits).
    The bits become +-1 floats, whose squared Euclidean distance is 4 x the Hamming
    distance: the same pairs as metric="hamming", by a BLAS product 16x faster than
    scikit-learn's Hamming loop (20k hashes: 0.9 s against 15 s).
    Memory per image: 4 bytes per bit in the index (256 B at hash_size 8), plus the bits
    and the hex strings (module docstring: 660 B in all, measured)."""
    ordered = canonical(images)
    signs = hash_bits(ordered["phash"], hash_size * hash_size).astype(np.float32) * 2 - 1
    # +0.5 bit: a float32 distance of exactly `radius` bits must not fall just outside
    first, second, distance = radius_pairs(signs, 2 * np.sqrt(radius + 0.5))
    bits = np.rint(distance ** 2 / 4)
    return _pairs(ordered, first, second, "near_hash", bits)


def near_latent_pairs(images: pd.DataFrame, vectors: np.ndarray,
                      radius: float) -> pd.DataFrame:
    """Pairs of images whose vectors (row i of `vectors` is row i of `images`; the caller
    picks the space, e.g. the model's pooled latents reduced by PCA) are at most `radius`
    apart in cosine distance; a zero vector has no direction and pairs with nothing.
    Memory per image: the unit vectors, D x 4 bytes (200 B at 50 dims)."""
    if len(vectors) != len(images):
        raise ValueError(f"{len(vectors)} vectors for {len(images)} images")
    ordered = canonical(images)
    unit, has_direction = unit_vectors(np.asarray(vectors)[ordered["row"].to_numpy()])
    kept = np.flatnonzero(has_direction)
    first, second, distance = radius_pairs(unit[kept], np.sqrt(2 * radius))
    return _pairs(ordered, kept[first], kept[second], "near_latent", distance ** 2 / 2)


def find_pairs(images: pd.DataFrame, hash_size: int, hash_radius: int,
               vectors: np.ndarray | None = None,
               latent_radius: float | None = None) -> pd.DataFrame:
    """All duplicate pairs among `images` (columns image_id, split, sha256, pixel_sha256,
    phash; one row per image of either split), each pair once under its strongest kind
    (KINDS order), sorted by kind, then the a and b sides. The latent kind only when
    `vectors` (one row per image) are given."""
    found = [exact_pairs(images, "exact_bytes"), exact_pairs(images, "exact_pixels"),
             near_hash_pairs(images, hash_size, hash_radius)]
    if vectors is not None:
        found.append(near_latent_pairs(images, vectors, latent_radius))
    pairs = pd.concat(found, ignore_index=True)
    pairs = pairs.drop_duplicates(["split_a", "image_id_a", "split_b", "image_id_b"])
    return pairs.sort_values(["kind", "split_a", "image_id_a", "split_b", "image_id_b"],
                             key=lambda c: c.map(KINDS.index) if c.name == "kind" else c,
                             kind="stable").reset_index(drop=True)


def counts_by_kind_and_split(pairs: pd.DataFrame) -> dict[str, dict[str, int]]:
    """{kind: {split pair: number of pairs}} over every kind and split pair, zeros included
    (summary.json's duplicates.by_kind_and_split, which the report tabulates as it is)."""
    split = pairs["split_a"].astype(str) + "-" + pairs["split_b"].astype(str)
    for found, known in ((split, SPLIT_PAIRS), (pairs["kind"].astype(str), KINDS)):
        unknown = sorted(set(found) - set(known))
        if unknown:
            raise ValueError(f"a pair of {unknown[0]}: expected one of {', '.join(known)}")
    table = pd.crosstab(pairs["kind"].astype(str), split).reindex(
        index=list(KINDS), columns=list(SPLIT_PAIRS), fill_value=0)
    return {k: {s: int(table.loc[k, s]) for s in SPLIT_PAIRS} for k in KINDS}


def leaked_val_ids(pairs: pd.DataFrame, kinds: tuple[str, ...] = LEAK_KINDS) -> list[int]:
    """The val images with a twin in train (a pair of one of `kinds` across the splits),
    sorted: the images to leave out when the metrics are recomputed without leakage."""
    across = pairs[(pairs["split_a"] == "train") & (pairs["split_b"] == "val")
                   & pairs["kind"].isin(kinds)]
    return sorted(int(i) for i in across["image_id_b"].unique())
