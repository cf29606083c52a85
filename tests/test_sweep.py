"""``ema-callbacks sweep``: accuracy against half-life from one run (ema_callbacks.examples.sweep)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ema_callbacks.cli import main
from ema_callbacks.examples.sweep import (
    MAX_FIT_ERROR,
    SweepResult,
    format_sweep_table,
    half_life_sweep,
    plot_sweep,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    assert data[12:16] == b"IHDR" and data[-8:-4] == b"IEND"
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert width > 400 and height > 200


@pytest.fixture(scope="module")
def sweep() -> SweepResult:
    return half_life_sweep(
        steps=300, half_lives=[2, 10, 20, 30, 400], snapshot_every=25, grid=[12, 20, 45]
    )


def test_every_profile_equals_a_separate_single_ema_run(sweep: SweepResult) -> None:
    # one EMA tracking every half-life (and two sigma_rel profiles, with snapshots) holds
    # exactly the shadows of separate runs with one half-life each: "from one run" is exact
    assert sweep.profiles == ["ema_2ba", "ema_10ba", "ema_20ba", "ema_30ba", "ema_400ba"]
    assert set(sweep.shadows) == {*sweep.profiles, "ema_sigma_rel0.05", "ema_sigma_rel0.1"}
    for h, name, point in zip(sweep.half_lives, sweep.profiles, sweep.tracked, strict=True):
        single = half_life_sweep(steps=300, half_lives=[h], sigma_rels=())
        assert single.snapshots == 0 and single.reconstructed == []
        (alone,) = single.shadows.values()
        together = sweep.shadows[name]
        assert alone.keys() == together.keys()
        for key in alone:
            assert torch.equal(alone[key], together[key]), (name, key)
        assert (single.raw_accuracy, single.raw_loss) == (sweep.raw_accuracy, sweep.raw_loss)
        assert single.tracked[0] == point


def test_deterministic(sweep: SweepResult) -> None:
    again = half_life_sweep(
        steps=300, half_lives=[2, 10, 20, 30, 400], snapshot_every=25, grid=[12, 20, 45]
    )
    assert format_sweep_table(again) == format_sweep_table(sweep)
    assert again.reconstructed == sweep.reconstructed


def test_reconstructed_half_lives_agree_with_tracked_ones(sweep: SweepResult) -> None:
    assert sweep.snapshots == 2 * 12  # 25ba ... 300ba, sigma_rel 0.05 and 0.10
    fits = {q.half_life: q.fit_error for q in sweep.posthoc_at_tracked}
    assert fits[30] is not None and fits[30] < 0.05  # inside the snapshots' range
    assert fits[400] is not None and fits[400] > MAX_FIT_ERROR  # wider than any snapshot
    compared = 0
    for p, q in zip(sweep.tracked, sweep.posthoc_at_tracked, strict=True):
        assert q.half_life == p.half_life and q.fit_error is not None
        if q.fit_error <= MAX_FIT_ERROR:
            assert abs(q.loss - p.loss) < 0.01 * p.loss, (p, q)
            assert abs(q.accuracy - p.accuracy) <= 2 / 450 + 1e-6, (p, q)
            compared += 1
    assert compared >= 3
    assert [p.half_life for p in sweep.reconstructed] == [12, 20, 45]
    table = format_sweep_table(sweep)
    assert "| 30ba |" in table and "*" in table  # 400ba is flagged as poorly represented


def test_plot_is_a_png(sweep: SweepResult, tmp_path: Path) -> None:
    path = tmp_path / "sub" / "sweep.png"
    assert plot_sweep(sweep, path)
    _assert_png(path)


def test_invalid_arguments() -> None:
    with pytest.raises(ValueError, match="steps"):
        half_life_sweep(steps=0)
    with pytest.raises(ValueError, match="half_lives"):
        half_life_sweep(steps=5, half_lives=[10, 10])
    with pytest.raises(ValueError, match="snapshot_every"):
        half_life_sweep(steps=5, snapshot_every=0)


def test_cli_sweep(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    png, table = tmp_path / "sweep.png", tmp_path / "sweep.md"
    assert main(["sweep", "--steps", "60", "--output", str(png), "--table", str(table)]) == 0
    out = capsys.readouterr().out
    assert "| training weights |" in out and "| 1000ba |" in out
    assert table.read_text().startswith("| half-life | tracked accuracy |")
    _assert_png(png)
    assert main(["sweep", "--steps", "0"]) == 2
    assert "--steps: must be a positive integer" in capsys.readouterr().err


def test_module_entry_point(tmp_path: Path) -> None:
    png = tmp_path / "sweep.png"
    out = subprocess.run(
        [sys.executable, "-m", "ema_callbacks", "sweep", "--steps", "30", "--output", str(png)],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "| 3ba |" in out.stdout and f"plot: {png}" in out.stdout
    _assert_png(png)


# -- ema-callbacks averages: EMA, BEMA and uniform against training time ---------------------


def test_averages_over_time_are_the_averages_of_one_run(tmp_path: Path) -> None:
    from ema_callbacks import EMA
    from ema_callbacks.examples import digits_datasets, digits_mlp
    from ema_callbacks.examples.sweep import (
        SWEEP_BATCH_SIZE,
        SWEEP_HIDDEN,
        SWEEP_LR,
        SWEEP_MOMENTUM,
        averages_over_time,
        format_averages_table,
        plot_averages,
    )

    result = averages_over_time(steps=60, every=20, half_life=8)
    assert result.steps == [20, 40, 60]
    assert list(result.accuracy) == ["training", "ema", "bema", "uniform"]
    # the uniform average starts half-way: nothing to evaluate before
    assert torch.isnan(torch.tensor(result.accuracy["uniform"][0]))
    assert all(0.0 < a <= 1.0 for a in result.accuracy["bema"])
    assert averages_over_time(steps=60, every=20, half_life=8).accuracy == result.accuracy

    # the same run by hand, BEMA alone: its accuracy at the end is the one reported
    torch.manual_seed(0)
    train, val = digits_datasets(0)
    (x, y), (xv, yv) = train.tensors, val.tensors
    model = digits_mlp(hidden=SWEEP_HIDDEN)
    opt = torch.optim.SGD(model.parameters(), lr=SWEEP_LR, momentum=SWEEP_MOMENTUM)
    bema = EMA(model, ema_power=0.5, bias_power=0.2, lag=10)
    order = torch.Generator().manual_seed(0)
    perm, pos = torch.randperm(len(x), generator=order), 0
    for _ in range(60):
        if pos + SWEEP_BATCH_SIZE > len(x):
            perm, pos = torch.randperm(len(x), generator=order), 0
        index = perm[pos : pos + SWEEP_BATCH_SIZE]
        pos += SWEEP_BATCH_SIZE
        loss = torch.nn.functional.cross_entropy(model(x[index]), y[index])
        opt.zero_grad()
        loss.backward()
        opt.step()
        bema.step(model)
    with bema.swapped(model), torch.no_grad():
        model.eval()
        accuracy = float((model(xv).argmax(1) == yv).float().mean())
    assert result.final("bema") == pytest.approx(accuracy, abs=1e-9)

    assert format_averages_table(result).splitlines()[0] == (
        "| step | training | ema | bema | uniform |"
    )
    if plot_averages(result, tmp_path / "a.png"):
        _assert_png(tmp_path / "a.png")


def test_cli_averages(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "averages.png"
    assert main(["averages", "--steps", "40", "--every", "20", "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    for name in ("training", "ema", "bema", "uniform"):
        assert f"final_{name}: " in printed
    assert main(["averages", "--every", "0"]) == 2
    assert "--every" in capsys.readouterr().err
