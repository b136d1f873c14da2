"""What every stage's main() shares: the --params flag, logging, one clear error line."""
from __future__ import annotations

import argparse
import logging
import re
import sys
from pathlib import Path
from typing import Callable, Iterable

from stages.lib.io import prepare_output
from stages.lib.params import ParamsError


class StageError(RuntimeError):
    """Bad input a user can fix: reported as one line naming the file, key or value."""


def first_sentence(docstring: str) -> str:
    """The docstring's first sentence on one line: what --help shows. A module docstring's
    first line often stops mid-sentence, which --help would print as it is."""
    paragraph = " ".join(docstring.strip().split("\n\n")[0].split())
    end = re.search(r"\.(\s|$)", paragraph)
    return paragraph[:end.start() + 1] if end else paragraph


def stage_parser(name: str, docstring: str) -> argparse.ArgumentParser:
    """The stage's parser, named as the README and dvc.yaml run it, with --params."""
    parser = argparse.ArgumentParser(prog=f"python -m stages.{name}",
                                     description=first_sentence(docstring))
    parser.add_argument("--params", required=True, help="params.yaml to read and validate")
    return parser


SEED_MAX = 2**32 - 1   # numpy's and torch's seeds: as params.schema.yaml's $defs.seed


def seed_value(text: str) -> int:
    """argparse type of --seed: one of train.seeds, which the engines pass one per job."""
    try:
        seed = int(text)
    except ValueError:
        seed = -1
    if not 0 <= seed <= SEED_MAX or str(seed) != text.strip():
        raise argparse.ArgumentTypeError(f"{text!r}: expected an integer seed in 0..{SEED_MAX}")
    return seed


def run_main(name: str, body: Callable[[], None],
             outputs: Iterable[str | Path | None] = ()) -> int:
    """Run a stage body with logging set up; turn expected errors into exit code 2. Before
    the body, every output (files and folders the stage writes; None for an option not
    given) is prepared: its folder checked writable, dead runs' temporaries removed."""
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format=f"%(asctime)s {name} %(levelname)s %(message)s")
    log = logging.getLogger(name)
    try:
        for output in outputs:
            if output is not None:
                prepare_output(output, log)
        body()
    except (StageError, ParamsError) as exc:
        log.error("%s", exc)
        return 2
    return 0

