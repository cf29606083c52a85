"""Run a training described by a YAML file, for any of the three trainers, with EMA in it.

The top-level key ``framework`` says which trainer; the rest is that trainer's own format:

``framework: lightning``
    a LightningCLI config (``seed_everything``, ``trainer``, ``model``, ``data``,
    ``optimizer``, ``lr_scheduler``, ``ckpt_path``), EMA as
    ``trainer.callbacks: [{class_path: ema_callbacks.lightning.EMACallback, init_args: ...}]``;
    run through ``LightningCLI(args=..., run=False)`` and ``trainer.fit``.
``framework: composer``
    ``model``, ``train_dataloader``, ``eval_dataloader`` as ``{class_path, init_args}``;
    ``optimizer`` ``{class_path, init_args}`` (built with the model's parameters first);
    ``trainer`` (``composer.Trainer`` keyword arguments: ``max_duration``, ``eval_interval``,
    ``seed``, ...); ``algorithms: {ema: {half_life: 50ba, ...}}``
    (:class:`ema_callbacks.composer.EMA`'s arguments; other algorithms as
    ``{class_path, init_args}``); ``callbacks`` a list of ``{class_path, init_args}``.
``framework: transformers``
    ``model``, ``train_dataset``, ``eval_dataset`` as ``{class_path, init_args}`` (nested
    ``{class_path, init_args}`` values are built too, e.g. a model's ``config``);
    ``training_arguments`` (``TrainingArguments`` keyword arguments); ``callbacks`` a list of
    ``{class_path, init_args}`` (``ema_callbacks.transformers.EMATrainerCallback``);
    ``compute_metrics`` and ``data_collator`` as dotted paths.

:func:`load_config` parses and validates the whole file before anything is built: unknown
keys, class paths that do not import, arguments a class does not take, and every EMA object
(built, so the adapters' own checks run). Errors are :class:`ConfigError` (a ``ValueError``)
saying ``"{file}: {dotted.key}: expected ..., got ..."``; a trainer that is not installed is an
``ImportError`` naming the pip extra. :func:`run` then trains and returns the final metrics.

>>> import tempfile, pathlib
>>> path = pathlib.Path(tempfile.mkdtemp()) / 'bad.yaml'
>>> _ = path.write_text('framework: keras\\n')
>>> load_config(path)
Traceback (most recent call last):
...
ema_callbacks.run_config.ConfigError: .../bad.yaml: framework: expected one of 'composer', 'lightning', 'transformers', got 'keras'
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import importlib
import importlib.util
import inspect
import os
import re
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

__all__ = ["ConfigError", "FRAMEWORKS", "RunConfig", "load_config", "run"]

#: The values of the top-level ``framework`` key.
FRAMEWORKS = ("composer", "lightning", "transformers")

_NEEDS = {
    "composer": ("composer", "MosaicML Composer", "composer"),
    "lightning": ("lightning", "Lightning", "lightning"),
    "transformers": ("transformers", "Hugging Face transformers", "transformers"),
}
_TOP_KEYS = {
    "composer": (
        "framework",
        "model",
        "train_dataloader",
        "eval_dataloader",
        "optimizer",
        "trainer",
        "algorithms",
        "callbacks",
    ),
    "lightning": (
        "framework",
        "seed_everything",
        "trainer",
        "model",
        "data",
        "optimizer",
        "lr_scheduler",
        "ckpt_path",
    ),
    "transformers": (
        "framework",
        "model",
        "train_dataset",
        "eval_dataset",
        "training_arguments",
        "callbacks",
        "compute_metrics",
        "data_collator",
    ),
}
_COMPOSER_RESERVED = {
    "model": "model",
    "train_dataloader": "train_dataloader",
    "eval_dataloader": "eval_dataloader",
    "optimizers": "optimizer",
    "algorithms": "algorithms",
    "callbacks": "callbacks",
}
_LIGHTNING_EMA = "ema_callbacks.lightning.EMACallback"
_TRANSFORMERS_EMA = "ema_callbacks.transformers.EMATrainerCallback"


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
    """A validated run configuration: the file, the trainer, and the file's mapping (with any
    overrides applied) as it will be run.

    >>> RunConfig(Path('x.yaml'), 'lightning', {'framework': 'lightning'}).framework
    'lightning'
    """

    path: Path
    framework: str
    config: dict[str, Any]


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


class _Missing:
    """Marks a key that is not in the file."""


_MISSING = _Missing()


class _Validator:
    """Walks one file's mapping; every error names the file and the dotted key."""

    def __init__(self, path: Path, config: dict[str, Any]) -> None:
        self.path = path
        self.config = config

    def error(self, key: str, expected: str, got: Any, detail: str = "") -> ConfigError:
        message = f"expected {expected}, got {_show(got)}"
        return ConfigError(self.path, key, message + (f" ({detail})" if detail else ""))

    # -- shapes -------------------------------------------------------------------------------

    def keys(self, mapping: Mapping[str, Any], allowed: Sequence[str], prefix: str) -> None:
        for name in mapping:
            if name not in allowed:
                close = difflib.get_close_matches(str(name), allowed, n=1)
                raise self.error(
                    f"{prefix}{name}",
                    f"one of the keys {_listing(allowed)}",
                    str(name),
                    f"did you mean {close[0]!r}?" if close else "",
                )

    def mapping(self, value: Any, key: str, what: str = "a mapping") -> dict[str, Any]:
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            raise self.error(key, what, value)
        return dict(value)

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
    ) -> tuple[Any, dict[str, Any]]:
        """A ``{class_path, init_args}`` mapping: the imported target and its arguments, the
        arguments checked against the target's signature, nested specs checked too."""
        if value is None or isinstance(value, _Missing):
            if required:
                raise self.error(key, "a mapping with 'class_path' and 'init_args'", _MISSING)
            return None, {}
        if not isinstance(value, Mapping) or "class_path" not in value:
            raise self.error(key, "a mapping with 'class_path' and 'init_args'", value)
        self.keys(value, ("class_path", "init_args"), f"{key}.")
        target = self.target(value["class_path"], f"{key}.class_path")
        init_args = self.mapping(value.get("init_args"), f"{key}.init_args")
        self.arguments(target, init_args, f"{key}.init_args", supplied)
        for name, arg in init_args.items():
            self.nested(arg, f"{key}.init_args.{name}")
        return target, init_args

    def nested(self, value: Any, key: str) -> None:
        if isinstance(value, Mapping) and "class_path" in value:
            self.spec(value, key)
        elif isinstance(value, list):
            for i, item in enumerate(value):
                self.nested(item, f"{key}[{i}]")

    def target(self, path: Any, key: str) -> Any:
        """Import ``'package.module.Name'`` (or ``'package.module:Name'``)."""
        expected = "an importable dotted path like 'package.module.Name'"
        if not isinstance(path, str) or not re.fullmatch(r"[\w.]+(:[\w.]+)?", path):
            raise self.error(key, expected, path)
        if ":" in path:
            module_name, attr = path.split(":")
            candidates = [(module_name, attr.split("."))]
        else:
            parts = path.split(".")
            candidates = [(".".join(parts[:i]), parts[i:]) for i in range(len(parts) - 1, 0, -1)]
        last: Exception | None = None
        for module_name, attrs in candidates:
            try:
                target: Any = importlib.import_module(module_name)
            except ModuleNotFoundError as err:
                if err.name and (module_name == err.name or module_name.startswith(err.name + ".")):
                    last = err
                    continue  # this prefix is not a module: try a shorter one
                raise ImportError(f"{self.path}: {key}: importing {path!r} failed: {err}") from err
            except ImportError as err:  # e.g. an adapter whose trainer is missing
                raise ImportError(f"{self.path}: {key}: importing {path!r} failed: {err}") from err
            try:
                for attr in attrs:
                    target = getattr(target, attr)
            except AttributeError as err:
                raise self.error(key, expected, path, str(err)) from err
            if not callable(target):
                raise self.error(key, "a class or function", path, f"a {type(target).__name__}")
            return target
        raise self.error(key, expected, path, str(last) if last else "")

    def arguments(
        self, target: Any, init_args: Mapping[str, Any], key: str, supplied: Sequence[str] = ()
    ) -> None:
        """Every name in ``init_args`` is a parameter of ``target`` (unless it takes
        ``**kwargs``), and no required parameter is missing (but those in ``supplied``, which
        the runner passes itself)."""
        try:
            signature = inspect.signature(target)
        except (TypeError, ValueError):  # some builtins have none
            return
        params = signature.parameters.values()
        for p in params:
            required = p.default is inspect.Parameter.empty and p.kind in (
                inspect.Parameter.POSITIONAL_OR_KEYWORD,
                inspect.Parameter.KEYWORD_ONLY,
            )
            if required and p.name not in init_args and p.name not in supplied:
                raise self.error(f"{key}.{p.name}", "a value (it is required)", _MISSING)
        named = [
            p.name
            for p in params
            if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        ]
        what = getattr(target, "__qualname__", repr(target))
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
            for name in init_args:
                if name not in named:
                    close = difflib.get_close_matches(str(name), named, n=1)
                    raise self.error(
                        f"{key}.{name}",
                        f"an argument of {what} ({_listing(named)})",
                        str(name),
                        f"did you mean {close[0]!r}?" if close else "",
                    )

    def build(self, cls: Any, init_args: Mapping[str, Any], key: str) -> Any:
        """Build an EMA object now, so its own validation runs; its ``ValueError`` or
        ``TypeError`` is reported at the argument it names."""
        try:
            return cls(**init_args)
        except (ValueError, TypeError) as err:
            message = str(err)
            first = re.match(r"\w+", message)
            if first and first.group(0) in init_args:
                name = first.group(0)
                raise self.error(
                    f"{key}.{name}", f"a valid {cls.__name__} argument", init_args[name], message
                ) from err
            raise self.error(
                key, f"valid {cls.__name__} arguments", dict(init_args), message
            ) from err


# ---------------------------------------------------------------------------------------------
# Parsing, overrides
# ---------------------------------------------------------------------------------------------


_TOKEN = re.compile(r"([^.\[\]]+)|\[(\d+)\]")


def _split_key(key: str) -> list[str | int]:
    """``'trainer.callbacks[0].init_args'`` -> ``['trainer', 'callbacks', 0, 'init_args']``."""
    parts: list[str | int] = []
    pos = 0
    while pos < len(key):
        if key[pos] == "." and pos > 0:
            pos += 1
        match = _TOKEN.match(key, pos)
        if match is None:
            raise ValueError(
                f"override keys are dotted paths like 'trainer.max_epochs' or "
                f"'trainer.callbacks[0].init_args.half_life'; got {key!r}"
            )
        parts.append(match.group(1) if match.group(1) is not None else int(match.group(2)))
        pos = match.end()
    if not parts:
        raise ValueError(f"override keys must not be empty; got {key!r}")
    return parts


def _apply_overrides(
    config: dict[str, Any], overrides: Mapping[str, Any] | Sequence[str] | None, path: Path
) -> None:
    """Set each dotted key (``'trainer.max_epochs'``, ``'trainer.callbacks[0].init_args.x'``)
    to its value; ``'key=value'`` strings have their value parsed as YAML."""
    if overrides is None:
        return
    items: list[tuple[str, Any]]
    if isinstance(overrides, Mapping):
        items = [(str(k), v) for k, v in overrides.items()]
    elif isinstance(overrides, (str, bytes)) or not isinstance(overrides, Sequence):
        raise TypeError(
            "overrides must be a mapping {'dotted.key': value} or a list of 'dotted.key=value' "
            f"strings; got {overrides!r}"
        )
    else:
        items = []
        for item in overrides:
            if not isinstance(item, str) or "=" not in item:
                raise ValueError(f"an override must look like 'dotted.key=value'; got {item!r}")
            key, _, text = item.partition("=")
            items.append((key.strip(), yaml.safe_load(text)))
    for key, value in items:
        parts = _split_key(key)
        node: Any = config
        for i, part in enumerate(parts[:-1]):
            here = ".".join(str(p) for p in parts[: i + 1])
            if isinstance(part, int):
                if not isinstance(node, list) or part >= len(node):
                    raise ConfigError(path, here, f"expected a list with an item {part}, got none")
                node = node[part]
            else:
                if not isinstance(node, dict):
                    raise ConfigError(path, here, f"expected a mapping, got {_show(node)}")
                if not isinstance(node.get(part), (dict, list)):
                    node[part] = {}
                node = node[part]
        last = parts[-1]
        if isinstance(last, int):
            if not isinstance(node, list) or last >= len(node):
                raise ConfigError(path, key, f"expected a list with an item {last}, got none")
            node[last] = value
        else:
            if not isinstance(node, dict):
                raise ConfigError(path, key, f"expected a mapping, got {_show(node)}")
            node[last] = value


def _read(path: Path) -> dict[str, Any]:
    text = path.read_text()
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark is not None else "(file)"
        raise ConfigError(path, where, f"expected valid YAML, got a syntax error: {err}") from err
    if not isinstance(data, dict):
        raise ConfigError(path, "(file)", f"expected a mapping of keys, got {_show(data)}")
    return data


def _require(framework: str, path: Path) -> None:
    module, name, extra = _NEEDS[framework]
    try:
        spec = importlib.util.find_spec(module)
        # a folder of that name on sys.path (a namespace package) is not the trainer
        found = spec is not None and spec.origin not in (None, "namespace")
    except (ImportError, ValueError):
        found = False
    if not found:
        raise ImportError(
            f"{path}: framework: {framework!r} needs {name}, which is not installed: "
            f'pip install "ema-callbacks[{extra}]"'
        )


def load_config(
    path: str | os.PathLike[str], overrides: Mapping[str, Any] | Sequence[str] | None = None
) -> RunConfig:
    """Parse and validate a run configuration; nothing is trained and no model is built.

    Args:
        path: the YAML file.
        overrides: values replacing the file's, by dotted key: a mapping
            ``{'trainer.max_epochs': 1}`` or ``['trainer.max_epochs=1']`` (values parsed as
            YAML); list items by index, ``'trainer.callbacks[0].init_args.half_life'``.

    Raises:
        ConfigError: ``"{file}: {dotted.key}: expected ..., got ..."``.
        ImportError: the file's trainer (or a class it names) is not installed; names the
            pip extra.

    >>> config = load_config('configs/lightning_digits.yaml')       # doctest: +SKIP
    >>> config.framework                                             # doctest: +SKIP
    'lightning'
    """
    file = Path(path)
    config = _read(file)
    _apply_overrides(config, overrides, file)
    check = _Validator(file, config)
    framework = config.get("framework", _MISSING)
    if framework not in FRAMEWORKS:
        raise check.error(
            "framework", "one of " + ", ".join(repr(f) for f in FRAMEWORKS), framework
        )
    check.keys(config, _TOP_KEYS[framework], "")
    _require(framework, file)
    _VALIDATORS[framework](check, config)
    return RunConfig(file, framework, config)


# ---------------------------------------------------------------------------------------------
# Validation per trainer
# ---------------------------------------------------------------------------------------------


def _validate_lightning(check: _Validator, config: dict[str, Any]) -> None:
    from lightning.pytorch import Trainer

    from ema_callbacks.lightning import EMACallback

    seed = config.get("seed_everything", True)
    if not isinstance(seed, (bool, int)):
        raise check.error("seed_everything", "an integer or true/false", seed)
    trainer = check.mapping(config.get("trainer"), "trainer")
    trainer_params = [p for p in inspect.signature(Trainer.__init__).parameters if p != "self"]
    check.keys(trainer, trainer_params, "trainer.")
    for key, entry in check.entries(trainer.get("callbacks"), "trainer.callbacks"):
        cls, init_args = check.spec(entry, key)
        if isinstance(cls, type) and issubclass(cls, EMACallback):
            check.build(cls, init_args, f"{key}.init_args")
    for name in ("logger", "plugins"):  # also true/false or a name: left to LightningCLI
        if isinstance(trainer.get(name), (Mapping, list)):
            for key, entry in check.entries(trainer[name], f"trainer.{name}"):
                if isinstance(entry, Mapping):
                    check.spec(entry, key)
    check.spec(config.get("model", _MISSING), "model")
    for name in ("data", "optimizer", "lr_scheduler"):
        if isinstance(config.get(name), Mapping):  # LightningCLI passes params / optimizer
            check.spec(config[name], name, supplied=("params", "optimizer"))
    try:
        import jsonargparse  # noqa: F401  (LightningCLI needs it)
    except ImportError as err:
        raise ImportError(
            f"{check.path}: running a Lightning config needs LightningCLI's jsonargparse: "
            'pip install "jsonargparse[signatures]"'
        ) from err


def _validate_composer(check: _Validator, config: dict[str, Any]) -> None:
    from composer import Trainer

    from ema_callbacks.composer import EMA

    check.spec(config.get("model", _MISSING), "model")
    check.spec(config.get("train_dataloader", _MISSING), "train_dataloader")
    check.spec(config.get("eval_dataloader"), "eval_dataloader", required=False)
    optimizer = config.get("optimizer")
    if optimizer is not None:
        _, init_args = check.spec(optimizer, "optimizer", supplied=("params",))
        if "params" in init_args:
            raise check.error(
                "optimizer.init_args.params", "no 'params' (the model's are passed)", "params"
            )
    trainer = check.mapping(config.get("trainer"), "trainer")
    params = [p for p in inspect.signature(Trainer.__init__).parameters if p != "self"]
    for name in trainer:
        if name in _COMPOSER_RESERVED:
            raise check.error(
                f"trainer.{name}",
                f"it at the top level, as '{_COMPOSER_RESERVED[name]}'",
                "it under 'trainer'",
            )
    check.keys(trainer, [p for p in params if p not in _COMPOSER_RESERVED], "trainer.")
    algorithms = check.mapping(config.get("algorithms"), "algorithms")
    for name, value in algorithms.items():
        if name == "ema":
            init_args = check.mapping(value, "algorithms.ema", "a mapping of EMA arguments")
            check.arguments(EMA, init_args, "algorithms.ema")
            check.build(EMA, init_args, "algorithms.ema")
        else:
            check.spec(value, f"algorithms.{name}")
    for key, entry in check.entries(config.get("callbacks"), "callbacks"):
        check.spec(entry, key)


def _validate_transformers(check: _Validator, config: dict[str, Any]) -> None:
    from transformers import TrainingArguments

    from ema_callbacks.transformers import EMATrainerCallback

    check.spec(config.get("model", _MISSING), "model")
    check.spec(config.get("train_dataset", _MISSING), "train_dataset")
    check.spec(config.get("eval_dataset"), "eval_dataset", required=False)
    arguments = check.mapping(config.get("training_arguments"), "training_arguments")
    fields = [f.name for f in dataclasses.fields(TrainingArguments) if f.init]
    check.keys(arguments, fields, "training_arguments.")
    for key, entry in check.entries(config.get("callbacks"), "callbacks"):
        cls, init_args = check.spec(entry, key)
        if isinstance(cls, type) and issubclass(cls, EMATrainerCallback):
            check.build(cls, init_args, f"{key}.init_args")
    for name in ("compute_metrics", "data_collator"):
        if config.get(name) is not None:
            check.target(config[name], name)
    with tempfile.TemporaryDirectory() as folder:
        try:
            TrainingArguments(**{"output_dir": folder, **arguments})
        except (ValueError, TypeError) as err:
            message = str(err)
            named = [n for n in arguments if re.search(rf"\b{re.escape(n)}\b", message)] or [
                n
                for n, v in arguments.items()
                if isinstance(v, str) and re.search(rf"(?<![\w-]){re.escape(v)}(?![\w-])", message)
            ]
            key = f"training_arguments.{named[0]}" if named else "training_arguments"
            got = arguments[named[0]] if named else arguments
            raise check.error(
                key, "TrainingArguments that transformers accepts", got, message
            ) from err


_VALIDATORS: dict[str, Callable[[_Validator, dict[str, Any]], None]] = {
    "composer": _validate_composer,
    "lightning": _validate_lightning,
    "transformers": _validate_transformers,
}


# ---------------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------------


def _instantiate(value: Any) -> Any:
    """Build ``{class_path, init_args}`` mappings (nested ones first); other values as is."""
    if isinstance(value, Mapping) and "class_path" in value:
        target = _Validator(Path("."), {}).target(value["class_path"], "class_path")
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


@contextmanager
def _folder(output_dir: str | os.PathLike[str] | None) -> Iterator[str]:
    if output_dir is not None:
        os.makedirs(output_dir, exist_ok=True)
        yield os.fspath(output_dir)
    else:
        with tempfile.TemporaryDirectory(prefix="ema-callbacks-run-") as folder:
            yield folder


def run(
    path: str | os.PathLike[str],
    overrides: Mapping[str, Any] | Sequence[str] | None = None,
    output_dir: str | os.PathLike[str] | None = None,
) -> dict[str, float]:
    """Validate (:func:`load_config`), then train as the file says; returns the final metrics.

    Args:
        path: the YAML file; its ``framework`` key picks the trainer.
        overrides: as in :func:`load_config`.
        output_dir: where the trainer writes (Lightning ``trainer.default_root_dir``, Composer
            ``trainer.save_folder`` when ``save_interval`` or checkpoints are asked for,
            transformers ``training_arguments.output_dir``) unless the file sets it; by default
            a temporary folder removed afterwards.

    Returns:
        The trainer's last evaluation metrics as floats, under its own names (Lightning
        ``trainer.callback_metrics``, e.g. ``val_loss``; Composer ``metrics/{label}/{Metric}``;
        transformers ``eval_loss``, ``eval_accuracy``), measured on the EMA weights when an EMA
        evaluates, plus ``ema/num_updates`` for each EMA in the run (``ema/num_updates`` for one,
        ``ema/{i}/num_updates`` for several).

    >>> metrics = run('configs/lightning_digits.yaml', {'trainer.max_epochs': 1})  # doctest: +SKIP
    >>> sorted(metrics)                                                           # doctest: +SKIP
    ['ema/num_updates', 'val_acc', 'val_loss']
    """
    config = load_config(path, overrides)
    with _folder(output_dir) as folder:
        return _RUNNERS[config.framework](config, folder)


def _ema_metrics(controllers: Sequence[Any]) -> dict[str, float]:
    if len(controllers) == 1:
        return {"ema/num_updates": float(controllers[0].num_updates)}
    return {f"ema/{i}/num_updates": float(c.num_updates) for i, c in enumerate(controllers)}


def _jsonargparse_error(path: Path, err: BaseException) -> ConfigError:
    message = str(err)
    keys = re.findall(r'key "([^"]+)"', message)
    key = keys[0] if keys else "(LightningCLI)"
    if len(keys) > 1 and "class_path" in message:
        key = f"{keys[0]}.init_args.{keys[-1]}"
    found = re.search(r"Expected (.*?)\. Got value: (.*)", message)
    if found:
        return ConfigError(path, key, f"expected {found.group(1)}, got {found.group(2)!r}")
    summary = " ".join(line.strip() for line in message.splitlines() if line.strip())
    return ConfigError(path, key, f"expected a value LightningCLI accepts, got an error: {summary}")


def _run_lightning(config: RunConfig, folder: str) -> dict[str, float]:
    from lightning.pytorch.cli import LightningCLI

    from ema_callbacks.lightning import EMACallback

    args = copy.deepcopy(config.config)
    args.pop("framework")
    ckpt_path = args.pop("ckpt_path", None)
    trainer_args = args.setdefault("trainer", {}) or {}
    args["trainer"] = trainer_args
    trainer_args.setdefault("default_root_dir", folder)
    try:
        cli = LightningCLI(
            args=args,
            run=False,
            save_config_kwargs={"overwrite": True},
            parser_kwargs={"exit_on_error": False},
        )
    except SystemExit as err:  # pragma: no cover - jsonargparse versions that ignore the flag
        raise ConfigError(
            config.path, "(LightningCLI)", f"expected a valid config, got exit status {err}"
        ) from err
    except Exception as err:
        if type(err).__name__ == "ArgumentError":
            raise _jsonargparse_error(config.path, err) from err
        raise
    cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=ckpt_path)
    metrics = _float_metrics(cli.trainer.callback_metrics)
    callbacks = getattr(cli.trainer, "callbacks", [])  # a property mypy does not see
    emas = [c.controller for c in callbacks if isinstance(c, EMACallback)]
    return {**metrics, **_ema_metrics(emas)}


def _run_composer(config: RunConfig, folder: str) -> dict[str, float]:
    from composer import Trainer
    from composer.utils import reproducibility

    from ema_callbacks.composer import EMA

    data = copy.deepcopy(config.config)
    trainer_args = dict(data.get("trainer") or {})
    if trainer_args.get("seed") is not None:
        reproducibility.seed_all(int(trainer_args["seed"]))
    if trainer_args.get("save_interval") is not None:
        trainer_args.setdefault("save_folder", folder)
    model = _instantiate(data["model"])
    train_dataloader = _instantiate(data["train_dataloader"])
    eval_dataloader = _instantiate(data.get("eval_dataloader"))
    optimizer = None
    if data.get("optimizer") is not None:
        cls = _Validator(config.path, {}).target(data["optimizer"]["class_path"], "optimizer")
        optimizer = cls(model.parameters(), **dict(data["optimizer"].get("init_args") or {}))
    algorithms = []
    emas = []
    for name, value in dict(data.get("algorithms") or {}).items():
        if name == "ema":
            algorithm = EMA(**dict(value or {}))
            emas.append(algorithm)
        else:
            algorithm = _instantiate(value)
        algorithms.append(algorithm)
    callbacks = _instantiate(data.get("callbacks") or [])
    if isinstance(callbacks, Mapping) or not isinstance(callbacks, list):
        callbacks = [callbacks]
    trainer = Trainer(
        model=model,
        train_dataloader=train_dataloader,
        eval_dataloader=eval_dataloader,
        optimizers=optimizer,
        algorithms=algorithms,
        callbacks=callbacks,
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
    return {**metrics, **_ema_metrics([e.controller for e in emas])}


def _run_transformers(config: RunConfig, folder: str) -> dict[str, float]:
    import transformers

    from ema_callbacks.transformers import EMATrainerCallback

    data = copy.deepcopy(config.config)
    arguments = {"output_dir": folder, **dict(data.get("training_arguments") or {})}
    transformers.set_seed(int(arguments.get("seed", 42)))
    model = _instantiate(data["model"])
    train_dataset = _instantiate(data["train_dataset"])
    eval_dataset = _instantiate(data.get("eval_dataset"))
    callbacks = _instantiate(data.get("callbacks") or [])
    if not isinstance(callbacks, list):
        callbacks = [callbacks]
    check = _Validator(config.path, {})
    compute_metrics = data.get("compute_metrics")
    collator = data.get("data_collator")
    trainer = transformers.Trainer(
        model=model,
        args=transformers.TrainingArguments(**arguments),
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        callbacks=callbacks,
        compute_metrics=None
        if compute_metrics is None
        else check.target(compute_metrics, "compute_metrics"),
        data_collator=None if collator is None else check.target(collator, "data_collator"),
    )
    trainer.train()
    evaluations = [
        entry for entry in trainer.state.log_history if any(k.startswith("eval_") for k in entry)
    ]
    metrics = _float_metrics(evaluations[-1]) if evaluations else {}
    emas = [c.controller for c in callbacks if isinstance(c, EMATrainerCallback)]
    return {**metrics, **_ema_metrics(emas)}


_RUNNERS: dict[str, Callable[[RunConfig, str], dict[str, float]]] = {
    "composer": _run_composer,
    "lightning": _run_lightning,
    "transformers": _run_transformers,
}
