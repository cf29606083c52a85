"""Run under ``torchrun --nproc_per_node=2``: ``EMA.fused_step`` under DDP and FSDP2.

For each case (wrapper, optimizer, ``compile``) every rank builds two identical wrapped models,
trains both on the same data (its half of every global batch), one with
``optimizer.step(); ema.step(model)``, the other with ``ema.fused_step(optimizer)``, and
compares the training weights and the EMA (under FSDP2: this rank's local shards). The
collectives are counted at the process groups themselves (the gloo groups' sequence numbers,
which every collective advances, from Python or from compiled code alike) and through
``torch.distributed``'s Python functions (patched with counters): during the fused step and
during the separate steps' ``optimizer.step()``. Writes one JSON file per rank into the folder
given as argv[1]; argv[2:] (optional) selects cases by name.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel

from ema_callbacks import EMA

STEPS = 6
PER_RANK = 4
OPTIONS: dict[str, Any] = {"half_life": "3ba"}

# (name, wrapper, optimizer, compile)
CASES = [
    ("ddp-adamw-eager", "ddp", "adamw", False),
    ("ddp-sgd-eager", "ddp", "sgd", False),
    ("ddp-adamw-compiled", "ddp", "adamw", True),
    ("fsdp2-adamw-eager", "fsdp2", "adamw", False),
    ("fsdp2-sgd-eager", "fsdp2", "sgd", False),
    ("fsdp2-adamw-compiled", "fsdp2", "adamw", True),
]

# torch.distributed's Python collectives (FSDP2 calls these; DDP's reducer calls its group from C++)
COLLECTIVES = [
    "all_reduce",
    "all_reduce_coalesced",
    "all_gather",
    "all_gather_into_tensor",
    "all_gather_coalesced",
    "all_gather_single",  # FSDP2's (torch 2.13)
    "all_gather_object",
    "_all_gather_base",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "_reduce_scatter_base",
    "reduce_scatter_single",  # FSDP2's (torch 2.13)
    "broadcast",
    "broadcast_object_list",
    "reduce",
    "gather",
    "scatter",
    "all_to_all",
    "all_to_all_single",
    "barrier",
    "monitored_barrier",
    "send",
    "recv",
    "isend",
    "irecv",
    "batch_isend_irecv",
]

CALLS = {"n": 0}


def _counted(fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        CALLS["n"] += 1
        return fn(*args, **kwargs)

    return wrapper


def patch_collectives() -> None:
    """Count every call of torch.distributed's Python collectives (module and c10d alike)."""
    c10d = dist.distributed_c10d
    for name in COLLECTIVES:
        fn = getattr(c10d, name, None)
        if fn is None:
            continue
        wrapped = _counted(fn)
        setattr(c10d, name, wrapped)
        if getattr(dist, name, None) is fn:
            setattr(dist, name, wrapped)


def sequence_numbers() -> int:
    """The sum over every process group of its collective count (gloo advances a group's
    sequence number in every collective, whoever calls it)."""
    total = 0
    for pg in dist.distributed_c10d._world.pg_map:
        total += pg._get_sequence_number_for_group()
    return total


@contextlib.contextmanager
def counting(into: dict[str, int]) -> Iterator[None]:
    seq, calls = sequence_numbers(), CALLS["n"]
    yield
    into["wire"] += sequence_numbers() - seq
    into["python"] += CALLS["n"] - calls


def build() -> nn.Module:
    torch.manual_seed(0)
    # 33 rows: uneven across 2 ranks, so FSDP2 pads the last shard
    return nn.Sequential(nn.Linear(16, 33), nn.Tanh(), nn.Linear(33, 4))


def wrap(model: nn.Module, kind: str) -> nn.Module:
    if kind == "ddp":
        return DistributedDataParallel(model)
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    return model


def optimizer_for(model: nn.Module, kind: str) -> torch.optim.Optimizer:
    if kind == "adamw":
        # a tensor learning rate, as the compiled-optimizer recipe has it
        return torch.optim.AdamW(model.parameters(), lr=torch.tensor(0.02))
    return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)


def local(t: torch.Tensor) -> torch.Tensor:
    t = t.detach()
    return t.to_local() if hasattr(t, "to_local") else t  # type: ignore[no-any-return]


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    if b.numel() == 0:
        return 0.0
    return float((a - b).norm() / b.norm())


def run(wrapper: str, opt_kind: str, compile: bool, rank: int, world: int) -> dict[str, Any]:
    models = [wrap(build(), wrapper), wrap(build(), wrapper)]
    opts = [optimizer_for(m, opt_kind) for m in models]
    emas = [EMA(m, **OPTIONS) for m in models]
    fused = emas[1].fused_step(opts[1], compile=compile)
    counts = {
        "forward_backward": {"wire": 0, "python": 0},  # DDP's and FSDP2's own: the counters work
        "plain_step": {"wire": 0, "python": 0},
        "separate_ema": {"wire": 0, "python": 0},
        "fused": {"wire": 0, "python": 0},
    }
    seconds = {"separate": 0.0, "fused": 0.0}

    def separate() -> None:
        with counting(counts["plain_step"]):
            opts[0].step()
        with counting(counts["separate_ema"]):
            emas[0].step(models[0])

    def fused_call() -> None:
        with counting(counts["fused"]):
            fused()

    gen = torch.Generator().manual_seed(1)
    for step in range(STEPS):
        x = torch.randn(PER_RANK * world, 16, generator=gen)
        y = torch.randn(PER_RANK * world, 4, generator=gen)
        mine = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
        for i, model in enumerate(models):
            opts[i].zero_grad()
            with counting(counts["forward_backward"]):
                nn.functional.mse_loss(model(x[mine]), y[mine]).backward()
        # alternate which runs first, so that neither gets the warmer caches every step
        for name, fn in (("separate", separate), ("fused", fused_call))[:: 1 - 2 * (step % 2)]:
            start = time.perf_counter()
            fn()
            if step >= 2:  # after the compilations (the initialising copy, then the lerp)
                seconds[name] += time.perf_counter() - start

    params = [[local(p) for p in m.parameters()] for m in models]
    shadows = [{k: local(v) for k, v in e.shadow.items()} for e in emas]
    weights = emas[1].controller.weights
    assert weights is not None
    return {
        "sharded": bool(weights.is_sharded),
        # under FSDP2 a shard: fewer elements than the whole (33x16 + 33 + 4x33 + 4 = 697)
        "local_numel": sum(p.numel() for p in params[1]),
        "weights_equal": all(torch.equal(p, q) for p, q in zip(params[0], params[1], strict=True)),
        "weights_rel": max(relative(q, p) for p, q in zip(params[0], params[1], strict=True)),
        "ema_equal": all(torch.equal(shadows[1][k], v) for k, v in shadows[0].items()),
        "ema_diff": max(
            float((shadows[1][k] - v).abs().max()) if v.numel() else 0.0
            for k, v in shadows[0].items()
        ),
        "keys_equal": sorted(shadows[0]) == sorted(shadows[1]),
        "num_updates": [e.num_updates for e in emas],
        "compilations": fused.compilations,
        "collectives": counts,
        "seconds_per_step": {k: v / (STEPS - 2) for k, v in seconds.items()},
    }


def main() -> None:
    out_dir = sys.argv[1]
    chosen = set(sys.argv[2:])
    dist.init_process_group("gloo")
    patch_collectives()
    rank, world = dist.get_rank(), dist.get_world_size()
    result: dict[str, Any] = {"rank": rank, "world": world}
    check = {"wire": 0, "python": 0}
    with counting(check):  # the counters see a collective
        dist.all_reduce(torch.ones(1))
    result["counter_check"] = check
    for name, wrapper, opt_kind, compile in CASES:
        if chosen and name not in chosen:
            continue
        try:
            result[name] = run(wrapper, opt_kind, compile, rank, world)
        except Exception as e:  # reported, so that the test names the failure
            result[name] = {"error": f"{type(e).__name__}: {e}"[:3000]}
        dist.barrier()
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
