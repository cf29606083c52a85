"""Run under ``torchrun --nproc_per_node=2``: this library's Composer ``EMA`` on a model that
Composer itself shards with FSDP2 (``parallelism_config={'fsdp': FSDP2Config()}``, CPU, gloo).

A test callback (callbacks run after the algorithms at every event) checks, at every
``BATCH_END``, that the EMA gathered from the ranks' shards equals a reference EMA computed by
hand from the gathered training weights with the same smoothing; it counts the collective calls
made inside the algorithm's ``apply``; and at every evaluation batch it checks that the model
holds the EMA. Writes one JSON file per rank into the folder given as argv[1].
"""

from __future__ import annotations

import json
import logging
import os
import sys
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as tdist
from composer import Callback, Trainer
from composer.core import Event, State
from composer.loggers import Logger
from composer.metrics import CrossEntropy
from composer.models import ComposerClassifier
from composer.utils import dist
from composer.utils.parallelism import FSDP2Config
from torch import nn
from torch.distributed.tensor.debug import CommDebugMode
from torch.utils.data import DataLoader, TensorDataset

from ema_callbacks.composer import EMA
from ema_callbacks.weights import normalize_name

SMOOTHING = 0.8
BATCHES = 8
PER_RANK = 4

logging.getLogger("composer").setLevel(logging.ERROR)
warnings.filterwarnings("ignore")

_COLLECTIVES = (
    "all_reduce",
    "all_gather",
    "all_gather_into_tensor",
    "reduce_scatter_tensor",
    "broadcast",
    "barrier",
    "all_to_all_single",
)


def make_model() -> ComposerClassifier:
    torch.manual_seed(0)
    # 33 rows: uneven across 2 ranks, so FSDP2 pads the last shard
    net = nn.Sequential(nn.Linear(8, 33), nn.Tanh(), nn.Linear(33, 3))
    return ComposerClassifier(net, num_classes=3, val_metrics=CrossEntropy())


def make_loader(seed: int, batches: int) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    n = batches * PER_RANK * dist.get_world_size()
    x = torch.randn(n, 8, generator=g)
    y = torch.randint(0, 3, (n,), generator=g)
    data = TensorDataset(x, y)
    return DataLoader(data, batch_size=PER_RANK, sampler=dist.get_sampler(data, shuffle=False))


def full_params(model: nn.Module) -> dict[str, torch.Tensor]:
    """The gathered training (or swapped-in) weights, by normalised name (collective)."""
    out = {}
    for name, p in model.named_parameters():
        t = p.full_tensor() if hasattr(p, "full_tensor") else p  # type: ignore[operator]
        out[normalize_name(name)] = t.detach().clone()
    return out


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert set(a) == set(b), (sorted(a), sorted(b))
    return max(float((a[k] - b[k]).abs().max()) for k in a)


class Check(Callback):  # type: ignore[misc]
    def __init__(self, algo: EMA) -> None:
        self.algo = algo
        self.reference: dict[str, torch.Tensor] | None = None
        self.ema_diffs: list[float] = []
        self.local_diffs: list[float] = []
        self.eval_diffs: list[float] = []
        self.after_eval_diffs: list[float] = []
        self.training: dict[str, torch.Tensor] = {}
        self.updates = 0
        self.dtensor_params = 0
        self.local_numel = 0
        self.full_numel = 0

    def fit_start(self, state: State, logger: Logger) -> None:
        params = list(state.model.parameters())
        self.dtensor_params = sum(type(p).__name__ == "DTensor" for p in params)
        self.full_numel = sum(p.numel() for p in params)  # a DTensor's numel is the global one
        self.local_numel = sum(
            (p.to_local() if hasattr(p, "to_local") else p).numel()  # type: ignore[operator]
            for p in params
        )

    def batch_end(self, state: State, logger: Logger) -> None:
        controller = self.algo.controller
        training = full_params(state.model)
        self.training = training
        if self.reference is None:  # the EMA starts as a copy of the weights
            assert controller.started and controller.num_updates == 0
            self.reference = {k: v.clone() for k, v in training.items()}
        else:  # then one update per batch with the constant smoothing
            assert controller.num_updates == self.updates + 1
            for k, v in training.items():
                self.reference[k].lerp_(v, 1 - SMOOTHING)
        self.updates = controller.num_updates
        weights = controller.weights
        assert weights is not None
        gathered = {k: v for k, v in weights.full_state_dict().items() if k in self.reference}
        self.ema_diffs.append(max_diff(gathered, self.reference))
        # each rank's shard against its slice of the reference
        sharded = weights.sharded_state_dict()
        local = {
            k: sharded[k].full_tensor() if hasattr(sharded[k], "full_tensor") else sharded[k]
            for k in self.reference
        }
        self.local_diffs.append(max_diff(local, self.reference))

    def eval_batch_start(self, state: State, logger: Logger) -> None:
        assert self.reference is not None
        self.eval_diffs.append(max_diff(full_params(state.model), self.reference))

    def eval_end(self, state: State, logger: Logger) -> None:
        # the algorithm has put the training weights back
        self.after_eval_diffs.append(max_diff(full_params(state.model), self.training))


def count_collectives(counter: dict[str, int]) -> Callable[[], None]:
    """Wrap torch.distributed's collectives to count the calls; returns the undo."""
    saved = {name: getattr(tdist, name) for name in _COLLECTIVES}

    def wrap(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def counted(*args: Any, **kwargs: Any) -> Any:
            counter[name] = counter.get(name, 0) + 1
            return fn(*args, **kwargs)

        return counted

    for name, fn in saved.items():
        setattr(tdist, name, wrap(name, fn))

    def undo() -> None:
        for name, fn in saved.items():
            setattr(tdist, name, fn)

    return undo


def main() -> None:
    out_dir = sys.argv[1]
    model = make_model()
    algo = EMA(smoothing=SMOOTHING)
    check = Check(algo)
    comm = {"comm_debug": 0, "wrapped": 0, "applies": 0, "batch_end_applies": 0}
    apply = algo.apply

    def counted_apply(event: Event, state: State, logger: Logger) -> None:
        counter: dict[str, int] = {}
        undo = count_collectives(counter)
        try:
            with CommDebugMode() as mode:
                apply(event, state, logger)
        finally:
            undo()
        comm["comm_debug"] += mode.get_total_counts()
        comm["wrapped"] += sum(counter.values())
        comm["applies"] += 1
        comm["batch_end_applies"] += event == Event.BATCH_END

    algo.apply = counted_apply  # type: ignore[method-assign]
    trainer = Trainer(
        model=model,
        train_dataloader=make_loader(0, BATCHES),
        eval_dataloader=make_loader(1, 2),
        eval_interval="4ba",
        max_duration=f"{BATCHES}ba",
        optimizers=torch.optim.SGD(model.parameters(), lr=0.2),
        algorithms=[algo],
        callbacks=[check],
        parallelism_config={"fsdp": FSDP2Config()},
        device="cpu",
        seed=0,
        progress_bar=False,
        log_to_console=False,
    )
    trainer.fit()

    weights = algo.controller.weights
    assert weights is not None
    with CommDebugMode() as mode:  # the counter does see collectives: the export gathers
        weights.full_state_dict()
    result = {
        "rank": dist.get_global_rank(),
        "world": dist.get_world_size(),
        "sharded": weights.is_sharded,
        "dtensor_params": check.dtensor_params,
        "ema_bytes": weights.nbytes,
        "local_numel": check.local_numel,
        "full_numel": check.full_numel,
        "ema_diffs": check.ema_diffs,
        "local_diffs": check.local_diffs,
        "eval_diffs": check.eval_diffs,
        "after_eval_diffs": check.after_eval_diffs,
        "collectives": comm,
        "export_collectives": mode.get_total_counts(),
        "num_updates": algo.controller.num_updates,
    }
    with open(os.path.join(out_dir, f"rank{result['rank']}.json"), "w") as f:
        json.dump(result, f)
    trainer.close()


if __name__ == "__main__":
    main()
