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
one (frozen weights and untracked buffers keep the model's values), keyed by the EMA's names:
the model's names without wrapper prefixes (DDP's and Composer's ``module.``, ``_orig_mod.``,
FSDP's), the keys ``ema-callbacks posthoc`` writes too. Every name of a tied tensor is there
(each its own copy: safetensors refuses shared memory). So it loads with
``load_state_dict(strict=True)`` into the model a user deploys; ``strip_prefix`` selects a
sub-module (``'model.'`` inside a LightningModule) and ``format='hf'`` writes a transformers
``save_pretrained`` folder.

Inputs are never written over: an output that is an input file, or lies in the input
checkpoint folder, is refused. A damaged, empty or foreign input file raises
:class:`~ema_callbacks.files.FileProblem` with one line naming it.

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
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ema_callbacks.controller import STATE_FORMAT
from ema_callbacks.files import FileProblem, write_safetensors
from ema_callbacks.weights import _as_dtype, normalize_name

__all__ = ["UnsafeCheckpointError", "export_ema", "read_ema", "safe_torch_load"]


class UnsafeCheckpointError(FileProblem):
    """A checkpoint would need arbitrary pickled code to load; it is not loaded (a
    :class:`~ema_callbacks.files.FileProblem`: the command line exits with status 1)."""


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


_ZIP = b"PK\x03\x04"


def _sniff(path: str) -> str:
    """What a file that is not a readable PyTorch checkpoint looks like, for the message."""
    with open(path, "rb") as f:
        head = f.read(512)
    if head.startswith(b"{") or head.startswith(b"["):
        return "a JSON file, not a PyTorch checkpoint"
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return "not a PyTorch checkpoint (unrecognised binary data)"
    if text.isprintable() or all(c.isprintable() or c in "\r\n\t" for c in text):
        return "a text file (YAML, JSON or similar), not a PyTorch checkpoint"
    return "not a PyTorch checkpoint (unrecognised data)"


def _needs_numpy(names: list[str]) -> bool:
    return bool(names) and all(n.startswith("numpy.") for n in names)


def _numpy_missing() -> bool:
    try:
        import numpy  # noqa: F401
    except ImportError:
        return True
    return False


def safe_torch_load(path: str | os.PathLike[str]) -> Any:
    """``torch.load(path, weights_only=True)`` allowing plain data types only; anything that
    would run pickled code raises :class:`UnsafeCheckpointError` naming what it needs. An empty,
    truncated or damaged file, or another kind of file, raises :class:`FileProblem` saying so
    (never torch's advice to load with ``weights_only=False``)."""
    path = os.fspath(path)
    try:
        size = os.path.getsize(path)
    except OSError as err:
        raise FileProblem(f"{path}: cannot read: {err.strerror}") from err
    if size == 0:
        raise FileProblem(f"{path}: empty file (0 bytes), not a checkpoint")
    with open(path, "rb") as f:
        head = f.read(4)
    if head != _ZIP and not head.startswith(b"\x80"):
        raise FileProblem(f"{path}: {_sniff(path)}")
    allowed = _allowed_globals()
    names = {_qualname(a) for a in allowed}
    needed: list[str] = []
    if head == _ZIP:
        try:
            needed = list(torch.serialization.get_unsafe_globals_in_checkpoint(path))
        except Exception as err:
            raise FileProblem(
                f"{path}: damaged or truncated PyTorch checkpoint (its zip archive cannot be read)"
            ) from err
    unsafe = [
        n for n in needed if n not in names and n.replace("numpy.core", "numpy._core") not in names
    ]
    if unsafe and _needs_numpy(unsafe) and _numpy_missing():
        raise ImportError(
            f"{path}: this checkpoint stores NumPy arrays, and reading them needs numpy, which is "
            "not installed: pip install numpy"
        )
    if unsafe:
        raise UnsafeCheckpointError(
            f"{path}: refusing to load: it needs pickled objects that could run code "
            f"({', '.join(sorted(unsafe)[:6])}); ema-callbacks only reads tensors and plain data "
            "(safetensors, or torch.load(weights_only=True))"
        )
    try:
        with warnings.catch_warnings(), torch.serialization.safe_globals(allowed):
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"GLOBAL ([\w.]+)", str(err))
        what = f" ({found.group(1)})" if found else ""
        raise UnsafeCheckpointError(
            f"{path}: refusing to load: it needs pickled objects that could run code{what}, or "
            "is not a PyTorch checkpoint; ema-callbacks only reads tensors and plain data "
            "(safetensors, or torch.load(weights_only=True))"
        ) from err
    except RecursionError as err:
        raise FileProblem(f"{path}: nested too deeply to be a checkpoint") from err
    except Exception as err:
        raise FileProblem(
            f"{path}: damaged or truncated PyTorch checkpoint ({type(err).__name__} while "
            "reading it)"
        ) from err


@dataclass
class EMAExtract:
    """What :func:`read_ema` found: the checkpoint kind, the model's tensors keyed by the EMA's
    names (the model's names without wrapper prefixes such as DDP's or Composer's ``module.``),
    which of them the EMA replaced, and, for a transformers folder, the layout of its model
    files (``{file name: [keys as written]}``) and the files to copy with it."""

    kind: str
    tensors: dict[str, torch.Tensor]
    ema_names: list[str] = field(default_factory=list)
    aliases: dict[str, str] = field(default_factory=dict)
    hf_layout: dict[str, list[str]] | None = None
    hf_tensors: dict[str, torch.Tensor] | None = None


def _aliases_of(state: Mapping[str, Any] | None) -> dict[str, str]:
    raw = (state or {}).get("aliases") or {}
    if not isinstance(raw, Mapping):
        return {}
    return {normalize_name(str(k)): normalize_name(str(v)) for k, v in raw.items()}


def _named(model_state: Mapping[str, Any], where: object) -> dict[str, torch.Tensor]:
    """The tensors of ``model_state`` keyed by the EMA's names (wrapper prefixes removed)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in model_state.items():
        if not isinstance(value, torch.Tensor):
            continue
        name = normalize_name(str(key))
        if name in out:
            raise FileProblem(f"{where}: two tensors of the model are both named {name!r}")
        out[name] = value
    return out


def _overlay(
    model_state: Mapping[str, torch.Tensor],
    shadow: Mapping[str, torch.Tensor],
    kind: str,
    aliases: Mapping[str, str] | None = None,
    where: object = "checkpoint",
) -> EMAExtract:
    """The model's tensors with the EMA's wherever the EMA tracks one (matched by normalised
    name; a tied tensor's other names get the EMA of its tracked name, and names a model file
    left out, as transformers does for tied weights, are added); raises if the EMA holds names
    the model lacks."""
    aliases = dict(aliases or {})
    out = _named(model_state, where)
    used: set[str] = set()
    for name in out:
        tracked = aliases.get(name, name)
        if tracked in shadow:
            out[name] = shadow[tracked]
            used.add(tracked)
    for alias, tracked in aliases.items():
        if alias not in out and tracked in shadow:
            out[alias] = shadow[tracked]
    missing = sorted(set(shadow) - used - set(out))
    if missing:
        raise FileProblem(
            f"{where}: the EMA holds weights the checkpoint's model lacks: {missing[:10]}"
            f"{'...' if len(missing) > 10 else ''}"
        )
    for name in shadow:
        out.setdefault(name, shadow[name])
    ema = sorted(n for n in out if aliases.get(n, n) in shadow)
    return EMAExtract(kind, out, ema, aliases)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise FileProblem(f"{path}: not valid JSON ({type(err).__name__})") from err
    except RecursionError as err:
        raise FileProblem(f"{path}: JSON nested too deeply to be an EMA state") from err
    except OSError as err:
        raise FileProblem(f"{path}: cannot read: {err.strerror}") from err


def _load_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a safetensors file; a damaged one is a :class:`FileProblem`."""
    from safetensors import safe_open

    if path.is_file() and path.stat().st_size == 0:
        raise FileProblem(f"{path}: empty file (0 bytes), not a safetensors file")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    except FileNotFoundError:
        raise
    except Exception as err:
        raise FileProblem(
            f"{path}: damaged or truncated safetensors file ({' '.join(str(err).split())[:120]})"
        ) from err
    return tensors, meta


_WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def _model_files(folder: Path) -> dict[str, list[str]] | None:
    """``{file: [keys]}`` of the model's own weights in a transformers checkpoint folder (one
    file, or the shards an index names); None when there are none."""
    for index in _WEIGHT_INDEXES:
        if (folder / index).is_file():
            data = _read_json(folder / index)
            weight_map = data.get("weight_map") if isinstance(data, dict) else None
            if not isinstance(weight_map, dict):
                raise FileProblem(f"{folder / index}: no 'weight_map' in this index")
            layout: dict[str, list[str]] = {}
            for key, file in weight_map.items():
                layout.setdefault(str(file), []).append(str(key))
            return layout
    for name in _WEIGHT_FILES:
        if (folder / name).is_file():
            return {name: []}
    return None


def _load_model_files(folder: Path, layout: dict[str, list[str]]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for file in list(layout):
        path = folder / file
        if not path.is_file():
            raise FileProblem(f"{path}: missing (the checkpoint's weight index names it)")
        if file.endswith(".safetensors"):
            tensors, _ = _load_safetensors(path)
        else:
            loaded = safe_torch_load(path)
            if not isinstance(loaded, Mapping):
                raise FileProblem(f"{path}: not a state dict (a {type(loaded).__name__})")
            tensors = {str(k): v for k, v in loaded.items() if isinstance(v, torch.Tensor)}
        layout[file] = list(tensors)
        out.update(tensors)
    return out


def _from_transformers_folder(
    folder: Path, name: str | None, profile: str | None = None
) -> EMAExtract:
    ours = []
    for path in sorted(folder.glob("*_state.json")):
        meta = _read_json(path)
        if isinstance(meta, dict) and meta.get("format") == STATE_FORMAT:
            ours.append(path)
    ranked = sorted(folder.glob("*_state-rank*-of*.json"))
    layout = _model_files(folder)
    model = _load_model_files(folder, layout) if layout is not None else None
    if ranked and not ours:
        # DeepSpeed ZeRO-3: one partition per rank; the transformers adapter reassembles them.
        prefix = ranked[0].name.split("_state-rank", 1)[0]
        if name is not None and name != prefix:
            raise ValueError(f"{folder}: no EMA state named {name!r} (found {prefix!r})")
        from ema_callbacks.state_files import load_ema_state

        state = load_ema_state(folder, prefix)
        full = state["shadow"]
        extract = _overlay(
            model if model is not None else full,
            full,
            "transformers (ZeRO-3, reassembled)",
            _aliases_of(state),
            folder,
        )
        return _with_layout(extract, layout, model, state)
    if name is not None:
        ours = [p for p in ours if p.name == f"{name}_state.json"]
    if not ours:
        raise FileProblem(
            f"{folder}: not a checkpoint folder with an ema_callbacks EMA state (no "
            "*_state.json written by ema_callbacks here)"
        )
    if len(ours) > 1:
        found = ", ".join(p.name[: -len("_state.json")] for p in ours)
        raise ValueError(f"{folder}: several EMA states ({found}); choose one with --name")
    prefix = ours[0].name[: -len("_state.json")]
    meta = _read_json(ours[0])
    names = _profile_names(meta)
    tensor_file = folder / f"{prefix}_state.safetensors"
    if not tensor_file.is_file():
        raise FileProblem(f"{tensor_file}: missing ({ours[0].name} is there without it)")
    if profile is not None and profile != (names[0] if names else None):
        from ema_callbacks.state_files import load_ema_state

        chosen = dict(_profile_shadow(load_ema_state(folder, prefix), profile, folder) or {})
    else:
        tensors, _ = _load_safetensors(tensor_file)
        chosen = {k[len("shadow/") :]: v for k, v in tensors.items() if k.startswith("shadow/")}
    extract = _overlay(
        model if model is not None else chosen, chosen, "transformers", _aliases_of(meta), folder
    )
    return _with_layout(extract, layout, model, meta)


def _with_layout(
    extract: EMAExtract,
    layout: dict[str, list[str]] | None,
    model: Mapping[str, torch.Tensor] | None,
    state: Mapping[str, Any],
) -> EMAExtract:
    """Add the model files' own keys with the EMA's values (for ``--format hf``)."""
    if layout is None or model is None:
        return extract
    hf: dict[str, torch.Tensor] = {}
    for keys in layout.values():
        for key in keys:
            name = normalize_name(key)
            hf[key] = extract.tensors.get(name, model[key])
    extract.hf_layout = layout
    extract.hf_tensors = hf
    return extract


def _profile_names(state: Mapping[str, Any]) -> list[str]:
    """The profile names of a saved controller state, primary first."""
    config = state.get("config") or {}
    if not isinstance(config, Mapping):
        return []
    listed = config.get("profiles")
    if isinstance(listed, list) and listed:
        return [str(p.get("name")) for p in listed if isinstance(p, Mapping)]
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
    """The first mapping with ``format == STATE_FORMAT`` in a nested structure (breadth first,
    iteratively, so that deep nesting is no problem)."""
    queue: list[tuple[Any, int]] = [(obj, 0)]
    while queue:
        item, depth = queue.pop(0)
        if depth > 32:
            continue
        if isinstance(item, Mapping):
            if item.get("format") == STATE_FORMAT:
                return item
            queue += [(v, depth + 1) for v in item.values()]
        elif isinstance(item, (list, tuple)):
            queue += [(v, depth + 1) for v in item]
    return None


def _from_torch_file(path: Path, profile: str | None = None) -> EMAExtract:
    ckpt = safe_torch_load(path)
    if not isinstance(ckpt, Mapping):
        raise FileProblem(f"{path}: not a checkpoint (a {type(ckpt).__name__})")
    if ckpt.get("format") == STATE_FORMAT:  # a saved ema_callbacks EMA state
        shadow = dict(_profile_shadow(ckpt, profile, path) or {})
        return _overlay(shadow, shadow, "ema_callbacks", _aliases_of(ckpt), path)
    if "ema_callbacks" in ckpt and isinstance(ckpt.get("state_dict"), Mapping):  # Lightning
        marker = ckpt["ema_callbacks"] if isinstance(ckpt["ema_callbacks"], Mapping) else {}
        model_state = ckpt["state_dict"]
        ours = _find_our_state(ckpt.get("callbacks", {}))
        names = _profile_names(ours) if ours is not None else []
        aliases = _aliases_of(ours)
        primary = profile is None or profile == (names[0] if names else None)
        if marker.get("state_dict_holds") == "ema" and primary:
            named = _named(model_state, path)
            # a tied tensor's other names: the EMA of its tracked name (older checkpoints held
            # the training weights there)
            return _overlay(named, named, "lightning", aliases, path)
        picked = None if ours is None else _profile_shadow(ours, profile, path)
        if not picked:
            raise FileProblem(
                f"{path}: a Lightning checkpoint without EMA weights (the EMA had not started)"
            )
        if marker.get("state_dict_holds") == "ema" and ours is not None and ours.get("training"):
            # the model slot holds the primary EMA: overlay on the training weights
            model_state = {
                k: ours["training"].get(normalize_name(k), v) for k, v in model_state.items()
            }
        return _overlay(model_state, picked, "lightning", aliases, path)
    state = ckpt.get("state")
    if isinstance(state, Mapping) and isinstance(state.get("model"), Mapping):  # Composer
        model_state = state["model"]
        algorithms = state.get("algorithms") or []
        ours = _find_our_state(algorithms)
        if ours is not None:
            picked = _profile_shadow(ours, profile, path)
            if not picked:
                raise FileProblem(
                    f"{path}: the EMA had not started when this checkpoint was written"
                )
            return _overlay(model_state, picked, "composer", _aliases_of(ours), path)
        for entry in algorithms if isinstance(algorithms, (list, tuple)) else []:
            _, value = (
                entry if isinstance(entry, (list, tuple)) and len(entry) == 2 else (None, entry)
            )
            if isinstance(value, Mapping) and isinstance(value.get("ema_model"), Mapping):
                if not value.get("ema_started", False):
                    raise FileProblem(f"{path}: composer.algorithms.EMA had not started")
                if value.get("ema_weights_active", False):  # the model slot holds the EMA
                    named = _named(model_state, path)
                    return _overlay(named, named, "composer.algorithms.EMA", None, path)
                stored = {
                    **value["ema_model"].get("named_buffers_dict", {}),
                    **value["ema_model"].get("named_parameters_dict", {}),
                }
                return _overlay(
                    model_state,
                    {normalize_name(k): v for k, v in stored.items()},
                    "composer.algorithms.EMA",
                    None,
                    path,
                )
        raise FileProblem(f"{path}: a Composer checkpoint without an EMA algorithm state")
    raise FileProblem(
        f"{path}: not a checkpoint this command knows (Composer .pt, Lightning .ckpt, a "
        "transformers checkpoint-N folder, or a saved ema_callbacks state)"
    )


def _is_safetensors(path: Path) -> bool:
    """A safetensors file, whatever its name: an 8-byte header length, then a JSON header."""
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError:
        return False
    if len(head) < 9 or head[8:9] != b"{":
        return False
    return 0 < int.from_bytes(head[:8], "little") < 100_000_000


def read_ema(
    path: str | os.PathLike[str], name: str | None = None, profile: str | None = None
) -> EMAExtract:
    """Find the EMA in ``path`` (see the module docs for the kinds recognised); ``profile``
    chooses one of several EMAs tracked together (default: the primary one). A damaged,
    unreadable or unknown file raises :class:`~ema_callbacks.files.FileProblem`."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such file or folder")
    if p.is_dir():
        return _from_transformers_folder(p, name, profile)
    if not os.access(p, os.R_OK):
        raise FileProblem(f"{p}: cannot read (permission denied)")
    if p.suffix == ".safetensors" or _is_safetensors(p):
        sibling = p.with_name(p.name[: -len(".safetensors")] + ".json")
        if sibling.is_file() and p.name.endswith("_state.safetensors"):
            return _from_transformers_folder(
                p.parent, p.name[: -len("_state.safetensors")], profile
            )
        tensors, meta = _load_safetensors(p)
        if str(meta.get("format", "")).startswith("ema_callbacks.posthoc"):
            aliases = {}
            try:
                raw = json.loads(meta.get("aliases", "{}"))
                aliases = {str(k): str(v) for k, v in dict(raw).items()}
            except (ValueError, TypeError, RecursionError):
                pass
            return _overlay(tensors, tensors, "posthoc", aliases, p)
        raise FileProblem(
            f"{p}: a safetensors file without ema_callbacks metadata (not an EMA state, "
            "snapshot or post-hoc result)"
        )
    return _from_torch_file(p, profile)


# ---------------------------------------------------------------------------------------------
# Writing, without ever touching an input
# ---------------------------------------------------------------------------------------------


def _inside(path: Path, folder: Path) -> bool:
    return folder == path or folder in path.parents


def check_output(
    output: str | os.PathLike[str],
    inputs: list[Path],
    folders: list[Path],
    force: bool = False,
    replaceable: Any = None,
) -> None:
    """Refuse (``ValueError``, naming both paths) an ``output`` that is one of ``inputs`` or
    lies in one of the input ``folders``. With ``force``, a *new* file in an input folder is
    allowed (it cannot destroy anything); an existing file there never is, unless
    ``replaceable(path)`` says it is an earlier result of ours."""
    out = Path(output).resolve()
    if out.is_dir():
        return  # not a file to write: the writer says so
    for item in inputs:
        same = out == item.resolve()
        if not same and out.exists() and item.exists():
            try:
                same = os.path.samefile(out, item)
            except OSError:
                same = False
        if same:
            raise ValueError(
                f"output {output} is the input {item}: refusing to write over an input; "
                "choose another output path"
            )
    for folder in folders:
        if not _inside(out, folder.resolve()):
            continue
        if out.exists():
            if replaceable is not None and replaceable(out):
                continue
            raise ValueError(
                f"output {output} is a file in the input folder {folder}: refusing to write over "
                "it; choose another output path"
            )
        if not force:
            raise ValueError(
                f"output {output} is in the input checkpoint folder {folder}: refusing to write "
                "into an input; choose another output path (or --force for a new file there)"
            )


def _input_paths(path: Path) -> tuple[list[Path], list[Path]]:
    """The files and folders an export reads from ``path``."""
    if path.is_dir():
        return [], [path]
    if path.name.endswith("_state.safetensors"):
        return [path, path.with_name(path.name[: -len(".safetensors")] + ".json")], [path.parent]
    return [path], []


def _strip(
    tensors: Mapping[str, torch.Tensor], prefixes: list[str]
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The tensors under the prefixes, renamed without them; and the names left out."""
    out: dict[str, torch.Tensor] = {}
    left_out: list[str] = []
    for key, value in tensors.items():
        for prefix in prefixes:
            if key.startswith(prefix) and len(key) > len(prefix):
                new = key[len(prefix) :]
                if new in out:
                    raise ValueError(
                        f"--strip-prefix: two tensors become {new!r}; give prefixes that do not "
                        "overlap"
                    )
                out[new] = value
                break
        else:
            left_out.append(key)
    if not out:
        shown = ", ".join(sorted(tensors)[:4])
        raise ValueError(
            f"--strip-prefix {' '.join(repr(p) for p in prefixes)}: no tensor name starts with "
            f"it; the names look like {shown}"
        )
    return out, left_out


def _prefixes(strip_prefix: Any) -> list[str]:
    if strip_prefix is None:
        return []
    items = [strip_prefix] if isinstance(strip_prefix, str) else list(strip_prefix)
    out = []
    for p in items:
        if not isinstance(p, str) or not p.strip(". "):
            raise ValueError(f"--strip-prefix must be a module path like 'model.'; got {p!r}")
        out.append(p if p.endswith(".") else p + ".")
    return out


def export_ema(
    path: str | os.PathLike[str],
    output: str | os.PathLike[str],
    dtype: str | None = None,
    name: str | None = None,
    profile: str | None = None,
    strip_prefix: str | list[str] | None = None,
    format: str = "safetensors",
    force: bool = False,
) -> dict[str, Any]:
    """Write the EMA found in ``path`` to ``output`` (atomically) and return a summary.

    ``format='safetensors'`` (the default): a plain safetensors state dict keyed by the EMA's
    names (the model's names without wrapper prefixes: DDP's and Composer's ``module.``,
    ``_orig_mod.``, FSDP's), the same keys ``ema-callbacks posthoc`` writes for the run; every
    name of a tied tensor is there. ``strip_prefix`` (one or several, e.g. ``'model.'``) keeps
    the tensors under the prefix, renamed without it: the state dict of that sub-module (the
    ``left_out`` count says how many tensors were outside every prefix).

    ``format='hf'``: ``output`` is a folder; from a transformers checkpoint folder, writes a
    ``save_pretrained`` folder (``config.json`` and the other model files of the checkpoint, the
    weights in the checkpoint's own file layout with the EMA values) that
    ``AutoModel*.from_pretrained(output)`` loads as the EMA. An existing, non-empty folder needs
    ``force`` (its weight files are replaced).

    ``dtype`` casts floating tensors (``'float16'``, ``'bfloat16'``...); ``profile`` exports one
    of several EMAs tracked together (``'ema_1000ba'``; default: the primary one). The output
    may never be an input file nor lie in the input checkpoint folder (``force`` allows a new
    file there, never replacing one).
    """
    if format not in ("safetensors", "hf"):
        raise ValueError(f"--format must be 'safetensors' or 'hf'; got {format!r}")
    target_dtype = _as_dtype(dtype, "dtype")
    prefixes = _prefixes(strip_prefix)
    source = Path(path)
    if format == "hf" and prefixes:
        raise ValueError("--strip-prefix does not apply to --format hf (it keeps the model's keys)")
    if source.exists():
        inputs, folders = _input_paths(source)
        if format == "hf":
            out = Path(output).resolve()
            for item in [*inputs, *folders]:
                if _inside(out, item.resolve()):
                    raise ValueError(
                        f"output {output} would be in or over the input {item}: refusing to write "
                        "into an input; choose another output folder"
                    )
        else:
            check_output(output, inputs, folders, force)
    extract = read_ema(path, name, profile)

    def cast(value: torch.Tensor) -> torch.Tensor:
        value = value.detach().cpu()
        if target_dtype is not None and value.is_floating_point():
            value = value.to(target_dtype)
        return value

    if format == "hf":
        return _export_hf(extract, source, Path(output), target_dtype, cast, force)
    tensors = {k: cast(v) for k, v in extract.tensors.items()}
    left_out: list[str] = []
    if prefixes:
        tensors, left_out = _strip(tensors, prefixes)
    metadata = {"format": "ema_callbacks.export", "source": os.fspath(path), "kind": extract.kind}
    write_safetensors(output, tensors, metadata)
    summary: dict[str, Any] = {
        "kind": extract.kind,
        "output": os.fspath(output),
        "tensors": len(tensors),
        "ema_tensors": sum(1 for k in extract.ema_names if k in extract.tensors),
        "tied_names": len([a for a in extract.aliases if a in extract.tensors]),
    }
    if prefixes:
        summary["ema_tensors"] = sum(
            1 for k in extract.ema_names if any(k.startswith(p) for p in prefixes)
        )
        summary["left_out"] = len(left_out)
    return summary


# Files of a transformers checkpoint folder that are training state, not the model.
_TRAINING_FILES = re.compile(
    r"^(optimizer\.(pt|bin)|scheduler\.pt|scaler\.pt|rng_state(_\d+)?\.pth|trainer_state\.json|"
    r"training_args\.bin|latest|zero_to_fp32\.py|.*_state(-rank\d+-of\d+)?\.(json|safetensors)|"
    r"model(-\d+-of-\d+)?\.safetensors|pytorch_model(-\d+-of-\d+)?\.bin|"
    r".*\.index\.json|\..*)$"
)


def _export_hf(
    extract: EMAExtract,
    source: Path,
    output: Path,
    target_dtype: torch.dtype | None,
    cast: Any,
    force: bool,
) -> dict[str, Any]:
    import shutil
    import tempfile

    if extract.hf_layout is None or extract.hf_tensors is None or not source.is_dir():
        raise ValueError(
            f"--format hf needs a transformers checkpoint-N folder with the model's weights; "
            f"{source} is a {extract.kind} checkpoint (export it as safetensors instead)"
        )
    if not (source / "config.json").is_file():
        raise FileProblem(f"{source}: no config.json, so not a transformers model checkpoint")
    if output.exists() and not output.is_dir():
        raise FileProblem(f"{output}: is a file; --format hf writes a folder")
    if output.is_dir() and any(output.iterdir()) and not force:
        raise ValueError(
            f"output folder {output} exists and is not empty: pass --force to replace the model "
            "files in it, or choose a new folder"
        )
    copied = sorted(
        f.name for f in source.iterdir() if f.is_file() and not _TRAINING_FILES.match(f.name)
    )
    if "config.json" not in copied:
        copied.append("config.json")
    layout = extract.hf_layout
    single = len(layout) == 1
    files: dict[str, dict[str, torch.Tensor]] = {}
    for file, keys in layout.items():
        new = "model.safetensors" if single else _as_safetensors_name(file)
        files[new] = {k: cast(extract.hf_tensors[k]) for k in keys}
    # All or nothing: the folder is built beside the output and renamed into place; with
    # --force an existing output is kept aside until the new one is in place.
    parent = output.parent
    parent.mkdir(parents=True, exist_ok=True)
    build = Path(tempfile.mkdtemp(prefix=f".{output.name}.", suffix=".tmp", dir=parent))
    try:
        os.chmod(build, 0o777 & ~_umask())
        for name in copied:
            if name == "config.json" and target_dtype is not None:
                config = _read_json(source / name)
                for key in ("dtype", "torch_dtype"):
                    if key in config:
                        config[key] = str(target_dtype).replace("torch.", "")
                text = json.dumps(config, indent=2, sort_keys=True) + "\n"
                _write_text(build / name, text)
            else:
                _copy(source / name, build / name)
        for name, tensors in files.items():
            write_safetensors(build / name, tensors, {"format": "pt"})
        if not single:
            weight_map = {k: name for name, tensors in files.items() for k in tensors}
            index = {"metadata": {}, "weight_map": dict(sorted(weight_map.items()))}
            _write_text(build / "model.safetensors.index.json", json.dumps(index, indent=2) + "\n")
        if output.exists():
            # --force: the user's other files (a model card) stay; weight files of an earlier
            # export would mix with ours, so they go.
            for old in output.iterdir():
                if (build / old.name).exists() or _HF_WEIGHT_FILE.match(old.name):
                    continue
                if old.is_dir():
                    shutil.copytree(old, build / old.name, symlinks=True)
                else:
                    shutil.copy2(old, build / old.name, follow_symlinks=False)
            aside = Path(tempfile.mkdtemp(prefix=f".{output.name}.old.", suffix=".tmp", dir=parent))
            aside.rmdir()
            os.rename(output, aside)
            try:
                os.rename(build, output)
            except BaseException:
                os.rename(aside, output)
                raise
            shutil.rmtree(aside, ignore_errors=True)
        else:
            os.rename(build, output)
    except BaseException:
        shutil.rmtree(build, ignore_errors=True)
        raise
    return {
        "kind": extract.kind,
        "format": "hf",
        "output": os.fspath(output),
        "tensors": sum(len(t) for t in files.values()),
        "ema_tensors": len(extract.ema_names),
        "files": ", ".join(sorted({*copied, *files})),
    }


_HF_WEIGHT_FILE = re.compile(
    r"^(model(-\d+-of-\d+)?\.safetensors|pytorch_model.*\.bin|.*\.index\.json)$"
)


def _as_safetensors_name(file: str) -> str:
    if file.endswith(".safetensors"):
        return file
    return re.sub(r"^pytorch_model", "model", file)[: -len(".bin")] + ".safetensors"


def _umask() -> int:
    from ema_callbacks.files import current_umask

    return current_umask()


def _write_text(path: Path, text: str) -> None:
    from ema_callbacks.files import atomic_write

    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def _copy(source: Path, target: Path) -> None:
    import shutil

    from ema_callbacks.files import atomic_write

    atomic_write(target, lambda tmp: shutil.copyfile(source, tmp))
