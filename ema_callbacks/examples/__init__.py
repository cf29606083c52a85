"""Digits models and data for every trainer, importable by ``class_path`` from a YAML config.

This package imports torch only. Each trainer has its own module, which imports only that
trainer:

=====================================================  ========================================
``ema_callbacks.examples.lightning_digits``            ``DigitsClassifier``, ``DigitsDataModule``
``ema_callbacks.examples.composer_digits``             ``digits_model``, ``digits_*_dataloader``
``ema_callbacks.examples.transformers_digits``         ``DigitsMLP``, ``DigitsMLPConfig``,
                                                       ``DigitsDataset``, ``compute_metrics``
``ema_callbacks.examples.tokens``                      ``RandomTokens`` (torch only: token ids
                                                       for a causal language model)
=====================================================  ========================================

and a ``run_digits_demo(epochs, half_life, seed, progress)`` that trains with the real trainer
and this library's adapter and evaluates the training weights and the EMA weights on the
validation split after every epoch (the rows of ``ema-callbacks demo``); this package's own
:func:`run_digits_demo` does the same with a plain PyTorch loop and :class:`ema_callbacks.EMA`.

The data is scikit-learn's bundled 8x8 digits (nothing is downloaded), split 75/25 as in
:func:`ema_callbacks.demo.digits_tensors`.

>>> train, val = digits_datasets()
>>> len(train), len(val)
(1347, 450)
>>> model = digits_mlp(hidden=32)
>>> tuple(model(train[:5][0]).shape)
(5, 10)
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from torch.utils.data import TensorDataset

from ema_callbacks.demo import digits_tensors

__all__ = [
    "DEMO_BATCH_SIZE",
    "DEMO_LR",
    "DEMO_MOMENTUM",
    "ProgressFn",
    "digits_datasets",
    "digits_mlp",
    "evaluate_logits",
    "quiet",
    "run_digits_demo",
]

#: The demo's optimiser: SGD with a large learning rate, where the raw weights bounce around
#: and the average is steadier.
DEMO_LR = 0.2
DEMO_MOMENTUM = 0.9
DEMO_BATCH_SIZE = 32

#: ``progress(done, total)``: optimizer steps done so far out of the run's total.
ProgressFn = Callable[[int, int], None]


def digits_datasets(seed: int = 0) -> tuple[TensorDataset, TensorDataset]:
    """The digits train and validation splits as ``TensorDataset(x, y)``: ``x`` is a float32
    ``(n, 64)`` tensor in [0, 1], ``y`` the class index.

    >>> train, val = digits_datasets(seed=0)
    >>> x, y = train[0]
    >>> tuple(x.shape), y.dtype
    ((64,), torch.int64)
    """
    x, y, xv, yv = digits_tensors(seed)
    return TensorDataset(x, y), TensorDataset(xv, yv)


def digits_mlp(hidden: int = 128, dropout: float = 0.1) -> nn.Sequential:
    """The demo's classifier: ``Linear(64, hidden) -> ReLU -> Dropout -> Linear(hidden, 10)``.

    >>> digits_mlp(hidden=16)
    Sequential(
      (0): Linear(in_features=64, out_features=16, bias=True)
      (1): ReLU()
      (2): Dropout(p=0.1, inplace=False)
      (3): Linear(in_features=16, out_features=10, bias=True)
    )
    """
    if isinstance(hidden, bool) or not isinstance(hidden, int) or hidden < 1:
        raise ValueError(f"hidden must be a positive integer; got {hidden!r}")
    if not 0.0 <= float(dropout) < 1.0:
        raise ValueError(f"dropout must be in [0, 1); got {dropout!r}")
    return nn.Sequential(
        nn.Linear(64, hidden), nn.ReLU(), nn.Dropout(float(dropout)), nn.Linear(hidden, 10)
    )


@torch.no_grad()
def evaluate_logits(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """``(accuracy, mean cross-entropy)`` of ``logits`` against ``labels``.

    >>> evaluate_logits(torch.tensor([[2.0, 0.0], [0.0, 2.0]]), torch.tensor([0, 0]))[0]
    0.5
    """
    loss = float(nn.functional.cross_entropy(logits, labels))
    accuracy = float((logits.argmax(dim=1) == labels).float().mean())
    return accuracy, loss


@contextlib.contextmanager
def quiet(*loggers: str) -> Iterator[None]:
    """Silence warnings and log records below ERROR for the block (``logging.disable``, which
    also holds for loggers that a library creates or re-levels meanwhile, such as DeepSpeed's
    accelerator notice), and the named loggers; restore everything afterwards.

    >>> with quiet('lightning'):
    ...     logging.getLogger('lightning').warning('not shown')
    """
    saved: list[tuple[logging.Logger, int]] = []
    for name in loggers:
        logger = logging.getLogger(name)
        saved.append((logger, logger.level))
        logger.setLevel(logging.ERROR)
    disabled = logging.root.manager.disable
    logging.disable(max(disabled, logging.WARNING))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(disabled)
        for logger, level in saved:
            logger.setLevel(level)


def _row(epoch: int, raw: tuple[float, float], ema: tuple[float, float]) -> dict[str, Any]:
    """One row of a ``run_digits_demo`` result."""
    return {
        "epoch": epoch,
        "raw_accuracy": raw[0],
        "raw_loss": raw[1],
        "ema_accuracy": ema[0],
        "ema_loss": ema[1],
    }


@torch.no_grad()
def _evaluate_raw_and_ema(
    model: nn.Module,
    weights: Any,
    forward: Callable[[Callable[..., Any]], torch.Tensor],
    labels: torch.Tensor,
) -> tuple[tuple[float, float], tuple[float, float]]:
    """Evaluate the training weights (``model`` as it is) and the EMA (``weights``' view via
    ``functional_call``, the model untouched), both in eval mode. ``forward(call)`` returns
    the logits of the validation split computed with ``call`` (``model`` or the EMA view)."""
    if weights is None:
        raise RuntimeError("the EMA has not been set up: no EMA weights to evaluate")
    if weights.is_swapped:
        raise RuntimeError("the EMA weights are in the model: cannot evaluate the raw weights")
    was = model.training
    model.eval()
    try:
        raw = evaluate_logits(forward(model), labels)
        ema = evaluate_logits(
            forward(lambda *a, **k: weights.functional_call(model, *a, **k)), labels
        )
    finally:
        model.train(was)
    return raw, ema


def run_digits_demo(
    epochs: int = 4,
    half_life: str = "0.5ep",
    seed: int = 0,
    progress: ProgressFn | None = None,
) -> list[dict[str, Any]]:
    """Train :func:`digits_mlp` with a plain PyTorch loop and :class:`ema_callbacks.EMA`
    (updated every optimizer step); after every epoch evaluate the training weights and the
    EMA weights on the validation split. The same run as the trainers' ``run_digits_demo``:
    SGD (lr 0.2, momentum 0.9), batches of 32.

    Returns one row per epoch: ``{'epoch', 'raw_accuracy', 'raw_loss', 'ema_accuracy',
    'ema_loss'}``; ``progress(done, total)`` is called after every optimizer step.

    >>> rows = run_digits_demo(epochs=1)
    >>> [row['epoch'] for row in rows], sorted(rows[0])
    ([1], ['ema_accuracy', 'ema_loss', 'epoch', 'raw_accuracy', 'raw_loss'])
    """
    return _train_plain(epochs, half_life, seed, progress)[0]


def _train_plain(
    epochs: int, half_life: str, seed: int, progress: ProgressFn | None
) -> tuple[list[dict[str, Any]], nn.Module, Any]:
    """The plain demo run; also returns the model (training weights in) and the EMA."""
    from ema_callbacks.ema import EMA

    torch.manual_seed(seed)
    train, val = digits_datasets(seed)
    xv, yv = val.tensors
    model = digits_mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=DEMO_LR, momentum=DEMO_MOMENTUM)
    loader = torch.utils.data.DataLoader(
        train,
        batch_size=DEMO_BATCH_SIZE,
        shuffle=True,
        generator=torch.Generator().manual_seed(seed),
    )
    steps = len(loader)
    ema = EMA(model, half_life=half_life, update_interval="1ba", steps_per_epoch=steps)
    rows: list[dict[str, Any]] = []
    for epoch in range(1, epochs + 1):
        model.train()
        for i, (xb, yb) in enumerate(loader):
            loss = nn.functional.cross_entropy(model(xb), yb)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            ema.step(model, samples=len(yb))
            if progress is not None:
                progress((epoch - 1) * steps + i + 1, epochs * steps)
        ema.end_epoch(model)
        raw, averaged = _evaluate_raw_and_ema(
            model, ema.controller.weights, lambda call: call(xv), yv
        )
        rows.append(_row(epoch, raw, averaged))
    return rows, model, ema
