"""The package as a user installs it: build the wheel and the sdist once, install the wheel into
fresh environments outside the repository (no extras, then each user-facing extra alone), and run there,
from an empty folder, the README's quickstarts and its command-line block.

    python tests/wheel/check_wheel.py --uv .venv/bin/uv [--find-links DIR] [--only base,lightning]

(``make test-wheel``, part of ``make test``.) Rules checked:

- the wheel and sdist carry what they should (LICENSE, metadata, ``docs/`` in the sdist, no
  tests); the version is the package's ``__version__``;
- ``import ema_callbacks`` in an environment is the installed wheel, not the repository;
- each environment runs the plain-loop quickstarts (which write ``ema.pt`` and ``snapshots/``:
  the base install writes a snapshot and, below, an export) and its trainer's quickstart;
- every line of the ```bash block under ``## Command line`` either exits 0 (and a ``-o PATH``
  it names exists afterwards), or exits 1 naming an extra this environment lacks
  (``ema-callbacks[NAME]``); and every line exits 0 in at least one environment.

Environments are kept between runs under ``--envs`` (default
``~/.cache/ema-callbacks/wheel-envs/<checkout>``): one whose requirements (the wheel's
``Requires-Dist`` for its extra) are unchanged is reused, with only the wheel reinstalled when
it changed; the wheel is rebuilt only when a file that goes into it changed; and an
environment's check is skipped while the wheel, the README and this folder are as they were when
it last passed there (``--force`` runs it anyway). The plain-loop quickstarts train once per
check; later environments get copies of their files.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
# (name, extras, the README quickstart headings its python runs, besides the plain loop's)
ENVS: list[tuple[str, list[str], list[str]]] = [
    ("base", [], []),
    ("lightning", ["lightning"], ["Quickstart: Lightning"]),
    ("transformers", ["transformers"], ["Quickstart: Hugging Face transformers"]),
    ("composer", ["composer"], ["Quickstart: Composer"]),
    ("demo", ["demo"], []),  # its quickstart is the demo line: plain loop, tqdm, the plot
]
PLAIN = ["Quickstart: a plain PyTorch loop"]
SOURCES = [
    "pyproject.toml",
    "README.md",
    "LICENSE",
    "MANIFEST.in",
    "ema_callbacks",
    "configs",
    "docs",
]


def say(message: str) -> None:
    print(f"check_wheel: {message}", flush=True)


def fail(message: str) -> None:
    raise SystemExit(f"check_wheel: FAILED: {message}")


def digest(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for top in paths:
        files = sorted(top.rglob("*")) if top.is_dir() else [top]
        for f in files:
            if f.is_file() and "__pycache__" not in f.parts:
                name = f.relative_to(ROOT) if ROOT in f.parents else f.name
                h.update(str(name).encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()


def run(cmd: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, text=True, **kw)  # type: ignore[call-overload,no-any-return]


def build(uv: str, dist: Path) -> tuple[Path, Path]:
    stamp = dist / ".sources"
    sources = digest([ROOT / s for s in SOURCES if (ROOT / s).exists()])
    wheels, sdists = sorted(dist.glob("*.whl")), sorted(dist.glob("*.tar.gz"))
    if stamp.exists() and stamp.read_text() == sources and len(wheels) == len(sdists) == 1:
        say(f"wheel up to date: {wheels[0].name}")
        return wheels[0], sdists[0]
    shutil.rmtree(dist, ignore_errors=True)
    dist.mkdir(parents=True)
    out = run([uv, "build", "-q", "--out-dir", str(dist), str(ROOT)], capture_output=True)
    if out.returncode != 0:
        fail(f"uv build:\n{out.stdout}{out.stderr}")
    wheels, sdists = sorted(dist.glob("*.whl")), sorted(dist.glob("*.tar.gz"))
    stamp.write_text(sources)
    say(f"built {wheels[0].name} and {sdists[0].name}")
    return wheels[0], sdists[0]


def metadata(wheel: Path) -> str:
    with zipfile.ZipFile(wheel) as z:
        name = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        return z.read(name).decode()


def check_distributions(wheel: Path, sdist: Path) -> None:
    meta = metadata(wheel)
    init = (ROOT / "ema_callbacks" / "__init__.py").read_text()
    version = re.search(r'^__version__ = "([^"]+)"', init, re.M)
    if version is None or f"\nVersion: {version.group(1)}\n" not in meta:
        fail("the wheel's Version is not ema_callbacks.__version__")
    for needed in ("License-Expression: Apache-2.0", "License-File: LICENSE", "Classifier: "):
        if needed not in meta:
            fail(f"the wheel's METADATA lacks {needed!r}")
    offered = set(re.findall(r"^Provides-Extra: (\S+)$", meta, re.M))
    tested = {extra for _, extras, _ in ENVS for extra in extras}
    if offered != tested:
        fail(f"the wheel offers the extras {sorted(offered)}; this check installs {sorted(tested)}")
    if re.search(r"\]\((?!https?://)[^)]*\)", meta):
        fail("the README (the index page) has a relative link")
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
    if (
        not any(n.endswith("/licenses/LICENSE") for n in names)
        or "ema_callbacks/py.typed" not in names
    ):
        fail("the wheel lacks LICENSE or py.typed")
    with tarfile.open(sdist) as t:
        members = [m.split("/", 1)[1] for m in t.getnames() if "/" in m]
    if any(m.startswith("tests/") for m in members):
        fail("the sdist ships tests/ (they need the repository's environments)")
    readme = (ROOT / "README.md").read_text()
    for doc in sorted(set(re.findall(r"docs/[\w./-]+\.md", readme))):
        if doc not in members:
            fail(f"the README names {doc}, which the sdist does not carry")
    say("wheel and sdist contents: ok")


def requirements(meta: str, extras: list[str]) -> list[str]:
    keep = []
    for line in meta.splitlines():
        if line.startswith("Requires-Dist: "):
            req = line.removeprefix("Requires-Dist: ")
            extra = re.search(r"extra\s*==\s*['\"]([^'\"]+)['\"]", req)
            if extra is None or extra.group(1) in extras:
                keep.append(req)
    return sorted(keep)


def environment(
    root: Path, name: str, extras: list[str], wheel: Path, uv: str, links: list[str]
) -> Path:
    env = root / name
    stamp = env / ".ema-wheel-check.json"
    wanted = {
        "requires": requirements(metadata(wheel), extras),
        "python": f"{sys.version_info.major}.{sys.version_info.minor}",
    }
    wheel_sha = hashlib.sha256(wheel.read_bytes()).hexdigest()
    python = env / "bin" / "python"
    old = json.loads(stamp.read_text()) if stamp.exists() else {}
    spec = f"{wheel}[{','.join(extras)}]" if extras else str(wheel)
    started = time.perf_counter()
    if {k: old.get(k) for k in wanted} != wanted or not python.exists():
        shutil.rmtree(env, ignore_errors=True)
        steps = [
            [uv, "venv", "-q", "--python", wanted["python"], str(env)],
            [uv, "pip", "install", "-q", "--python", str(python), *links, spec],
        ]
        what = "created"
    elif old.get("wheel") != wheel_sha:
        steps = [[uv, "pip", "install", "-q", "--python", str(python), "--no-deps",
                  "--reinstall-package", "ema-callbacks", str(wheel)]]  # fmt: skip
        what = "reused, wheel reinstalled"
    else:
        steps, what = [], "reused"
    for cmd in steps:
        out = run(cmd, capture_output=True, env={**os.environ, "UV_LINK_MODE": "hardlink"})
        if out.returncode != 0:
            fail(f"{name}: {' '.join(cmd)}:\n{out.stdout}{out.stderr}")
    stamp.write_text(json.dumps({**wanted, "wheel": wheel_sha}))
    say(f"{name}: environment {what} ({time.perf_counter() - started:.0f} s): {env}")
    return env


def command_lines(readme: str) -> list[str]:
    match = re.search(r"^## Command line\n(.*?)^## ", readme, re.M | re.S)
    block = match and re.search(r"^```bash\n(.*?)^```", match.group(1), re.M | re.S)
    if not block:
        fail("the README has no ```bash block under '## Command line'")
    lines = [ln.split("  #", 1)[0].strip() for ln in block.group(1).splitlines()]
    return [ln for ln in lines if ln and not ln.startswith("#")]


def user_env(env: Path) -> dict[str, str]:
    keep = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    return {
        **keep,
        "PATH": f"{env / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}",
        "VIRTUAL_ENV": str(env),
        "PYTHONNOUSERSITE": "1",
        "MPLBACKEND": "Agg",
    }


def check_env(
    env: Path, name: str, extras: list[str], headings: list[str], made: Path | None
) -> dict[str, bool]:
    """Run the README in ``env``; ``made``: a folder where the plain-loop quickstarts already
    ran in this check (their files are copied instead of training again)."""
    work = env.parent / f"{name}-work"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    environ = user_env(env)
    python = str(env / "bin" / "python")
    where = run(
        [python, "-c", "import ema_callbacks; print(ema_callbacks.__file__)"],
        capture_output=True, cwd=work, env=environ,
    )  # fmt: skip
    if where.returncode != 0 or not where.stdout.strip().startswith(str(env)):
        fail(f"{name}: ema_callbacks is not the installed wheel: {where.stdout}{where.stderr}")
    readme = str(ROOT / "README.md")
    started = time.perf_counter()
    quickstarts = headings if made else PLAIN + headings
    if made:
        shutil.copy2(made / "ema.pt", work / "ema.pt")
        shutil.copytree(made / "snapshots", work / "snapshots")
    if quickstarts:
        out = run([python, str(HERE / "run_blocks.py"), readme, *quickstarts],
                  capture_output=True, cwd=work, env=environ)  # fmt: skip
        if out.returncode != 0:
            fail(f"{name}: README quickstarts:\n{out.stdout[-3000:]}{out.stderr[-3000:]}")
        say(f"{name}: quickstarts ran ({', '.join(quickstarts)}; "
            f"{time.perf_counter() - started:.0f} s)")  # fmt: skip
    if not list((work / "snapshots").glob("*.safetensors")):
        fail(f"{name}: the post-hoc quickstart wrote no snapshot")
    passed = {}
    for line in command_lines((ROOT / "README.md").read_text()):
        started = time.perf_counter()
        out = run(["bash", "-c", line], capture_output=True, cwd=work, env=environ, timeout=600)
        seconds = time.perf_counter() - started
        named = set(re.findall(r"ema-callbacks\[(\w+)\]", out.stderr))
        missing = named - set(extras)
        if out.returncode == 0:
            output = re.search(r"(?:^|\s)(?:-o|--output)[ =](\S+)", line)
            if output and not (work / output.group(1)).exists():
                fail(f"{name}: `{line}` exited 0 but wrote no {output.group(1)}")
            say(f"{name}: ok ({seconds:.0f} s): {line}")
            passed[line] = True
        elif out.returncode == 1 and missing and len(out.stderr.strip().splitlines()) == 1:
            say(f"{name}: needs ema-callbacks[{','.join(sorted(missing))}] (exit 1): {line}")
            passed[line] = False
        else:
            fail(
                f"{name}: `{line}` exited {out.returncode} in {work}:\n"
                f"{out.stdout[-2000:]}{out.stderr[-2000:]}"
            )
    return passed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--uv", default="uv", help="the uv executable (default: %(default)s)")
    parser.add_argument("--find-links", default=os.environ.get("PIP_FIND_LINKS"),
                        help="extra wheels, e.g. the CPU torch (default: $PIP_FIND_LINKS)")  # fmt: skip
    default_envs = Path.home() / ".cache" / "ema-callbacks" / "wheel-envs"
    key = hashlib.sha256(str(ROOT).encode()).hexdigest()[:10]
    parser.add_argument("--envs", type=Path, default=default_envs / key,
                        help="where the environments are kept (default: %(default)s)")  # fmt: skip
    parser.add_argument("--only", help="comma-separated environment names (default: all)")
    parser.add_argument(
        "--force", action="store_true", help="run every check, even where nothing changed"
    )
    args = parser.parse_args(argv)
    if ROOT in args.envs.resolve().parents or args.envs.resolve() == ROOT:
        parser.error("--envs must be outside the repository")
    names = [n for n, _, _ in ENVS]
    only = args.only.split(",") if args.only else names
    if set(only) - set(names):
        parser.error(f"--only: choose from {', '.join(names)}; got {args.only!r}")
    started = time.perf_counter()
    args.envs.mkdir(parents=True, exist_ok=True)
    wheel, sdist = build(args.uv, args.envs / "dist")
    check_distributions(wheel, sdist)
    links = ["--find-links", args.find_links] if args.find_links else []
    # What a passed check depends on besides its environment: a check is skipped while these
    # and the environment are as they were when it last passed (--force runs it anyway).
    inputs = digest([wheel, ROOT / "README.md", HERE])
    results: dict[str, dict[str, bool]] = {}
    made: Path | None = None
    for name, extras, headings in ENVS:
        if name not in only:
            continue
        env = environment(args.envs, name, extras, wheel, args.uv, links)
        passed = env / ".ema-wheel-check-passed.json"
        if not args.force and passed.exists():
            last = json.loads(passed.read_text())
            if last["inputs"] == inputs:
                say(f"{name}: passed before with this wheel, README and check; skipped")
                results[name] = last["lines"]
                continue
        passed.unlink(missing_ok=True)
        results[name] = check_env(env, name, extras, headings, made)
        passed.write_text(json.dumps({"inputs": inputs, "lines": results[name]}))
        made = made or env.parent / f"{name}-work"
    if set(only) == set(names):
        lines = next(iter(results.values()))
        never = [ln for ln in lines if not any(r[ln] for r in results.values())]
        if never:
            fail(f"README command lines that ran in no environment: {never}")
    say(f"all done in {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
