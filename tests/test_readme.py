"""The README's commands work as written (the quick ones are run here; `make demo` and
`make test` are what CI and the set-up run)."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def bash_lines() -> list[str]:
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", README, re.S):
        for line in block.splitlines():
            command = line.split("#", 1)[0].strip()
            if command:
                lines.append(command)
    return lines


def test_two_setup_commands_and_ci_contract() -> None:
    lines = bash_lines()
    assert "make demo" in lines and "make test" in lines
    ci = [ln.strip() for ln in (ROOT / ".ci/run").read_text().splitlines()]
    commands = [
        ln for ln in ci if ln and not ln.startswith("#") and not ln.startswith(("set ", "cd "))
    ]
    assert commands == ["make test"]  # CI runs exactly the README's test command


def test_quick_cli_commands_run_as_written() -> None:
    ran = 0
    for line in bash_lines():
        argv = shlex.split(line)
        if argv[:2] == ["ema-callbacks", "halflife"]:
            out = subprocess.run(
                [sys.executable, "-m", "ema_callbacks", *argv[1:]],
                capture_output=True,
                text=True,
                check=True,
                cwd=ROOT,
            )
            comment = next(c for c in README.splitlines() if line in c).split("#", 1)[1].strip()
            assert comment in out.stdout.splitlines()  # the comment is a line it prints
            ran += 1
    assert ran >= 1


def test_documented_files_exist_and_links_are_absolute() -> None:
    """The README is the package index page: no relative links (they break there); the docs
    it names by path exist (the sdist carries docs/: tests/wheel/check_wheel.py)."""
    links = re.findall(r"\]\(([^)]+)\)", README)
    assert all(link.startswith(("https://", "http://")) for link in links), links
    named = set(re.findall(r"docs/[\w./-]+\.md", README))
    assert len(named) >= 10
    for doc in named:
        assert (ROOT / doc).exists(), doc
    for line in bash_lines():
        for arg in shlex.split(line):
            if arg.startswith("configs/"):
                assert (ROOT / arg).exists(), arg


def test_every_cli_command_in_readme_exists() -> None:
    from ema_callbacks.cli import _parser

    commands = set(_parser()._subparsers._group_actions[0].choices)  # type: ignore[union-attr]
    for line in bash_lines():
        argv = shlex.split(line)
        if argv and argv[0] == "ema-callbacks" and not argv[1].startswith("-"):
            assert argv[1] in commands, line
