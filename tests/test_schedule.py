"""The re-timed LR schedule: continuous across a retarget, reaching its end exactly on the new last step."""

from __future__ import annotations

import pytest
import torch
from transformers import get_scheduler

from trl_select.schedule import RetimedLR, update_steps_per_epoch


def _scheduler(name: str, horizon: int, warmup: int = 0):
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    base = get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=horizon)
    return optimizer, RetimedLR.wrap(base, optimizer, horizon)


def _run(optimizer, scheduler, steps, retarget=None):
    lrs = []
    for step in range(steps):
        if retarget and step == retarget[0]:
            scheduler.retarget(step, retarget[1])
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs, optimizer.param_groups[0]["lr"]


def test_identity_until_retargeted():
    optimizer, scheduler = _scheduler("linear", 20, warmup=3)
    reference_optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    reference = get_scheduler("linear", reference_optimizer, num_warmup_steps=3, num_training_steps=20)
    ours, _ = _run(optimizer, scheduler, 20)
    theirs, _ = _run(reference_optimizer, reference, 20)
    assert ours == pytest.approx(theirs)


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_retarget_is_continuous_and_ends_on_the_last_real_step(name):
    optimizer, scheduler = _scheduler(name, 30, warmup=2)
    lrs, final = _run(optimizer, scheduler, 18, retarget=(10, 8))
    assert lrs[10] == pytest.approx(lrs[9] - (lrs[8] - lrs[9]), abs=0.05)  # no jump at the retarget
    assert final == pytest.approx(0.0, abs=1e-12)  # the schedule's end, on real step 18
    assert all(lr > 0 for lr in lrs[1:18])  # step 0 is the start of the warm-up
    assert scheduler.real_end == 18


def test_state_dict_round_trip_keeps_the_retiming():
    optimizer, scheduler = _scheduler("linear", 30)
    _run(optimizer, scheduler, 10, retarget=(5, 10))
    state = scheduler.state_dict()
    optimizer2, scheduler2 = _scheduler("linear", 30)
    scheduler2.load_state_dict(state)
    assert scheduler2.real_end == 15
    assert scheduler2.lr_lambdas[0](12) == pytest.approx(scheduler.lr_lambdas[0](12))


def test_update_steps_per_epoch_counts_the_partial_accumulation():
    assert update_steps_per_epoch(7, 1) == 7
    assert update_steps_per_epoch(7, 2) == 4
    assert update_steps_per_epoch(8, 2) == 4
