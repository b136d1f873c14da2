"""train.schedule: the learning rate of every epoch, read off a real optimiser stepped the way
train steps it (once after each epoch), against values worked out by hand."""
from __future__ import annotations

import math

import pytest
import torch

from stages.lib.schedule import make_scheduler


def _lrs(schedule: str, epochs: int, warmup: int = 0, lr: float = 0.01) -> list[float]:
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    scheduler = make_scheduler(optimizer, {"schedule": schedule, "epochs": epochs,
                                           "warmup": warmup, "lr": lr})
    seen = []
    for _ in range(epochs):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert scheduler.last_epoch == epochs  # what a checkpoint's consistency check expects
    return seen


def test_constant_and_cosine():
    assert _lrs("constant", 4) == [0.01] * 4
    # CosineAnnealingLR to 0 over 4 epochs: 0.01 * (1 + cos(pi e / 4)) / 2
    assert _lrs("cosine", 4) == pytest.approx([0.01, 0.0085355339, 0.005, 0.0014644661])


def test_warmup_cosine_by_hand():
    # 2 warm-up epochs at 1/3 and 2/3 of lr, then the cosine over the 4 remaining epochs
    c = math.cos(math.pi / 4)
    assert _lrs("warmup_cosine", 6, warmup=2) == pytest.approx(
        [0.01 / 3, 0.02 / 3, 0.01, 0.005 * (1 + c), 0.005, 0.005 * (1 - c)])


def test_onecycle_starts_low_peaks_at_lr_and_ends_near_zero():
    lrs = _lrs("onecycle", 10)
    assert lrs[0] == pytest.approx(0.01 / 25)        # OneCycleLR's default div_factor
    assert max(lrs) == pytest.approx(0.01, rel=0.05)
    assert lrs.index(max(lrs)) in (2, 3)             # pct_start 0.3 of 11 steps
    assert lrs[-1] < 0.01 / 10


def test_unknown_schedule_is_refused():
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=0.01)
    with pytest.raises(ValueError, match="unknown schedule 'step' "):
        make_scheduler(optimizer, {"schedule": "step", "epochs": 3, "warmup": 0,
                                   "lr": 0.01})
