"""Benchmarks of segflow's stages: `python -m benchmarks [names...]` (or `make bench`).

Each benchmarks/bench_<name>.py exposes `run(scale: float) -> dict` returning
  {"title": str, "table": [ {column: value, ...}, ... ], "notes": [str, ...]}
(every row with the same keys, in column order). The harness (harness.py) writes
benchmarks/out/<name>.json and rewrites the <name> section of BENCHMARKS.md.

`python -m benchmarks projection` (also run after `python -m benchmarks` with no names)
measures nothing: projection.py turns the JSON results in benchmarks/out/ into the
full-COCO-2014 projection section of BENCHMARKS.md, per stage on this machine and on one
GPU, naming the benchmark to run where a result is missing.
"""
