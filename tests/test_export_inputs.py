"""``export`` and ``posthoc`` never touch their inputs, and report every damaged or unusable
path in one line (exit 1 for a bad file, 2 for bad usage), with no traceback and no advice to
unpickle; a failed command changes nothing that existed before it."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ema_callbacks import EMA
from ema_callbacks.cli import main
from ema_callbacks.controller import STATE_FORMAT
from ema_callbacks.posthoc import save_snapshot


def _tree(root: Path) -> dict[str, str]:
    """Every path under ``root`` with a hash of its content (folders: 'dir')."""
    out = {}
    for p in sorted(root.rglob("*")):
        out[str(p.relative_to(root))] = (
            "dir" if p.is_dir() else hashlib.sha1(p.read_bytes()).hexdigest()
        )
    return out


def _saved_state(folder: Path) -> Path:
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    ema = EMA(model, half_life="2ba")
    for _ in range(3):
        with torch.no_grad():
            model.weight.add_(1.0)
        ema.step(model)
    torch.save(ema.state_dict(), folder / "ema.pt")
    return folder / "ema.pt"


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    status = main(argv)
    err = capsys.readouterr().err
    return status, err


def _one_clean_line(err: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err and "weights_only" not in err.replace(
        "torch.load(weights_only=True)", ""
    ), err


def _damaged_inputs(root: Path) -> dict[str, Path]:
    good = _saved_state(root)
    data = good.read_bytes()
    files = {
        "empty": root / "empty.ckpt",
        "truncated": root / "truncated.ckpt",
        "random": root / "random.pt",
        "yaml": root / "config.yaml",
        "json": root / "deep.json",
        "legacy_garbage": root / "garbage.pt",
        "bad_safetensors": root / "bad.safetensors",
    }
    files["empty"].write_bytes(b"")
    files["truncated"].write_bytes(data[: len(data) // 2])
    files["random"].write_bytes(os.urandom(4096))
    files["yaml"].write_text("model:\n  half_life: 2ba\n")
    files["json"].write_text("[" * 100000 + "]" * 100000)
    files["legacy_garbage"].write_bytes(b"\x80\x04garbage that is no pickle")
    files["bad_safetensors"].write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{broken")
    # a folder that is not a checkpoint; one whose EMA state JSON is nested too deeply
    (root / "not_a_checkpoint").mkdir()
    (root / "not_a_checkpoint" / "notes.txt").write_text("hello")
    files["folder"] = root / "not_a_checkpoint"
    deep = root / "deep_folder"
    deep.mkdir()
    (deep / "ema_state.json").write_text("[" * 100000 + "]" * 100000)
    files["deep_folder"] = deep
    half = root / "half_folder"
    half.mkdir()
    (half / "ema_state.json").write_text(json.dumps({"format": STATE_FORMAT}))
    files["half_folder"] = half
    return files


@pytest.mark.parametrize(
    "kind",
    [
        "empty",
        "truncated",
        "random",
        "yaml",
        "json",
        "legacy_garbage",
        "bad_safetensors",
        "folder",
        "deep_folder",
        "half_folder",
    ],
)
def test_damaged_inputs_are_one_line_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], kind: str
) -> None:
    files = _damaged_inputs(tmp_path)
    before = _tree(tmp_path)
    status, err = _run(["export", str(files[kind]), "-o", str(tmp_path / "o.safetensors")], capsys)
    assert status == 1, err
    _one_clean_line(err)
    assert str(files[kind]) in err or files[kind].name in err
    assert _tree(tmp_path) == before  # nothing written, nothing changed


def test_damaged_snapshot_named_on_the_command_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for name, data in (("empty.safetensors", b""), ("bad.safetensors", os.urandom(64))):
        (tmp_path / name).write_bytes(data)
        status, err = _run(["posthoc", str(tmp_path / name), "--sigma-rel", "0.1"], capsys)
        assert status == 1, err
        _one_clean_line(err)
        assert name in err


def test_messages_say_what_is_wrong(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    files = _damaged_inputs(tmp_path)
    expected = {
        "empty": "empty file (0 bytes)",
        "truncated": "damaged or truncated PyTorch checkpoint",
        "yaml": "a text file (YAML, JSON or similar)",
        "json": "a JSON file",
        "folder": "not a checkpoint folder",
        "deep_folder": "nested too deeply",
        "half_folder": "ema_state.safetensors: missing",
    }
    for kind, text in expected.items():
        _, err = _run(["export", str(files[kind]), "-o", str(tmp_path / "o.safetensors")], capsys)
        assert text in err, (kind, err)


def test_debug_shows_the_traceback(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "empty.ckpt").write_bytes(b"")
    status, err = _run(["export", str(tmp_path / "empty.ckpt"), "--debug"], capsys)
    assert status == 1 and "Traceback" in err and "FileProblem" in err


def test_refuses_to_write_over_an_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    state = _saved_state(tmp_path)
    os.link(state, tmp_path / "hardlink.pt")
    before = _tree(tmp_path)
    for out in (state, tmp_path / "hardlink.pt", tmp_path / "." / "ema.pt"):
        for extra in ([], ["--force"]):
            status, err = _run(["export", str(state), "-o", str(out), *extra], capsys)
            assert status == 2, err
            assert f"output {out} is the input {state}" in err
            _one_clean_line(err)
    assert _tree(tmp_path) == before


def test_refuses_to_write_into_an_input_checkpoint_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("transformers.trainer")
    from ema_callbacks.controller import EMAController
    from ema_callbacks.transformers import save_ema_state

    folder = tmp_path / "checkpoint-12"
    model = torch.nn.Linear(2, 1)
    ctrl = EMAController.create(half_life="4ba")
    ctrl.fit_start(model)
    save_ema_state(ctrl.state_dict(), folder)
    from safetensors.torch import save_file

    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()}, folder / "model.safetensors"
    )
    before = _tree(tmp_path)
    for target, extra in (
        (folder / "model.safetensors", []),
        (folder / "model.safetensors", ["--force"]),  # never over an existing file
        (folder / "ema_state.safetensors", ["--force"]),
        (folder / "new.safetensors", []),  # a new file there: only with --force
    ):
        status, err = _run(["export", str(folder), "-o", str(target), *extra], capsys)
        assert status == 2, (target, err)
        assert str(target) in err and str(folder) in err
        _one_clean_line(err)
    assert _tree(tmp_path) == before
    # a new file with --force cannot destroy anything
    assert main(["export", str(folder), "-o", str(folder / "new.safetensors"), "--force"]) == 0
    assert set(load_file(folder / "new.safetensors")) == {"weight", "bias"}
    # also when given the state file itself
    status, err = _run(
        ["export", str(folder / "ema_state.safetensors"), "-o", str(folder / "ema_state.json")],
        capsys,
    )
    assert status == 2 and "is the input" in err


def test_posthoc_refuses_to_write_over_a_snapshot(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    snaps = tmp_path / "snaps"
    for t in (100, 200):
        for s in (0.05, 0.1):
            save_snapshot(snaps / f"{t}-{s}.safetensors", {"w": torch.ones(2)}, time=t, sigma_rel=s)
    (snaps / "notes.safetensors.txt").write_text("mine")
    before = _tree(tmp_path)
    for out in (snaps / "200-0.1.safetensors", snaps / "100-0.05.safetensors"):
        status, err = _run(["posthoc", str(snaps), "--sigma-rel", "0.07", "-o", str(out)], capsys)
        assert status == 2, err
        assert str(out) in err and "refusing to write over" in err
        _one_clean_line(err)
    status, err = _run(
        [
            "posthoc",
            str(snaps / "200-0.1.safetensors"),
            str(snaps / "200-0.05.safetensors"),
            "--sigma-rel",
            "0.07",
            "-o",
            str(snaps / "200-0.1.safetensors"),
        ],
        capsys,
    )
    assert status == 2 and "is the input" in err
    assert _tree(tmp_path) == before
    # a new file in the snapshot folder, then replacing that earlier result, are fine
    out = snaps / "result.safetensors"
    assert main(["posthoc", str(snaps), "--sigma-rel", "0.07", "-o", str(out)]) == 0
    assert main(["posthoc", str(snaps), "--sigma-rel", "0.08", "-o", str(out)]) == 0


def test_unusable_output_paths(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    state = _saved_state(inputs)
    save_snapshot(inputs / "snap" / "s.safetensors", {"w": torch.ones(1)}, time=1, sigma_rel=0.1)
    work = tmp_path / "work"
    work.mkdir()
    (work / "afile").write_text("x")
    (work / "adir").mkdir()
    cases = {
        str(work / "adir"): "is a folder",
        str(work / "newdir") + "/": "is a folder",
        str(work / "afile" / "out.safetensors"): "a part of the path is a file",
        str(work / "afile" / "deeper" / "out.safetensors"): "a part of the path is a file",
    }
    if _cannot_create("/sys"):  # even root cannot create files there: a read-only folder
        cases["/sys/ema_callbacks_test.safetensors"] = "cannot write"
    before = _tree(tmp_path)
    for out, text in cases.items():
        for command in (
            ["export", str(state)],
            ["posthoc", str(inputs / "snap"), "--sigma-rel", "0.1"],
        ):
            status, err = _run([*command, "-o", out], capsys)
            assert status == 1, (out, err)
            assert text in err and out.rstrip("/") in err, (out, err)
            _one_clean_line(err)
            assert _tree(tmp_path) == before
    assert not (work / "newdir").exists()


def _cannot_create(folder: str) -> bool:
    try:
        fd = os.open(os.path.join(folder, ".ema_callbacks_probe"), os.O_CREAT | os.O_WRONLY)
    except OSError:
        return os.path.isdir(folder)
    os.close(fd)
    os.remove(os.path.join(folder, ".ema_callbacks_probe"))
    return False


def test_bad_arguments_name_the_flag(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    state = _saved_state(tmp_path)
    cases = [
        (["export", str(state), "--strip-prefix", "nothing."], "--strip-prefix 'nothing.'"),
        (["export", str(state), "--strip-prefix", "."], "--strip-prefix must be"),
        (["export", str(state), "--dtype", "int3"], "dtype"),
        (["export", str(state), "--format", "hf", "-o", str(tmp_path / "m")], "--format hf"),
        (["posthoc", str(tmp_path), "--sigma-rel", "1e-160"], "--sigma-rel is too small"),
        (["posthoc", str(tmp_path), "--sigma-rel", "0.5"], "--sigma-rel must be between"),
        (["posthoc", str(tmp_path), "--sigma-rel", "nan"], "--sigma-rel must be between"),
    ]
    for argv, text in cases:
        status, err = _run(argv, capsys)
        assert status == 2, (argv, err)
        assert text in err, (argv, err)
        _one_clean_line(err)


def test_every_option_has_help(capsys: pytest.CaptureFixture[str]) -> None:
    from ema_callbacks.cli import _parser

    parser = _parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    for name in ("export", "posthoc"):
        for action in sub.choices[name]._actions:  # type: ignore[attr-defined]
            assert action.help, (name, action.dest)


def test_posthoc_words_its_warnings(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for t in (100, 200):
        for s in (0.05, 0.1):
            save_snapshot(
                tmp_path / f"{t}-{s}.safetensors", {"w": torch.ones(2)}, time=t, sigma_rel=s
            )
    status = main(
        [
            "posthoc",
            str(tmp_path),
            "--sigma-rel",
            "0.25",
            "-o",
            str(tmp_path / "o" / "r.safetensors"),
        ]
    )
    captured = capsys.readouterr()
    assert status == 0
    assert "UserWarning" not in captured.err and "warnings.warn" not in captured.err
    lines = captured.err.strip().splitlines()
    assert all(line.startswith("ema-callbacks posthoc: warning: ") for line in lines), lines
    assert any("poorly represented" in line for line in lines)
    out = dict(line.split(": ", 1) for line in captured.out.strip().splitlines())
    assert set(out) >= {"output", "time", "sigma_rel", "snapshots", "fit_error"}


def test_export_prints_key_value_lines(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    state = _saved_state(tmp_path)
    assert main(["export", str(state), "-o", str(tmp_path / "e.safetensors")]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    out = dict(line.split(": ", 1) for line in lines)
    assert out["kind"] == "ema_callbacks" and out["tensors"] == "2"
    assert out["output"] == str(tmp_path / "e.safetensors")


def test_a_damaged_file_in_a_snapshot_folder_is_an_error_not_skipped(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import torch

    from ema_callbacks.posthoc import find_snapshots, save_snapshot

    folder = tmp_path / "snaps"
    for t in (10, 20):
        save_snapshot(
            folder / f"ema-{t}ba.safetensors", {"w": torch.ones(2)}, time=t, sigma_rel=0.1
        )
    (folder / "ema-30ba.safetensors").write_bytes(os.urandom(64))  # a damaged copy
    status, err = _run(["posthoc", str(folder), "--sigma-rel", "0.1"], capsys)
    assert status == 1, err
    _one_clean_line(err)
    assert "ema-30ba.safetensors" in err and "damaged" in err
    # a training run that only scans its folder skips it with a warning
    with pytest.warns(UserWarning, match="skipping .*ema-30ba.safetensors"):
        assert [s.time for s in find_snapshots(folder, skip_damaged=True)] == [10.0, 20.0]
