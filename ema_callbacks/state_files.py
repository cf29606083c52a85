"""The EMA state as checkpoint files: ``{name}_state.safetensors`` (the tensors) and
``{name}_state.json`` (everything else), written atomically and read without unpickling.

The transformers adapter keeps its EMA in ``checkpoint-N/{name}_state.*`` with these; they need
no trainer (``ema-callbacks export`` reads them), and any trainer may use them for its
checkpoint slot.

>>> import tempfile, torch
>>> from ema_callbacks import EMA
>>> ema = EMA(torch.nn.Linear(2, 1), ema_power=0.5)
>>> folder = tempfile.mkdtemp()
>>> save_ema_state(ema.controller.state_dict(), folder)
>>> sorted(load_ema_state(folder)['buffers'])     # BEMA's extra tensors travel too
['ema', 'theta0']
"""

from __future__ import annotations

import json
import math
import os
import re
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ema_callbacks.files import FileProblem, atomic_write

__all__ = ["load_ema_state", "save_ema_state"]


# ---------------------------------------------------------------------------------------------


def _paths(
    directory: str | os.PathLike[str], name: str, shard: tuple[int, int] | None = None
) -> tuple[str, str]:
    suffix = "" if shard is None else f"-rank{shard[0]}-of{shard[1]}"
    base = os.path.join(os.fspath(directory), f"{name}_state{suffix}")
    return base + ".safetensors", base + ".json"


def _shard_files(directory: str | os.PathLike[str], name: str) -> dict[int, set[int]]:
    """``{world size: {ranks}}`` of the per-rank (ZeRO-3) EMA files in ``directory``."""
    pattern = re.compile(rf"^{re.escape(name)}_state-rank(\d+)-of(\d+)\.json$")
    found: dict[int, set[int]] = {}
    folder = os.fspath(directory)
    for entry in os.listdir(folder) if os.path.isdir(folder) else ():
        match = pattern.match(entry)
        if match:
            found.setdefault(int(match.group(2)), set()).add(int(match.group(1)))
    return found


def save_ema_state(
    state: Mapping[str, Any],
    directory: str | os.PathLike[str],
    name: str = "ema",
    shard: tuple[int, int] | None = None,
    full_shapes: Mapping[str, Any] | None = None,
) -> None:
    """Write an :meth:`EMAController.state_dict` into ``directory`` as ``{name}_state.safetensors``
    (the tensors) and ``{name}_state.json`` (everything else), each atomically (temp file +
    ``os.replace``); the JSON is written last, so its presence means the pair is complete.
    Both files carry the same write id (the JSON's ``write``, the safetensors metadata
    ``ema_callbacks_write``): a pair from two different saves (a save killed between the two
    renames) is refused on load, never mixed.

    Tensor keys: ``shadow/<tensor>`` (the primary EMA), ``training/<tensor>`` (the training
    weights, when the model held an EMA), ``profiles/<profile>/<tensor>`` (the other EMAs of
    a callback with several), and for averages that keep extra tensors (BEMA)
    ``buffers/<buffer>/<tensor>`` and ``profile_buffers/<profile>/<buffer>/<tensor>``. The JSON
    lists them under ``tensors``.

    ``shard=(rank, world)`` writes one rank's part of a DeepSpeed ZeRO-3 EMA (its flat
    partitions) as ``{name}_state-rank{rank}-of{world}.*``; ``full_shapes`` (name -> shape of
    the whole tensor) lets :func:`load_ema_state` reassemble the partitions.

    >>> import tempfile, torch
    >>> from ema_callbacks.controller import EMAController
    >>> ctrl = EMAController.create(half_life=['4ba', '8ba'])
    >>> ctrl.fit_start(torch.nn.Linear(2, 1))
    >>> folder = tempfile.mkdtemp()
    >>> save_ema_state(ctrl.state_dict(), folder)
    >>> sorted(os.listdir(folder))
    ['ema_state.json', 'ema_state.safetensors']
    >>> state = load_ema_state(folder)
    >>> sorted(state['shadow']), sorted(state['profiles']['ema_8ba']['shadow'])
    (['bias', 'weight'], ['bias', 'weight'])
    """
    tensors: dict[str, torch.Tensor] = {}
    listing: dict[str, Any] = {}
    for group in ("shadow", "training"):
        if group not in state:
            continue
        values = dict(state.get(group) or {})
        for key, value in values.items():
            tensors[f"{group}/{key}"] = value.detach().contiguous()
        listing[group] = sorted(values)
    meta = {
        k: v for k, v in state.items() if k not in ("shadow", "training", "profiles", "buffers")
    }

    def add_buffers(saved: Mapping[str, Any], prefix: str) -> dict[str, list[str]]:
        kept = {}
        for buffer, values in dict(saved.get("buffers") or {}).items():
            for key, value in dict(values).items():
                tensors[f"{prefix}{buffer}/{key}"] = value.detach().contiguous()
            kept[buffer] = sorted(values)
        return kept

    if state.get("buffers") is not None:
        listing["buffers"] = add_buffers(state, "buffers/")
    if state.get("profiles") is not None:
        meta["profiles"], listing["profiles"] = {}, {}
        for profile, saved in dict(state["profiles"]).items():
            meta["profiles"][profile] = {
                k: v for k, v in saved.items() if k not in ("shadow", "buffers")
            }
            shadow = dict(saved.get("shadow") or {})
            for key, value in shadow.items():
                tensors[f"profiles/{profile}/{key}"] = value.detach().contiguous()
            listing["profiles"][profile] = sorted(shadow)
            if saved.get("buffers") is not None:
                listing.setdefault("profile_buffers", {})[profile] = add_buffers(
                    saved, f"profile_buffers/{profile}/"
                )
    meta["tensors"] = listing
    if shard is not None:
        meta["shard"] = {"rank": int(shard[0]), "world": int(shard[1])}
        meta["full_shapes"] = {k: [int(n) for n in v] for k, v in (full_shapes or {}).items()}
    write_id = uuid.uuid4().hex
    meta["write"] = write_id
    tensor_path, json_path = _paths(directory, name, shard)
    atomic_write(tensor_path, lambda p: save_file(tensors, p, metadata={_WRITE_KEY: write_id}))

    def write_json(path: str) -> None:
        with open(path, "w") as f:
            json.dump(meta, f, indent=1, sort_keys=True)

    atomic_write(json_path, write_json)


def load_ema_state(
    directory: str | os.PathLike[str], name: str = "ema", shard: tuple[int, int] | None = None
) -> dict[str, Any]:
    """Read what :func:`save_ema_state` wrote (tensors on CPU): a state for
    :meth:`EMAController.load_state_dict`. ``state['shadow']`` is the (primary) EMA as a plain
    state dict of the bare model; with several EMAs, ``state['profiles'][name]['shadow']`` is
    each other one. Raises ``FileNotFoundError`` naming the files if they are not there. Files
    written before several EMAs existed (no ``profiles``) load unchanged.

    ``shard=(rank, world)`` reads one rank's ZeRO-3 part as written. Without ``shard``, a folder
    holding only per-rank ZeRO-3 files is reassembled into the full EMA (partitions
    concatenated in rank order, padding trimmed, shapes restored; no processes needed).

    >>> import tempfile, torch
    >>> from ema_callbacks.controller import EMAController
    >>> ctrl = EMAController.create(half_life='4ba')
    >>> ctrl.fit_start(torch.nn.Linear(2, 1))
    >>> folder = tempfile.mkdtemp()
    >>> save_ema_state(ctrl.state_dict(), folder, name='slow')
    >>> load_ema_state(folder, name='slow')['config']['schedule']['half_life']
    '4ba'
    >>> load_ema_state(folder)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    FileNotFoundError: no EMA state in '...': expected ema_state.safetensors and ema_state.json
    """
    tensor_path, json_path = _paths(directory, name, shard)
    if not (os.path.isfile(tensor_path) and os.path.isfile(json_path)):
        worlds = _shard_files(directory, name)
        if shard is None and len(worlds) == 1:
            return _merge_shards(directory, name, *next(iter(worlds.items())))
        raise FileNotFoundError(
            f"no EMA state in {os.fspath(directory)!r}: expected {os.path.basename(tensor_path)} "
            f"and {os.path.basename(json_path)}"
        )
    state, tensors = _read_pair(tensor_path, json_path)

    def buffers(listed: Mapping[str, Any], prefix: str) -> dict[str, dict[str, torch.Tensor]]:
        out = {}
        for buffer, names in dict(listed).items():
            missing = [k for k in names if f"{prefix}{buffer}/{k}" not in tensors]
            if missing:
                raise ValueError(
                    f"{tensor_path!r} lacks the tensors {missing[:5]} of the EMA buffer "
                    f"{prefix}{buffer} that {os.path.basename(json_path)} lists"
                )
            out[buffer] = {k: tensors[f"{prefix}{buffer}/{k}"] for k in names}
        return out

    for group, keys in dict(state.pop("tensors", {})).items():
        if group == "buffers":
            state["buffers"] = buffers(keys, "buffers/")
        elif group == "profile_buffers":
            for profile, listed in dict(keys).items():
                entry = state.setdefault("profiles", {}).setdefault(profile, {})
                entry["buffers"] = buffers(listed, f"profile_buffers/{profile}/")
        elif group == "profiles":
            for profile, names in dict(keys).items():
                entry = state.setdefault("profiles", {}).setdefault(profile, {})
                missing = [k for k in names if f"profiles/{profile}/{k}" not in tensors]
                if missing:
                    raise ValueError(
                        f"{tensor_path!r} lacks the tensors {missing[:5]} of EMA profile "
                        f"{profile!r} that {os.path.basename(json_path)} lists"
                    )
                entry["shadow"] = {k: tensors[f"profiles/{profile}/{k}"] for k in names}
        else:
            state[group] = {
                k[len(group) + 1 :]: v for k, v in tensors.items() if k.startswith(group + "/")
            }
    return state


_WRITE_KEY = "ema_callbacks_write"


def _read_pair(tensor_path: str, json_path: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The JSON and the tensors of one :func:`save_ema_state` write; a damaged file or a pair
    from two different writes is a :class:`~ema_callbacks.files.FileProblem` naming the files."""
    try:
        with open(json_path) as f:
            state = json.load(f)
        if not isinstance(state, dict):
            raise ValueError(f"expected a JSON object, got {type(state).__name__}")
    except (OSError, ValueError, RecursionError) as err:
        raise FileProblem(f"{json_path}: damaged EMA state file ({err})") from err
    try:
        with safe_open(tensor_path, framework="pt", device="cpu") as f:
            written = (f.metadata() or {}).get(_WRITE_KEY)
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    except Exception as err:
        raise FileProblem(
            f"{tensor_path}: damaged or truncated EMA state file ({' '.join(str(err).split())[:120]})"
        ) from err
    expected = state.pop("write", None)
    if written != expected:
        raise FileProblem(
            f"torn EMA state: {os.path.basename(tensor_path)} and {os.path.basename(json_path)} "
            f"in {os.path.dirname(tensor_path)!r} come from different saves (write ids "
            f"{written!r} and {expected!r}; a save was interrupted between its two files); "
            "resume from another checkpoint"
        )
    return state, tensors


def _merge_shards(
    directory: str | os.PathLike[str], name: str, world: int, ranks: set[int]
) -> dict[str, Any]:
    """The full EMA from the ``world`` per-rank ZeRO-3 files in ``directory``."""
    if ranks != set(range(world)):
        raise FileNotFoundError(
            f"incomplete ZeRO-3 EMA state in {os.fspath(directory)!r}: {world} ranks wrote it, "
            f"but only the files of ranks {sorted(ranks)} are there"
        )
    parts = [load_ema_state(directory, name, (r, world)) for r in range(world)]
    merged = {k: v for k, v in parts[0].items() if k not in ("shard", "full_shapes")}
    shapes = parts[0].get("full_shapes", {})

    def whole(tensors: list[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for key, value in tensors[0].items():
            if key not in shapes:  # whole on every rank (buffers)
                out[key] = value
                continue
            full = torch.cat([t[key].reshape(-1) for t in tensors])
            out[key] = full[: math.prod(shapes[key])].reshape(shapes[key]).clone()
        return out

    for group in ("shadow", "training"):
        if group in parts[0]:
            merged[group] = whole([p[group] for p in parts])

    def whole_buffers(saved: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, torch.Tensor]]:
        return {b: whole([s["buffers"][b] for s in saved]) for b in saved[0]["buffers"]}

    if "buffers" in parts[0]:
        merged["buffers"] = whole_buffers(parts)
    if "profiles" in parts[0]:
        merged["profiles"] = {}
        for profile, saved in parts[0]["profiles"].items():
            each = [p["profiles"][profile] for p in parts]
            merged["profiles"][profile] = {
                **saved,
                "shadow": whole([s.get("shadow", {}) for s in each]),
            }
            if "buffers" in saved:
                merged["profiles"][profile]["buffers"] = whole_buffers(each)
    return merged
