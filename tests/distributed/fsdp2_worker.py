"""Run under ``torchrun --nproc_per_node=2``: the EMA of an FSDP2-sharded model.

Each rank trains its half of every global batch on a ``fully_shard``-ed model and keeps an EMA
of its local shards; every rank also trains an unsharded replica on the whole global batch with
its own EMA, as the reference. Writes one JSON file per rank into the folder given as argv[1].
"""

from __future__ import annotations

import json
import os
import sys
import tempfile

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor.debug import CommDebugMode

from ema_callbacks import EMA


def build() -> nn.Module:
    torch.manual_seed(0)
    # 33 rows: uneven across 2 ranks, so FSDP2 pads the last shard
    return nn.Sequential(
        nn.Linear(16, 33), nn.Tanh(), nn.Linear(33, 64), nn.Tanh(), nn.Linear(64, 4)
    )


def shard(model: nn.Module) -> nn.Module:
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    return model


def main() -> None:
    out_dir = sys.argv[1]
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model, ref = shard(build()), build()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.05)
    ema = EMA(model, half_life="4ba")
    ref_ema = EMA(ref, half_life="4ba")
    gen = torch.Generator().manual_seed(1)
    per_rank = 4
    collectives = {"update": 0, "swap": 0}
    eval_diff = 0.0
    for step in range(12):
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
        collectives["update"] += comm.get_total_counts()
        ref_ema.step(ref)
        if step % 4 == 3:
            weights = ema.controller.weights
            assert weights is not None
            with CommDebugMode() as comm:
                weights.swap_in(model)
            collectives["swap"] += comm.get_total_counts()
            with torch.no_grad():
                got = model(x)  # FSDP all-gathers the (EMA) shards for this forward
            with CommDebugMode() as comm:
                weights.swap_out()
            collectives["swap"] += comm.get_total_counts()
            with ref_ema.swapped(ref), torch.no_grad():
                want = ref(x)
            eval_diff = max(eval_diff, float((got - want).abs().max()))

    weights, ref_weights = ema.controller.weights, ref_ema.controller.weights
    assert weights is not None and ref_weights is not None
    with CommDebugMode() as comm:
        full = weights.full_state_dict()  # the one gather
    collectives["export"] = comm.get_total_counts()
    ema_diff = max(float((full[k] - ref_weights.shadow[k]).abs().max()) for k in ref_weights.shadow)
    shapes_ok = all(full[k].shape == ref_weights.shadow[k].shape for k in ref_weights.shadow)

    # Sharded checkpoint with torch.distributed.checkpoint, loaded into a fresh sharded EMA.
    ckpt = os.path.join(out_dir, "dcp")
    dcp.save(weights.sharded_state_dict(), checkpoint_id=ckpt)
    fresh = EMA(shard(build()), half_life="4ba")
    fresh_weights = fresh.controller.weights
    assert fresh_weights is not None
    target = fresh_weights.sharded_state_dict()
    dcp.load(target, checkpoint_id=ckpt)
    dcp_ok = all(torch.equal(fresh_weights.shadow[k], weights.shadow[k]) for k in weights.shadow)
    # A full (gathered) state loads into a sharded EMA too: each rank keeps its slice.
    again = EMA(shard(build()), half_life="4ba")
    again.controller.weights.load_state_dict(full)  # type: ignore[union-attr]
    full_load_ok = all(
        torch.equal(again.controller.weights.shadow[k], weights.shadow[k])  # type: ignore[union-attr]
        for k in weights.shadow
    )

    # Root-only sharding: the root module owns the weights, and FSDP2 leaves them unsharded
    # after a forward with no backward (evaluation); swapping must still work.
    root_model = build()
    fully_shard(root_model)
    root_ref = build()
    root_opt = torch.optim.SGD(root_model.parameters(), lr=0.05)
    root_ref_opt = torch.optim.SGD(root_ref.parameters(), lr=0.05)
    root_ema, root_ref_ema = EMA(root_model, half_life="2ba"), EMA(root_ref, half_life="2ba")
    gen = torch.Generator().manual_seed(2)
    for _ in range(3):
        x = torch.randn(per_rank * world, 16, generator=gen)
        y = torch.randn(per_rank * world, 4, generator=gen)
        mine = slice(rank * per_rank, (rank + 1) * per_rank)
        nn.functional.mse_loss(root_model(x[mine]), y[mine]).backward()
        root_opt.step()
        root_opt.zero_grad()
        nn.functional.mse_loss(root_ref(x), y).backward()
        root_ref_opt.step()
        root_ref_opt.zero_grad()
        root_ema.step(root_model)
        root_ref_ema.step(root_ref)
    with torch.no_grad():
        root_model(x)  # forward, no backward: the root's weights stay unsharded

    def full(t: torch.Tensor) -> torch.Tensor:  # DTensor when sharded, plain when unsharded
        return t.full_tensor() if hasattr(t, "full_tensor") else t

    unsharded = not any(hasattr(p, "full_tensor") for p in root_model.parameters())
    before = {n: full(p.detach()).clone() for n, p in root_model.named_parameters()}
    with root_ema.swapped(root_model), torch.no_grad():
        got = root_model(x)
    with root_ref_ema.swapped(root_ref), torch.no_grad():
        want = root_ref(x)
    after = {n: full(p.detach()) for n, p in root_model.named_parameters()}
    root_restored = all(torch.equal(before[n], after[n]) for n in before)
    root_eval_diff = float((got - want).abs().max())

    result = {
        "rank": rank,
        "world": world,
        "sharded": weights.is_sharded,
        "collectives": collectives,
        "ema_max_abs_diff": ema_diff,
        "eval_max_abs_diff": eval_diff,
        "shapes_ok": shapes_ok,
        "ema_bytes": weights.nbytes,
        "unsharded_ema_bytes": ref_weights.nbytes,
        "dcp_round_trip": dcp_ok,
        "full_state_load": full_load_ok,
        "num_updates": ema.num_updates,
        "root_only_unsharded_before_swap": unsharded,
        "root_only_restored": root_restored,
        "root_only_eval_diff": root_eval_diff,
    }
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    with tempfile.TemporaryDirectory():
        main()
