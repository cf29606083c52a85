"""Skip collecting modules whose trainer is not installed in this environment.

`make test` runs the suite twice: in `.venv` (newest torch, Lightning, transformers) and in
`.venv-composer` (Composer's pinned torch). Adapter modules and their tests only load where
their trainer is installed; everything else must pass in both.
"""

from __future__ import annotations

import importlib.util

collect_ignore: list[str] = []


def _missing(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is None
    except (ImportError, ValueError):
        return True


if _missing("composer"):
    collect_ignore += [
        "ema_callbacks/composer.py",
        "ema_callbacks/examples/composer_digits.py",
        "tests/composer",
        "docs/composer.md",
    ]
if _missing("lightning"):
    collect_ignore += [
        "ema_callbacks/lightning.py",
        "ema_callbacks/examples/lightning_digits.py",
        "tests/lightning",
        "docs/lightning.md",
    ]
if _missing("transformers"):
    collect_ignore += [
        "ema_callbacks/transformers.py",
        "ema_callbacks/examples/transformers_digits.py",
        "tests/transformers",
        "docs/transformers.md",
    ]
if _missing("lightning") or _missing("transformers"):
    collect_ignore += ["tests/test_run_config.py"]

try:  # property tests: no per-example deadline (a loaded 2-core CI machine is slow, not wrong)
    from hypothesis import settings

    settings.register_profile("ema_callbacks", deadline=None)
    settings.load_profile("ema_callbacks")
except ImportError:  # pragma: no cover
    pass
