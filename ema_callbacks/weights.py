"""The shadow weights and everything done to them: update, swap, view, copy, state.

Torch only: no notion of trainers or events (that is :mod:`ema_callbacks.controller`).

* **Selection** — parameters (trainable only by default) and buffers (``average``, ``copy`` or
  ``ignore``), filtered by glob patterns on normalised names. Integer buffers
  (``num_batches_tracked``) are always copied, never averaged.
* **Names** — wrappers are unwrapped and their path components removed, so an EMA built on a
  bare model keeps working on the DDP-, FSDP- or ``torch.compile``-wrapped one.
* **Update** — :func:`lerp_` is one ``torch._foreach_lerp_`` per (device, dtype) group; a
  float32 shadow of bf16/fp16 weights is updated through a small reusable float32 scratch,
  never a float32 copy of the whole model. Such shadows are packed back to back in one buffer
  (tensors of their own to everyone else), so each staged batch is one ``lerp_`` over a flat
  slice instead of one call per tensor. No host synchronisation.
* **Swap** — O(1): the parameter's ``.data`` and the shadow tensor exchange storage (optimizer
  state keys on the parameter object, so it keeps pointing at the right tensors). A float32
  average of bf16/fp16 weights is cast into reusable tensors of the weights' dtype (one
  ``copy_`` per packed buffer) whose storage is exchanged; offloaded and sharded ones are
  copied in through one reusable backup buffer.
* **View** — :meth:`EMAWeights.functional_call` runs the model on the shadow weights through
  ``torch.func.functional_call`` without touching it.

>>> import torch
>>> model = torch.nn.Linear(2, 2)
>>> weights = EMAWeights(model)
>>> weights.names
['bias', 'weight']
>>> with torch.no_grad():
...     _ = model.weight.add_(1.0)
>>> weights.update_(0.5)                      # ema <- ema + 0.5 * (model - ema)
True
>>> bool(torch.allclose(weights.shadow['weight'], model.weight - 0.5))
True
"""

from __future__ import annotations

import contextlib
import fnmatch
import weakref
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ema_callbacks._sharding import PLAIN, DTensorShards, Sharding, sharding_of
from ema_callbacks._update import Batch, lerp_, update_together_

__all__ = [
    "BUFFER_POLICIES",
    "EMAWeights",
    "NonFiniteWeightsError",
    "expand_aliases",
    "lerp_",
    "normalize_name",
    "unwrap_model",
    "update_together_",
]

BUFFER_POLICIES = ("average", "copy", "ignore")
NONFINITE_POLICIES = ("skip", "error", "ignore")
_WRAPPER_COMPONENTS = frozenset(
    {"_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module", "_forward_module"}
)
_DTYPES = {
    "float32": torch.float32,
    "float": torch.float32,
    "float64": torch.float64,
    "double": torch.float64,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "half": torch.float16,
}
# Largest number of float32 elements the mixed-dtype scratch holds (16 MiB); the scratch is
# also capped at 1/32 of the shadow so its peak extra memory stays ~3% of the shadow.
_SCRATCH_MAX = 4 * 2**20
_SCRATCH_MIN = 2**16


_STREAMED: weakref.WeakSet[EMAWeights] = weakref.WeakSet()
_HOOK: list[Any] = []

# Bumped whenever any module in the process registers a parameter or buffer (which includes
# ``module.weight = nn.Parameter(...)`` and ``module.buf = tensor``): an EMA compares it with the
# value at its last bind, so a replaced tensor costs one integer comparison per update to notice
# (the identity of each tracked tensor is checked only after a bump).
_GENERATION = [0]
_REGISTRATION_HOOKS: list[Any] = []


def _bump_generation(module: nn.Module, name: str, value: Any) -> None:
    _GENERATION[0] += 1


def _install_registration_hooks() -> None:
    if _REGISTRATION_HOOKS:
        return
    from torch.nn.modules import module as module_hooks

    _REGISTRATION_HOOKS.append(
        module_hooks.register_module_parameter_registration_hook(_bump_generation)
    )
    _REGISTRATION_HOOKS.append(
        module_hooks.register_module_buffer_registration_hook(_bump_generation)
    )


def _install_optimizer_hook() -> None:
    """Once per process: every ``torch.optim`` step first waits (on the GPU) for side-stream
    EMA updates still reading the weights it is about to write."""
    if _HOOK:
        return

    def wait_for_ema(optimizer: Any, args: Any, kwargs: Any) -> None:
        for weights in list(_STREAMED):
            weights.synchronize()

    _HOOK.append(torch.optim.optimizer.register_optimizer_step_pre_hook(wait_for_ema))


class NonFiniteWeightsError(FloatingPointError):
    """Raised by an update whose source weights hold NaN or Inf, with ``nonfinite='error'``."""


def normalize_name(name: str) -> str:
    """Drop the path components that wrappers insert (``_orig_mod``, ``_fsdp_wrapped_module``,
    ``_checkpoint_wrapped_module``) and a leading ``module.`` (DDP, DataParallel).

    >>> normalize_name('module._orig_mod.encoder._fsdp_wrapped_module.weight')
    'encoder.weight'
    """
    parts = name.split(".")
    if parts and parts[0] == "module" and len(parts) > 1:
        parts = parts[1:]
    return ".".join(p for p in parts if p not in _WRAPPER_COMPONENTS)


def unwrap_model(model: nn.Module) -> nn.Module:
    """Peel DDP/DataParallel (``.module``) and ``torch.compile`` (``._orig_mod``) wrappers.

    >>> m = torch.nn.Linear(1, 1)
    >>> unwrap_model(torch.nn.DataParallel(m)) is m
    True
    """
    seen = 0
    while seen < 16:
        seen += 1
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif type(model).__name__ == "OptimizedModule" and hasattr(model, "_orig_mod"):
            model = model._orig_mod  # type: ignore[assignment]
        else:
            break
    return model


def _as_patterns(value: str | Sequence[str] | None, name: str) -> tuple[str, ...] | None:
    if value is None:
        return None
    if isinstance(value, str):
        return (value,)
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise TypeError(f"{name} must be a glob pattern or a list of them; got {value!r}")


def _as_dtype(value: str | torch.dtype | None, name: str = "dtype") -> torch.dtype | None:
    if value is None:
        return value
    if isinstance(value, torch.dtype):
        if value not in _DTYPES.values():  # an integer, bool or float8 EMA cannot average
            raise ValueError(
                f"{name} must be a floating dtype ({', '.join(sorted(_DTYPES))}) or None; "
                f"got {value!r}"
            )
        return value
    if isinstance(value, str) and value.removeprefix("torch.") in _DTYPES:
        return _DTYPES[value.removeprefix("torch.")]
    raise ValueError(f"{name} must be one of {sorted(_DTYPES)} or None; got {value!r}")


def _fsdp2_modules(model: nn.Module) -> list[nn.Module]:
    """The FSDP2 (``fully_shard``) modules in ``model``; empty without FSDP2."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch without FSDP2
        return []
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


class _Packs:
    """The buffers packed shadows are views of (:meth:`EMAWeights._shadow_plan`): one per
    key, and one per key and extra buffer, each handed out front to back by :meth:`take`."""

    def __init__(self, made: Sequence[tuple[Any, ...]], extra: Sequence[str]) -> None:
        sizes: dict[tuple[Any, ...], int] = {}
        for _entry, src, _dtype, _target, key in made:
            if key is not None:
                sizes[key] = sizes.get(key, 0) + src.numel()
        self._buffers: dict[tuple[Any, ...], torch.Tensor] = {}
        self._used: dict[tuple[Any, ...], int] = {}
        for key, n in sizes.items():
            _, device, dtype, src_device, _ = key
            pin = device.type == "cpu" and src_device.type == "cuda"
            for k in (key, *((b, *key) for b in extra)):
                self._buffers[k] = torch.empty(n, dtype=dtype, device=device, pin_memory=pin)
                self._used[k] = 0

    def take(self, key: tuple[Any, ...], value: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        """The next ``shape`` of ``key``'s buffer, holding ``value`` (cast)."""
        start = self._used[key]
        n = value.numel()
        self._used[key] = start + n
        t = self._buffers[key][start : start + n].view(shape)
        t.copy_(value.detach())
        return t


def _adjacent(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether contiguous ``b`` starts where contiguous ``a`` ends, in the same storage and
    dtype (neighbouring packed shadows)."""
    return (
        a.dtype == b.dtype
        and a.is_contiguous()
        and b.is_contiguous()
        and a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
        and b.storage_offset() == a.storage_offset() + a.numel()
    )


def _span(tensors: Sequence[torch.Tensor]) -> torch.Tensor | None:
    """One flat tensor over ``tensors`` when they lie back to back, in order, in one storage
    (packed shadows); ``None`` otherwise."""
    if not tensors or not tensors[0].is_contiguous():
        return None
    if not all(map(_adjacent, tensors[:-1], tensors[1:])):
        return None
    first = tensors[0]
    numel = sum(t.numel() for t in tensors)
    return first.as_strided((numel,), (1,), first.storage_offset())


@dataclass
class _Entry:
    name: str  # normalised name (the shadow key)
    model_name: str  # name in the bound model (for functional_call)
    owner: nn.Module
    attr: str
    is_param: bool
    average: bool  # False: copied every update


class _Group:
    """Tensors updated together: one device, one shadow dtype, one source dtype."""

    def __init__(self, entries: list[_Entry], shadows: list[torch.Tensor]) -> None:
        self.entries = entries
        self.shadows = shadows
        # What the update lerps into: the shadows (the evaluated weights), or for an average
        # whose evaluated weights are formed from a running one (BEMA) that buffer; and every
        # extra buffer of the averaged tensors (EMAWeights.extra), aligned with ``entries``.
        self.targets = shadows
        self.extra: dict[str, list[torch.Tensor]] = {}
        # The tensors the model holds (parameters or buffers), their layouts across ranks, and
        # for plain ones the sources of every update cached here as detached aliases of the same
        # storage (a multi-tensor kernel reads plain tensors faster than Parameter objects:
        # ~0.25 us a tensor on CPU). A ``.data`` reassignment changes the parameter's storage
        # address, which :meth:`EMAWeights._check_live` compares with ``ptrs`` before every
        # update and swap: the EMA then re-binds (new aliases) or refuses another shape. Sharded
        # sources (FSDP2 shards, ZeRO-3 partitions) are local views that the wrapper may
        # re-point (``Sharding.dynamic``): read anew each time.
        self.live: list[torch.Tensor] = [
            e.owner._parameters[e.attr] if e.is_param else e.owner._buffers[e.attr]  # type: ignore[misc]
            for e in entries
        ]
        self.shardings = [sharding_of(t) for t in self.live]
        dynamic = any(s.dynamic for s in self.shardings)
        self.cached: list[torch.Tensor] | None = None if dynamic else self.live
        self.ptrs: list[int] = [] if dynamic else [t.data_ptr() for t in self.live]
        self.aliases: list[torch.Tensor] | None = None
        if not dynamic:
            with torch.inference_mode(False):  # bound inside a trainer's validate, too
                self.aliases = [t.detach() for t in self.live]
        # mixed-dtype staging steps (_update.plan_batches), planned at the first update
        self.plan: list[Batch] | None = None
        # ``targets`` as one flat tensor when they are packed (EMAWeights._shadow_plan)
        self.span: torch.Tensor | None = None

    def sources(self) -> list[torch.Tensor]:
        if self.aliases is not None:
            return self.aliases
        return [s.local(t) for s, t in zip(self.shardings, self.live, strict=True)]


class EMAWeights:
    """Shadow copies of a model's weights, keyed by normalised name.

    Args:
        model: the module whose weights are averaged (wrappers are looked through).
        include, exclude: glob patterns on normalised names (``'encoder.*'``); a tensor is
            tracked if it matches an ``include`` pattern (all do when ``include`` is None) and
            no ``exclude`` pattern.
        trainable_only: skip parameters with ``requires_grad=False`` (frozen backbones, LoRA
            bases).
        buffers: ``'average'`` (BatchNorm statistics are averaged like weights), ``'copy'``
            (the shadow keeps the latest value) or ``'ignore'``. Integer buffers are copied.
        dtype: shadow dtype (``'float32'``...); default float32 for bf16/fp16 weights, the
            weight's own dtype otherwise.
        device: shadow device (``'cpu'`` offloads it; pinned when the weights are on CUDA).
        nonfinite: what to do with an update whose source holds NaN/Inf: ``'ignore'``
            (default: no check), ``'skip'`` it (counted and warned about; the EMA keeps its last
            finite value) or ``'error'`` (raise :class:`NonFiniteWeightsError`). The check costs
            one extra read of the weights per update and, on CUDA, one host synchronisation,
            which is why it is opt-in.
        stream: on CUDA, run the update on a side stream so it overlaps the next forward and
            backward; every ``torch.optim`` optimizer step then waits for it on the GPU (no host
            synchronisation). Weights written outside ``torch.optim`` need :meth:`synchronize`
            first. Ignored on CPU.
        extra, running: for an average whose evaluated weights are not its running average
            (BEMA): the names of extra tensors kept per averaged weight (shaped, sharded and
            saved like the shadow: :attr:`extra`), and the one of them the update lerps into
            (None: the shadow). ``shadow`` always holds the evaluated weights: the ones swapped
            in, viewed, copied and written out.

    >>> model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    >>> w = EMAWeights(model, buffers='copy', exclude='1.*')
    >>> w.names
    ['0.bias', '0.weight']
    >>> w.nbytes
    24
    """

    # Over 300 lines on purpose: selection, binding, swap, view and state all work on the same
    # prepared groups of tensors (built once in bind), which is what makes the update one fused
    # call and the swap O(1); splitting them would mean passing those groups around. The
    # update maths live in _update, the differences between plain, FSDP2 and ZeRO-3 tensors
    # behind _sharding's interface.

    def __init__(
        self,
        model: nn.Module,
        *,
        include: str | Sequence[str] | None = None,
        exclude: str | Sequence[str] | None = None,
        trainable_only: bool = True,
        buffers: str = "average",
        dtype: str | torch.dtype | None = None,
        device: str | torch.device | None = None,
        nonfinite: str = "ignore",
        stream: bool = False,
        extra: Sequence[str] = (),
        running: str | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}")
        if buffers not in BUFFER_POLICIES:
            raise ValueError(f"buffers must be one of {BUFFER_POLICIES}; got {buffers!r}")
        if nonfinite not in NONFINITE_POLICIES:
            raise ValueError(f"nonfinite must be one of {NONFINITE_POLICIES}; got {nonfinite!r}")
        if not isinstance(trainable_only, bool):
            raise TypeError(f"trainable_only must be True or False; got {trainable_only!r}")
        self.include = _as_patterns(include, "include")
        self.exclude = _as_patterns(exclude, "exclude")
        self.trainable_only = trainable_only
        self.buffers = buffers
        self.dtype = _as_dtype(dtype)
        try:
            self.device = None if device is None else torch.device(device)
        except (RuntimeError, TypeError) as err:
            raise ValueError(
                f"device must be a torch device like 'cpu' or 'cuda:0'; got {device!r}"
            ) from err
        self.nonfinite = nonfinite
        if not isinstance(stream, bool):
            raise TypeError(f"stream must be True or False; got {stream!r}")
        self.stream = stream
        self._side_stream: Any = None
        self._pending_event: Any = None

        if running is not None and running not in extra:
            raise ValueError(f"running must be one of extra {tuple(extra)}; got {running!r}")
        self.running = running
        self.shadow: dict[str, torch.Tensor] = {}
        self.extra: dict[str, dict[str, torch.Tensor]] = {b: {} for b in extra}
        self._average: dict[str, bool] = {}
        self._entries: list[_Entry] = []
        # Tied/shared tensors: every other name a tracked tensor has in the bound model,
        # normalised (-> the shadow key) and as the model spells it (-> the shadow key). Only
        # read when tensors are written out; the update never looks at them.
        self._aliases: dict[str, str] = {}
        self._alias_model_names: dict[str, str] = {}
        self._groups: list[_Group] = []
        self._mixed: list[_Group] = []
        self._copies: list[_Group] = []
        self._layout: tuple[Any, ...] = ()
        self._bound: nn.Module | None = None
        self._fsdp2: list[nn.Module] = []
        self._swapped = False
        self._held: dict[str, torch.Tensor] = {}
        self._backup: dict[str, torch.Tensor] = {}
        # The cast swap (a float32 average of bf16/fp16 weights), prepared at the first swap
        # after a bind (:meth:`_prepare_casts`): the tensors in the weights' dtype that go into
        # the model, and the casts that fill them.
        self._cast_slots: list[tuple[str, nn.Parameter | None, dict[str, Any], str, torch.Tensor]]
        self._cast_slots = []
        self._cast_runs: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._cast_each: tuple[list[torch.Tensor], list[torch.Tensor]] = ([], [])
        self._casts_ready = False
        self._scratch: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}
        self._scratch_numel = _SCRATCH_MIN
        # How each tracked tensor is laid out across ranks, by name (set by bind): the shadow
        # holds the rank-local part; these gather, slice and view it.
        self._shardings: dict[str, Sharding] = {}

        self._check_patterns(model)
        entries = self._select(model)
        if not entries:
            raise ValueError(
                "no weights to average: every parameter and buffer was filtered out "
                f"(include={include!r}, exclude={exclude!r}, trainable_only={trainable_only}, "
                f"buffers={buffers!r})"
            )
        # Normal tensors even when built inside ``torch.inference_mode`` (a trainer's validate
        # or test before fit): inference tensors could not be updated in place later.
        with torch.inference_mode(False):
            made = [self._shadow_plan(e) for e in entries]
            packs = _Packs(made, extra)
            for e, src, shadow_dtype, target, key in made:
                if key is not None:
                    self.shadow[e.name] = packs.take(key, src, src.shape)
                    for b, kept in self.extra.items():
                        kept[e.name] = packs.take((b, *key), self.shadow[e.name], src.shape)
                    self._average[e.name] = True
                    continue
                t = src.detach().to(device=target, dtype=shadow_dtype, copy=True)
                if t.is_inference():
                    t = t.clone()
                if target.type == "cpu" and src.device.type == "cuda":
                    t = t.pin_memory()
                self.shadow[e.name] = t
                self._average[e.name] = e.average
                if e.average:
                    for kept in self.extra.values():
                        kept[e.name] = t.clone()
        self.bind(model)

    def _shadow_plan(
        self, e: _Entry
    ) -> tuple[_Entry, torch.Tensor, torch.dtype, torch.device, tuple[Any, ...] | None]:
        """How ``e``'s shadow is made: ``(entry, source, dtype, device, pack key)``. An averaged
        tensor whose shadow differs from it in dtype or device (a float32 average of bf16/fp16
        weights, an offloaded one) gets a key: such shadows are packed back to back in one
        buffer per key (bind groups them by the same key, in the same order), so the update
        lerps each staged batch of them in one call (:func:`~ema_callbacks._update.mixed_lerp_`)
        instead of one call per tensor (packed shadows are contiguous whatever the weights'
        memory format). Sharded and empty sources are not packed."""
        live = e.owner._parameters[e.attr] if e.is_param else e.owner._buffers[e.attr]
        assert live is not None
        sharding = sharding_of(live)
        src = sharding.local(live)  # as _source_of
        shadow_dtype = self._shadow_dtype(src)
        target = self.device if self.device is not None else src.device
        packed = (
            e.average
            and (shadow_dtype != src.dtype or target != src.device)
            and sharding is PLAIN
            and src.numel() > 0
        )
        key = (e.is_param, target, shadow_dtype, src.device, src.dtype) if packed else None
        return e, src, shadow_dtype, target, key

    # -- selection and binding ------------------------------------------------------------

    def _selected(self, name: str) -> bool:
        if self.include is not None and not any(fnmatch.fnmatchcase(name, p) for p in self.include):
            return False
        return not (
            self.exclude is not None and any(fnmatch.fnmatchcase(name, p) for p in self.exclude)
        )

    def _check_patterns(self, model: nn.Module) -> None:
        """Raise ``ValueError`` naming every ``include``/``exclude`` pattern that matches no
        weight of ``model`` (a typo would otherwise silently track everything, or nothing)."""
        root = unwrap_model(model)
        names = {normalize_name(n) for n, _ in root.named_parameters(remove_duplicate=False)}
        names |= {normalize_name(n) for n, _ in root.named_buffers(remove_duplicate=False)}
        for option, patterns in (("include", self.include), ("exclude", self.exclude)):
            unmatched = [
                p for p in patterns or () if not any(fnmatch.fnmatchcase(n, p) for n in names)
            ]
            if unmatched:
                shown = ", ".join(repr(p) for p in unmatched)
                example = ", ".join(repr(n) for n in sorted(names)[:5])
                raise ValueError(
                    f"{option} pattern {shown} matches no weight of the model (names are "
                    f"normalised, e.g. {example}{', ...' if len(names) > 5 else ''})"
                )

    def _select(self, model: nn.Module) -> list[_Entry]:
        root = unwrap_model(model)
        for module in _fsdp2_modules(root):  # sharded parameters in place, whatever ran last
            module.reshard()  # type: ignore[operator]
        if any(type(m).__name__ == "FullyShardedDataParallel" for m in root.modules()):
            raise ValueError(
                "FSDP1 (FullyShardedDataParallel) is not supported: its flat parameters hide the "
                "weights' names and shapes, and averaging them whole would mean an all-gather on "
                "every update. Shard with FSDP2 (torch.distributed.fsdp.fully_shard), whose EMA "
                "is kept shard-local here with no communication per update"
            )
        entries: list[_Entry] = []
        seen: set[int] = set()
        for module_name, module in root.named_modules(remove_duplicate=True):
            for attr, p in module._parameters.items():
                if p is None or id(p) in seen:
                    continue
                seen.add(id(p))
                full = f"{module_name}.{attr}" if module_name else attr
                name = normalize_name(full)
                if self.trainable_only and not p.requires_grad:
                    continue
                if not self._selected(name):
                    continue
                average = p.is_floating_point() or p.is_complex()
                entries.append(_Entry(name, full, module, attr, True, average))
            if self.buffers == "ignore":
                continue
            for attr, b in module._buffers.items():
                if b is None or id(b) in seen or attr in module._non_persistent_buffers_set:
                    continue
                seen.add(id(b))
                full = f"{module_name}.{attr}" if module_name else attr
                name = normalize_name(full)
                if not self._selected(name):
                    continue
                average = self.buffers == "average" and (b.is_floating_point() or b.is_complex())
                entries.append(_Entry(name, full, module, attr, False, average))
        entries.sort(key=lambda e: e.name)
        names = [e.name for e in entries]
        if len(set(names)) != len(names):
            dup = sorted({n for n in names if names.count(n) > 1})
            raise ValueError(f"two weights normalise to the same name: {dup}")
        return entries

    @staticmethod
    def _find_aliases(
        model: nn.Module, entries: list[_Entry]
    ) -> tuple[dict[str, str], dict[str, str]]:
        """The other names of the tracked tensors (tied weights such as ``head.weight =
        emb.weight``, a module registered twice): ``({normalised alias: shadow key},
        {alias as the model spells it: shadow key})``. A tensor is tracked under its first name
        (the first in ``named_modules`` order) and selected by that name."""
        by_id: dict[int, _Entry] = {}
        for e in entries:
            live = e.owner._parameters[e.attr] if e.is_param else e.owner._buffers[e.attr]
            by_id[id(live)] = e
        aliases: dict[str, str] = {}
        model_names: dict[str, str] = {}
        for module_name, module in unwrap_model(model).named_modules(remove_duplicate=False):
            found = [(a, t) for a, t in module._parameters.items() if t is not None]
            found += [
                (a, t)
                for a, t in module._buffers.items()
                if t is not None and a not in module._non_persistent_buffers_set
            ]
            for attr, t in found:
                tracked = by_id.get(id(t))
                full = f"{module_name}.{attr}" if module_name else attr
                if tracked is None or full == tracked.model_name:
                    continue
                model_names[full] = tracked.name
                name = normalize_name(full)
                if name != tracked.name:
                    aliases[name] = tracked.name
        return dict(sorted(aliases.items())), model_names

    @staticmethod
    def _source_of(e: _Entry) -> torch.Tensor:
        t = e.owner._parameters[e.attr] if e.is_param else e.owner._buffers[e.attr]
        assert t is not None
        return sharding_of(t).local(t)

    def _shadow_dtype(self, src: torch.Tensor) -> torch.dtype:
        if self.dtype is not None and (src.is_floating_point() or src.is_complex()):
            return self.dtype
        if src.dtype in (torch.bfloat16, torch.float16):
            return torch.float32
        return src.dtype

    def bind(self, model: nn.Module) -> None:
        """Point the update at ``model``'s tensors, matching by normalised name.

        Called at construction; call it again after the model's parameters were replaced
        (``fully_shard``, ``to_empty``, wrapping in a new module). Raises ``ValueError``
        listing the missing and unexpected names if ``model`` does not hold the same weights.
        A tensor of the bound model replaced in place during training (``m.weight =
        nn.Parameter(...)``, a buffer assigned anew, ``.data`` pointed at new storage) is
        followed without a call: the next update, swap or copy re-binds; one whose shape no
        longer matches its shadow (replaced or resized) raises ``ValueError`` naming it.
        """
        if self._swapped:
            raise RuntimeError("cannot rebind while the EMA weights are swapped in; swap out first")
        entries = self._select(model)
        by_name = {e.name: e for e in entries}
        missing = sorted(set(self.shadow) - set(by_name))
        unexpected = sorted(set(by_name) - set(self.shadow))
        if missing or unexpected:
            raise ValueError(
                "the model does not hold the weights this EMA tracks: "
                f"missing {missing[:10]}{'...' if len(missing) > 10 else ''}, "
                f"unexpected {unexpected[:10]}{'...' if len(unexpected) > 10 else ''}"
            )
        for e in entries:
            src, sh = self._source_of(e), self.shadow[e.name]
            if src.shape != sh.shape:
                raise ValueError(
                    f"weight {e.name!r} has shape {tuple(src.shape)} in the model but "
                    f"{tuple(sh.shape)} in the EMA"
                )
        self._entries = entries
        self._aliases, self._alias_model_names = self._find_aliases(model, entries)
        self._bound = model
        self._fsdp2 = _fsdp2_modules(unwrap_model(model))
        groups: dict[tuple[Any, ...], list[_Entry]] = {}
        for e in entries:
            src, sh = self._source_of(e), self.shadow[e.name]
            key = (e.average, e.is_param, sh.device, sh.dtype, src.device, src.dtype)
            groups.setdefault(key, []).append(e)
        self._groups, self._mixed, self._copies = [], [], []
        for (average, _, sdev, sdt, pdev, pdt), members in groups.items():
            group = _Group(members, [self.shadow[e.name] for e in members])
            if average:
                group.extra = {b: [t[e.name] for e in members] for b, t in self.extra.items()}
                if self.running is not None:
                    group.targets = group.extra[self.running]
                group.span = _span(group.targets)
            if not average:
                self._copies.append(group)
            elif sdev == pdev and sdt == pdt:
                self._groups.append(group)
            else:
                self._mixed.append(group)
        # Which tensors each group updates: EMAs with the same layout update together
        # (:func:`update_together_`).
        self._layout = tuple(
            (kind, tuple(e.name for e in g.entries))
            for kind, gs in (("lerp", self._groups), ("mixed", self._mixed), ("copy", self._copies))
            for g in gs
        )
        total = sum(t.numel() for t in self.shadow.values())
        self._scratch_numel = max(_SCRATCH_MIN, min(_SCRATCH_MAX, total // 32))
        self._scratch.clear()
        # The evaluation swap, prepared once: parameters and buffers whose storage is exchanged
        # (with an alias of the training storage to put back) and the entries copied instead.
        every = (*self._groups, *self._mixed, *self._copies)
        self._live = {e.name: t for g in every for e, t in zip(g.entries, g.live, strict=True)}
        self._shardings = {
            e.name: s for g in every for e, s in zip(g.entries, g.shardings, strict=True)
        }
        self._swap_params: list[tuple[str, nn.Parameter, torch.Tensor]] = []
        self._swap_buffers: list[tuple[str, dict[str, Any], str, torch.Tensor]] = []
        self._swap_copies: list[_Entry] = []
        self._swap_casts: list[_Entry] = []
        self._casts_ready = False
        for e in entries:
            if not self._swappable(e):
                src = self._live[e.name]
                plain = not self._shardings[e.name].dynamic
                if plain and src.device == self.shadow[e.name].device:
                    self._swap_casts.append(e)  # bf16/fp16 weights, a float32 average
                else:
                    self._swap_copies.append(e)
            elif e.is_param:
                self._swap_params.append((e.name, self._live[e.name], self.shadow[e.name]))  # type: ignore[arg-type]
            else:
                self._swap_buffers.append((e.name, e.owner._buffers, e.attr, self.shadow[e.name]))
        _install_registration_hooks()
        self._generation = _GENERATION[0]

    def _check_live(self) -> bool:
        """Make sure the model still holds the tensors bound (cheap: one integer comparison,
        and one storage-address read per cached source tensor).

        A parameter or buffer replaced in its module (``m.weight = nn.Parameter(...)``), or a
        ``.data`` reassigned to new storage, is followed: the EMA re-binds to the model's
        current tensors. One with another shape than its shadow (replaced or resized) raises
        ``ValueError`` naming the weight, before anything is averaged or swapped. Returns
        whether it re-bound."""
        changed = self._generation != _GENERATION[0] and any(
            (e.owner._parameters if e.is_param else e.owner._buffers).get(e.attr)
            is not self._live[e.name]
            for e in self._entries
        )
        if not changed:
            for group in (*self._groups, *self._mixed, *self._copies):
                if group.cached is not None and (
                    list(map(torch.Tensor.data_ptr, group.cached)) != group.ptrs
                ):
                    changed = True
                    break
        if not changed:
            self._generation = _GENERATION[0]
            return False
        for e in self._entries:
            now = (e.owner._parameters if e.is_param else e.owner._buffers).get(e.attr)
            sh = self.shadow[e.name]
            kind = "parameter" if e.is_param else "buffer"
            if now is None:
                raise ValueError(
                    f"{kind} {e.model_name!r} was removed from the model during training (it is "
                    "None now); the EMA tracks it: restore it, or build a new EMA"
                )
            shape = sharding_of(now).local(now).shape
            if tuple(shape) != tuple(sh.shape):
                raise ValueError(
                    f"{kind} {e.model_name!r} was replaced or resized during training: the model "
                    f"holds shape {tuple(shape)} but its EMA {tuple(sh.shape)}; an EMA cannot "
                    "average tensors of different shapes: keep the shape (assign into "
                    "`.data` with copy_), or build a new EMA for the new model"
                )
        self.bind(self._bound)  # type: ignore[arg-type]
        return True

    def _reshard(self) -> None:
        """FSDP2 leaves a module's parameters unsharded after a forward that no backward
        follows (evaluation): put the sharded parameters back (local, no communication) before
        touching the model's tensors. A no-op without FSDP2 or when already sharded."""
        for module in self._fsdp2:
            module.reshard()  # type: ignore[operator]

    @property
    def bound_model(self) -> nn.Module | None:
        """The model whose tensors the update reads (set by :meth:`bind`)."""
        return self._bound

    @property
    def names(self) -> list[str]:
        """The tracked names, sorted."""
        return sorted(self.shadow)

    @property
    def aliases(self) -> dict[str, str]:
        """``{other name: tracked name}`` for tensors the model holds under several names
        (tied weights): one shadow each, written out under every name (``state_dict(
        aliases=True)``, checkpoints, exports). Empty for a model without shared tensors.

        >>> emb = torch.nn.Embedding(4, 2)
        >>> model = torch.nn.ModuleDict({'emb': emb, 'head': torch.nn.Linear(2, 4, bias=False)})
        >>> model['head'].weight = emb.weight
        >>> w = EMAWeights(model)
        >>> w.names, w.aliases
        (['emb.weight'], {'head.weight': 'emb.weight'})
        """
        return dict(self._aliases)

    @property
    def nbytes(self) -> int:
        """Bytes held by the shadow tensors and any extra buffers."""
        tensors = [*self.shadow.values(), *(t for b in self.extra.values() for t in b.values())]
        return sum(t.numel() * t.element_size() for t in tensors)

    def averaged_groups(
        self,
    ) -> list[tuple[list[torch.Tensor], dict[str, list[torch.Tensor]], list[torch.Tensor]]]:
        """``(shadows, {extra buffer: tensors}, sources)`` for every group of averaged tensors
        (one device and dtype each; the sources may be of another dtype or device): what an
        averager with extra buffers works on after an update."""
        self.synchronize()
        return [(g.shadows, g.extra, g.sources()) for g in (*self._groups, *self._mixed)]

    @property
    def is_swapped(self) -> bool:
        """Whether the EMA weights are currently in the bound model."""
        return self._swapped

    def _check_bound(self, model: nn.Module | None) -> None:
        if model is not None and model is not self._bound:
            self.bind(model)

    # -- update ---------------------------------------------------------------------------

    def update_(self, weight: float, model: nn.Module | None = None) -> bool:
        """``ema += weight * (model - ema)`` for averaged tensors; copied tensors take the
        model's value. ``weight = 1`` copies everything. Returns False if the update was
        skipped by the non-finite guard.
        """
        return update_together_([self], [weight], model)

    # -- CUDA side stream -----------------------------------------------------------------

    def _side_stream_for_update(self) -> Any:
        if not self.stream or not torch.cuda.is_available():
            return None
        devices = {sh.device for g in self._groups for sh in g.shadows}
        if len(devices) != 1 or next(iter(devices)).type != "cuda":
            return None
        device = next(iter(devices))
        if self._side_stream is None:
            self._side_stream = torch.cuda.Stream(device)
            _install_optimizer_hook()
        self.synchronize()  # the previous update is ordered before this one
        # The weights are final once the work queued so far (the optimizer step) is done.
        self._side_stream.wait_stream(torch.cuda.current_stream(device))
        return self._side_stream

    def synchronize(self) -> None:
        """Make the current CUDA stream wait (on the GPU) for a side-stream update in flight.

        Called before every optimizer step (a global ``torch.optim`` hook) and before swap,
        copy, view and state access; a no-op without ``stream=True``."""
        pending = self._pending_event
        if pending is not None:
            device, event = pending
            torch.cuda.current_stream(device).wait_event(event)
            self._pending_event = None
            _STREAMED.discard(self)

    def _scratch_for(
        self, device: torch.device, dtype: torch.dtype, pin: bool = False
    ) -> torch.Tensor:
        key = (device, dtype)
        buf = self._scratch.get(key)
        if buf is None:
            buf = torch.empty(self._scratch_numel, device=device, dtype=dtype, pin_memory=pin)
            self._scratch[key] = buf
        return buf

    # -- swap -----------------------------------------------------------------------------

    def _swappable(self, e: _Entry) -> bool:
        src, sh = self._source_of(e), self.shadow[e.name]
        # A sharded source (an FSDP2 shard, a ZeRO-3 partition) is a view into the wrapper's
        # buffers; exchanging its storage would detach it from them: the EMA part is copied in.
        return (
            src.dtype == sh.dtype
            and src.device == sh.device
            and not self._shardings[e.name].dynamic
        )

    @torch.no_grad()
    def swap_in(self, model: nn.Module | None = None) -> None:
        """Put the EMA weights into the model; idempotent. Storage is exchanged (O(1)) where
        shadow and weight share dtype and device; a float32 average of bf16/fp16 weights is cast
        into a reusable tensor of the weights' dtype, whose storage is then exchanged (one cast
        pass); an offloaded or sharded one is copied in through a reusable backup."""
        self.synchronize()
        self._check_bound(model)
        if self._swapped:
            return
        self._reshard()
        self._check_live()  # never an old-shaped tensor into the model
        # Swappable tensors: exchange storage, prepared at bind (a Python loop of one `.data`
        # read and write per tensor, independent of the tensors' sizes).
        held = self._held
        for name, p, sh in self._swap_params:
            held[name] = p.data
            p.data = sh
        for name, buffers, attr, sh in self._swap_buffers:
            held[name] = buffers[attr]
            buffers[attr] = sh
        if self._swap_casts:
            if not self._casts_ready:
                self._prepare_casts()
            for low, shadows in self._cast_runs:
                low.copy_(shadows)
            if self._cast_each[0]:
                torch._foreach_copy_(*self._cast_each)
            for name, param, buffers, attr, low in self._cast_slots:
                if param is not None:  # the bound Parameter, as for _swap_params
                    held[name] = param.data
                    param.data = low
                else:
                    held[name] = buffers[attr]
                    buffers[attr] = low
        copy_dst: list[torch.Tensor] = []
        copy_src: list[torch.Tensor] = []
        backups: list[torch.Tensor] = []
        for e in self._swap_copies:
            sh = self.shadow[e.name]
            live = self._source_of(e)
            backup = self._backup.get(e.name)
            if backup is None or backup.shape != live.shape or backup.dtype != live.dtype:
                # Offloaded shadows keep the training weights' backup on their side too, so
                # an evaluation swap costs no extra accelerator memory.
                backup = torch.empty(
                    live.shape,
                    dtype=live.dtype,
                    device=sh.device,
                    pin_memory=sh.device.type == "cpu" and live.device.type == "cuda",
                )
                self._backup[e.name] = backup
            copy_dst.append(live)
            copy_src.append(sh)
            backups.append(backup)
        if copy_dst:
            torch._foreach_copy_(backups, copy_dst)
            torch._foreach_copy_(copy_dst, copy_src)
        self._swapped = True

    @torch.no_grad()
    def swap_out(self) -> None:
        """Put the training weights back; idempotent."""
        if not self._swapped:
            return
        self._reshard()
        held = self._held
        for name, p, _ in self._swap_params:
            p.data = held.pop(name)
        for name, buffers, attr, _ in self._swap_buffers:
            buffers[attr] = held.pop(name)
        for name, param, buffers, attr, _ in self._cast_slots:
            if param is not None:
                param.data = held.pop(name)
            else:
                buffers[attr] = held.pop(name)
        copy_dst = [self._source_of(e) for e in self._swap_copies]
        if copy_dst:
            torch._foreach_copy_(copy_dst, [self._backup[e.name] for e in self._swap_copies])
        self._swapped = False

    def _prepare_casts(self) -> None:
        """The cast swap's tensors in the weights' dtype, one per cast entry. Where shadows lie
        back to back (packed, :meth:`_shadow_plan`), so do their low-precision tensors, and
        each run is cast in one ``copy_``; the rest in one ``_foreach_copy_``."""
        slots: list[tuple[str, nn.Parameter | None, dict[str, Any], str, torch.Tensor]] = []
        runs: list[tuple[torch.Tensor, torch.Tensor]] = []
        each: tuple[list[torch.Tensor], list[torch.Tensor]] = ([], [])

        def place(e: _Entry) -> tuple[int, int]:
            sh = self.shadow[e.name]
            return sh.untyped_storage().data_ptr(), int(sh.storage_offset())

        entries = sorted(self._swap_casts, key=place)  # each packed buffer front to back
        lives = [self._live[e.name] for e in entries]
        every = [self.shadow[e.name] for e in entries]
        i = 0
        while i < len(entries):
            j = i + 1  # the run [i, j): shadows back to back, weights of one dtype
            while (
                j < len(entries)
                and lives[j].dtype == lives[i].dtype
                and _adjacent(every[j - 1], every[j])
            ):
                j += 1
            shadows = every[i:j]
            span = _span(shadows) if j - i > 1 else None
            if span is not None:
                flat = torch.empty(span.numel(), dtype=lives[i].dtype, device=span.device)
                runs.append((flat, span))
                lows, start = [], 0
                for live in lives[i:j]:
                    lows.append(flat[start : start + live.numel()].view(live.shape))
                    start += live.numel()
            else:
                lows = [
                    torch.empty_like(live, memory_format=torch.contiguous_format)
                    for live in lives[i:j]
                ]
                each[0].extend(lows)
                each[1].extend(shadows)
            for e, low in zip(entries[i:j], lows, strict=True):
                param = self._live[e.name] if e.is_param else None
                slots.append((e.name, param, e.owner._buffers, e.attr, low))  # type: ignore[arg-type]
            i = j
        self._cast_slots, self._cast_runs, self._cast_each = slots, runs, each
        self._casts_ready = True

    @contextlib.contextmanager
    def swapped(self, model: nn.Module | None = None) -> Iterator[None]:
        """EMA weights in for the block, training weights back in ``finally``.

        >>> m = torch.nn.Linear(1, 1); w = EMAWeights(m)
        >>> with torch.no_grad(): _ = m.weight.fill_(5.0)
        >>> with w.swapped(m):
        ...     m.weight.item() != 5.0
        True
        >>> m.weight.item()
        5.0
        """
        was = self._swapped
        self.swap_in(model)
        try:
            yield
        finally:
            if not was:
                self.swap_out()

    @torch.no_grad()
    def update_bn_(
        self,
        loader: Any,
        model: nn.Module | None = None,
        *,
        batches: int | None = None,
        forward: Any = None,
    ) -> int:
        """Recompute the BatchNorm statistics held in the shadow for the shadow's weights:
        ``torch.optim.swa_utils.update_bn`` on the model with the shadow swapped in (statistics
        reset, ``momentum=None``, training mode, one forward per batch: a list or tuple feeds
        its first item, moved to the model's device), without a copy of the model. The model's
        training weights, statistics, modes and momenta are back afterwards; on an exception the
        shadow's statistics are too. ``batches`` stops after that many; ``forward(model,
        batch)`` replaces the call of the model on a batch (a trainer's own way to feed it).
        Returns the number of batches used."""
        if self.buffers == "ignore":
            raise ValueError(
                "update_bn needs the average to hold the BatchNorm statistics: build the EMA "
                "with buffers='average' or buffers='copy' (it has buffers='ignore')"
            )
        if batches is not None and (
            isinstance(batches, bool) or not isinstance(batches, int) or batches < 1
        ):
            raise ValueError(f"batches must be a positive integer or None; got {batches!r}")
        self._check_bound(model)
        bound = self._bound
        assert bound is not None
        root = unwrap_model(bound)
        norms = [
            (name, m)
            for name, m in root.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
        ]
        if not norms:
            raise ValueError(
                "update_bn: the model has no BatchNorm layer that tracks running statistics, so "
                "there are none to recompute for the average"
            )
        tracked = {
            normalize_name(f"{name}.{attr}" if name else attr)
            for name, m in norms
            for attr in ("running_mean", "running_var", "num_batches_tracked")
        } & set(self.shadow)
        if not tracked:
            raise ValueError(
                "update_bn: the EMA does not track the BatchNorm statistics (include/exclude "
                "filter them out), so the average has none to recompute"
            )
        device = next((t.device for t in root.parameters()), None)
        saved = {n: self.shadow[n].clone() for n in tracked}
        modes = [(m, m.training) for m in root.modules()]
        momenta = [(m, m.momentum) for _, m in norms]
        used = 0
        with self.swapped():
            try:
                for _, m in norms:
                    m.reset_running_stats()
                    m.momentum = None
                root.train()
                for batch in loader:
                    if batches is not None and used >= batches:
                        break
                    if forward is not None:
                        forward(bound, batch)
                    else:
                        x = batch[0] if isinstance(batch, (list, tuple)) else batch
                        if isinstance(x, torch.Tensor) and device is not None:
                            x = x.to(device)
                        bound(x)
                    used += 1
                # Statistics of tensors swapped by copy or cast live in the model: keep them.
                for e in (*self._swap_copies, *self._swap_casts):
                    if e.name in tracked:
                        self.shadow[e.name].copy_(self._source_of(e))
            except BaseException:
                for n, t in saved.items():
                    self.shadow[n].copy_(t)
                raise
            finally:
                for m, momentum in momenta:
                    m.momentum = momentum
                for module, mode in modes:
                    module.training = mode
        if used == 0:
            for n, t in saved.items():
                self.shadow[n].copy_(t)
            raise ValueError("update_bn: the loader gave no batch; the statistics are unchanged")
        return used

    @torch.no_grad()
    def copy_to(self, model: nn.Module | None = None) -> None:
        """Write the EMA values into the model's weights (a permanent copy, not a swap)."""
        self.synchronize()
        if self._swapped:
            raise RuntimeError("the EMA weights are swapped in; swap out before copy_to")
        self._check_bound(model)
        self._reshard()
        self._check_live()
        dst = [self._source_of(e) for e in self._entries]
        src = [self.shadow[e.name] for e in self._entries]
        torch._foreach_copy_(dst, src)

    def training_state_dict(self) -> dict[str, torch.Tensor]:
        """The training weights of the tracked tensors by normalised name, wherever they are:
        in the model, or held aside while the EMA is swapped in (live tensors; clone to keep)."""
        self._reshard()
        out: dict[str, torch.Tensor] = {}
        for e in self._entries:
            if self._swapped:
                out[e.name] = self._held[e.name] if e.name in self._held else self._backup[e.name]
            else:
                out[e.name] = self._source_of(e)
        return out

    @torch.no_grad()
    def load_training_(self, state: Mapping[str, torch.Tensor]) -> None:
        """Write saved training weights into the model (swapped out first). Names must match."""
        if self._swapped:
            self.swap_out()
        self._reshard()
        state = self._canonical(state)
        missing = sorted(set(self.shadow) - set(state))
        unexpected = sorted(set(state) - set(self.shadow))
        if missing or unexpected:
            raise ValueError(
                f"saved training weights do not match the model: missing {missing}, unexpected {unexpected}"
            )
        for e in self._entries:
            self._source_of(e).copy_(self._shardings[e.name].local_part(state[e.name]))

    # -- view -----------------------------------------------------------------------------

    def tensors_for(self, model: nn.Module | None = None) -> dict[str, torch.Tensor]:
        """The shadow keyed by ``model``'s own names, in the model's dtypes (for
        ``torch.func.functional_call``). Shares storage where dtypes match. A tied tensor is
        under each of its names (the same tensor)."""
        self._check_bound(model)
        self._reshard()
        self.synchronize()
        out: dict[str, torch.Tensor] = {}
        for e in self._entries:
            sh = self.shadow[e.name]
            live = self._source_of(e)
            out[e.model_name] = (
                sh
                if (sh.dtype == live.dtype and sh.device == live.device)
                else sh.to(live.device, live.dtype)
            )
        by_name = {e.name: e.model_name for e in self._entries}
        for alias, name in self._alias_model_names.items():
            out[alias] = out[by_name[name]]
        return out

    def functional_call(self, model: nn.Module, *args: Any, **kwargs: Any) -> Any:
        """Run ``model(*args, **kwargs)`` with the EMA weights, leaving the model untouched.

        >>> m = torch.nn.Linear(1, 1, bias=False); w = EMAWeights(m)
        >>> with torch.no_grad(): _ = m.weight.fill_(3.0)
        >>> float(w.functional_call(m, torch.ones(1, 1))) == float(w.shadow['weight'])
        True
        """
        if self._swapped:
            return model(*args, **kwargs)
        root = unwrap_model(model)
        tensors = self.tensors_for(model)
        return torch.func.functional_call(root, tensors, args, kwargs, strict=False)

    # -- state ----------------------------------------------------------------------------

    def state_dict(self, aliases: bool = False) -> dict[str, torch.Tensor]:
        """``{name: shadow tensor}`` (the live tensors; clone before mutating). With
        ``aliases``, a tied tensor is also under each of its other names (the same tensor
        object; :func:`expand_aliases`), so the result loads into the model with
        ``load_state_dict`` under every name it has."""
        self.synchronize()
        out = {name: self.shadow[name] for name in self.names}
        return expand_aliases(out, self._aliases) if aliases else out

    def _canonical(self, state: Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
        """``state`` keyed by tracked names only: an alias's value stands for its tracked
        name when that is absent, and is dropped otherwise (it is the same tensor)."""
        if not self._aliases or not any(k in self._aliases for k in state):
            return state
        out = {k: v for k, v in state.items() if k not in self._aliases}
        for key, value in state.items():
            target = self._aliases.get(key)
            if target is not None and target not in out:
                out[target] = value
        return out

    @property
    def is_sharded(self) -> bool:
        """Whether any tracked weight is a DTensor (FSDP2): the shadow then holds local shards."""
        return any(isinstance(s, DTensorShards) for s in self._shardings.values())

    def sharded_state_dict(self) -> dict[str, torch.Tensor]:
        """The shadow as DTensors over the local shards (no copy, no communication), for
        ``torch.distributed.checkpoint.save``/``load``: loading writes into the shadow in place.
        Unsharded entries are plain tensors, and so are DeepSpeed ZeRO-3 partitions (flat,
        rank-local: save them per rank, or use :meth:`full_state_dict`)."""
        self.synchronize()
        return {name: self._shardings[name].global_view(self.shadow[name]) for name in self.names}

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The whole (unsharded) EMA on every rank: the one place sharded weights are gathered
        (one all-gather per sharded tensor: FSDP2 DTensor or DeepSpeed ZeRO-3 partition; every
        rank must call it). For export; never called by updates or swaps."""
        self.synchronize()
        return {name: self._shardings[name].full(self.shadow[name]) for name in self.names}

    @torch.no_grad()
    def load_state_dict(self, state: Mapping[str, torch.Tensor], strict: bool = True) -> None:
        """Copy saved shadows in (cast to this EMA's dtype and device). With ``strict``,
        mismatched names raise ``ValueError`` listing the missing and unexpected ones."""
        if self._swapped:
            raise RuntimeError("cannot load while the EMA weights are swapped in")
        self.synchronize()
        state = self._canonical(state)
        missing = sorted(set(self.shadow) - set(state))
        unexpected = sorted(set(state) - set(self.shadow))
        if strict and (missing or unexpected):
            raise ValueError(
                f"EMA state does not match the model: missing {missing}, unexpected {unexpected}"
            )
        for name, value in state.items():
            if name not in self.shadow:
                continue
            target = self.shadow[name]
            local = self._shardings[name].local_part(value)
            if tuple(local.shape) != tuple(target.shape):
                raise ValueError(
                    f"EMA state for {name!r} has shape {tuple(value.shape)}; expected {tuple(target.shape)}"
                )
            target.copy_(local)

    def extra_state_dict(self) -> dict[str, dict[str, torch.Tensor]]:
        """``{buffer: {name: tensor}}`` of the extra buffers (live tensors; clone to keep)."""
        self.synchronize()
        return {b: {n: t[n] for n in sorted(t)} for b, t in self.extra.items()}

    @torch.no_grad()
    def load_extra_state_dict(self, state: Mapping[str, Mapping[str, torch.Tensor]]) -> None:
        """Copy saved extra buffers in (:meth:`extra_state_dict`'s layout); every buffer and
        name this EMA keeps must be there, with the right shape (``ValueError`` otherwise)."""
        self.synchronize()
        missing = sorted(set(self.extra) - set(state))
        unexpected = sorted(set(state) - set(self.extra))
        if missing or unexpected:
            raise ValueError(
                f"the EMA state's buffers do not match this average's: missing {missing}, "
                f"unexpected {unexpected}"
            )
        for buffer, tensors in self.extra.items():
            saved = self._canonical(state[buffer])
            if sorted(saved) != sorted(tensors):
                raise ValueError(
                    f"the EMA state's buffer {buffer!r} does not match the model: missing "
                    f"{sorted(set(tensors) - set(saved))}, unexpected "
                    f"{sorted(set(saved) - set(tensors))}"
                )
            for name, target in tensors.items():
                local = self._shardings[name].local_part(saved[name])
                if tuple(local.shape) != tuple(target.shape):
                    raise ValueError(
                        f"the EMA state's buffer {buffer!r} for {name!r} has shape "
                        f"{tuple(saved[name].shape)}; expected {tuple(target.shape)}"
                    )
                target.copy_(local)


def expand_aliases(
    tensors: Mapping[str, torch.Tensor], aliases: Mapping[str, str]
) -> dict[str, torch.Tensor]:
    """``tensors`` plus, for every ``{alias: name}`` whose ``name`` is there, the same tensor
    under ``alias``: a tied tensor under every name the model has for it. Files that refuse
    shared memory (safetensors) need a ``.clone()`` per alias.

    >>> t = torch.ones(2)
    >>> out = expand_aliases({'emb.weight': t}, {'head.weight': 'emb.weight', 'x': 'missing'})
    >>> sorted(out), out['head.weight'] is t
    (['emb.weight', 'head.weight'], True)
    """
    out = dict(tensors)
    for alias, name in aliases.items():
        if name in tensors and alias not in out:
            out[alias] = tensors[name]
    return out
