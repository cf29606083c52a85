"""Run the python blocks under some headings of a markdown file, as written, in the current
folder, each in a fresh namespace holding the tiny objects it leaves to the reader.

    python tests/wheel/run_blocks.py README.md "Quickstart: a plain PyTorch loop" ...

The wheel check runs it with an environment's own python, outside the repository, so the
blocks import the installed wheel (this folder is on ``sys.path`` for ``doc_objects`` only).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from doc_objects import blocks, kind_of, namespace


def section(text: str, heading: str) -> str:
    """The text under ``## heading`` up to the next heading of that level or above."""
    match = re.search(rf"^(#+) {re.escape(heading)}\s*$", text, re.M)
    if match is None:
        raise SystemExit(f"run_blocks: no heading {heading!r}")
    level = len(match.group(1))
    rest = text[match.end() :]
    end = re.search(rf"^#{{1,{level}}} ", rest, re.M)
    return rest[: end.start()] if end else rest


def main(argv: list[str]) -> int:
    path, headings = Path(argv[0]), argv[1:]
    text = path.read_text(encoding="utf-8")
    for heading in headings:
        found = [b for b in blocks(section(text, heading)) if b[2] is None]
        if not found:
            raise SystemExit(f"run_blocks: no python block under {heading!r}")
        for number, (_, code, _) in enumerate(found, 1):
            print(f"run_blocks: {path.name}: {heading} (block {number})", flush=True)
            exec(compile(code, f"{path.name}: {heading}", "exec"), namespace(kind_of(code)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
