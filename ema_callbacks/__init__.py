"""ema_callbacks: one exponential-moving-average engine for model weights.

``import ema_callbacks`` imports no trainer and not even torch: the time strings and the
schedule maths are pure Python (so a YAML config can be validated anywhere); the torch parts
load on first use. Trainer adapters live in ``ema_callbacks.composer``,
``ema_callbacks.lightning`` and ``ema_callbacks.transformers``.

>>> import ema_callbacks
>>> ema_callbacks.Time.parse('50ba')
Time(value=50, unit=<TimeUnit.BATCH: 'ba'>)
>>> ema_callbacks.half_life_to_smoothing(50, 1) == 2 ** (-1 / 50)
True
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ema_callbacks.schedule import (
    Clock,
    Schedule,
    ScheduleState,
    gamma_to_sigma_rel,
    half_life_to_smoothing,
    sigma_rel_to_gamma,
    smoothing_to_half_life,
)
from ema_callbacks.time_strings import Time, TimeUnit

if TYPE_CHECKING:
    from ema_callbacks.controller import EMAController
    from ema_callbacks.ema import EMA
    from ema_callbacks.weights import EMAWeights, NonFiniteWeightsError

__version__ = "0.1.0"

__all__ = [
    "Clock",
    "EMA",
    "EMAController",
    "EMAWeights",
    "NonFiniteWeightsError",
    "Schedule",
    "ScheduleState",
    "Time",
    "TimeUnit",
    "__version__",
    "gamma_to_sigma_rel",
    "half_life_to_smoothing",
    "sigma_rel_to_gamma",
    "smoothing_to_half_life",
]

_LAZY = {
    "EMA": "ema_callbacks.ema",
    "EMAController": "ema_callbacks.controller",
    "EMAWeights": "ema_callbacks.weights",
    "NonFiniteWeightsError": "ema_callbacks.weights",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'ema_callbacks' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
