"""Step accounting for epochs whose length changes, and an LR schedule whose horizon follows them.

The HF `Trainer` freezes the steps per epoch and the scheduler horizon from the full pool before the first epoch.
With selection, epochs get shorter, so (1) the per-epoch step counts are recomputed from the live dataloader at the
start of every epoch (see `SelectiveDPOTrainer._run_epoch`), (2) the run's horizon, `state.max_steps`, is re-estimated
at every selection (`selective_horizon`), so that transformers stops, saves and evaluates on the real last step, and
(3) the LR schedule is re-timed to that horizon, so that it reaches its end exactly on the last real step.

The re-timing maps the real optimizer step `s` to a "virtual" step `v(s)` of the original schedule, piecewise
linearly: at each retarget the current point `(s0, v(s0))` is kept and the rest of the original horizon `[v(s0), H]`
is spread over the real remaining steps `[s0, s0 + R]`. The LR is continuous across a retarget (no jump), warm-up
inside the full-pool epochs is untouched, and `v(s0 + R) = H`, so a linear or cosine schedule ends at its final value.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


def update_steps_per_epoch(num_batches: int, gradient_accumulation_steps: int) -> int:
    """Optimizer steps in an epoch of `num_batches` batches; a trailing partial accumulation is one more step."""
    return math.ceil(num_batches / gradient_accumulation_steps)


def selective_horizon(
    epoch_start_step: int, epoch: int, num_train_epochs: float, num_batches: int, gradient_accumulation_steps: int
) -> int:
    """The run's last optimizer step, estimated as epoch `epoch` (`num_batches` batches) begins at `epoch_start_step`.

    This epoch and every later one are counted at this epoch's length: the later selections are not known yet. A
    fractional `num_train_epochs` ends the last epoch that far into it, rounded up to a whole step, as transformers
    does. The estimate never ends the run early (the epoch under way fits in it unless the run ends inside it), and
    it is exact from the last epoch's selection on, so the run's last step is the horizon's.
    """
    steps = update_steps_per_epoch(num_batches, gradient_accumulation_steps)
    return epoch_start_step + math.ceil(round((num_train_epochs - epoch) * steps, 9))


class RetimedSchedule:
    """An LR multiplier `f(v(s))`: the original schedule `f` read at the re-timed step `v(s)`.

    Its attributes are plain numbers (and `f`, a picklable callable), so `LambdaLR.state_dict()` saves them.
    """

    def __init__(self, base: Callable[[int], float], horizon: int) -> None:
        self.base = base
        self.horizon = horizon
        self.real_anchor = 0
        self.virtual_anchor = 0.0
        self.real_end = horizon

    def virtual_step(self, step: int) -> float:
        """The step of the original schedule that real step `step` corresponds to."""
        if step <= self.real_anchor:
            # Steps before the last retarget are history; they were mapped by an earlier segment, and LambdaLR only
            # asks for them at construction (step 0), where every segment is the identity.
            return float(step) if self.real_anchor == 0 else self.virtual_anchor
        span = max(self.real_end - self.real_anchor, 1)
        return self.virtual_anchor + (step - self.real_anchor) * (self.horizon - self.virtual_anchor) / span

    def retarget(self, step: int, remaining_steps: int) -> None:
        """From real step `step` on, finish the original schedule in exactly `remaining_steps` steps."""
        if remaining_steps < 1:
            raise ValueError(f"remaining_steps must be >= 1, got {remaining_steps}.")
        self.virtual_anchor = min(self.virtual_step(step), float(self.horizon))
        self.real_anchor = step
        self.real_end = step + remaining_steps

    def __call__(self, step: int) -> float:
        return self.base(self.virtual_step(step))


class RetimedLR(LambdaLR):
    """`LambdaLR` over `RetimedSchedule`s, one per parameter group; `retarget` moves the horizon of all of them."""

    def __init__(self, optimizer: Optimizer, bases: list[Callable[[int], float]], horizon: int) -> None:
        super().__init__(optimizer, [RetimedSchedule(base, horizon) for base in bases])

    @classmethod
    def wrap(cls, scheduler: LambdaLR, optimizer: Optimizer, horizon: int) -> RetimedLR:
        """Re-time an HF `LambdaLR` (what `transformers.get_scheduler` returns for every LambdaLR schedule)."""
        return cls(optimizer, list(scheduler.lr_lambdas), horizon)

    def state_dict(self) -> dict:
        """`LambdaLR.state_dict` without each schedule's `base` callable: the retiming is plain numbers.

        The Trainer reloads `scheduler.pt` with `torch.load(weights_only=True)`, which refuses pickled callables; `base`
        is rebuilt from the config when the scheduler is created, so the checkpoint needs only the anchors.
        """
        state = super().state_dict()
        state["lr_lambdas"] = [
            {key: value for key, value in schedule.items() if key != "base"} for schedule in state["lr_lambdas"]
        ]
        return state

    @property
    def real_end(self) -> int:
        """The real step on which the schedule reaches its end."""
        return self.lr_lambdas[0].real_end

    def retarget(self, step: int, remaining_steps: int) -> None:
        for schedule in self.lr_lambdas:
            schedule.retarget(step, remaining_steps)
