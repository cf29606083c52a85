"""Every fenced python block of the README and of docs/*.md runs as written.

Doctest blocks (``>>>``) run under ``pytest --doctest-glob='*.md'``; this file runs the others,
each in a fresh namespace holding the tiny objects the block leaves to the reader (``model``,
``loader``, ``train_dl``, ``module``, ``train_ds``; see ``tests/wheel/doc_objects.py``), in an
empty working folder. A block that only makes sense inside others is marked in the markdown by
a ``<!-- fragment: REASON -->`` line just before it, and reported as skipped with the reason.
"""

from __future__ import annotations

import importlib.metadata
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "wheel"))

from doc_objects import blocks, kind_of, namespace  # noqa: E402

# The trainer a docs page is about: its blocks get that trainer's objects unless they import
# another one.
PAGE_KIND = {
    "composer.md": "composer",
    "lightning.md": "lightning",
    "transformers.md": "transformers",
    "run_config.md": "lightning",  # its block runs a Lightning config
}
# The distribution each kind needs (by distribution: tests/composer and its siblings would pass
# for namespace packages of the trainers' names).
PACKAGE = {"composer": "mosaicml", "lightning": "lightning", "transformers": "transformers"}

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
CASES = [
    pytest.param(page, code, reason, id=f"{page.relative_to(ROOT)}:{line}")
    for page in PAGES
    for line, code, reason in blocks(page.read_text())
]


def _installed(distribution: str) -> bool:
    try:
        importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def test_the_pages_have_blocks_to_run() -> None:
    runnable = [case for case in CASES if case.values[2] is None]
    assert len(runnable) >= 15
    fragments = [case for case in CASES if case.values[2] is not None]
    assert len(fragments) <= 4, "fragments are for the few blocks that cannot run alone"


@pytest.mark.parametrize(("page", "code", "fragment"), CASES)
def test_block_runs_as_written(
    page: Path, code: str, fragment: str | None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if fragment is not None:
        pytest.skip(f"fragment: {fragment}")
    kind = kind_of(code, PAGE_KIND.get(page.name, "plain"))
    if kind != "plain" and not _installed(PACKAGE[kind]):
        pytest.skip(f"{kind} is not installed in this environment")
    if (ROOT / "configs").is_dir():  # blocks that name configs/... as a clone has them
        shutil.copytree(ROOT / "configs", tmp_path / "configs")
    monkeypatch.chdir(tmp_path)
    scope = namespace(kind)
    exec(compile(code, f"{page.name} block", "exec"), scope)
