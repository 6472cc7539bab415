"""Schedules of the step: the learning rate and the progressive knobs beta(t), gamma(t).

Each is an optax schedule, a plain function ``step -> float32``, built from a config block:

    learning_rate: {peak, warmup_steps, decay: "linear" | "cosine" | "constant", end_fraction}
    progressive.beta / progressive.gamma:
                   {start, end, steps, shape: "linear" | "cosine" | "constant"}

beta rises from ``start`` to ``end`` over ``steps`` (easy -> hard negatives); gamma falls from
``start`` to ``end`` (early noise protection -> every query counts). After ``steps`` each stays at
``end``.
"""

from __future__ import annotations

from typing import Callable, Mapping

import optax

Schedule = Callable

_SHAPES = ("linear", "cosine", "constant")


def learning_rate(config: Mapping, total_steps: int) -> Schedule:
    """Warmup from 0 to ``peak`` over ``warmup_steps``, then decay to ``peak * end_fraction``."""
    peak = float(config["peak"])
    warmup = int(config.get("warmup_steps", 0))
    decay = config.get("decay", "linear")
    end = peak * float(config.get("end_fraction", 0.0))
    if decay not in _SHAPES:
        raise ValueError(f"config.learning_rate.decay={decay!r}: use one of {_SHAPES}")
    decay_steps = max(total_steps - warmup, 1)
    if decay == "cosine":
        after = optax.cosine_decay_schedule(peak, decay_steps, alpha=end / peak if peak else 0.0)
    elif decay == "linear":
        after = optax.linear_schedule(peak, end, decay_steps)
    else:
        after = optax.constant_schedule(peak)
    if warmup == 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), after], [warmup])


def knob(config: Mapping, name: str) -> Schedule:
    """A progressive knob moving from ``start`` to ``end`` over ``steps`` steps, then constant."""
    shape = config.get("shape", "linear")
    start, end = float(config["start"]), float(config.get("end", config["start"]))
    steps = int(config.get("steps", 0))
    if shape not in _SHAPES:
        raise ValueError(f"config.progressive.{name}.shape={shape!r}: use one of {_SHAPES}")
    if shape == "constant" or start == end:
        return optax.constant_schedule(start)
    if steps <= 0:
        return optax.constant_schedule(end)
    if shape == "linear":
        return optax.linear_schedule(start, end, steps)
    # cosine interpolation from start to end
    return lambda step: end + (start - end) * optax.cosine_decay_schedule(1.0, steps)(step)
