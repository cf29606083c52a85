"""The EMA update fused into the optimizer step: :meth:`ema_callbacks.EMA.fused_step`.

A separate EMA update reads the weights again after ``optimizer.step()`` wrote them (weights,
shadow, shadow: 12 bytes per float32 parameter). Compiled together with the optimizer's own
pass, the weights are still in registers when the EMA reads them, so the update costs only the
shadow's read and write. :class:`FusedStep` compiles ``optimizer.step()`` and the lerp of every
EMA due at that step into one ``torch.compile`` graph:

* The optimizer's step runs without its ``torch.optim`` wrapper (whose graph breaks would cut
  the graph in two); its pre- and post-hooks run around the compiled call as
  ``optimizer.step()`` runs them.
* The lerp weights enter as 0-d tensors, so a changing smoothing does not recompile; one graph
  is compiled per set of EMA profiles due together (and one for each profile's first,
  initialising copy), and one for the steps with no update due (the optimizer alone).
* Everything around the tensors is the controller's, as for :meth:`EMA.step`: the schedules,
  BEMA's evaluated weights (formed after the fused call), ``train_with_ema_weights``, the
  post-hoc snapshots, state, swap and export.

``compile=False`` gives the same semantics eagerly (``optimizer.step()``, then
:meth:`EMA.step`), for optimizers or platforms that cannot compile.

Speed, measured (``docs/performance_fused.md``, CPU, torch 2.13, 2 threads, cold caches): the
lerp runs in AdamW's own loop (one loop per tensor, the shadow's read and write added), because
the graph reads the parameters themselves (:func:`_sources`) and the lerp is written out. On 20
x 1M float32 with AdamW the fused EMA costs 0.48-0.66x the separate :meth:`EMA.step` after a
compiled AdamW (four runs), and 0.51-0.57x with bf16 weights and a float32 shadow. The GPU is
untested; the separate :meth:`EMA.step` stays the default.

Limits: ``nonfinite`` must be ``'ignore'`` (the guard's decision would need the weights after
the step, before the update: a host synchronisation inside the graph) and ``stream=False``.
Learning rates that change every step should be tensors (``lr=torch.tensor(1e-3)``), as in
PyTorch's compiled-optimizer recipe; a Python float recompiles when it changes.

>>> import torch
>>> from ema_callbacks import EMA
>>> model = torch.nn.Linear(4, 1)
>>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
>>> ema = EMA(model, half_life='10ba')
>>> step = ema.fused_step(opt, compile=False)
>>> loss = model(torch.randn(8, 4)).pow(2).mean(); loss.backward()
>>> step()          # optimizer.step() and the EMA's due update: the first one initialises
True
>>> ema.num_updates
0
"""

from __future__ import annotations

import types
from collections.abc import Callable
from itertools import chain
from typing import TYPE_CHECKING, Any

import torch

from ema_callbacks._sharding import DTensorShards

if TYPE_CHECKING:
    from torch import nn

    from ema_callbacks.controller import EMAController, EMAProfile
    from ema_callbacks.ema import EMA
    from ema_callbacks.schedule import Clock, Update

__all__ = [
    "ADAPTER_OPTION",
    "FusedStep",
    "FusedUpdate",
    "NO_FUSED",
    "check_adapter_option",
    "check_options",
    "fused_step_in",
    "replace_step",
]

#: How the adapters' errors name their switch, and its alternative.
ADAPTER_OPTION = "fused_optimizer=True"
NO_FUSED = "leave fused_optimizer off"


# Inductor emulates the rounding of bf16/fp16 weights in a fused kernel reliably from this torch
# on (tried: 2.13 does; 2.7's CPU code generation fails on it).
_PRECISE_CASTS = tuple(int(v) for v in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 13)


def _raw_step(optimizer: torch.optim.Optimizer) -> Callable[..., Any]:
    """The optimizer class's own ``step``, without ``torch.optim``'s wrappers (the profiling
    and hook wrapper, and ``_use_grad_for_differentiable`` whose graph breaks would split the
    compiled function)."""
    raw: Any = type(optimizer).step
    while hasattr(raw, "__wrapped__"):
        raw = raw.__wrapped__
    return raw  # type: ignore[no-any-return]


def _sources(group: Any) -> list[torch.Tensor]:
    """The tensors the model holds (the parameters the optimizer writes), not the detached
    aliases the eager update reads: an alias is a second graph input on the same storage as a
    mutated parameter, and AOTAutograd then merges them into a synthetic base and reads each
    weight through a view, copied back after the graph, with the lerp in loops of its own
    (measured on 20 x 1M float32 with AdamW: the EMA cost 11-15 ms so, 3.6-5.8 ms now). FSDP2's
    ``DTensor`` parameters enter as themselves too, their local shards taken inside the graph
    (:func:`_in_graph`); ZeRO-3 partitions are read anew, as for :meth:`EMA.step`."""
    cached: list[torch.Tensor] | None = group.cached
    if cached is not None:
        return cached
    return [
        t if isinstance(s, DTensorShards) else s.local(t)
        for s, t in zip(group.shardings, group.live, strict=True)
    ]


def _in_graph(group: Any) -> tuple[bool, ...]:
    """Which of :func:`_sources` are ``DTensor`` parameters, whose local shard the compiled
    function takes itself. A shard taken outside (``to_local()``: a plain tensor) is a second
    graph input on the storage of the ``DTensor`` the optimizer writes, and the compiled
    function does not order its read after that write (torch 2.13, FSDP2 on 2 processes: the
    initialising copy took the shard from before the step, so the EMA started one step behind,
    6e-3 off the separate update after 6 AdamW steps; read in the graph, it is exact with SGD
    and within 6e-7 with AdamW)."""
    if group.cached is not None:
        return ()
    return tuple(isinstance(s, DTensorShards) for s in group.shardings)


def check_options(controller: EMAController, option: str, instead: str) -> None:
    """Refuse the EMA options a fused update cannot honour (``option`` and ``instead`` name
    the user's switch and its alternative): the adapters call it at construction.

    >>> from ema_callbacks.controller import EMAController
    >>> check_options(EMAController.create(stream=True), 'fused_optimizer=True', '')
    Traceback (most recent call last):
    ...
    ValueError: fused_optimizer=True runs the update in the optimizer's pass, so there is no separate update to put on a side stream: build the EMA with stream=False
    """
    options = controller.weights_kwargs
    if options["nonfinite"] != "ignore":
        raise ValueError(
            f"{option} needs nonfinite='ignore' (this EMA has "
            f"nonfinite={options['nonfinite']!r}): the guard decides between the step and the "
            f"update, on the host; {instead}"
        )
    if options["stream"]:
        raise ValueError(
            f"{option} runs the update in the optimizer's pass, so there is no separate "
            "update to put on a side stream: build the EMA with stream=False"
        )


def check_adapter_option(controller: EMAController, fused_optimizer: Any) -> bool:
    """An adapter's ``fused_optimizer`` argument, checked at construction against the EMA's
    other options; returns it.

    >>> from ema_callbacks.controller import EMAController
    >>> check_adapter_option(EMAController.create(), 'yes')
    Traceback (most recent call last):
    ...
    TypeError: fused_optimizer must be True or False; got 'yes'
    """
    if not isinstance(fused_optimizer, bool):
        raise TypeError(f"fused_optimizer must be True or False; got {fused_optimizer!r}")
    if fused_optimizer:
        check_options(controller, ADAPTER_OPTION, NO_FUSED)
    return fused_optimizer


class FusedUpdate:
    """The compiled function behind :class:`FusedStep` and the adapters' ``fused_optimizer``
    option: ``optimizer.step()`` and ``controller``'s updates due at a given clock, in one
    ``torch.compile`` graph per set of updates due together. Calling it counts as the
    controller's ``batch_end`` at that clock.

    ``option`` and ``instead`` name the user's switch and its alternative in the errors.

    >>> import torch
    >>> from ema_callbacks import EMA
    >>> from ema_callbacks.schedule import Clock
    >>> model = torch.nn.Linear(2, 1)
    >>> ema = EMA(model, smoothing=0.9, nonfinite='skip')
    >>> FusedUpdate(ema.controller, torch.optim.SGD(model.parameters(), lr=0.1))
    Traceback (most recent call last):
    ...
    ValueError: fused_step(compile=True) needs nonfinite='ignore' (this EMA has nonfinite='skip'): the guard decides between the step and the update, on the host; use compile=False
    """

    def __init__(
        self,
        controller: EMAController,
        optimizer: torch.optim.Optimizer,
        *,
        option: str = "fused_step(compile=True)",
        instead: str = "use compile=False",
    ) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(
                f"optimizer must be a torch.optim.Optimizer; got {type(optimizer).__name__}"
            )
        check_options(controller, option, instead)
        self.controller = controller
        self.optimizer = optimizer
        self.option = option
        self.instead = instead
        self.compilations = 0
        self._raw = _raw_step(optimizer)
        self._graphs: dict[tuple[Any, ...], Callable[..., None]] = {}
        self._weights: dict[tuple[str, torch.dtype, torch.device], torch.Tensor] = {}
        self._serial = 0
        self.check_weights()

    def check_weights(self) -> None:
        """Refuse bf16/fp16 weights with a float32 average on a torch whose Inductor cannot
        keep their rounding (called again once the shadows are built)."""
        weights = self.controller.weights
        if not _PRECISE_CASTS and weights is not None and weights._mixed:
            raise ValueError(
                f"{self.option} with bf16/fp16 weights and a float32 average needs "
                f"torch >= 2.13 (this is {torch.__version__}, whose Inductor cannot keep the "
                f"weights' rounding in the fused kernel); {self.instead}"
            )

    # -- the compiled functions ------------------------------------------------------------

    def _graph(
        self, due: list[tuple[EMAProfile, Update]]
    ) -> tuple[Callable[..., None], tuple[list[Any], list[Any], list[Any]]]:
        """The compiled function for these due updates, and its inputs: the lerp weights
        (0-d tensors, refilled each call), and the target and source tensor lists."""
        lead = due[0][0].weights if due else self.controller.weights
        assert lead is not None
        plan: list[tuple[str, int | None, tuple[bool, ...]]] = []
        weights: list[torch.Tensor] = []
        targets_in: list[list[torch.Tensor]] = []
        sources_in: list[list[torch.Tensor]] = []
        for p, u in due:
            w = p.weights
            assert w is not None
            for kind, groups, mine in (
                ("lerp", lead._groups, w._groups),
                ("mixed", lead._mixed, w._mixed),
                ("copy", lead._copies, w._copies),
            ):
                for group, own in zip(groups, mine, strict=True):
                    targets_in.append(own.targets if kind != "copy" else own.shadows)
                    sources_in.append(_sources(group))
                    shards = _in_graph(group)
                    if kind == "copy" or u.initialise:
                        plan.append(("copy", None, shards))
                        continue
                    t = own.targets[0]
                    slot = (p.name, t.dtype, t.device)
                    if slot not in self._weights:
                        self._weights[slot] = torch.zeros((), dtype=t.dtype, device=t.device)
                    weight = self._weights[slot]
                    weight.fill_(u.weight)
                    index = next((i for i, x in enumerate(weights) if x is weight), None)
                    if index is None:
                        index = len(weights)
                        weights.append(weight)
                    plan.append((kind, index, shards))
        key = tuple(plan)
        fn = self._graphs.get(key)
        if fn is None:
            fn = self._compile(plan)
            self._graphs[key] = fn
            self.compilations += 1
        return fn, (weights, targets_in, sources_in)

    def _compile(self, plan: list[tuple[str, int | None, tuple[bool, ...]]]) -> Callable[..., None]:
        optimizer, raw = self.optimizer, self._raw

        def fused(
            weights: list[torch.Tensor],
            targets: list[list[torch.Tensor]],
            sources: list[list[torch.Tensor]],
        ) -> None:
            raw(optimizer)
            for (kind, index, shards), dst, src in zip(plan, targets, sources, strict=True):
                if shards:  # FSDP2: the local shards, read after the optimizer wrote them
                    src = [s.to_local() if d else s for s, d in zip(src, shards, strict=True)]  # type: ignore[attr-defined]
                if kind == "copy":
                    torch._foreach_copy_(dst, src)
                    continue
                assert index is not None
                if kind == "mixed":  # bf16/fp16 weights, float32 shadow: cast in the same pass
                    src = [s.to(t.device, t.dtype) for s, t in zip(src, dst, strict=True)]
                # dst += w * (src - dst): torch.lerp's formula for w < 0.5 (an EMA's weights),
                # written out: Inductor's lerp evaluates both of its branches and a select per
                # element, which made the bf16 kernel compute-bound (measured on 20 x 1M bf16 with
                # AdamW: the EMA cost 12.8 ms inside the graph as a lerp, 3.4 ms so)
                torch._foreach_add_(
                    dst, torch._foreach_mul(torch._foreach_sub(src, dst), weights[index])
                )

        # A code object of its own per plan: dynamo keeps its compiled graphs (and its
        # recompile limit) per code object, so the variants of one FusedStep, and several
        # FusedSteps, never evict or count against each other.
        self._serial += 1
        name = f"ema_fused_step_{id(self):x}_{self._serial}"
        code = fused.__code__.replace(co_name=name, co_qualname=name)
        own = types.FunctionType(code, fused.__globals__, name, None, fused.__closure__)
        # emulate_precision_casts: a bf16 weight is averaged as stored (rounded), not as the
        # float32 value the fused kernel computed before rounding it
        options: dict[str, Any] = {"emulate_precision_casts": True} if _PRECISE_CASTS else {}
        return torch.compile(own, options=options)

    # -- one step --------------------------------------------------------------------------

    def __call__(self, model: nn.Module, clock: Clock) -> bool:
        """``optimizer.step()`` and the updates due at ``clock``, with the optimizer's hooks
        around them as ``optimizer.step()`` runs them. Returns True if an EMA was updated."""
        controller = self.controller
        due = controller.prepare_update(model, clock)
        if due:
            self.check_weights()
        for p, _ in due:
            assert p.weights is not None
            p.weights._check_live()  # a replaced parameter is followed, as by EMA.step
        fn, inputs = self._graph(due)
        args: tuple[Any, ...] = ()
        kwargs: dict[str, Any] = {}
        opt = self.optimizer
        from torch.optim import optimizer as hooks

        for pre in chain(
            hooks._global_optimizer_pre_hooks.values(), opt._optimizer_step_pre_hooks.values()
        ):
            pre(opt, args, kwargs)
        with torch.no_grad():
            fn(*inputs)
        for post in chain(
            opt._optimizer_step_post_hooks.values(), hooks._global_optimizer_post_hooks.values()
        ):
            post(opt, args, kwargs)
        opt._opt_called = True  # type: ignore[attr-defined]  # LR schedulers check it
        if due:
            controller.finish_update(model, clock, due)
        return bool(due)


class FusedStep:
    """``optimizer.step()`` and the EMA's due update as one call (one compiled function with
    ``compile=True``); counts as one :meth:`EMA.step`. Build it with :meth:`EMA.fused_step`.

    ``compilations`` counts the graphs compiled so far (one per set of profiles due together,
    per initialising copy, and one for the optimizer alone).

    >>> import torch
    >>> from ema_callbacks import EMA
    >>> model = torch.nn.Linear(2, 1)
    >>> ema = EMA(model, smoothing=0.9)
    >>> FusedStep(ema, torch.optim.SGD(model.parameters(), lr=0.1), compile=False).compilations
    0
    """

    def __init__(self, ema: EMA, optimizer: torch.optim.Optimizer, *, compile: bool = True) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(
                f"optimizer must be a torch.optim.Optimizer; got {type(optimizer).__name__}"
            )
        if not isinstance(compile, bool):
            raise TypeError(f"compile must be True or False; got {compile!r}")
        self.ema = ema
        self.optimizer = optimizer
        self.compile = compile
        self._fused = FusedUpdate(ema.controller, optimizer) if compile else None

    @property
    def compilations(self) -> int:
        """The graphs compiled so far (0 with ``compile=False``)."""
        return 0 if self._fused is None else self._fused.compilations

    def __call__(self, *, samples: Any = None, tokens: Any = None) -> bool:
        """``optimizer.step()``, then the EMA's update if one is due (``samples``/``tokens`` as
        for :meth:`EMA.step`). Returns True if an EMA was updated."""
        ema = self.ema
        model = ema._model(None)
        if self._fused is None:
            self.optimizer.step()
            return ema.step(model, samples=samples, tokens=tokens)
        ema._advance(samples, tokens)
        updated = self._fused(model, ema.clock)
        ema._snapshot()
        return updated


def replace_step(optimizer: torch.optim.Optimizer, run: Callable[[], Any]) -> Callable[[], None]:
    """Make ``optimizer.step(closure)`` run ``closure`` (with grad enabled, as ``torch.optim``
    does) and then ``run()`` instead of the optimizer's own step; returns the function that
    puts the class's ``step`` back. What the adapters' ``fused_optimizer`` installs, so that the
    trainer's own call (through its precision plugin, gradient scaler or wrapper) runs the fused
    function.

    >>> import torch
    >>> opt = torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=0.1)
    >>> calls = []
    >>> restore = replace_step(opt, lambda: calls.append('fused'))
    >>> opt.step(lambda: calls.append('closure'))
    >>> restore(); calls, 'step' in vars(opt)
    (['closure', 'fused'], False)
    """
    previous = vars(optimizer).get("step")
    # torch < 2.8's LR schedulers wrap the instance's step to note that it was called; the
    # fused step notes it itself (``_opt_called``), and is marked so that schedulers built
    # after it leave it alone.
    if previous is not None and not getattr(previous, "_wrapped_by_lr_sched", False):
        raise ValueError(
            f"{type(optimizer).__name__}.step is already replaced on this optimizer (by a "
            "wrapper such as a gradient scaler's patch); a fused EMA step cannot replace it too"
        )

    def step(closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        run()
        return loss

    step._wrapped_by_lr_sched = True  # type: ignore[attr-defined]
    step._ema_fused_step = True  # type: ignore[attr-defined]
    optimizer.step = step  # type: ignore[method-assign]

    def restore() -> None:
        if vars(optimizer).get("step") is step:
            if previous is None:
                del optimizer.step
            else:
                optimizer.step = previous  # type: ignore[method-assign]

    return restore


def fused_step_in(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer.step`` is a fused EMA step that :func:`replace_step` installed.

    >>> fused_step_in(torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=0.1))
    False
    """
    return bool(getattr(vars(optimizer).get("step"), "_ema_fused_step", False))
