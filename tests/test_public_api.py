"""The public surface: exported names, lazy imports, docstrings with examples."""

from __future__ import annotations

import importlib
import inspect
import subprocess
import sys

import pytest

import ema_callbacks

CORE_MODULES = [
    "ema_callbacks.time_strings",
    "ema_callbacks.schedule",
    "ema_callbacks.averagers",
    "ema_callbacks.options",
    "ema_callbacks.state_files",
    "ema_callbacks.fused",
    "ema_callbacks.weights",
    "ema_callbacks.controller",
    "ema_callbacks.ema",
    "ema_callbacks.export",
    "ema_callbacks.files",
    "ema_callbacks.posthoc",
]


def test_all_is_sorted_and_exported() -> None:
    names = list(ema_callbacks.__all__)
    assert names == sorted(names)
    for name in names:
        assert hasattr(ema_callbacks, name), name
    for module_name in CORE_MODULES:
        module = importlib.import_module(module_name)
        assert list(module.__all__) == sorted(module.__all__), module_name


def test_import_loads_neither_torch_nor_trainers() -> None:
    code = (
        "import sys, ema_callbacks; "
        "ema_callbacks.Schedule(half_life='50ba'); "
        "bad = [m for m in ('torch', 'composer', 'lightning', 'pytorch_lightning', 'transformers') "
        "if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_lazy_torch_exports() -> None:
    from ema_callbacks.ema import EMA

    assert ema_callbacks.EMA is EMA
    with pytest.raises(AttributeError):
        ema_callbacks.Nope  # noqa: B018


@pytest.mark.parametrize("module_name", CORE_MODULES)
def test_public_objects_have_docstrings_with_examples(module_name: str) -> None:
    module = importlib.import_module(module_name)
    assert module.__doc__ and ">>>" in module.__doc__, module_name
    for name in module.__all__:
        obj = getattr(module, name)
        if not (inspect.isclass(obj) or inspect.isfunction(obj)):
            continue
        doc = inspect.getdoc(obj) or ""
        assert doc, f"{module_name}.{name} has no docstring"
        assert ">>>" in doc or ">>>" in (module.__doc__ or ""), (
            f"{module_name}.{name} has no example"
        )
