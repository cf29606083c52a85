"""Run a training described by a YAML file, for any of the three trainers, with EMA in it.

The top-level key ``framework`` (``composer``, ``lightning`` or ``transformers``) says which
trainer; the rest is in that trainer's own terms: a LightningCLI config; Composer ``Trainer``
arguments with ``algorithms: {ema: {...}}``; ``TrainingArguments`` with ``callbacks``. Classes
are ``{class_path, init_args}``. ``docs/run_config.md`` gives each format in full. Example
configs ship in the package (:func:`bundled_configs`); a name such as ``'lightning_digits'``
works wherever a path does.

:func:`load_config` checks the whole file before anything is built, with the types of the
libraries that own them: jsonargparse (which LightningCLI uses) reads the signatures and type
hints of every class the file names, of the trainers and of ``TrainingArguments``; then every
EMA object and ``TrainingArguments`` are built, so their own checks run. **One conversion**: a
string where a number is declared is read as a number when it reads as one (``1e-3``, a string
to YAML 1.1). Errors are :class:`ConfigError` (a ``ValueError``):
``"{file}: {dotted.key}: expected ..., got ..."``, with a "did you mean" for unknown keys; a
missing trainer is an ``ImportError`` naming the pip extra. :func:`train` then trains into a
folder it keeps.

>>> import tempfile, pathlib
>>> path = pathlib.Path(tempfile.mkdtemp()) / 'bad.yaml'
>>> _ = path.write_text('framework: keras\\n')
>>> load_config(path)
Traceback (most recent call last):
...
ema_callbacks.run_config.ConfigError: .../bad.yaml: framework: expected one of 'composer', 'lightning', 'transformers', got 'keras'
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import difflib
import importlib
import importlib.resources
import importlib.util
import inspect
import os
import re
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

__all__ = [
    "ConfigError",
    "EMA_WEIGHTS_FILE",
    "FRAMEWORKS",
    "RunConfig",
    "RunResult",
    "bundled_configs",
    "describe_config",
    "find_config",
    "load_config",
    "output_folder",
    "run",
    "train",
]

#: The values of the top-level ``framework`` key.
FRAMEWORKS = ("composer", "lightning", "transformers")
#: The file :func:`train` writes in the run's folder: the model with the EMA weights in.
EMA_WEIGHTS_FILE = "ema_weights.safetensors"

# the keys (besides ``framework``) each framework's file may have at the top level
_TOP_KEYS = {
    "composer": "model train_dataloader eval_dataloader optimizer trainer algorithms callbacks",
    "lightning": "seed_everything trainer model data optimizer lr_scheduler ckpt_path",
    "transformers": "model train_dataset eval_dataset training_arguments callbacks "
    "compute_metrics data_collator",
}
# composer.Trainer arguments the file gives at the top level, and the key it gives them as
_COMPOSER_RESERVED = {
    **{k: k for k in ("model", "train_dataloader", "eval_dataloader", "algorithms", "callbacks")},
    "optimizers": "optimizer",
}
# where each trainer writes: (section, key) of the file
_OUTPUT_KEY = {
    "composer": ("trainer", "save_folder"),
    "lightning": ("trainer", "default_root_dir"),
    "transformers": ("training_arguments", "output_dir"),
}


class ConfigError(ValueError):
    """A configuration mistake, found before any training: ``"{file}: {key}: {message}"``
    where ``message`` reads ``expected ..., got ...``.

    >>> err = ConfigError('run.yaml', 'trainer.max_epochs', "expected an integer, got 'two'")
    >>> str(err), err.file, err.key
    ("run.yaml: trainer.max_epochs: expected an integer, got 'two'", 'run.yaml', 'trainer.max_epochs')
    """

    def __init__(self, file: str | os.PathLike[str], key: str, message: str) -> None:
        self.file = os.fspath(file)
        self.key = key
        self.message = message
        super().__init__(f"{self.file}: {key}: {message}")

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.file, self.key, self.message))


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """A checked run configuration: the file, the trainer, and the file's mapping as it will be
    run (overrides applied, numbers given as strings converted).

    >>> RunConfig(Path('x.yaml'), 'lightning', {'framework': 'lightning'}).framework
    'lightning'
    """

    path: Path
    framework: str
    config: dict[str, Any]


@dataclasses.dataclass(frozen=True)
class RunResult:
    """What :func:`train` made: the final metrics, the run's folder, the folder holding the
    trainer's checkpoints and the newest of them (``None`` where it wrote none), the EMA weights
    file (``None`` if no EMA started) and the trainer itself.

    >>> RunResult({'val_loss': 0.5}, Path('runs/x'), None, None, None, None).metrics
    {'val_loss': 0.5}
    """

    metrics: dict[str, float]
    output_dir: Path
    checkpoints: Path | None
    last_checkpoint: Path | None
    ema_weights: Path | None
    trainer: Any = dataclasses.field(repr=False, compare=False)


# ---------------------------------------------------------------------------------------------
# Bundled configs, files, overrides
# ---------------------------------------------------------------------------------------------


def bundled_configs() -> dict[str, Path]:
    """The example configs shipped in the package (``ema_callbacks/configs``), by name: the
    file name without ``.yaml``.

    >>> sorted(bundled_configs())[:3]
    ['composer_digits', 'composer_ema', 'ema_options']
    """
    folder = Path(str(importlib.resources.files("ema_callbacks") / "configs"))
    return {p.stem: p for p in sorted(folder.glob("*.yaml"))}


def describe_config(path: str | os.PathLike[str]) -> str:
    """A config's one-line description: its first comment line.

    >>> describe_config(bundled_configs()['lightning_digits'])[:40]
    "Lightning: a small MLP on scikit-learn's"
    """
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    return next((ln.lstrip("#").strip() for ln in lines if ln.startswith("#")), "")


def find_config(name: str | os.PathLike[str]) -> Path:
    """The file a name stands for: an existing path, else a bundled config's name
    (``'lightning_digits'``, also with ``.yaml``).

    Raises:
        FileNotFoundError: neither (the message lists the bundled names).
        ValueError: the path is a folder.

    >>> find_config('lightning_digits').name
    'lightning_digits.yaml'
    """
    path = Path(name)
    bundled = bundled_configs()
    if not path.exists() and path.name.removesuffix(".yaml") in bundled and path.parent == Path():
        return bundled[path.name.removesuffix(".yaml")]
    if path.is_dir():
        raise ValueError(f"{path}: is a folder; expected a YAML run config or a bundled name")
    if not path.exists():
        close = difflib.get_close_matches(str(name), list(bundled), n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise FileNotFoundError(
            f"{name}: no such file, nor a bundled config; {hint}bundled: {', '.join(bundled)}"
        )
    return path


def _read(path: Path) -> dict[str, Any]:
    from ema_callbacks.files import FileProblem

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark is not None else "(file)"
        raise ConfigError(path, where, f"expected valid YAML, got a syntax error: {err}") from err
    except UnicodeDecodeError as err:
        raise FileProblem(f"{path}: not a text file ({err.reason})") from err
    if not isinstance(data, dict):
        raise ConfigError(path, "(file)", f"expected a mapping of keys, got {_show(data)}")
    return data


class _Missing:
    """Marks a key that is not in the file."""


_MISSING = _Missing()


def _show(value: Any) -> str:
    """How a received value is shown in a message."""
    if isinstance(value, _Missing):
        return "nothing (the key is missing)"
    if isinstance(value, Mapping):
        return f"a mapping with keys {sorted(map(str, value))}"
    if isinstance(value, list):
        return f"a list of {len(value)}"
    return repr(value)


def _listing(names: Sequence[str], limit: int = 12) -> str:
    """``'a', 'b', 'c'``; a long list is cut after ``limit`` names."""
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def _split_key(key: str) -> list[str | int]:
    """``'trainer.callbacks[0].init_args'`` -> ``['trainer', 'callbacks', 0, 'init_args']``."""
    if not re.fullmatch(r"[^.\[\]]+(\.[^.\[\]]+|\[\d+\])*", key):
        raise ValueError(
            "override keys are dotted paths like 'trainer.max_epochs' or "
            f"'trainer.callbacks[0].init_args.half_life'; got {key!r}"
        )
    return [int(i) if i else name for name, i in re.findall(r"([^.\[\]]+)|\[(\d+)\]", key)]


def _apply_overrides(
    config: dict[str, Any], overrides: Mapping[str, Any] | Sequence[str] | None, path: Path
) -> None:
    """Set each dotted key to its value; ``'key=value'`` strings have the value read as YAML.
    A key the file lacks is added, and then checked like the file's own keys."""
    if isinstance(overrides, (str, bytes)) or not isinstance(overrides, Sequence | Mapping | None):
        raise TypeError(
            "overrides must be a mapping {'dotted.key': value} or a list of 'dotted.key=value' "
            f"strings; got {overrides!r}"
        )
    items = list(overrides.items()) if isinstance(overrides, Mapping) else []
    for item in overrides if isinstance(overrides, Sequence) else ():
        if not isinstance(item, str) or "=" not in item:
            raise ValueError(f"an override must look like 'dotted.key=value'; got {item!r}")
        key, _, text = item.partition("=")
        try:
            items.append((key.strip(), yaml.safe_load(text)))
        except yaml.YAMLError as err:
            raise ValueError(f"override {item!r}: the value is not valid YAML") from err
    for key, value in items:
        node: Any = config
        parts = _split_key(str(key))
        for i, part in enumerate(parts):
            here = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in parts[: i + 1])
            if isinstance(part, int) and (not isinstance(node, list) or part >= len(node)):
                raise ConfigError(path, here[1:], f"expected a list with an item {part}, got none")
            if isinstance(part, str) and not isinstance(node, dict):
                raise ConfigError(path, here[1:], f"expected a mapping, got {_show(node)}")
            if i == len(parts) - 1:
                node[part] = value
                break
            if isinstance(part, str) and not isinstance(node.get(part), (dict, list)):
                node[part] = {}
            node = node[part]


def _require(framework: str, path: Path) -> None:
    """The trainer (its module is named like the framework) and jsonargparse are installed (a
    folder of that name on ``sys.path``, a namespace package, is not the library)."""
    for module, hint in (
        (framework, f"ema-callbacks[{framework}]"),
        ("jsonargparse", "jsonargparse[signatures]"),
    ):
        with contextlib.suppress(ImportError, ValueError):
            spec = importlib.util.find_spec(module)
            if spec is not None and spec.origin not in (None, "namespace"):
                continue
        raise ImportError(
            f"{path}: framework: {framework!r} needs {module}, which is not installed: "
            f'pip install "{hint}"'
        )


# ---------------------------------------------------------------------------------------------
# Checking: the walk names every key; jsonargparse checks each class's arguments
# ---------------------------------------------------------------------------------------------


def _is_spec(value: Any) -> bool:
    return isinstance(value, Mapping) and "class_path" in value


def _type_names(text: str) -> str:
    """jsonargparse's ``<class 'int'>``, ``typing.Literal[...]`` as ``int``, ``Literal[...]``."""
    text = re.sub(r"<(?:class|enum) '(?:[\w.]+\.)?(\w+)'>", r"\1", text).replace("typing.", "")
    return text.replace("NoneType", "null")


class _Check:
    """Walks one file's mapping; every error names the file and the dotted key."""

    def __init__(self, path: Path, ema_class: Any = None) -> None:
        self.path = path
        self.ema_class = ema_class

    def error(self, key: str, expected: str, got: Any, detail: str = "") -> ConfigError:
        message = f"expected {expected}, got {_show(got)}"
        return ConfigError(self.path, key, message + (f" ({detail})" if detail else ""))

    def unknown(self, key: str, name: str, allowed: Sequence[str], what: str) -> ConfigError:
        close = difflib.get_close_matches(name, allowed, n=1)
        hint = f"did you mean {close[0]!r}?" if close else ""
        return self.error(key, f"{what} ({_listing(allowed)})", name, hint)

    def keys(self, mapping: Mapping[str, Any], allowed: Sequence[str]) -> None:
        for name in mapping:
            if name not in allowed:
                raise self.unknown(str(name), str(name), allowed, "one of the keys")

    def mapping(self, value: Any, key: str, what: str = "a mapping") -> dict[str, Any]:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise self.error(key, what, value)
        return value

    def entries(self, value: Any, key: str) -> list[tuple[str, Any]]:
        """A list (or a single mapping) of ``{class_path, init_args}``, with each one's key."""
        if value is None:
            return []
        if isinstance(value, Mapping):
            return [(key, value)]
        if not isinstance(value, list):
            raise self.error(key, "a list of {class_path, init_args} mappings", value)
        return [(f"{key}[{i}]", v) for i, v in enumerate(value)]

    def spec(
        self, value: Any, key: str, required: bool = True, supplied: Sequence[str] = ()
    ) -> Any:
        """A ``{class_path, init_args}`` mapping: import the target, check its arguments
        (nested specs first); an EMA object is built. Returns the target."""
        if value is None or isinstance(value, _Missing):
            if required:
                raise self.error(key, "a mapping with 'class_path' and 'init_args'", _MISSING)
            return None
        if not _is_spec(value):
            raise self.error(key, "a mapping with 'class_path' and 'init_args'", value)
        for name in value:
            if name not in ("class_path", "init_args"):
                raise self.unknown(f"{key}.{name}", name, ["class_path", "init_args"], "one of")
        target = self.target(value["class_path"], f"{key}.class_path")
        init_args = self.mapping(value.get("init_args"), f"{key}.init_args")
        self.arguments(target, init_args, f"{key}.init_args", supplied)
        if isinstance(target, type) and self.ema_class and issubclass(target, self.ema_class):
            self.build(target, init_args, f"{key}.init_args")
        return target

    def target(self, path: Any, key: str) -> Any:
        """Import ``'package.module.Name'`` (or ``'package.module:Name'``)."""
        expected = "an importable dotted path like 'package.module.Name'"
        if not isinstance(path, str) or not re.fullmatch(r"\w+(\.\w+)*[.:]\w+", path):
            raise self.error(key, expected, path)
        module_name, _, name = path.rpartition(":" if ":" in path else ".")
        try:
            target = getattr(importlib.import_module(module_name), name)
        except (ModuleNotFoundError, AttributeError) as err:
            if isinstance(err, ModuleNotFoundError) and not module_name.startswith(err.name or "?"):
                raise ImportError(f"{self.path}: {key}: importing {path!r} failed: {err}") from err
            raise self.error(key, expected, path, str(err)) from err
        except ImportError as err:  # e.g. an adapter whose trainer is missing
            raise ImportError(f"{self.path}: {key}: importing {path!r} failed: {err}") from err
        if not callable(target):
            raise self.error(key, "a class or function", path, f"a {type(target).__name__}")
        return target

    def arguments(
        self, target: Any, args: dict[str, Any], key: str, skip: Sequence[str] = ()
    ) -> None:
        """jsonargparse checks ``args`` against ``target``'s signature and type hints (those in
        ``skip`` the runner passes itself); nested specs are checked first. A string given where
        a number is declared, that reads as one, is replaced by the number in ``args``."""
        from jsonargparse import ArgumentParser

        for name, value in args.items():
            for i, item in enumerate(value if isinstance(value, list) else [value]):
                if _is_spec(item):
                    self.spec(item, f"{key}.{name}" + (f"[{i}]" if isinstance(value, list) else ""))
        parser = ArgumentParser(exit_on_error=False)
        add = (
            parser.add_class_arguments if inspect.isclass(target) else parser.add_function_arguments
        )
        try:
            add(target, "a", fail_untyped=False, skip=set(skip))
            known = list(vars(parser.get_defaults().get("a") or {}))
        except Exception:  # no signature jsonargparse can read (a builtin): left to the call
            return
        try:
            takes_more = any(
                p.kind is p.VAR_KEYWORD for p in inspect.signature(target).parameters.values()
            )
        except (TypeError, ValueError):
            takes_more = False
        given = {k: v for k, v in args.items() if k in known or not takes_more}
        try:
            parsed = parser.parse_object({"a": copy.deepcopy(given)}, defaults=False).get("a")
        except Exception as err:
            if type(err).__name__ != "ArgumentError":
                raise
            raise self.translate(str(err), target, args, key, known) from err
        for name, value in given.items():
            new = parsed.get(name) if parsed is not None else None
            if isinstance(value, str) and isinstance(new, (int, float)):
                args[name] = new

    def translate(
        self, text: str, target: Any, args: Mapping[str, Any], key: str, known: Sequence[str]
    ) -> ConfigError:
        """jsonargparse's message as ``file: key: expected ..., got ...``."""
        what = getattr(target, "__name__", repr(target))
        if match := re.search(r"does not accept option '([^']+)'", text):
            name = match.group(1)
            return self.unknown(f"{key}.{name}", name, known, f"an argument of {what}")
        if match := re.search(r"arguments are required: a\.(\w+)", text):
            return self.error(f"{key}.{match.group(1)}", "a value (it is required)", _MISSING)
        match = re.search(r'Parser key "a\.(\w+)', text)
        name = match.group(1) if match else ""
        union = re.search(r"Subtypes: \[(.*)\]", text)
        single = re.search(r"Expected a (.+?)(?:\. Got value:.*)?$", text, re.M)
        if union:
            expected = " or ".join(_type_names(t) for t in re.split(r", (?![^\[]*\])", union[1]))
        elif single:
            expected = _type_names(single.group(1))
        else:
            expected = f"an argument {what} accepts"
        detail = "" if union or single else " ".join(text.split())
        got = args.get(name, _MISSING) if name else dict(args)
        if isinstance(got, bool) and "str" in expected:
            detail = "YAML reads yes/no/on/off as true/false: quote a word, 'no'"
        return self.error(f"{key}.{name}" if name else key, expected, got, detail)

    def build(self, cls: Any, init_args: Mapping[str, Any], key: str, **supplied: Any) -> Any:
        """Build ``cls(**init_args, **supplied)`` now, so its own validation runs (an EMA
        object, ``TrainingArguments``). Its ``ValueError`` or ``TypeError`` is reported at the
        argument it names: its first word, else an argument it mentions, else one whose string
        value it quotes."""
        try:
            return cls(**{**init_args, **supplied})
        except (ValueError, TypeError) as err:
            message = str(err)
            first = re.match(r"\w+", message)
            named = ([first.group(0)] if first and first.group(0) in init_args else []) or [
                n for n in init_args if re.search(rf"\b{re.escape(n)}\b", message)
            ]
            named = named or [
                n
                for n, v in init_args.items()
                if isinstance(v, str) and re.search(rf"(?<![\w-]){re.escape(v)}(?![\w-])", message)
            ]
            if named:
                raise self.error(
                    f"{key}.{named[0]}",
                    f"a valid {cls.__name__} argument",
                    init_args[named[0]],
                    message,
                ) from err
            raise self.error(
                key, f"valid {cls.__name__} arguments", dict(init_args), message
            ) from err


def _check_lightning(check: _Check, config: dict[str, Any]) -> None:
    from lightning.pytorch import Trainer

    from ema_callbacks.lightning import EMACallback

    check.ema_class = EMACallback
    seed = config.get("seed_everything", True)
    if not isinstance(seed, (bool, int)):
        raise check.error("seed_everything", "an integer or true/false", seed)
    if not isinstance(config.get("ckpt_path"), str | None):
        raise check.error("ckpt_path", "a checkpoint path", config["ckpt_path"])
    check.arguments(Trainer, check.mapping(config.get("trainer"), "trainer"), "trainer")
    check.spec(config.get("model", _MISSING), "model")
    for name in ("data", "optimizer", "lr_scheduler"):
        if isinstance(config.get(name), Mapping):  # LightningCLI passes params / optimizer
            check.spec(config[name], name, supplied=("params", "optimizer"))


def _check_composer(check: _Check, config: dict[str, Any]) -> None:
    from composer import Trainer

    from ema_callbacks.composer import EMA

    check.ema_class = EMA
    check.spec(config.get("model", _MISSING), "model")
    check.spec(config.get("train_dataloader", _MISSING), "train_dataloader")
    check.spec(config.get("eval_dataloader"), "eval_dataloader", required=False)
    optimizer = config.get("optimizer")
    if isinstance(optimizer, Mapping) and "params" in (optimizer.get("init_args") or {}):
        raise check.error(
            "optimizer.init_args.params", "no 'params' (the model's are passed)", "params"
        )
    check.spec(optimizer, "optimizer", required=False, supplied=("params",))
    trainer = check.mapping(config.get("trainer"), "trainer")
    for name in trainer:
        if name in _COMPOSER_RESERVED:
            raise check.error(
                f"trainer.{name}",
                f"it at the top level, as '{_COMPOSER_RESERVED[name]}'",
                "it under 'trainer'",
            )
    check.arguments(Trainer, trainer, "trainer", list(_COMPOSER_RESERVED))
    for name, value in check.mapping(config.get("algorithms"), "algorithms").items():
        if name == "ema":
            init_args = check.mapping(value, "algorithms.ema", "a mapping of EMA arguments")
            check.arguments(EMA, init_args, "algorithms.ema")
            check.build(EMA, init_args, "algorithms.ema")
        else:
            check.spec(value, f"algorithms.{name}")
    for key, entry in check.entries(config.get("callbacks"), "callbacks"):
        check.spec(entry, key)


def _check_transformers(check: _Check, config: dict[str, Any]) -> None:
    from transformers import TrainingArguments

    from ema_callbacks.transformers import EMATrainerCallback

    check.ema_class = EMATrainerCallback
    check.spec(config.get("model", _MISSING), "model")
    check.spec(config.get("train_dataset", _MISSING), "train_dataset")
    check.spec(config.get("eval_dataset"), "eval_dataset", required=False)
    arguments = check.mapping(config.get("training_arguments"), "training_arguments")
    skip = [] if "output_dir" in arguments else ["output_dir"]  # the runner gives one
    check.arguments(TrainingArguments, arguments, "training_arguments", skip)
    for key, entry in check.entries(config.get("callbacks"), "callbacks"):
        check.spec(entry, key)
    for name in ("compute_metrics", "data_collator"):
        if config.get(name) is not None:
            check.target(config[name], name)
    with tempfile.TemporaryDirectory() as folder:  # its own checks (__post_init__)
        check.build(TrainingArguments, arguments, "training_arguments", output_dir=folder)


_CHECKS: dict[str, Callable[[_Check, dict[str, Any]], None]] = {
    "composer": _check_composer,
    "lightning": _check_lightning,
    "transformers": _check_transformers,
}


def load_config(
    path: str | os.PathLike[str], overrides: Mapping[str, Any] | Sequence[str] | None = None
) -> RunConfig:
    """Read and check a run configuration; nothing is trained and no model is built.

    Args:
        path: the YAML file, or a bundled config's name (:func:`bundled_configs`).
        overrides: values replacing the file's, by dotted key: a mapping
            ``{'trainer.max_epochs': 1}`` or ``['trainer.max_epochs=1']`` (values read as
            YAML); list items by index, ``'trainer.callbacks[0].init_args.half_life'``.
            They are checked like the file.

    Raises:
        ConfigError: ``"{file}: {dotted.key}: expected ..., got ..."``.
        ImportError: the file's trainer (or a class it names) is not installed; names the
            pip extra.

    >>> load_config('lightning_digits', ['framework=keras'])
    Traceback (most recent call last):
    ...
    ema_callbacks.run_config.ConfigError: .../lightning_digits.yaml: framework: expected one of 'composer', 'lightning', 'transformers', got 'keras'
    """
    file = find_config(path)
    config = _read(file)
    _apply_overrides(config, overrides, file)
    check = _Check(file)
    framework = config.get("framework", _MISSING)
    if framework not in FRAMEWORKS:
        hint = "not a run config: those name their trainer" if framework is _MISSING else ""
        raise check.error(
            "framework", "one of " + ", ".join(map(repr, FRAMEWORKS)), framework, hint
        )
    check.keys(config, ["framework", *_TOP_KEYS[framework].split()])
    _require(framework, file)
    _CHECKS[framework](check, config)
    return RunConfig(file, framework, config)


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------


def output_folder(config: RunConfig, output_dir: str | os.PathLike[str] | None = None) -> Path:
    """Where :func:`train` writes: ``output_dir`` if given, else the file's own output key
    (Lightning ``trainer.default_root_dir``, Composer ``trainer.save_folder``, transformers
    ``training_arguments.output_dir``), else a new folder ``runs/<config name>-<time>``.

    >>> config = RunConfig(Path('digits.yaml'), 'lightning', {'trainer': {'max_epochs': 1}})
    >>> output_folder(config, 'runs/mine')
    PosixPath('runs/mine')
    >>> output_folder(config).name.startswith('digits-')
    True
    """
    if output_dir is not None:
        return Path(output_dir)
    section, key = _OUTPUT_KEY[config.framework]
    own = (config.config.get(section) or {}).get(key)
    if own:
        return Path(own)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    folder, n = Path("runs") / f"{config.path.stem}-{stamp}", 1
    while folder.exists():
        n += 1
        folder = Path("runs") / f"{config.path.stem}-{stamp}-{n}"
    return folder


def run(
    path: str | os.PathLike[str],
    overrides: Mapping[str, Any] | Sequence[str] | None = None,
    output_dir: str | os.PathLike[str] | None = None,
) -> dict[str, float]:
    """Check (:func:`load_config`), then train as the file says (:func:`train`); returns the
    final metrics.

    >>> metrics = run('lightning_digits', {'trainer.max_epochs': 1}, 'runs/doc')  # doctest: +SKIP
    >>> sorted(metrics)                                                         # doctest: +SKIP
    ['ema/num_updates', 'val_acc', 'val_loss']
    """
    return train(load_config(path, overrides), output_dir).metrics


def train(config: RunConfig, output_dir: str | os.PathLike[str] | None = None) -> RunResult:
    """Train a checked config into a folder that is kept (:func:`output_folder`).

    The trainer writes its checkpoints there when the file asks for them (Lightning's
    ``ModelCheckpoint``, Composer's ``save_interval``, transformers' ``save_strategy``), and
    this function writes :data:`EMA_WEIGHTS_FILE`: the model's state dict with the primary EMA
    in, keyed as ``ema-callbacks export`` keys it (wrapper prefixes such as ``module.``
    removed).

    Returns:
        A :class:`RunResult`. Its ``metrics`` are the trainer's last evaluation metrics as
        floats, under its own names (Lightning ``trainer.callback_metrics``, e.g. ``val_loss``;
        Composer ``metrics/{label}/{Metric}``; transformers ``eval_loss``), measured on the EMA
        weights when an EMA evaluates, plus ``ema/num_updates`` for each EMA in the run
        (``ema/num_updates`` for one, ``ema/{i}/num_updates`` for several).
    """
    folder = output_folder(config, output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    trainer, model, controllers, metrics, (checkpoints, pattern) = _RUNNERS[config.framework](
        copy.deepcopy(config.config), str(folder), config.path
    )
    if len(controllers) == 1:
        metrics["ema/num_updates"] = float(controllers[0].num_updates)
    else:
        metrics.update(
            {f"ema/{i}/num_updates": float(c.num_updates) for i, c in enumerate(controllers)}
        )
    ema_file = None
    if controllers and controllers[0].started:
        from ema_callbacks.files import write_safetensors
        from ema_callbacks.weights import normalize_name

        ema_file = folder / EMA_WEIGHTS_FILE
        with controllers[0].ema_weights(model):
            state = {normalize_name(k): v for k, v in model.state_dict().items()}
            write_safetensors(ema_file, state)
    found = Path(checkpoints) if checkpoints else None
    saved = sorted(
        (p for p in found.glob(pattern) if not p.is_symlink()) if found else [],
        key=lambda p: p.stat().st_mtime,
    )
    return RunResult(
        metrics,
        folder,
        found if saved else None,
        saved[-1] if saved else None,
        ema_file,
        trainer,
    )


_Ran = tuple[Any, Any, list[Any], dict[str, float], tuple[str | None, str]]


def _instantiate(value: Any) -> Any:
    """Build ``{class_path, init_args}`` mappings (nested ones first); other values as is."""
    if _is_spec(value):
        target = _Check(Path(".")).target(value["class_path"], "class_path")
        init_args = {k: _instantiate(v) for k, v in dict(value.get("init_args") or {}).items()}
        return target(**init_args)
    if isinstance(value, list):
        return [_instantiate(v) for v in value]
    return value


def _float_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    out: dict[str, float] = {}
    for name, value in metrics.items():
        try:
            out[str(name)] = float(value)
        except (TypeError, ValueError):
            continue  # not a number (a string, a tensor of several values)
    return out


def _run_lightning(config: dict[str, Any], folder: str, path: Path) -> _Ran:
    from lightning.pytorch.cli import LightningCLI

    from ema_callbacks.lightning import EMACallback

    config.pop("framework")
    ckpt_path = config.pop("ckpt_path", None)
    config["trainer"] = {**(config.get("trainer") or {}), "default_root_dir": folder}
    argv, sys.argv = sys.argv, sys.argv[:1]  # the config is all LightningCLI reads
    try:
        cli = LightningCLI(
            args=config,
            run=False,
            save_config_kwargs={"overwrite": True},
            parser_kwargs={"exit_on_error": False},
        )
    except Exception as err:  # checked already: what LightningCLI still refuses, on one line
        if type(err).__name__ != "ArgumentError":
            raise
        summary = " ".join(str(err).split())
        raise ConfigError(
            path, "(LightningCLI)", f"expected what it accepts, got: {summary}"
        ) from err
    finally:
        sys.argv = argv
    cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=ckpt_path)
    callbacks = getattr(cli.trainer, "callbacks", [])  # a property mypy does not see
    emas = [c.controller for c in callbacks if isinstance(c, EMACallback)]
    checkpoint = getattr(cli.trainer, "checkpoint_callback", None)
    metrics = _float_metrics(cli.trainer.callback_metrics)
    return cli.trainer, cli.model, emas, metrics, (getattr(checkpoint, "dirpath", None), "*.ckpt")


def _run_composer(config: dict[str, Any], folder: str, path: Path) -> _Ran:
    from composer import Trainer
    from composer.utils import reproducibility

    from ema_callbacks.composer import EMA

    trainer_args = dict(config.get("trainer") or {})
    if trainer_args.get("seed") is not None:
        reproducibility.seed_all(int(trainer_args["seed"]))
    saving = trainer_args.get("save_interval") is not None or "save_folder" in trainer_args
    if saving:
        trainer_args["save_folder"] = folder
    model = _instantiate(config["model"])
    optimizer = None
    if config.get("optimizer") is not None:
        cls = _Check(Path(".")).target(config["optimizer"]["class_path"], "optimizer")
        optimizer = cls(model.parameters(), **dict(config["optimizer"].get("init_args") or {}))
    algorithms = [
        EMA(**(value or {})) if name == "ema" else _instantiate(value)
        for name, value in (config.get("algorithms") or {}).items()
    ]
    callbacks = _instantiate(config.get("callbacks") or [])
    trainer = Trainer(
        model=model,
        train_dataloader=_instantiate(config["train_dataloader"]),
        eval_dataloader=_instantiate(config.get("eval_dataloader")),
        optimizers=optimizer,
        algorithms=algorithms,
        callbacks=callbacks if isinstance(callbacks, list) else [callbacks],
        **trainer_args,
    )
    try:
        trainer.fit()
        metrics: dict[str, float] = {}
        for label, named in trainer.state.eval_metrics.items():
            for metric_name, metric in named.items():
                try:
                    metrics[f"metrics/{label}/{metric_name}"] = float(metric.compute())
                except (RuntimeError, ValueError, TypeError):
                    continue  # a metric never updated (no evaluation ran)
    finally:
        trainer.close()
    emas = [a.controller for a in algorithms if isinstance(a, EMA)]
    return trainer, trainer.state.model, emas, metrics, (folder if saving else None, "*.pt")


def _run_transformers(config: dict[str, Any], folder: str, path: Path) -> _Ran:
    import transformers

    from ema_callbacks.transformers import EMATrainerCallback

    arguments = {**(config.get("training_arguments") or {}), "output_dir": folder}
    transformers.set_seed(int(arguments.get("seed", 42)))
    callbacks = _instantiate(config.get("callbacks") or [])
    callbacks = callbacks if isinstance(callbacks, list) else [callbacks]
    check = _Check(Path("."))
    paths = {k: config.get(k) for k in ("compute_metrics", "data_collator")}
    trainer = transformers.Trainer(
        model=_instantiate(config["model"]),
        args=transformers.TrainingArguments(**arguments),
        train_dataset=_instantiate(config["train_dataset"]),
        eval_dataset=_instantiate(config.get("eval_dataset")),
        callbacks=callbacks,
        **{k: check.target(v, k) for k, v in paths.items() if v is not None},
    )
    trainer.train()
    evaluations = [e for e in trainer.state.log_history if any(k.startswith("eval_") for k in e)]
    metrics = _float_metrics(evaluations[-1]) if evaluations else {}
    emas = [c.controller for c in callbacks if isinstance(c, EMATrainerCallback)]
    return trainer, trainer.model, emas, metrics, (folder, "checkpoint-*")


_RUNNERS: dict[str, Callable[[dict[str, Any], str, Path], _Ran]] = {
    "composer": _run_composer,
    "lightning": _run_lightning,
    "transformers": _run_transformers,
}
