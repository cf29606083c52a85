"""Extract the EMA weights from a checkpoint as a plain state dict (``ema-callbacks export``).

Reads, detecting which:

* a **transformers** ``checkpoint-N/`` folder (``ema_state.safetensors`` + ``ema_state.json``
  beside the model's own ``model.safetensors``);
* a **Lightning** ``.ckpt`` (``checkpoint['state_dict']`` holds the EMA, or the callback state
  does, as ``checkpoint['ema_callbacks']`` says);
* a **Composer** checkpoint (``.pt``), written with this library's ``EMA`` algorithm or with
  ``composer.algorithms.EMA``;
* a saved :meth:`ema_callbacks.EMA.state_dict`, a post-hoc reconstruction or snapshot.

The output holds every tensor of the checkpoint's model, the EMA values wherever the EMA tracks
one (frozen weights and untracked buffers keep the model's values), keyed as the model names
them, so it loads into the bare model with ``load_state_dict(strict=True)``.

Nothing pickled is ever executed: safetensors, JSON, or ``torch.load(weights_only=True)``, with
only plain data types (NumPy arrays, ``timedelta``, torch's version string) allowed besides
tensors. A file that needs anything else is refused with a message naming what it needs.

>>> import os, tempfile, torch
>>> from ema_callbacks import EMA
>>> model = torch.nn.Linear(2, 1)
>>> ema = EMA(model, half_life='2ba'); _ = ema.step(model)
>>> folder = tempfile.mkdtemp()
>>> torch.save(ema.state_dict(), os.path.join(folder, 'ema.pt'))
>>> summary = export_ema(os.path.join(folder, 'ema.pt'), os.path.join(folder, 'ema.safetensors'))
>>> summary['kind'], summary['tensors']
('ema_callbacks', 2)
>>> from safetensors.torch import load_file
>>> torch.nn.Linear(2, 1).load_state_dict(load_file(os.path.join(folder, 'ema.safetensors')))
<All keys matched successfully>
"""

from __future__ import annotations

import datetime
import json
import os
import pickle
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ema_callbacks.controller import STATE_FORMAT
from ema_callbacks.files import atomic_write
from ema_callbacks.weights import _as_dtype, normalize_name

__all__ = ["UnsafeCheckpointError", "export_ema", "read_ema", "safe_torch_load"]


class UnsafeCheckpointError(ValueError):
    """A checkpoint would need arbitrary pickled code to load; it is not loaded."""


def _allowed_globals() -> list[Any]:
    """Plain data types that Composer and Lightning checkpoints carry besides tensors."""
    allowed: list[Any] = [datetime.timedelta]
    try:
        from torch.torch_version import TorchVersion

        allowed.append(TorchVersion)
    except ImportError:  # pragma: no cover
        pass
    try:
        import numpy as np

        allowed += [np.ndarray, np.dtype]
        try:
            from numpy._core.multiarray import _reconstruct
        except ImportError:  # numpy < 2
            from numpy.core.multiarray import _reconstruct  # type: ignore[no-redef]
        allowed.append(_reconstruct)
        allowed += [type(np.dtype(t)) for t in ("uint32", "int64", "float64", "float32", "bool")]
        allowed += [np.uint32, np.int64, np.float64, np.float32, np.bool_]
    except ImportError:  # pragma: no cover - numpy is optional
        pass
    return allowed


def _qualname(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', repr(obj))}"


def safe_torch_load(path: str | os.PathLike[str]) -> Any:
    """``torch.load(path, weights_only=True)`` allowing plain data types only; anything that
    would run pickled code raises :class:`UnsafeCheckpointError` naming what it needs."""
    path = os.fspath(path)
    allowed = _allowed_globals()
    names = {_qualname(a) for a in allowed}
    try:
        needed = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:
        needed = []
    unsafe = [
        n for n in needed if n not in names and n.replace("numpy.core", "numpy._core") not in names
    ]
    if unsafe:
        raise UnsafeCheckpointError(
            f"{path}: refusing to load: it needs pickled objects that could run code "
            f"({', '.join(sorted(unsafe)[:6])}); ema-callbacks only reads tensors and plain data "
            "(safetensors, or torch.load(weights_only=True))"
        )
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise UnsafeCheckpointError(
            f"{path}: refusing to load: {str(err).splitlines()[0]}; ema-callbacks only reads "
            "tensors and plain data (safetensors, or torch.load(weights_only=True))"
        ) from err


@dataclass
class EMAExtract:
    """What :func:`read_ema` found: the checkpoint kind, the model's tensors keyed as the model
    names them, and which of them the EMA replaced."""

    kind: str
    tensors: dict[str, torch.Tensor]
    ema_names: list[str] = field(default_factory=list)


def _overlay(
    model_state: Mapping[str, torch.Tensor], shadow: Mapping[str, torch.Tensor], kind: str
) -> EMAExtract:
    """The model's tensors with the EMA's wherever the EMA tracks one (matched by normalised
    name); raises if the EMA holds names the model lacks."""
    out: dict[str, torch.Tensor] = {}
    used: list[str] = []
    for key, value in model_state.items():
        if not isinstance(value, torch.Tensor):
            continue
        name = normalize_name(key)
        if name in shadow:
            out[key] = shadow[name]
            used.append(name)
        else:
            out[key] = value
    missing = sorted(set(shadow) - set(used))
    if missing:
        raise ValueError(
            f"the EMA holds weights the checkpoint's model lacks: {missing[:10]}"
            f"{'...' if len(missing) > 10 else ''}"
        )
    return EMAExtract(kind, out, sorted(used))


def _from_transformers_folder(
    folder: Path, name: str | None, profile: str | None = None
) -> EMAExtract:
    from safetensors.torch import load_file

    states = sorted(folder.glob("*_state.json"))
    ours = []
    for path in states:
        try:
            meta = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if isinstance(meta, dict) and meta.get("format") == STATE_FORMAT:
            ours.append(path)
    ranked = sorted(folder.glob("*_state-rank*-of*.json"))
    if ranked and not ours:
        # DeepSpeed ZeRO-3: one partition per rank; the transformers adapter reassembles them.
        prefix = ranked[0].name.split("_state-rank", 1)[0]
        if name is not None and name != prefix:
            raise ValueError(f"{folder}: no EMA state named {name!r} (found {prefix!r})")
        from ema_callbacks.transformers import load_ema_state

        full = load_ema_state(folder, prefix)["shadow"]
        return _overlay(_model_file_state(folder, full), full, "transformers (ZeRO-3, reassembled)")
    if name is not None:
        ours = [p for p in ours if p.name == f"{name}_state.json"]
    if not ours:
        raise ValueError(f"{folder}: no ema_callbacks EMA state (*_state.json) in this folder")
    if len(ours) > 1:
        found = ", ".join(p.name[: -len("_state.json")] for p in ours)
        raise ValueError(f"{folder}: several EMA states ({found}); choose one with --name")
    prefix = ours[0].name[: -len("_state.json")]
    meta = json.loads(ours[0].read_text())
    names = _profile_names(meta)
    if profile is not None and profile != (names[0] if names else None):
        from ema_callbacks.transformers import load_ema_state

        chosen = dict(_profile_shadow(load_ema_state(folder, prefix), profile, folder) or {})
        return _overlay(_model_file_state(folder, chosen), chosen, "transformers")
    tensors = load_file(str(folder / f"{prefix}_state.safetensors"), device="cpu")
    shadow = {k[len("shadow/") :]: v for k, v in tensors.items() if k.startswith("shadow/")}
    return _overlay(_model_file_state(folder, shadow), shadow, "transformers")


def _model_file_state(
    folder: Path, shadow: Mapping[str, torch.Tensor]
) -> Mapping[str, torch.Tensor]:
    """The model's own weights saved in a transformers checkpoint folder (the EMA alone when
    there is no model file, e.g. ZeRO-3 without a gathered 16-bit save)."""
    from safetensors.torch import load_file

    if (folder / "model.safetensors").is_file():
        return load_file(str(folder / "model.safetensors"), device="cpu")
    if (folder / "pytorch_model.bin").is_file():
        return dict(safe_torch_load(folder / "pytorch_model.bin"))
    return dict(shadow)


def _profile_names(state: Mapping[str, Any]) -> list[str]:
    """The profile names of a saved controller state, primary first."""
    config = state.get("config") or {}
    listed = config.get("profiles")
    if isinstance(listed, list) and listed:
        return [str(p.get("name")) for p in listed]
    try:
        from ema_callbacks.controller import profile_name
        from ema_callbacks.schedule import Schedule

        return [profile_name(Schedule(**dict(config.get("schedule") or {})))]
    except (TypeError, ValueError):
        return []


def _profile_shadow(
    state: Mapping[str, Any], profile: str | None, where: object
) -> Mapping[str, torch.Tensor] | None:
    """The shadow of ``profile`` (the primary one for None) in a saved controller state."""
    names = _profile_names(state)
    if profile is None or (names and profile == names[0]):
        return state.get("shadow")  # type: ignore[no-any-return]
    extra = state.get("profiles") or {}
    if profile in extra:
        return extra[profile].get("shadow")  # type: ignore[no-any-return]
    raise ValueError(f"{where}: no EMA profile {profile!r}; the profiles are {names}")


def _find_our_state(obj: Any) -> Mapping[str, Any] | None:
    if isinstance(obj, Mapping):
        if obj.get("format") == STATE_FORMAT:
            return obj
        for value in obj.values():
            found = _find_our_state(value)
            if found is not None:
                return found
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            found = _find_our_state(value)
            if found is not None:
                return found
    return None


def _from_torch_file(path: Path, profile: str | None = None) -> EMAExtract:
    ckpt = safe_torch_load(path)
    if not isinstance(ckpt, Mapping):
        raise ValueError(f"{path}: not a checkpoint (a {type(ckpt).__name__})")
    if ckpt.get("format") == STATE_FORMAT:  # a saved ema_callbacks EMA state
        shadow = dict(_profile_shadow(ckpt, profile, path) or {})
        return EMAExtract("ema_callbacks", shadow, sorted(shadow))
    if "ema_callbacks" in ckpt and "state_dict" in ckpt:  # Lightning
        marker = ckpt["ema_callbacks"]
        model_state = ckpt["state_dict"]
        ours = _find_our_state(ckpt.get("callbacks", {}))
        names = _profile_names(ours) if ours is not None else []
        primary = profile is None or profile == (names[0] if names else None)
        if marker.get("state_dict_holds") == "ema" and primary:
            return EMAExtract(
                "lightning", dict(model_state), [normalize_name(k) for k in model_state]
            )
        picked = None if ours is None else _profile_shadow(ours, profile, path)
        if not picked:
            raise ValueError(
                f"{path}: a Lightning checkpoint without EMA weights (the EMA had not started)"
            )
        if marker.get("state_dict_holds") == "ema" and ours is not None and ours.get("training"):
            # the model slot holds the primary EMA: overlay on the training weights
            model_state = {
                k: ours["training"].get(normalize_name(k), v) for k, v in model_state.items()
            }
        return _overlay(model_state, picked, "lightning")
    state = ckpt.get("state")
    if isinstance(state, Mapping) and "model" in state:  # Composer
        model_state = state["model"]
        algorithms = state.get("algorithms") or []
        ours = _find_our_state(algorithms)
        if ours is not None:
            picked = _profile_shadow(ours, profile, path)
            if not picked:
                raise ValueError(
                    f"{path}: the EMA had not started when this checkpoint was written"
                )
            return _overlay(model_state, picked, "composer")
        for entry in algorithms:  # composer.algorithms.EMA
            _, value = entry if isinstance(entry, (list, tuple)) else (None, entry)
            if isinstance(value, Mapping) and isinstance(value.get("ema_model"), Mapping):
                if not value.get("ema_started", False):
                    raise ValueError(f"{path}: composer.algorithms.EMA had not started")
                if value.get("ema_weights_active", False):  # the model slot holds the EMA
                    return EMAExtract(
                        "composer.algorithms.EMA",
                        dict(model_state),
                        [normalize_name(k) for k in model_state],
                    )
                stored = {
                    **value["ema_model"].get("named_buffers_dict", {}),
                    **value["ema_model"].get("named_parameters_dict", {}),
                }
                return _overlay(
                    model_state,
                    {normalize_name(k): v for k, v in stored.items()},
                    "composer.algorithms.EMA",
                )
        raise ValueError(f"{path}: a Composer checkpoint without an EMA algorithm state")
    raise ValueError(
        f"{path}: not a checkpoint this command knows (Composer .pt, Lightning .ckpt, a "
        "transformers checkpoint-N folder, or a saved ema_callbacks state)"
    )


def read_ema(
    path: str | os.PathLike[str], name: str | None = None, profile: str | None = None
) -> EMAExtract:
    """Find the EMA in ``path`` (see the module docs for the kinds recognised); ``profile``
    chooses one of several EMAs tracked together (default: the primary one)."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such file or folder")
    if p.is_dir():
        return _from_transformers_folder(p, name, profile)
    if p.suffix == ".safetensors":
        sibling = p.with_name(p.name[: -len(".safetensors")] + ".json")
        if sibling.is_file() and p.name.endswith("_state.safetensors"):
            return _from_transformers_folder(
                p.parent, p.name[: -len("_state.safetensors")], profile
            )
        from safetensors import safe_open

        with safe_open(str(p), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        if str(meta.get("format", "")).startswith("ema_callbacks.posthoc"):
            return EMAExtract("posthoc", tensors, sorted(tensors))
        raise ValueError(f"{p}: a safetensors file without ema_callbacks metadata")
    return _from_torch_file(p, profile)


def export_ema(
    path: str | os.PathLike[str],
    output: str | os.PathLike[str],
    dtype: str | None = None,
    name: str | None = None,
    profile: str | None = None,
) -> dict[str, Any]:
    """Write the EMA found in ``path`` to ``output`` as a plain safetensors state dict
    (atomically). ``dtype`` casts floating tensors (``'float16'``, ``'bfloat16'``...); returns
    a summary. ``profile`` exports one of several EMAs tracked together (``'ema_1000ba'``;
    default: the primary one)."""
    from safetensors.torch import save_file

    target_dtype = _as_dtype(dtype, "dtype")
    extract = read_ema(path, name, profile)
    tensors = {}
    for key, value in extract.tensors.items():
        value = value.detach().cpu()
        if target_dtype is not None and value.is_floating_point():
            value = value.to(target_dtype)
        tensors[key] = value.contiguous()
    metadata = {"format": "ema_callbacks.export", "source": os.fspath(path), "kind": extract.kind}
    atomic_write(output, lambda tmp: save_file(tensors, tmp, metadata=metadata))
    return {
        "kind": extract.kind,
        "output": os.fspath(output),
        "tensors": len(tensors),
        "ema_tensors": len(extract.ema_names),
    }
