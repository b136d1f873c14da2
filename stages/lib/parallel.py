"""Ordered, bounded fan-out over an executor: the one way a stage overlaps per-item work
(masks' worker processes, infer's writer threads)."""
from __future__ import annotations

import collections
import concurrent.futures
import functools
import reprlib
from concurrent.futures import Executor
from typing import Callable, Iterable, Iterator, TypeVar

T = TypeVar("T")
R = TypeVar("R")


def ordered_map(fn: Callable[[T], R], items: Iterable[T], pool: Executor,
                max_in_flight: int,
                named_errors: tuple[type[BaseException], ...] = ()) -> Iterator[R]:
    """fn(item) for each item on `pool`, results yielded in the order of `items`.

    At most `max_in_flight` items are submitted whose results the caller has not received
    (the one being handed over counts), so memory stays flat however many items there are;
    `items` is read only as far as that allows. An exception of fn surfaces when its item's
    turn comes, unchanged (same type and message) but for a note naming the item's position
    and a short repr of it; exceptions of the `named_errors` types already name their item
    (a StageError names its file) and get no note. When the generator ends, by an error, its
    caller's or its own, or by being closed early, items not started are cancelled and those
    running are waited for: no task is left running. For a process pool, fn and the items
    must be picklable."""
    if max_in_flight < 1:
        raise ValueError(f"max_in_flight must be at least 1, got {max_in_flight}")
    pending: collections.deque[concurrent.futures.Future] = collections.deque()
    try:
        for index, item in enumerate(items):
            task = functools.partial(_noting_item, fn, index, named_errors)
            pending.append(pool.submit(task, item))
            while len(pending) >= max_in_flight:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        for future in pending:
            future.cancel()
        # Without this wait a running task could still be writing into a temporary folder
        # that the caller's error handling is about to remove.
        concurrent.futures.wait(pending)


def _noting_item(fn: Callable[[T], R], index: int, named_errors: tuple, item: T) -> R:
    # Runs in the worker, where the item is at hand: the parent keeps no reference to it.
    try:
        return fn(item)
    except named_errors:
        raise
    except Exception as exc:
        exc.add_note(f"while working on item {index}: {_short_repr(item)}")
        raise


def _short_repr(item: object, limit: int = 200) -> str:
    brief = reprlib.Repr()
    brief.maxlevel, brief.maxlist, brief.maxtuple, brief.maxdict = 3, 4, 4, 4
    brief.maxstring = brief.maxother = 40
    text = brief.repr(item)
    return text if len(text) <= limit else f"{text[:limit]}..."
