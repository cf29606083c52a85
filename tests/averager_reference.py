"""An independent float64 reference for BEMA (TRL's bias-corrected EMA) and the uniform (SWA)
average, and the documented update schedule, shared by the averager tests of the plain loop
(tests/core) and of the Composer, Lightning and transformers adapters.

It imports nothing from ``ema_callbacks`` (the tests compare the library's averages against it,
so it must not reuse the code under test) and no trainer (every test environment imports it).

>>> ref = ReferenceBEMA(ema_power=0.5, lag=3.0, bias_power=float("inf"))
>>> ref.update(1, {"w": torch.tensor([0.0])}); ref.update(2, {"w": torch.tensor([4.0])})
>>> ref.evaluated["w"].item()  # beta = (3 + 1) ** -0.5 = 0.5, no bias correction
2.0
>>> reference_uniform({1: {"w": torch.tensor([1.0])}, 2: {"w": torch.tensor([2.0])}}, [1, 2])
{'w': tensor([1.5000], dtype=torch.float64)}
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import torch

Tensors = dict[str, torch.Tensor]

BEMA_DEFAULTS: dict[str, float] = {  # TRL's BEMACallback defaults
    "ema_power": 0.5,
    "bias_power": 0.2,
    "lag": 10.0,
    "multiplier": 1.0,
    "min_ema_multiplier": 0.0,
}


def due(step: int, interval: int, start: int) -> bool:
    """The documented rule (docs/composer.md): the first update is at the first step at or
    after ``start`` by which an interval multiple has been crossed, then at every multiple."""
    first = max(start, interval)
    return step == first or (step > first and step % interval == 0)


def due_steps(steps: Iterable[int], interval: int, start: int) -> list[int]:
    """The steps among ``steps`` (sorted) at which an update is due."""
    return [s for s in sorted(steps) if due(s, interval, start)]


def clone64(tensors: Mapping[str, torch.Tensor]) -> Tensors:
    """A detached copy: floating tensors in float64, the others (``num_batches_tracked``) as
    they are."""
    return {
        k: v.detach().double().clone() if v.is_floating_point() else v.detach().clone()
        for k, v in tensors.items()
    }


class ReferenceBEMA:
    """BEMA written out in float64 over every floating tensor (integer tensors follow the
    weights): a copy at the first update (step s0), then at step s, with t = s - s0,
    ``beta = max((lag + multiplier*t) ** -ema_power, min_ema_multiplier)``,
    ``ema = (1 - beta) * ema + beta * theta``,
    ``evaluated = ema + (lag + multiplier*t) ** -bias_power * (theta - theta0)``
    (``bias_power=inf``: no correction, evaluated is the running EMA). Options not given take
    :data:`BEMA_DEFAULTS`."""

    def __init__(self, **options: float) -> None:
        unknown = sorted(set(options) - set(BEMA_DEFAULTS))
        if unknown:
            raise TypeError(f"ReferenceBEMA: unknown options {unknown}")
        o = {**BEMA_DEFAULTS, **options}
        self.ema_power = o["ema_power"]
        self.bias_power = o["bias_power"]
        self.lag = o["lag"]
        self.multiplier = o["multiplier"]
        self.min_ema_multiplier = o["min_ema_multiplier"]
        self.s0: int | None = None
        self.theta0: Tensors = {}
        self.ema: Tensors = {}
        self.evaluated: Tensors = {}

    def update(self, step: int, theta: Mapping[str, torch.Tensor]) -> None:
        current = clone64(theta)
        if self.s0 is None:
            self.s0 = step
            self.theta0, self.ema, self.evaluated = current, dict(current), dict(current)
            return
        base = self.lag + self.multiplier * (step - self.s0)
        beta = max(base**-self.ema_power, self.min_ema_multiplier)
        alpha = 0.0 if math.isinf(self.bias_power) else base**-self.bias_power
        for k, v in current.items():
            if not v.is_floating_point():
                self.evaluated[k] = v
                continue
            self.ema[k] = (1 - beta) * self.ema[k] + beta * v
            self.evaluated[k] = self.ema[k] + alpha * (v - self.theta0[k])


class ReferenceUniform:
    """The plain mean, in float64, of every weight seen at an update (the initialising copy
    included); integer tensors follow the weights."""

    def __init__(self) -> None:
        self.seen: list[Tensors] = []

    def update(self, step: int, theta: Mapping[str, torch.Tensor]) -> None:
        self.seen.append(clone64(theta))

    @property
    def evaluated(self) -> Tensors:
        last = self.seen[-1]
        return {
            k: torch.stack([w[k] for w in self.seen]).mean(0) if v.is_floating_point() else v
            for k, v in last.items()
        }


def reference_bema(
    steps: Mapping[int, Mapping[str, torch.Tensor]], at: Iterable[int], **options: float
) -> tuple[Tensors, Tensors, Tensors]:
    """(evaluated, ema, theta0) of :class:`ReferenceBEMA` fed ``steps[s]`` at each step ``s``
    of ``at`` (the due steps; the first one is the initialising copy)."""
    ref = ReferenceBEMA(**options)
    for s in at:
        ref.update(s, steps[s])
    assert ref.s0 is not None, "no due step"
    return ref.evaluated, ref.ema, ref.theta0


def reference_uniform(
    steps: Mapping[int, Mapping[str, torch.Tensor]], at: Iterable[int]
) -> Tensors:
    """The float64 mean of ``steps[s]`` over the steps ``s`` of ``at`` (the due steps)."""
    ref = ReferenceUniform()
    for s in at:
        ref.update(s, steps[s])
    return ref.evaluated
