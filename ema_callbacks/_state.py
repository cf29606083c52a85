"""The controller's state: what :meth:`EMAController.state_dict
<ema_callbacks.controller.EMAController.state_dict>` writes and :meth:`load_state_dict
<ema_callbacks.controller.EMAController.load_state_dict>` reads back (versioned, name-keyed,
every field checked before anything changes).

>>> import torch
>>> from ema_callbacks.controller import EMAController
>>> ctrl = EMAController.create(half_life='10ba')
>>> ctrl.fit_start(torch.nn.Linear(2, 1))
>>> sorted(state_dict(ctrl))
['config', 'format', 'schedule', 'shadow', 'version', 'weights_active']
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

from ema_callbacks.schedule import SCHEDULE_KEYS, ScheduleState

if TYPE_CHECKING:
    from ema_callbacks.controller import EMAController, EMAProfile


__all__ = ["STATE_FORMAT", "STATE_VERSION", "load_state_dict", "state_dict"]

STATE_FORMAT = "ema_callbacks"
STATE_VERSION = 1


def _state_mapping(state: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    """``state[key]``, a mapping (absent or None: empty), or a ``ValueError`` naming it."""
    value = state.get(key)
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ValueError(f"the EMA state's {key!r} must be a mapping; got {value!r}")
    return value


def _tensors(state: Mapping[str, Any], key: str, where: str) -> dict[str, torch.Tensor]:
    """``state[key]`` as ``{name: tensor}``, or a ``ValueError`` naming ``where + key``."""
    value = state.get(key)
    if value is None and key == "shadow":
        return {}
    if not isinstance(value, Mapping):
        raise ValueError(
            f"the EMA state's '{where}{key}' must map weight names to tensors; got {value!r}"
        )
    for name, tensor in value.items():
        if not isinstance(name, str) or not isinstance(tensor, torch.Tensor):
            raise ValueError(
                f"the EMA state's '{where}{key}' must map weight names to tensors; got "
                f"{name!r}: {type(tensor).__name__}"
            )
    return dict(value)


def _shadow_of(p: EMAProfile) -> dict[str, torch.Tensor]:
    if p.weights is not None:
        return {k: v.detach().clone() for k, v in p.weights.state_dict().items()}
    return dict(p.pending or {})


def _extra_of(p: EMAProfile) -> dict[str, dict[str, torch.Tensor]]:
    if p.weights is not None:
        return {
            b: {k: v.detach().clone() for k, v in tensors.items()}
            for b, tensors in p.weights.extra_state_dict().items()
        }
    return {b: dict(t) for b, t in (p.pending_extra or {}).items()}


def _profile_state(ctrl: EMAController, p: EMAProfile) -> dict[str, Any]:
    out: dict[str, Any] = {"schedule": p.state.to_dict(), "shadow": _shadow_of(p)}
    if p.schedule.averager.buffers:
        out["buffers"] = _extra_of(p)
    return out


def _schedule_changes(ctrl: EMAController, saved: Mapping[str, Any]) -> list[str]:
    """``'option: saved -> now'`` for every schedule option of a saved ``config`` (from
    :meth:`config`) that differs from this controller's, per profile."""
    mine = {p.name: p.schedule.config() for p in ctrl.profiles}
    theirs: dict[str, Any] = {}
    if isinstance(saved.get("schedule"), Mapping):
        theirs[ctrl.primary.name] = saved["schedule"]
    for item in saved.get("profiles") or []:
        if isinstance(item, Mapping) and item.get("name") in mine:
            theirs.setdefault(str(item["name"]), item)
    changes = []
    for name, config in theirs.items():
        for key in SCHEDULE_KEYS:
            now = mine[name].get(key)
            if key in config and config[key] != now:
                where = "" if len(ctrl.profiles) == 1 else f"{name}."
                changes.append(f"{where}{key}: saved {config[key]!r}, now {now!r}")
    return changes


def _saved_extra(
    p: EMAProfile, saved: Mapping[str, Any], where: str
) -> dict[str, dict[str, torch.Tensor]] | None:
    """The extra buffers a profile's saved state holds, checked against its averager: a
    started average that keeps buffers (BEMA) cannot resume without them."""
    wanted = p.schedule.averager.buffers
    raw = saved.get("buffers")
    if not wanted:
        if raw:
            raise ValueError(
                f"the EMA state's '{where}buffers' holds {sorted(raw)}, kept by another "
                f"average than this one ({p.schedule.describe()}); load it with the options "
                "it was saved with"
            )
        return None
    if raw is None:
        started = bool((saved.get("schedule") or {}).get("started"))
        if started and saved.get("shadow"):
            raise ValueError(
                f"the EMA state{' of ' + repr(p.name) if where else ''} has no "
                f"{', '.join(wanted)} buffers, which {p.schedule.describe()} keeps: it was "
                "saved by another average; load it with the options it was saved with"
            )
        return None
    if not isinstance(raw, Mapping):
        raise ValueError(f"the EMA state's '{where}buffers' must be a mapping; got {raw!r}")
    return {str(b): _tensors(raw, b, f"{where}buffers.") for b in raw}


def state_dict(ctrl: EMAController, training: bool | None = None) -> dict[str, Any]:
    """:meth:`EMAController.state_dict`."""
    state: dict[str, Any] = {
        "format": STATE_FORMAT,
        "version": STATE_VERSION,
        "config": ctrl.config(),
        **_profile_state(ctrl, ctrl.primary),
        "weights_active": ctrl.weights_active,
    }
    if len(ctrl.profiles) > 1:
        state["profiles"] = {p.name: _profile_state(ctrl, p) for p in ctrl.profiles[1:]}
    if ctrl.snapshots is not None:
        state["snapshot"] = ctrl.snapshots.state.to_dict()
        state["snapshot_run"] = ctrl.snapshots.run
    aliases = ctrl.aliases
    if aliases:
        state["aliases"] = aliases
    if training is None:
        training = ctrl.weights_active == "ema"
    if training and ctrl.weights is not None:
        # The training weights, wherever they are (in the model, or held aside by the
        # profile swapped in).
        source = ctrl.profile(ctrl.active_profile).weights or ctrl.weights
        state["training"] = {k: v.detach().clone() for k, v in source.training_state_dict().items()}
    return state


def load_state_dict(ctrl: EMAController, state: Mapping[str, Any]) -> None:
    """:meth:`EMAController.load_state_dict`."""
    if not isinstance(state, Mapping) or state.get("format") != STATE_FORMAT:
        raise ValueError(
            "not an ema_callbacks EMA state (expected a mapping with format="
            f"{STATE_FORMAT!r}); got keys {sorted(state)[:8] if isinstance(state, Mapping) else type(state).__name__}"
        )
    version = state.get("version", 0)
    if isinstance(version, bool) or not isinstance(version, int):
        raise ValueError(f"the EMA state's 'version' must be an integer; got {version!r}")
    if version > STATE_VERSION:
        raise ValueError(
            f"EMA state version {version} is newer than this ema_callbacks understands "
            f"({STATE_VERSION}); upgrade ema-callbacks"
        )
    extra = dict(_state_mapping(state, "profiles"))
    for name, saved in extra.items():
        if not isinstance(saved, Mapping):
            raise ValueError(f"the EMA state's 'profiles.{name}' must be a mapping; got {saved!r}")
    ours = set(ctrl.names[1:])
    if extra or len(ctrl.profiles) > 1:
        missing, unexpected = sorted(ours - set(extra)), sorted(set(extra) - ours)
        if extra and (missing or unexpected):
            raise ValueError(
                f"the saved EMA profiles {sorted(extra)} (besides the primary) are not this "
                f"callback's {sorted(ours)}: missing {missing}, unexpected {unexpected}"
            )
    # Everything is read and checked before anything changes.
    items: list[
        tuple[EMAProfile, ScheduleState, dict[str, torch.Tensor], dict[str, Any] | None]
    ] = []
    for p, saved, where in [(ctrl.primary, state, "")] + [
        (ctrl.profile(name), extra[name], f"profiles.{name}.")
        for name in ctrl.names[1:]
        if name in extra
    ]:
        schedule_state = ScheduleState.from_dict(
            saved.get("schedule", {}), where=f"{where}schedule"
        )
        shadow = _tensors(saved, "shadow", where)
        items.append((p, schedule_state, shadow, _saved_extra(p, saved, where)))
    training = _tensors(state, "training", "") if state.get("training") is not None else None
    snapshot = ScheduleState.from_dict(state.get("snapshot") or {}, where="snapshot")
    aliases = _state_mapping(state, "aliases")
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in aliases.items()):
        raise ValueError(f"the EMA state's 'aliases' must map names to names; got {aliases!r}")
    changes = _schedule_changes(ctrl, _state_mapping(state, "config"))
    if changes:
        warnings.warn(
            "the EMA state being loaded was saved with another schedule ("
            + "; ".join(changes)
            + "): its EMA weights and progress carry on under this EMA's options, the "
            "constructor's, not the saved ones",
            UserWarning,
            stacklevel=3,
        )
    if len(ctrl.profiles) > 1 and not extra:
        warnings.warn(
            f"the saved EMA state holds one EMA; it becomes {ctrl.primary.name!r} and the "
            f"profiles {sorted(ours)} start afresh",
            UserWarning,
            stacklevel=3,
        )
    ctrl._loaded_aliases = dict(aliases)
    was = ctrl.active_profile
    ctrl._swap_out_all()
    for p, schedule_state, shadow, extra_tensors in items:
        p.state = schedule_state
        if p.weights is not None:
            p.weights.load_state_dict(shadow)
            if extra_tensors is not None:
                p.weights.load_extra_state_dict(extra_tensors)
        else:
            # A state saved before the shadow existed has no tensors: nothing to apply.
            p.pending = shadow or None
            p.pending_extra = extra_tensors if shadow else None
    if not extra:
        for p in ctrl.profiles[1:]:
            p.state = ScheduleState()
            p.pending = None
    if ctrl.snapshots is not None:
        ctrl.snapshots.resume(snapshot, state.get("snapshot_run"))  # the same run, resumed
    if ctrl.weights is not None:
        if training is not None:
            # The model slot of this checkpoint held EMA weights: put training weights back.
            ctrl.weights.load_training_(training)
        elif was is not None:
            restored = ctrl.profile(was).weights
            assert restored is not None
            restored.swap_in()
    else:
        ctrl._pending_training = None if training is None else dict(training)
