"""Run under ``torchrun --nproc_per_node=2``: several averages (three EMA profiles, BEMA and
uniform, one fused update) of a DDP model and of an FSDP2-sharded model.

Each rank trains its half of every global batch; every rank also trains an unsharded replica on
the whole global batch with the same three EMAs, as the reference. Counts the collectives the
EMA updates and the evaluation swaps of every profile make (none), and compares every
profile's EMA (each rank's shards, and the gathered whole) with the reference. Writes one JSON
file per rank into the folder given as argv[1].
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor.debug import CommDebugMode
from torch.nn.parallel import DistributedDataParallel

from ema_callbacks import EMA

PROFILES: list[dict[str, Any]] = [
    {"half_life": "4ba"},
    {"half_life": "8ba", "update_interval": "2ba"},
    {"sigma_rel": 0.1},
    {"name": "bema", "ema_power": 0.5, "lag": 2},  # BEMA: extra buffers, sharded like the EMA
    {"name": "swa", "uniform": True, "start": "3ba"},
]


def build() -> nn.Module:
    torch.manual_seed(0)
    # 33 rows: uneven across 2 ranks, so FSDP2 pads the last shard
    return nn.Sequential(nn.Linear(16, 33), nn.Tanh(), nn.Linear(33, 4))


def shard(model: nn.Module) -> nn.Module:
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    return model


def run(kind: str, rank: int, world: int) -> dict[str, Any]:
    inner = build()
    model: nn.Module = DistributedDataParallel(inner) if kind == "ddp" else shard(inner)
    ref = build()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.05)
    ema, ref_ema = EMA(model, profiles=PROFILES), EMA(ref, profiles=PROFILES)
    gen = torch.Generator().manual_seed(1)
    per_rank = 4
    counts = {"update": 0, "swap": 0}
    eval_diff = {name: 0.0 for name in ema.profiles}
    for step in range(10):
        x = torch.randn(per_rank * world, 16, generator=gen)
        y = torch.randn(per_rank * world, 4, generator=gen)
        mine = slice(rank * per_rank, (rank + 1) * per_rank)
        nn.functional.mse_loss(model(x[mine]), y[mine]).backward()
        opt.step()
        opt.zero_grad()
        nn.functional.mse_loss(ref(x), y).backward()
        ref_opt.step()
        ref_opt.zero_grad()
        with CommDebugMode() as comm:
            ema.step(model)
        counts["update"] += comm.get_total_counts()
        ref_ema.step(ref)
        if step % 3 == 2:
            for name in ema.profiles:
                weights = ema.controller.profile(name).weights
                assert weights is not None
                with CommDebugMode() as comm:
                    weights.swap_in(model)
                counts["swap"] += comm.get_total_counts()
                with torch.no_grad():
                    got = model(x)  # FSDP all-gathers the (EMA) shards for this forward
                with CommDebugMode() as comm:
                    weights.swap_out()
                counts["swap"] += comm.get_total_counts()
                with ref_ema.swapped(ref, profile=name), torch.no_grad():
                    want = ref(x)
                eval_diff[name] = max(eval_diff[name], float((got - want).abs().max()))

    ema_diff, shard_diff, nbytes = {}, {}, {}
    for name in ema.profiles:
        weights = ema.controller.profile(name).weights
        ref_weights = ref_ema.controller.profile(name).weights
        assert weights is not None and ref_weights is not None
        whole = weights.full_state_dict()
        ema_diff[name] = max(
            float((whole[k] - ref_weights.shadow[k]).abs().max()) for k in ref_weights.shadow
        )
        # this rank's own shard of every tensor against the same rows of the reference
        worst = 0.0
        for k, local in weights.shadow.items():
            part = local.to_local() if hasattr(local, "to_local") else local
            want = ref_weights.shadow[k]
            if part.shape != want.shape:  # FSDP2: this rank's dim-0 chunk (torch.chunk)
                want = torch.chunk(want, world, dim=0)[rank]
            worst = max(worst, float((part - want).abs().max()) if part.numel() else 0.0)
        # the extra buffers (BEMA's running EMA and theta0) are this rank's shards too
        for buffer, tensors in weights.extra_state_dict().items():
            for k, local in tensors.items():
                part = local.to_local() if hasattr(local, "to_local") else local
                want = ref_weights.extra[buffer][k]
                if part.shape != want.shape:
                    want = torch.chunk(want, world, dim=0)[rank]
                worst = max(worst, float((part - want).abs().max()) if part.numel() else 0.0)
        shard_diff[name] = worst
        nbytes[name] = [weights.nbytes, ref_weights.nbytes]
    return {
        "sharded": bool(ema.controller.weights.is_sharded),  # type: ignore[union-attr]
        "profiles": ema.profiles,
        "num_updates": {n: ema.controller.profile(n).state.num_updates for n in ema.profiles},
        "collectives": counts,
        "ema_diff": ema_diff,
        "shard_diff": shard_diff,
        "eval_diff": eval_diff,
        "nbytes": nbytes,
    }


def main() -> None:
    out_dir = sys.argv[1]
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    result: dict[str, Any] = {"rank": rank, "world": world}
    with CommDebugMode() as comm:  # the counter sees plain c10d collectives (DDP's kind) too
        dist.all_reduce(torch.ones(1))
    result["counter_sees_all_reduce"] = comm.get_total_counts()
    for kind in ("ddp", "fsdp2"):
        result[kind] = run(kind, rank, world)
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
