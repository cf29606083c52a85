"""How a tracked tensor is laid out across ranks, behind one small interface, so that
:mod:`ema_callbacks.weights` never branches on the kind.

* :data:`PLAIN` — every rank holds the whole tensor (single process, DDP).
* :class:`DTensorShards` — an FSDP2 ``DTensor``: each rank holds its local shard.
* :class:`Zero3Partition` — a DeepSpeed ZeRO-3 parameter: each rank holds a flat partition
  ``param.ds_tensor``; the module's tensor is an empty placeholder (or, for a persistent one, a
  whole copy DeepSpeed gathers from the partitions).

The EMA's shadow of a tensor is shaped like :meth:`Sharding.local`: it is rank-local, and only
:meth:`Sharding.full` communicates (export, never updates or swaps).

>>> w = torch.nn.Linear(2, 2).weight
>>> s = sharding_of(w)
>>> s is PLAIN, s.dynamic, s.local(w).shape
(True, False, torch.Size([2, 2]))
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

__all__ = ["PLAIN", "DTensorShards", "Sharding", "Zero3Partition", "sharding_of"]


def _is_dtensor(t: Any) -> bool:
    return type(t).__name__ == "DTensor" and hasattr(t, "to_local")


class Sharding:
    """A tensor's layout across ranks and the operations the EMA needs on it; this base is the
    plain layout (:data:`PLAIN`: the whole tensor on every rank, every operation the identity).

    Attributes:
        dynamic: whether the rank-local tensor is a view the wrapper may re-point: the update
            reads it anew each time (never cached) and a swap copies into it (exchanging its
            storage would detach it from the wrapper's buffers).
    """

    dynamic: ClassVar[bool] = False

    def local(self, t: torch.Tensor) -> torch.Tensor:
        """The rank-local tensor of a module's parameter or buffer ``t``: what the EMA reads,
        shapes its shadow like, and writes into (a parameter's ``.data``, so in-place writes
        need no ``no_grad``)."""
        return t.data if isinstance(t, nn.Parameter) else t

    def full(self, part: torch.Tensor) -> torch.Tensor:
        """The whole tensor from every rank's local ``part`` (one collective; every rank must
        call it)."""
        return part

    def local_part(self, value: torch.Tensor) -> torch.Tensor:
        """This rank's part of a saved ``value``: a ``DTensor``'s local tensor; the local part
        of a whole tensor; ``value`` itself when it is already local or of a wrong shape (the
        caller reports the mismatch)."""
        return value.to_local() if _is_dtensor(value) else value  # type: ignore[attr-defined]

    def global_view(self, part: torch.Tensor) -> torch.Tensor:
        """A global view of the local ``part`` without copy or communication (a ``DTensor``,
        for ``torch.distributed.checkpoint``), or ``part`` itself where there is none."""
        return part


PLAIN = Sharding()


@dataclass(frozen=True, eq=False)
class DTensorShards(Sharding):
    """An FSDP2 ``DTensor``: its mesh, placements, global shape and stride rebuild the global
    view of a local shard."""

    mesh: Any
    placements: tuple[Any, ...]
    shape: torch.Size
    stride: tuple[int, ...]

    dynamic: ClassVar[bool] = True

    def local(self, t: torch.Tensor) -> torch.Tensor:
        return super().local(t).to_local()  # type: ignore[attr-defined,no-any-return]

    def full(self, part: torch.Tensor) -> torch.Tensor:
        return self.global_view(part).full_tensor()  # type: ignore[attr-defined,no-any-return]

    def local_part(self, value: torch.Tensor) -> torch.Tensor:
        if _is_dtensor(value) or tuple(value.shape) != tuple(self.shape):
            return super().local_part(value)
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        local_shape, offset = compute_local_shape_and_global_offset(
            self.shape, self.mesh, self.placements
        )
        return value[tuple(slice(o, o + n) for o, n in zip(offset, local_shape, strict=True))]

    def global_view(self, part: torch.Tensor) -> torch.Tensor:
        from torch.distributed.tensor import DTensor

        return DTensor.from_local(
            part, self.mesh, self.placements, run_check=False, shape=self.shape, stride=self.stride
        )


@dataclass(frozen=True, eq=False)
class Zero3Partition(Sharding):
    """A DeepSpeed ZeRO-3 parameter: rank ``r`` of its process group holds chunk ``r`` of the
    flattened tensor, zero-padded to a multiple of the group size (DeepSpeed's
    ``partition_parameters.py``, ``_partition_param``). The partition ``ds_tensor`` is read
    anew each time: the optimizer may re-point it."""

    group: Any  # the parameter's ``ds_process_group`` (None: the default group)
    part_shape: tuple[int, ...]
    numel: int
    shape: tuple[int, ...]

    dynamic: ClassVar[bool] = True

    def local(self, t: torch.Tensor) -> torch.Tensor:
        return t.ds_tensor  # type: ignore[attr-defined,no-any-return]

    def full(self, part: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        parts = [torch.empty_like(part) for _ in range(dist.get_world_size(self.group))]
        dist.all_gather(parts, part.contiguous(), group=self.group)
        return torch.cat(parts)[: self.numel].view(self.shape)

    def local_part(self, value: torch.Tensor) -> torch.Tensor:
        if (
            _is_dtensor(value)
            or tuple(value.shape) == self.part_shape
            or value.numel() != self.numel
        ):
            return super().local_part(value)
        import torch.distributed as dist

        world, rank = dist.get_world_size(self.group), dist.get_rank(self.group)
        size = math.prod(self.part_shape)
        flat = value.reshape(-1)
        if size * world > flat.numel():
            flat = torch.cat([flat, flat.new_zeros(size * world - flat.numel())])
        return flat[rank * size : (rank + 1) * size]


def sharding_of(t: torch.Tensor) -> Sharding:
    """The layout of a module's parameter or buffer ``t`` (cheap: :data:`PLAIN` after a type
    name and an attribute check)."""
    part = getattr(t, "ds_tensor", None)
    if part is not None:
        return Zero3Partition(
            getattr(t, "ds_process_group", None),
            tuple(part.shape),
            int(t.ds_numel),  # type: ignore[attr-defined]
            tuple(t.ds_shape),  # type: ignore[attr-defined]
        )
    if _is_dtensor(t):
        return DTensorShards(
            t.device_mesh,  # type: ignore[attr-defined]
            tuple(t.placements),  # type: ignore[attr-defined]
            t.shape,
            t.stride(),
        )
    return PLAIN
