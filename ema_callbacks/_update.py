"""The update maths of :mod:`ema_callbacks.weights`, as functions over its groups of tensors:
the fused lerp of several EMAs at once, the mixed-dtype staging through a bounded scratch, the
non-finite guard. Torch only (examples: :func:`lerp_`, :func:`update_together_`).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import nn

if TYPE_CHECKING:
    from ema_callbacks.weights import EMAWeights, _Group

__all__ = ["Batch", "all_finite", "lerp_", "mixed_lerp_", "plan_batches", "update_together_"]


@torch.no_grad()
def lerp_(shadow: Sequence[torch.Tensor], source: Sequence[torch.Tensor], weight: float) -> None:
    """``shadow[i] += weight * (source[i] - shadow[i])`` for same-device, same-dtype lists.

    One fused multi-tensor call; ``weight == 1`` copies.

    >>> s, p = [torch.zeros(3)], [torch.ones(3)]
    >>> lerp_(s, p, 0.25); s[0].tolist()
    [0.25, 0.25, 0.25]
    """
    if not shadow:
        return
    if weight == 1.0:
        torch._foreach_copy_(list(shadow), list(source))
    elif weight != 0.0:
        torch._foreach_lerp_(list(shadow), list(source), weight)


def _blend_(
    targets: Sequence[tuple[list[torch.Tensor], float]], sources: list[torch.Tensor]
) -> None:
    """For every target ``(shadows, weight)`` (``shadows`` aligned with ``sources``):
    ``shadows += weight * (sources - shadows)``, weight 1 copying and 0 skipping. One
    ``_foreach_copy_`` for the copies and one ``_foreach_lerp_`` for the rest, with a weight per
    tensor (a scalar when they are all equal): each source is read once per fused call for every
    target."""
    copies: list[torch.Tensor] = []
    lerps: list[torch.Tensor] = []
    weights: list[tuple[float, int]] = []  # (weight, tensors) per lerping target
    for shadows, w in targets:
        if w == 1.0:
            copies.extend(shadows)
        elif w != 0.0:
            lerps.extend(shadows)
            weights.append((w, len(shadows)))
    if copies:
        torch._foreach_copy_(copies, sources * (len(copies) // len(sources)))
    if lerps:
        xs = sources * (len(lerps) // len(sources))
        if all(w == weights[0][0] for w, _ in weights):  # per target, not per tensor
            torch._foreach_lerp_(lerps, xs, weights[0][0])
        else:
            torch._foreach_lerp_(lerps, xs, [w for w, n in weights for _ in range(n)])


def all_finite(weights: EMAWeights) -> bool:
    """Whether every averaged source tensor is finite.

    One fused 2-norm per group, accumulated in float32 (float64 for float64 weights; NaN
    and Inf propagate into it; an fp16 norm could overflow, a float32 one only for weights
    above ~1e16), then one host read per device and norm dtype: the price of the guard is one extra read of the weights.
    ``ord=inf`` would be exact for huge values too, but is ~30x slower on CPU.
    """
    per_device: dict[tuple[torch.device, bool], list[torch.Tensor]] = {}
    for group in (*weights._groups, *weights._mixed):
        srcs = [s for s in group.sources() if s.numel() > 0 and s.is_floating_point()]
        # float64 weights get a float64 norm (a float32 one would narrow them).
        for wide in (False, True):
            part = [s for s in srcs if (s.dtype == torch.float64) is wide]
            if part:
                norms = torch._foreach_norm(part, 2, dtype=None if wide else torch.float32)
                per_device.setdefault((part[0].device, wide), []).extend(norms)
    return all(bool(torch.isfinite(torch.stack(ns)).all()) for ns in per_device.values())


def mixed_lerp_(
    weights: EMAWeights,
    sources: list[torch.Tensor],
    targets: list[tuple[list[torch.Tensor], float, torch.Tensor | None]],
    group: _Group | None = None,
) -> None:
    """Shadows and sources differ in dtype or device: stage the sources through a bounded
    scratch in the shadows' dtype and device, then update every target ``(shadows, weight,
    span)`` from each staged batch (several EMAs read each staged batch once). A target with a
    ``span`` (its shadows packed back to back, :meth:`EMAWeights._shadow_plan`) takes each batch
    in one ``lerp_`` over the flat slice; the others one ``_foreach_lerp_`` per batch.

    With ``group`` (whose sources are cached at bind), the batches are planned once and
    kept on it: contiguous ranges of tensors and their views into the scratch."""
    targets = [(shadows, w, span) for shadows, w, span in targets if w != 0.0]
    if not targets:
        return
    first = targets[0][0][0]
    # Offload (CUDA weights, CPU shadow): stage through pinned memory with non-blocking
    # copies, and wait for each batch's copies before the CPU reads them.
    offload = first.device.type == "cpu" and sources[0].device.type == "cuda"
    scratch = weights._scratch_for(first.device, first.dtype, pin=offload)

    def arrived() -> None:
        if offload:
            torch.cuda.current_stream(sources[0].device).synchronize()

    if group is not None and group.aliases is sources:
        if group.plan is None:
            group.plan = plan_batches(sources, targets[0][0], scratch)
        if group.plan:
            for a, b, staged, lo, hi, part, chunk in group.plan:
                if chunk is None:
                    torch._foreach_copy_(staged, sources[a:b], non_blocking=True)
                else:
                    staged[0].copy_(chunk, non_blocking=True)
                arrived()
                flat = scratch[: hi - lo]
                apart = []
                for shadows, w, span in targets:
                    if span is None:
                        apart.append(
                            (shadows[a:b] if part is None else [shadows[a].view(-1)[part]], w)
                        )
                    elif w == 1.0:
                        span[lo:hi].copy_(flat)
                    else:
                        span[lo:hi].lerp_(flat, w)
                if apart:
                    _blend_(apart, staged)
            return

    def apply(index: list[int], staged: list[torch.Tensor], part: slice | None) -> None:
        chosen = [
            ([sh[i] if part is None else sh[i].view(-1)[part] for i in index], w)
            for sh, w, _ in targets
        ]
        _blend_(chosen, staged)

    cap = scratch.numel()
    batch_i: list[int] = []
    batch_p: list[torch.Tensor] = []
    batch_x: list[torch.Tensor] = []
    used = 0

    def flush() -> None:
        nonlocal used
        if batch_i:
            torch._foreach_copy_(batch_x, batch_p, non_blocking=True)
            arrived()
            apply(batch_i, batch_x, None)
            batch_i.clear()
            batch_p.clear()
            batch_x.clear()
        used = 0

    for i, src in enumerate(sources):
        sh = targets[0][0][i]
        n = sh.numel()
        if n == 0:
            continue
        contiguous = src.is_contiguous() and all(t[0][i].is_contiguous() for t in targets)
        if n > cap or not contiguous:
            flush()
            if not contiguous:  # rare: through a temporary of this tensor only
                x = src.to(sh.dtype)
                apply([i], [x], None)
                continue
            flat_p = src.reshape(-1)
            for j in range(0, n, cap):
                m = min(cap, n - j)
                x = scratch[:m]
                x.copy_(flat_p[j : j + m], non_blocking=True)
                arrived()
                apply([i], [x], slice(j, j + m))
            continue
        if used + n > cap:
            flush()
        batch_i.append(i)
        batch_p.append(src)
        batch_x.append(scratch[used : used + n].view(sh.shape))
        used += n
    flush()


class Batch(NamedTuple):
    """One staging step of a planned mixed-dtype update (:func:`plan_batches`): sources
    ``[a, b)`` copied into ``staged`` (views from the scratch's start), elements ``[lo, hi)``
    of the group. ``part`` is set for a chunk of one tensor too large for the scratch: its
    elements ``part`` of tensor ``a``, copied from ``chunk`` (a view of the source)."""

    a: int
    b: int
    staged: list[torch.Tensor]
    lo: int
    hi: int
    part: slice | None = None
    chunk: torch.Tensor | None = None


def plan_batches(
    sources: list[torch.Tensor], shadows: list[torch.Tensor], scratch: torch.Tensor
) -> list[Batch]:
    """The staging steps of a mixed-dtype update: consecutive tensors that fit the scratch
    together, and chunks of those that do not; empty (use the general path) when a
    shadow is not contiguous, or a tensor too large for the scratch is not."""
    cap = scratch.numel()
    plan: list[Batch] = []
    start, used, lo, views = 0, 0, 0, []  # type: ignore[var-annotated]

    def close(end: int) -> None:
        nonlocal start, lo, used, views
        if views:
            plan.append(Batch(start, end, views, lo, lo + used))
        start, lo, used, views = end, lo + used, 0, []

    for i, (src, sh) in enumerate(zip(sources, shadows, strict=True)):
        n = sh.numel()
        if not sh.is_contiguous() or (n > cap and not src.is_contiguous()):
            return []
        if n > cap:
            close(i)
            flat = src.view(-1)
            for j in range(0, n, cap):
                m = min(cap, n - j)
                plan.append(
                    Batch(
                        i,
                        i + 1,
                        [scratch[:m]],
                        lo + j,
                        lo + j + m,
                        slice(j, j + m),
                        flat[j : j + m],
                    )
                )
            start, lo = i + 1, lo + n
            continue
        if used + n > cap:
            close(i)
        views.append(scratch[used : used + n].view(sh.shape))
        used += n
    close(len(sources))
    return plan


def update_together_(
    weights: Sequence[EMAWeights], factors: Sequence[float], model: nn.Module | None = None
) -> bool:
    """Update several EMAs of the same model in the same multi-tensor calls.

    ``weights[k] += factors[k] * (model - weights[k])`` for every averaged tensor (``1``
    copies, ``0`` leaves that EMA alone); copied tensors take the model's value. Each source
    tensor is read once per fused call for all the EMAs: one ``_foreach_lerp_`` with a weight
    per tensor over every shadow of a (device, dtype) group, and for float32 shadows of
    bf16/fp16 weights one staging of each batch for all of them. The EMAs must have been built
    with the same options on the same model (the same tensors in the same groups). Returns
    False if the non-finite guard (the first EMA's policy) skipped the update for all.

    >>> from ema_callbacks.weights import EMAWeights
    >>> model = torch.nn.Linear(2, 2)
    >>> fast, slow = EMAWeights(model), EMAWeights(model)
    >>> with torch.no_grad():
    ...     _ = model.weight.add_(1.0)
    >>> update_together_([fast, slow], [0.5, 0.1])
    True
    >>> round(float((fast.shadow['weight'] - slow.shadow['weight']).mean()), 4)
    0.4
    """
    grad = torch.is_grad_enabled()
    torch._C._set_grad_enabled(False)  # no_grad without its per-call context objects
    try:
        return _update_together(weights, factors, model)
    finally:
        torch._C._set_grad_enabled(grad)


def _update_together(
    weights: Sequence[EMAWeights], factors: Sequence[float], model: nn.Module | None
) -> bool:
    from ema_callbacks.weights import _GENERATION, _STREAMED, EMAWeights, NonFiniteWeightsError

    weights = list(weights)
    factors = [float(f) for f in factors]
    if len(weights) != len(factors):
        raise ValueError(
            f"factors must give one weight per EMA; got {len(factors)} for {len(weights)} EMAs"
        )
    if not weights:
        return True
    for w, f in zip(weights, factors, strict=True):
        if not isinstance(w, EMAWeights):
            raise TypeError(f"weights must hold EMAWeights; got {type(w).__name__}")
        if w._swapped:
            raise RuntimeError(
                "the EMA weights are swapped into the model: swap them out before updating"
            )
        if not 0.0 <= f <= 1.0 or math.isnan(f):
            raise ValueError(f"weight must be between 0 and 1; got {f!r}")
    lead = weights[0]
    for w in weights:
        w._check_bound(model if model is not None else lead._bound)
    # Replaced or resized tensors: followed (re-bound) or refused naming the weight. The EMAs
    # share the lead's source tensors, so the others need a look only if something changed.
    rebound = lead._check_live()
    for w in weights[1:]:
        if rebound or w._generation != _GENERATION[0]:
            w._check_live()
        if w._layout != lead._layout:
            raise ValueError(
                "EMAs updated together must track the same tensors with the same options "
                "(include, exclude, trainable_only, buffers, dtype, device)"
            )
    if lead.nonfinite != "ignore" and max(factors) > 0.0 and not all_finite(lead):
        if lead.nonfinite == "error":
            raise NonFiniteWeightsError("the model's weights hold NaN or Inf; EMA update refused")
        return False
    for w in weights[1:]:
        w.synchronize()
    side = lead._side_stream_for_update()
    with contextlib.nullcontext() if side is None else torch.cuda.stream(side):
        for gi, group in enumerate(lead._groups):
            _blend_(
                [(w._groups[gi].targets, f) for w, f in zip(weights, factors, strict=True)],
                group.sources(),
            )
        for gi, group in enumerate(lead._mixed):
            mixed_lerp_(
                lead,
                group.sources(),
                [
                    (w._mixed[gi].targets, f, w._mixed[gi].span)
                    for w, f in zip(weights, factors, strict=True)
                ],
                group,
            )
        for gi, group in enumerate(lead._copies):
            sources = group.sources()
            shadows = [sh for w in weights for sh in w._copies[gi].shadows]
            torch._foreach_copy_(shadows, sources * len(weights))
    if side is not None:
        event = (side.device, side.record_event())
        for w in weights:
            w._pending_event = event
            _STREAMED.add(w)
    return True
