"""The demo's data and table: scikit-learn's digits (bundled with scikit-learn, so nothing is
downloaded) and the raw-vs-EMA summary that ``ema-callbacks demo`` prints. The training runs,
one per trainer, are in :mod:`ema_callbacks.examples`.

>>> x, y, xv, yv = digits_tensors()
>>> int(y.max()) + 1
10
"""

from __future__ import annotations

import torch

__all__ = ["digits_tensors", "format_table"]


def digits_tensors(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """scikit-learn's 8x8 digits, scaled to [0, 1], split 75/25: ``(x_train, y_train, x_val,
    y_val)``.

    >>> x, y, xv, yv = digits_tensors()
    >>> tuple(x.shape), tuple(xv.shape)
    ((1347, 64), (450, 64))
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:  # pragma: no cover - exercised only without the extra
        raise ImportError('the demo needs scikit-learn: pip install "ema-callbacks[demo]"') from err
    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(x), generator=gen)
    x, y = x[order], y[order]
    split = int(0.75 * len(x))
    return x[:split], y[:split], x[split:], y[split:]


def format_table(results: dict[str, dict[str, float]]) -> str:
    """A plain-text table of final raw vs EMA metrics per trainer.

    >>> print(format_table({'plain': {'raw_accuracy': 0.9, 'raw_loss': 0.3,
    ...                               'ema_accuracy': 0.95, 'ema_loss': 0.2}}))
    trainer       raw acc  EMA acc  raw loss  EMA loss
    plain          0.9000   0.9500    0.3000    0.2000
    """
    width = max(12, *(len(name) for name in results))
    head = f"{'raw acc':>7s}  {'EMA acc':>7s}  {'raw loss':>8s}  {'EMA loss':>8s}"
    lines = [f"{'trainer':{width}s}  {head}"]
    for name, r in results.items():
        lines.append(
            f"{name:{width}s}  {r['raw_accuracy']:7.4f}  {r['ema_accuracy']:7.4f}  "
            f"{r['raw_loss']:8.4f}  {r['ema_loss']:8.4f}"
        )
    return "\n".join(lines)
