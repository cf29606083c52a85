"""The layouts of :mod:`ema_callbacks._sharding`: plain tensors in this process; FSDP2 shards and
ZeRO-3 partitions on 2 gloo processes (this file run by ``torchrun``), against the whole tensor.
"""

from __future__ import annotations

import sys

import pytest
import torch
from torch import nn

from ema_callbacks._sharding import PLAIN, DTensorShards, Zero3Partition, sharding_of


def _zero3_param(part: torch.Tensor, shape: tuple[int, ...]) -> nn.Parameter:
    """A parameter laid out as DeepSpeed ZeRO-3 lays one out: an empty placeholder and the
    attributes it sets (``ds_tensor`` the rank's flat partition)."""
    p = nn.Parameter(torch.empty(0))
    p.ds_tensor = part  # type: ignore[attr-defined]
    p.ds_numel = int(torch.Size(shape).numel())  # type: ignore[attr-defined]
    p.ds_shape = torch.Size(shape)  # type: ignore[attr-defined]
    p.ds_process_group = None  # type: ignore[attr-defined]
    return p


def test_plain_is_the_tensor_itself() -> None:
    lin = nn.Linear(2, 3)
    lin.register_buffer("stat", torch.ones(3))
    for t in (lin.weight, lin.stat):
        assert sharding_of(t) is PLAIN
    assert not PLAIN.dynamic
    local = PLAIN.local(lin.weight)  # a parameter's .data: writable without no_grad
    assert not isinstance(local, nn.Parameter) and local.data_ptr() == lin.weight.data_ptr()
    assert PLAIN.local(lin.stat) is lin.stat
    value = torch.randn(3, 2)
    for op in (PLAIN.full, PLAIN.local_part, PLAIN.global_view):
        assert op(value) is value


def test_zero3_parameter_is_its_partition() -> None:
    part = torch.zeros(3)
    p = _zero3_param(part, (5,))
    s = sharding_of(p)
    assert isinstance(s, Zero3Partition) and s.dynamic
    assert (s.group, s.part_shape, s.numel, s.shape) == (None, (3,), 5, (5,))
    assert s.local(p) is part
    p.ds_tensor = torch.ones(3)  # re-pointed by the optimizer: read anew  # type: ignore[attr-defined]
    assert s.local(p) is p.ds_tensor  # type: ignore[attr-defined]
    # already local, or of a wrong size: returned as it is (no process group needed)
    local, wrong = torch.ones(3), torch.ones(4)
    assert s.local_part(local) is local and s.local_part(wrong) is wrong


def _worker() -> None:
    """Each rank checks every layout's local part, gather and global view against the whole
    tensor (run by ``torchrun --nproc_per_node=2``)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    # FSDP2: 5 rows over 2 ranks, Shard(0): rows 0-2 and 3-4
    whole = torch.arange(15.0).view(5, 3)
    mesh = init_device_mesh("cpu", (2,))
    weight = nn.Parameter(distribute_tensor(whole, mesh, [Shard(0)]))
    s = sharding_of(weight)
    assert isinstance(s, DTensorShards) and s.dynamic and s.shape == (5, 3)
    mine = whole[:3] if rank == 0 else whole[3:]
    local = s.local(weight)
    assert not isinstance(local, (nn.Parameter, DTensor)) and torch.equal(local, mine)
    assert torch.equal(s.local_part(whole), mine)  # a saved whole tensor: this rank's rows
    assert torch.equal(s.local_part(weight.data), mine)  # a saved DTensor: its local tensor
    assert s.local_part(mine) is mine  # already local
    view = s.global_view(mine.clone())
    assert isinstance(view, DTensor) and view.shape == (5, 3)
    assert torch.equal(s.full(mine.clone()), whole)
    # ZeRO-3: 5 elements over 2 ranks, zero-padded to 6: [0, 1, 2] and [3, 4, 0]
    whole = torch.arange(1.0, 6.0)
    expected = torch.tensor([1.0, 2.0, 3.0]) if rank == 0 else torch.tensor([4.0, 5.0, 0.0])
    p = _zero3_param(expected.clone(), (5,))
    z = sharding_of(p)
    assert isinstance(z, Zero3Partition)
    assert torch.equal(z.local_part(whole), expected)
    assert torch.equal(z.local_part(whole.view(1, 5)), expected)  # any shape of 5 elements
    assert torch.equal(z.full(z.local(p)), whole)
    assert z.global_view(expected) is expected  # no global view of a flat partition
    # both ranks done before the group goes: destroyed while the other rank is still in a
    # collective, gloo aborts the process ("terminate called without an active exception")
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.distributed
@pytest.mark.slow
def test_sharded_layouts_on_two_processes() -> None:
    from tests.process_group import torchrun

    torchrun(__file__, "--worker", timeout=120)


if __name__ == "__main__" and sys.argv[1:] == ["--worker"]:
    _worker()
