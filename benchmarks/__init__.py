"""Benchmarks of segflow's stages: `python -m benchmarks [names...]` (or `make bench`).

Each benchmarks/bench_<name>.py exposes `run(scale: float) -> dict` returning
  {"title": str, "table": [ {column: value, ...}, ... ], "notes": [str, ...]}
(every row with the same keys, in column order). The harness (harness.py) writes
benchmarks/out/<name>.json and rewrites the <name> section of BENCHMARKS.md.
"""
