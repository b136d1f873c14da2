"""duplicates: analyze's duplicate search (stages/lib/duplicates.py) at COCO scale, and its
memory at full COCO 1x and 10x (issue 17: "at 82k + 40k images it must not be all-pairs in
Python ... show the memory at 1x and 10x").

Each kind of search runs on synthetic fingerprints in its own process, at 12,200 and
122,000 images (scale 1; a tenth and about all of COCO 2014's train + val): random sha256
and pixel digests, random perceptual hashes of `analyze.duplicates.hash_size`^2 bits and
random `analyze.pca_dims`-dimensional vectors, with one image in PLANT_EVERY a copy of the
one before it (same digests, its hash one bit off, its vector a little noise off), so the
search has pairs to find and the benchmark checks that it finds them. The figures: wall
time and tracemalloc's peak over the call (numpy and Python allocations; the input built
before it is not counted), and the growth of the process's peak RSS over the call. From the
larger run, memory is projected linearly to COCO 2014's 123,287 images and to 10x, time
quadratically for the near kinds (brute force, chunked) and linearly for the exact ones (a
self-join on the digest).
"""
from __future__ import annotations

import json
import sys
import time

from benchmarks.common import default_params, peak_mib, resident_mib, run_child

SIZES = (12_200, 122_000)
FULL_COCO = 82_783 + 40_504   # COCO 2014 train + val
PLANT_EVERY = 100
KINDS = ("exact", "near_hash", "near_latent")
HOW = {"exact": "exact_bytes + exact_pixels: self-join on the digest",
       "near_hash": "near_hash: +-1 bits, NearestNeighbors radius (brute, chunked)",
       "near_latent": "near_latent: unit vectors, NearestNeighbors radius (brute, chunked)"}


def synthetic(n: int, hash_size: int, dims: int):
    """Fingerprints and vectors of n images (two thirds train, as COCO's 82k/40k), every
    PLANT_EVERY-th a copy of the one before; also the number of planted pairs."""
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(0)
    n_bytes = max(1, hash_size * hash_size // 8)
    hashes = rng.integers(0, 256, size=(n, n_bytes), dtype=np.uint8)
    digests = rng.integers(0, 256, size=(n, 32), dtype=np.uint8)
    pixels = rng.integers(0, 256, size=(n, 32), dtype=np.uint8)
    vectors = rng.standard_normal((n, dims)).astype(np.float32)
    copies = np.arange(PLANT_EVERY, n, PLANT_EVERY)
    digests[copies], pixels[copies] = digests[copies - 1], pixels[copies - 1]
    hashes[copies] = hashes[copies - 1]
    hashes[copies, 0] ^= 1   # one bit off: near_hash, not exact
    vectors[copies] = vectors[copies - 1] + 0.01 * rng.standard_normal((len(copies), dims))
    images = pd.DataFrame({"image_id": np.arange(n),
                           "split": np.where(np.arange(n) % 3 == 2, "val", "train"),
                           "sha256": [d.tobytes().hex() for d in digests],
                           "pixel_sha256": [p.tobytes().hex() for p in pixels],
                           "phash": [h.tobytes().hex() for h in hashes]})
    return images, vectors, len(copies)


def child(kind: str, n: int, hash_size: int, hash_radius: int, latent_radius: float,
          dims: int) -> dict:
    import tracemalloc

    from stages.lib import duplicates

    images, vectors, planted = synthetic(n, hash_size, dims)
    searches = {
        "exact": lambda: [duplicates.exact_pairs(images, "exact_bytes"),
                          duplicates.exact_pairs(images, "exact_pixels")],
        "near_hash": lambda: [duplicates.near_hash_pairs(images, hash_size, hash_radius)],
        "near_latent": lambda: [duplicates.near_latent_pairs(images, vectors, latent_radius)]}
    before = resident_mib()
    tracemalloc.start()
    started, cpu = time.perf_counter(), time.process_time()
    found = searches[kind]()
    wall, cpu = time.perf_counter() - started, time.process_time() - cpu
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    # exact: the bytes and the pixels each find every planted pair
    pairs = sum(len(f) for f in found) // (2 if kind == "exact" else 1)
    return {"kind": kind, "images": n, "wall_s": wall, "cpu_s": cpu,
            "traced_peak_bytes": peak, "rss_growth_mib": max(0.0, peak_mib() - before),
            "pairs": pairs, "planted": planted}


def project(result: dict, images: int) -> dict:
    """A measured run scaled to `images`: memory linear, time quadratic for the near kinds."""
    factor = images / result["images"]
    power = 1 if result["kind"] == "exact" else 2
    return {"peak MiB": result["traced_peak_bytes"] * factor / 2**20,
            "wall s": result["wall_s"] * factor ** power}


def run(scale: float) -> dict:
    params = default_params()
    found = params["analyze"]["duplicates"]
    args = [found["hash_size"], found["hash_radius"], found["latent_radius"],
            params["analyze"]["pca_dims"]]
    sizes = [max(2 * PLANT_EVERY, round(s * scale)) for s in SIZES]
    rows, largest = [], {}
    for kind in KINDS:
        for n in sizes:
            result = run_child("benchmarks.bench_duplicates", [kind, n, *args])
            if result["pairs"] < result["planted"]:
                raise RuntimeError(f"{kind} at {n} images found {result['pairs']} pairs of "
                                   f"{result['planted']} planted")
            rows.append({"search": HOW[kind], "images": n, "measured": "yes",
                         "wall s": round(result["wall_s"], 2),
                         "peak MiB (tracemalloc)": round(result["traced_peak_bytes"] / 2**20, 1),
                         "B / image": round(result["traced_peak_bytes"] / n),
                         "RSS growth MiB": round(result["rss_growth_mib"]),
                         "pairs found / planted": f"{result['pairs']} / {result['planted']}"})
            largest[kind] = result
    for label, images in (("full COCO 1x", FULL_COCO), ("full COCO 10x", 10 * FULL_COCO)):
        for kind in KINDS:
            guess = project(largest[kind], images)
            rows.append({"search": HOW[kind], "images": images,
                         "measured": f"projected: {label}",
                         "wall s": round(guess["wall s"], 1),
                         "peak MiB (tracemalloc)": round(guess["peak MiB"], 1),
                         "B / image": round(largest[kind]["traced_peak_bytes"]
                                            / largest[kind]["images"]),
                         "RSS growth MiB": "—", "pairs found / planted": "—"})
    notes = [f"Synthetic fingerprints (seeded): random digests, {args[0]}x{args[0]}-bit "
             f"perceptual hashes and {args[3]}-dimensional vectors, one image in "
             f"{PLANT_EVERY} a copy of the one before (same digests, hash 1 bit off, vector "
             "plus 0.01 noise per dimension); analyze.duplicates' hash_radius "
             f"{args[1]} and latent_radius {args[2]:g} from params.yaml. Each row is one "
             "process; the input is built before the clock and tracemalloc start.",
             "peak MiB (tracemalloc): the most numpy and Python memory held at once during "
             "the search (scikit-learn's chunked radius search allocates its distance "
             "blocks through numpy, so they count). RSS growth: the process's peak RSS "
             "over its RSS before the call, the allocator's view of the same.",
             f"Projected rows: from the {sizes[-1]:,}-image run, memory linear in the "
             f"images (B / image x images), time quadratic for the near kinds (brute force: "
             f"every pair's distance is computed, in blocks) and linear for the exact ones; "
             f"full COCO is COCO 2014's {FULL_COCO:,} train + val images, both splits "
             "searched together as analyze does, once per scheme."]
    return {"title": "duplicates: the near-duplicate search's memory at full COCO 1x and 10x",
            "table": rows, "notes": notes}


if __name__ == "__main__":
    if sys.argv[1:2] != ["child"]:
        raise SystemExit("usage: python -m benchmarks.bench_duplicates child KIND IMAGES "
                         "HASH_SIZE HASH_RADIUS LATENT_RADIUS DIMS (the harness runs this; "
                         "use python -m benchmarks duplicates)")
    kind, n, size, radius, latent, dims = sys.argv[2:8]
    print(json.dumps(child(kind, int(n), int(size), int(radius), float(latent), int(dims))))
