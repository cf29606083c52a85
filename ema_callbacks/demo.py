"""The demo: train a small classifier on scikit-learn's digits, evaluate raw and EMA weights.

The data set ships inside scikit-learn, so nothing is downloaded. Training uses a deliberately
large learning rate, where the raw weights bounce around and the average is steadier.

>>> rows = run_plain(epochs=1, seed=0, quiet=True)
>>> sorted(rows[-1])
['ema_accuracy', 'ema_loss', 'epoch', 'raw_accuracy', 'raw_loss']
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ema_callbacks.ema import EMA

__all__ = ["digits_tensors", "format_table", "run_plain"]


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


def _model() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Dropout(0.1), nn.Linear(128, 10))


@torch.no_grad()
def _evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    was = model.training
    model.eval()
    logits = model(x)
    loss = float(nn.functional.cross_entropy(logits, y))
    accuracy = float((logits.argmax(dim=1) == y).float().mean())
    model.train(was)
    return accuracy, loss


def run_plain(
    epochs: int = 8,
    half_life: str = "0.5ep",
    lr: float = 0.2,
    batch_size: int = 32,
    seed: int = 0,
    quiet: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> list[dict[str, Any]]:
    """Train with a plain PyTorch loop and :class:`~ema_callbacks.EMA`; one row per epoch,
    evaluating both the training weights and the EMA weights after every epoch.
    ``progress(done, total)`` is called after every step (and silences the per-epoch lines)."""
    torch.manual_seed(seed)
    x, y, xv, yv = digits_tensors(seed)
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    steps = (len(x) + batch_size - 1) // batch_size
    ema = EMA(model, half_life=half_life, update_interval="1ba", steps_per_epoch=steps)
    rows: list[dict[str, Any]] = []
    for epoch in range(1, epochs + 1):
        order = torch.randperm(len(x))
        for i in range(steps):
            idx = order[i * batch_size : (i + 1) * batch_size]
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            ema.step(model, samples=len(idx))
            if progress is not None:
                progress((epoch - 1) * steps + i + 1, epochs * steps)
        ema.end_epoch(model)
        raw_acc, raw_loss = _evaluate(model, xv, yv)
        with ema.swapped(model):
            ema_acc, ema_loss = _evaluate(model, xv, yv)
        row = {
            "epoch": epoch,
            "raw_accuracy": raw_acc,
            "raw_loss": raw_loss,
            "ema_accuracy": ema_acc,
            "ema_loss": ema_loss,
        }
        rows.append(row)
        if not quiet and progress is None:
            print(
                f"epoch {epoch:2d}  raw acc {raw_acc:.4f} loss {raw_loss:.4f}  |  "
                f"EMA acc {ema_acc:.4f} loss {ema_loss:.4f}",
                flush=True,
            )
    return rows


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
