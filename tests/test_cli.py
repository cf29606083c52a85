"""The command line: halflife, posthoc, run/demo argument errors (export: tests/test_export.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ema_callbacks import EMA
from ema_callbacks.cli import main
from ema_callbacks.posthoc import save_snapshot


def _lines(text: str) -> dict[str, str]:
    return dict(line.split(": ", 1) for line in text.strip().splitlines())


def test_halflife_both_ways(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["halflife", "--smoothing", "0.999", "--interval", "1ba"]) == 0
    assert _lines(capsys.readouterr().out) == {
        "smoothing": "0.999",
        "interval": "1ba",
        "half_life": "693ba",
    }
    assert main(["halflife", "--smoothing", "0.5", "--interval", "0.25ep"]) == 0
    assert _lines(capsys.readouterr().out)["half_life"] == "0.25ep"
    assert main(["halflife", "--half-life", "10ba", "--interval", "10ba"]) == 0
    assert _lines(capsys.readouterr().out)["smoothing"] == "0.500000"
    assert main(["halflife", "--half-life", "10ba", "--interval", "1ep"]) == 2
    assert "same unit" in capsys.readouterr().err
    # Quoted as typed, not normalised.
    assert main(["halflife", "--half-life", "+10BA", "--interval", "1E0ep"]) == 2
    assert "got '+10BA' and '1E0ep'" in capsys.readouterr().err


def test_posthoc_quotes_the_half_life_as_typed() -> None:
    from ema_callbacks.posthoc import reconstruct

    with pytest.raises(ValueError, match=r"got '\+0ba'"):
        reconstruct([], half_life="+0ba")


def test_halflife_interval_defaults_to_the_half_lifes_unit(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["halflife", "--half-life", "1ep"]) == 0
    assert _lines(capsys.readouterr().out) == {
        "half_life": "1ep",
        "interval": "1ep",
        "smoothing": "0.500000",
    }
    assert main(["halflife", "--half-life", "4e3tok"]) == 0
    assert _lines(capsys.readouterr().out)["interval"] == "1tok"
    assert main(["halflife", "--smoothing", "0.99"]) == 0
    assert _lines(capsys.readouterr().out)["interval"] == "1ba"


@pytest.mark.parametrize(
    ("argv", "flag", "rule"),
    [
        (["demo", "--epochs", "-1"], "--epochs", "must be a positive integer; got '-1'"),
        (["demo", "--epochs", "0"], "--epochs", "must be a positive integer; got '0'"),
        (["demo", "--epochs", "two"], "--epochs", "must be a positive integer; got 'two'"),
        (["demo", "--trainers", "foo"], "--trainers", "invalid choice: 'foo'"),
        (["demo", "--half-life=-3ba"], "--half-life", "must not be negative; got '-3ba'"),
        (["demo", "--seed", "-1"], "--seed", "must be an integer >= 0; got '-1'"),
        (["demo", "--plot", "/no/such/folder/x.png"], "--plot", "folder '/no/such/folder'"),
        (["sweep", "--steps", "0"], "--steps", "must be a positive integer"),
        (["sweep", "--table", "/no/such/folder/t.md"], "--table", "does not exist"),
        (["halflife", "--smoothing", "1.5"], "--smoothing", "between 0 and 1; got '1.5'"),
        (["halflife", "--smoothing", "0.9", "--interval=-1ba"], "--interval", "not be negative"),
        (["halflife", "--smoothing", "0.9", "--interval", "0ba"], "--interval", "positive"),
        (["halflife", "--half-life", "10xs"], "--half-life", "unknown unit"),
        (["posthoc", "x", "--half-life", "0ba"], "--half-life", "positive and finite"),
        (["posthoc", "x", "--sigma-rel", "0.1", "--at", "1.5ba"], "--at", "whole number"),
    ],
)
def test_every_argument_is_checked_before_anything_runs(
    argv: list[str], flag: str, rule: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"ema-callbacks {argv[0]}: error: argument {flag}: "), err
    assert rule in err


def test_posthoc_errors_name_the_flags(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = torch.nn.Linear(2, 1)
    for t in (10, 20):
        for s in (0.05, 0.10):
            save_snapshot(
                tmp_path / f"s-{t}-{s}.safetensors", model.state_dict(), time=t, sigma_rel=s
            )
    out = str(tmp_path / "out.safetensors")
    assert main(["posthoc", str(tmp_path), "--sigma-rel", "0.08", "--at", "15ba", "-o", out]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ema-callbacks posthoc: error: --at must be the time of one of"), err
    assert main(["posthoc", str(tmp_path), "--sigma-rel", "0.08", "--at", "1ep", "-o", out]) == 2
    assert capsys.readouterr().err.startswith("ema-callbacks posthoc: error: --at '1ep' must")
    assert main(["posthoc", str(tmp_path / "nope"), "--sigma-rel", "0.08"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ema-callbacks posthoc: error: SNAPSHOTS: no such file or folder")
    assert "folders_or_files" not in err


def test_every_command_describes_itself_and_shows_defaults() -> None:
    from ema_callbacks.cli import _parser

    subparsers = _parser()._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    for name, sub in subparsers.items():
        if name == "run":
            continue  # the run command documents itself (ema_callbacks/run_config.py)
        assert sub.description and len(sub.description) > 40, name
        text = " ".join(sub.format_help().split())
        for action in sub._actions:
            if action.option_strings and action.dest not in ("help", "debug"):
                assert action.help, f"{name} {action.option_strings[0]} has no help"
                if action.default not in (None, False):
                    assert (
                        "default" in (action.help or "") or f"(default: {action.default})" in text
                    ), f"{name} {action.option_strings[0]} does not show its default"


def test_posthoc_reconstructs_a_tracked_profile(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 4)
    tracked = {s: EMA(model, sigma_rel=s) for s in (0.05, 0.10)}
    target = EMA(model, sigma_rel=0.07)
    gen = torch.Generator().manual_seed(1)
    for step in range(1, 401):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=gen) + 0.01)
        for ema in (*tracked.values(), target):
            ema.step(model)
        if step % 50 == 0:
            for s, ema in tracked.items():
                save_snapshot(
                    tmp_path / f"snap-{step}-{s}.safetensors",
                    ema.shadow,
                    time=step,
                    sigma_rel=s,
                    dtype="float32",
                )
    out = tmp_path / "rec.safetensors"
    assert main(["posthoc", str(tmp_path), "--sigma-rel", "0.07", "-o", str(out)]) == 0
    rebuilt = load_file(out)
    torch.nn.Linear(4, 4).load_state_dict(rebuilt, strict=True)
    err = max(float((rebuilt[k] - target.shadow[k]).abs().max()) for k in rebuilt)
    gap = max(
        float((tracked[0.05].shadow[k] - tracked[0.10].shadow[k]).abs().max()) for k in rebuilt
    )
    assert err < 0.02 * gap  # far closer to the tracked 0.07 than the inputs are to each other
    assert main(["posthoc", str(tmp_path / "missing"), "--sigma-rel", "0.07"]) == 2


def test_run_reports_config_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", str(tmp_path / "nope.yaml")]) == 2
    assert "nope.yaml" in capsys.readouterr().err


def test_module_entry_point() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "ema_callbacks", "halflife", "--smoothing", "0.99"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert _lines(out.stdout)["half_life"] == "69ba"


def _cli(
    *argv: str, cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ema_callbacks", *argv],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=300,
    )


def test_posthoc_warning_is_worded_for_the_command_line(tmp_path: Path) -> None:
    model = torch.nn.Linear(2, 1)
    for t in (10, 20, 30):
        for s in (0.05, 0.10):
            save_snapshot(
                tmp_path / f"s-{t}-{s}.safetensors", model.state_dict(), time=t, sigma_rel=s
            )
    out = _cli("posthoc", str(tmp_path), "--half-life", "5ba", "-o", "a.safetensors", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    (warning,) = out.stderr.strip().splitlines()
    assert warning.startswith("ema-callbacks posthoc: warning: post-hoc EMA half_life='5ba'")
    assert "UserWarning" not in out.stderr and ".py:" not in out.stderr
    assert _lines(out.stdout)["half_life"] == "5ba"


def test_demo_prints_key_value_lines_and_a_table(tmp_path: Path) -> None:
    pytest.importorskip("sklearn")
    out = _cli("demo", "--trainers", "plain", "--epochs", "1", "--plot", "p.png", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    table, tail = out.stdout.split("\n\n")[-2:]
    assert "trainers: plain" in out.stdout and "epochs: 1" in out.stdout
    assert table.splitlines()[0].split()[:3] == ["trainer", "raw", "acc"]
    values = _lines(tail)
    assert set(values) == {"plot", "seconds"}
    assert values["plot"] == "p.png" if (tmp_path / "p.png").exists() else "none" in values["plot"]
    assert "plain" in out.stderr  # the progress (tqdm's bar, or plain lines) is on stderr


def test_a_missing_extra_is_a_failed_run_naming_the_extra(tmp_path: Path) -> None:
    """``demo --trainers composer`` where Composer is not installed (or lightning where it is
    not): exit status 1, not 2, and the extra to install. The trainers are hidden from the
    command's installed-package check, as in an environment without them."""
    pytest.importorskip("sklearn")
    code = (
        "import importlib.util, sys; real = importlib.util.find_spec\n"
        "importlib.util.find_spec = lambda n, *a: None if n in ('composer', 'lightning',"
        " 'transformers') else real(n, *a)\n"
        "from ema_callbacks.cli import main; sys.exit(main(sys.argv[1:]))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, "demo", "--trainers", "composer", "--epochs", "1"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )
    assert out.returncode == 1, out.stderr
    assert out.stderr.strip() == (
        "ema-callbacks demo: error: --trainers composer: composer is not installed; "
        'pip install "ema-callbacks[composer]"'
    )
