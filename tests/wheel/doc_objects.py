"""The objects the README's and docs' code blocks leave to the reader (``model``, ``loader``,
``train_dl``, ``module``, ``train_ds``, ...), built tiny, for running those blocks as written.

Standalone on purpose (torch and the trainer only, no ``tests.`` imports): the wheel check
(``tests/wheel/check_wheel.py``) runs the README's quickstarts with it in environments that
hold only the installed wheel, and ``tests/test_docs.py`` runs every docs block with it.

>>> ns = namespace("plain")
>>> sorted(ns)
['evaluate', 'loader', 'loss_fn', 'model', 'optimizer']
>>> ns["evaluate"](ns["model"]) <= 1.0
True
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn

__all__ = ["FENCE", "blocks", "kind_of", "namespace"]

FEATURES, CLASSES, N_TRAIN, N_VAL, BATCH = 8, 3, 64, 32, 8

# A fenced python block, with the line before it (a ``<!-- fragment: REASON -->`` marker there
# says the block is a fragment that is not run, and why).
FENCE = re.compile(r"(?:^(?P<before>[^\n]*)\n)?^```python\n(?P<body>.*?)^```", re.M | re.S)


def blocks(text: str) -> list[tuple[int, str, str | None]]:
    """``(line of the fence, code, fragment_reason)`` of every fenced python block that is not a
    doctest.

    >>> blocks("x\\n```python\\na = 1\\n```\\n<!-- fragment: why -->\\n```python\\nb\\n```\\n")
    [(2, 'a = 1\\n', None), (6, 'b\\n', 'why')]
    """
    found = []
    for m in FENCE.finditer(text):
        body = m.group("body")
        if re.search(r"^\s*(>>>|\.\.\. )", body, re.M):
            continue  # a doctest block: pytest --doctest-glob runs it
        reason = re.fullmatch(r"\s*<!--\s*fragment:\s*(.+?)\s*-->\s*", m.group("before") or "")
        line = text.count("\n", 0, m.start("body"))
        found.append((line, body, reason.group(1) if reason else None))
    return found


def kind_of(code: str, default: str = "plain") -> str:
    """Which tiny objects a block needs: the trainer it imports, else ``default``.

    >>> kind_of("from ema_callbacks.lightning import EMACallback")
    'lightning'
    >>> kind_of("import torch", default="composer")
    'composer'
    """
    for kind in ("composer", "lightning", "transformers"):
        if re.search(rf"^\s*(from|import) (ema_callbacks\.)?{kind}\b", code, re.M):
            return kind
    return default


def _data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, FEATURES, generator=g)
    return x, (x[:, :CLASSES].argmax(dim=1))


def _net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(FEATURES, 16), nn.ReLU(), nn.Linear(16, CLASSES))


def _loader(n: int, seed: int, shuffle: bool = False) -> torch.utils.data.DataLoader[Any]:
    data = torch.utils.data.TensorDataset(*_data(n, seed))
    return torch.utils.data.DataLoader(data, batch_size=BATCH, shuffle=shuffle)


def _plain() -> dict[str, Any]:
    model = _net()
    x_val, y_val = _data(N_VAL, 1)

    def evaluate(model: nn.Module) -> float:
        with torch.no_grad():
            return float((model(x_val).argmax(dim=1) == y_val).float().mean())

    return {
        "model": model,
        "loader": _loader(N_TRAIN, 0, shuffle=True),
        "loss_fn": nn.CrossEntropyLoss(),
        "optimizer": torch.optim.SGD(model.parameters(), lr=0.1),
        "evaluate": evaluate,
    }


def _composer() -> dict[str, Any]:
    from composer.models import ComposerClassifier

    model = ComposerClassifier(_net(), num_classes=CLASSES)
    return {
        "model": model,
        "composer_model": model,
        "train_dl": _loader(N_TRAIN, 0, shuffle=True),
        "eval_dl": _loader(N_VAL, 1),
    }


def _lightning() -> dict[str, Any]:
    import lightning as L

    class Classifier(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = _net()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.model(x)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            return nn.functional.cross_entropy(self(x), y)

        def validation_step(self, batch: Any, batch_idx: int) -> None:
            x, y = batch
            logits = self(x)
            self.log("val_loss", nn.functional.cross_entropy(logits, y))
            self.log("val_acc", (logits.argmax(dim=1) == y).float().mean())

        test_step = validation_step

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    class Data(L.LightningDataModule):
        def train_dataloader(self) -> Any:
            return _loader(N_TRAIN, 0, shuffle=True)

        def val_dataloader(self) -> Any:
            return _loader(N_VAL, 1)

        test_dataloader = val_dataloader

    module, dm = Classifier(), Data()
    return {"module": module, "model": module, "dm": dm, "datamodule": dm}


class _TinyClassifier(nn.Module):
    """A classifier in the shape the transformers Trainer expects (``loss`` and ``logits``)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = _net()

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, Any]:
        logits = self.net(x)
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = nn.functional.cross_entropy(logits, labels)
        return out


def _transformers() -> dict[str, Any]:
    def dataset(n: int, seed: int) -> list[dict[str, torch.Tensor]]:
        x, y = _data(n, seed)
        return [{"x": x[i], "labels": y[i]} for i in range(n)]

    def accuracy(prediction: Any) -> dict[str, float]:
        logits, labels = prediction.predictions, prediction.label_ids
        return {"accuracy": float((logits.argmax(-1) == labels).mean())}

    train, val = dataset(N_TRAIN, 0), dataset(N_VAL, 1)
    return {
        "model": _TinyClassifier(),
        "train_ds": train,
        "eval_ds": val,
        "train": train,
        "val": val,
        "accuracy": accuracy,
    }


def namespace(kind: str) -> dict[str, Any]:
    """Fresh tiny objects for a block of this kind (``plain``, ``composer``, ``lightning``,
    ``transformers``); the trainer is imported only for its own kind."""
    makers = {
        "plain": _plain,
        "composer": _composer,
        "lightning": _lightning,
        "transformers": _transformers,
    }
    return makers[kind]()
