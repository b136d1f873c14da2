"""stages.lib.parallel.ordered_map: order, the in-flight bound, errors, nothing left running."""
from __future__ import annotations

import multiprocessing
import threading
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor

import pytest

from stages.lib.parallel import ordered_map


class Tracker:
    """fn for ordered_map that counts, under a lock, the tasks running at once and how many
    have started and finished."""

    def __init__(self, delay=lambda item: 0.0, fail_on=None):
        self.lock = threading.Lock()
        self.running = self.peak = self.started = self.finished = 0
        self.delay, self.fail_on = delay, fail_on

    def __call__(self, item):
        with self.lock:
            self.running += 1
            self.started += 1
            self.peak = max(self.peak, self.running)
        try:
            time.sleep(self.delay(item))
            if item == self.fail_on:
                raise ValueError(f"bad item {item}")
            return item * 10
        finally:
            with self.lock:
                self.running -= 1
                self.finished += 1


@pytest.mark.parametrize("workers, bound", [(1, 1), (1, 3), (3, 3), (4, 9), (8, 2)])
def test_results_keep_the_order_of_the_items_and_the_bound_holds(workers, bound):
    # every third item is slow, so later items finish first on several threads
    work = Tracker(delay=lambda item: 0.03 if item % 3 == 0 else 0.0)
    pulled, outstanding = [], []
    received = 0

    def items():
        for i in range(30):
            pulled.append(i)
            yield i

    with ThreadPoolExecutor(workers) as pool:
        results = []
        for result in ordered_map(work, items(), pool, bound):
            # handed out but not yet received by this loop, the one in hand included
            outstanding.append(len(pulled) - received)
            received += 1
            results.append(result)
    assert results == [10 * i for i in range(30)]
    assert max(outstanding) == bound          # the bound is reached, never passed
    assert work.peak <= min(workers, bound)   # never more running than either allows
    assert work.started == work.finished == 30


def test_items_are_read_lazily():
    pulled = []

    def items():
        for i in range(1000):
            pulled.append(i)
            yield i

    with ThreadPoolExecutor(2) as pool:
        first = next(ordered_map(lambda i: i, items(), pool, 4))
    assert first == 0 and len(pulled) == 4


def test_an_error_surfaces_with_its_item_and_nothing_is_left_running():
    # item 5 fails fast; items after it are slow and must not be running once it surfaces
    work = Tracker(delay=lambda item: 0.05 if item > 5 else 0.0, fail_on=5)
    got = []
    with ThreadPoolExecutor(3) as pool:
        with pytest.raises(ValueError) as info:
            for result in ordered_map(work, iter(range(40)), pool, 6):
                got.append(result)
        # checked before the pool's own shutdown could wait for anything
        assert work.running == 0
        assert work.started == work.finished
    assert got == [0, 10, 20, 30, 40]            # the results before it, in order
    assert info.value.args == ("bad item 5",)    # the task's own exception, unchanged
    assert info.value.__notes__ == ["while working on item 5: 5"]
    assert work.started < 40                     # what had not started was cancelled


def test_the_note_names_a_large_item_briefly():
    def fail(item):
        raise KeyError("missing")

    with ThreadPoolExecutor(1) as pool, pytest.raises(KeyError) as info:
        list(ordered_map(fail, [("val", {"id": 7, "file_name": "x.jpg"}, list(range(10**5)))],
                         pool, 2))
    note, = info.value.__notes__
    assert note.startswith("while working on item 0: ('val', {") and len(note) < 200


def test_closing_early_cancels_and_waits():
    work = Tracker(delay=lambda item: 0.02)
    with ThreadPoolExecutor(2) as pool:
        results = ordered_map(work, iter(range(100)), pool, 5)
        assert next(results) == 0
        results.close()                           # the caller stops reading
        assert work.running == 0 and work.started == work.finished
        assert work.started <= 6
    assert work.started == work.finished


def test_a_caller_error_inside_the_loop_leaves_nothing_running():
    work = Tracker(delay=lambda item: 0.02)
    with ThreadPoolExecutor(2) as pool:
        with pytest.raises(RuntimeError, match="consumer"):
            for _ in ordered_map(work, iter(range(100)), pool, 5):
                raise RuntimeError("consumer")
        assert work.running == 0 and work.started == work.finished


def _times_ten(item: int) -> int:
    if item == 3:
        raise ArithmeticError(f"worker refused {item}")
    return item * 10


def test_process_pool_keeps_order_and_the_note_crosses_processes():
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(2, mp_context=context) as pool:
        assert list(ordered_map(_times_ten, [0, 1, 2], pool, 2)) == [0, 10, 20]
        with pytest.raises(ArithmeticError) as info:
            list(ordered_map(_times_ten, [1, 3, 2], pool, 2))
    assert info.value.args == ("worker refused 3",)
    assert info.value.__notes__ == ["while working on item 1: 3"]


def test_a_bound_below_one_is_refused():
    with ThreadPoolExecutor(1) as pool, pytest.raises(ValueError, match="at least 1, got 0"):
        next(ordered_map(lambda i: i, [1], pool, 0))


class Named(Exception):
    """Stands for StageError: a message that already names its item."""


def test_named_errors_surface_without_a_note():
    def fail(item):
        raise Named(f"{item}.jpg: cannot read image")

    with ThreadPoolExecutor(1) as pool, pytest.raises(Named) as info:
        list(ordered_map(fail, ["a", "b"], pool, 2, named_errors=(Named,)))
    assert str(info.value) == "a.jpg: cannot read image"
    assert not hasattr(info.value, "__notes__")
