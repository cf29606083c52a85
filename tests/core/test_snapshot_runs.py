"""Post-hoc snapshot folders belong to one run: each file records the run that wrote it,
``snapshot_keep`` deletes only that run's files, a resumed run is the same run, and a run
whose folder holds another run's snapshots is refused before it writes (nothing touched)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from ema_callbacks import EMA
from ema_callbacks.controller import EMAController
from ema_callbacks.posthoc import find_snapshots, load_snapshot, save_snapshot
from ema_callbacks.schedule import Clock


def drift(model: nn.Module, step: int) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * step)


def train(ema: EMA, model: nn.Module, steps: range) -> None:
    for step in steps:
        drift(model, step)
        ema.step(model)


def files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_every_snapshot_records_its_run_and_a_resume_keeps_it(tmp_path: Path) -> None:
    model = nn.Linear(3, 2)
    first = EMA(model, sigma_rel=0.1, snapshot_every="2ba", snapshot_folder=tmp_path)
    train(first, model, range(1, 5))
    run = first.controller.snapshot_run
    assert isinstance(run, str) and len(run) == 16
    assert {s.run for s in find_snapshots(tmp_path)} == {run}
    state = first.state_dict()
    assert state["snapshot_run"] == run

    resumed = EMA(model, sigma_rel=0.1, snapshot_every="2ba", snapshot_folder=tmp_path)
    assert resumed.controller.snapshot_run != run  # a new run, until the state is loaded
    resumed.load_state_dict(state)
    train(resumed, model, range(5, 7))  # same run: adds to its own folder
    assert sorted(s.time for s in find_snapshots(tmp_path)) == [2.0, 4.0, 6.0]
    assert {s.run for s in find_snapshots(tmp_path)} == {run}


def test_a_second_run_into_the_same_folder_is_refused_before_writing(tmp_path: Path) -> None:
    model = nn.Linear(3, 2)
    first = EMA(model, sigma_rel=0.1, snapshot_every="2ba", snapshot_folder=tmp_path)
    train(first, model, range(1, 5))
    before = files(tmp_path)

    second = EMA(model, sigma_rel=0.1, snapshot_every="2ba", snapshot_folder=tmp_path)
    with pytest.raises(ValueError, match="holds 2 post-hoc EMA snapshot.s. of another run") as err:
        second.step(model)
    message = str(err.value)
    assert str(tmp_path) in message and first.controller.snapshot_run in message
    assert "snapshot_folder" in message
    assert files(tmp_path) == before  # nothing replaced, nothing deleted

    # files without a run id (another tool, an older version) are another run's too
    other = tmp_path / "other"
    save_snapshot(
        other / "ema-2ba-sigma_rel0.1.safetensors", {"w": torch.ones(1)}, time=2, sigma_rel=0.1
    )
    third = EMA(model, sigma_rel=0.1, snapshot_every="2ba", snapshot_folder=other)
    with pytest.raises(ValueError, match="written by a run;"):
        third.step(model)


def test_snapshot_keep_deletes_only_its_own_runs_files(tmp_path: Path) -> None:
    model = nn.Linear(3, 2)
    ctrl = EMAController.create(sigma_rel=0.1, snapshot_every="2ba", snapshot_keep=1)
    ctrl.fit_start(model, Clock(batch=0))
    ctrl.check_snapshot_folder(tmp_path)  # at the start of training: empty, fine
    # Another run starts into the same folder at the same moment (both passed the check).
    foreign = save_snapshot(
        tmp_path / "ema-1ba-sigma_rel0.1.safetensors",
        {"weight": torch.zeros(2, 3)},
        time=1,
        sigma_rel=0.1,
        run="someoneelse00000",
    )
    for step in range(1, 7):
        drift(model, step)
        ctrl.batch_end(model, Clock(batch=step))
        if ctrl.snapshot_due(Clock(batch=step)):
            ctrl.write_snapshots(tmp_path, Clock(batch=step))
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "ema-1ba-sigma_rel0.1.safetensors",  # the other run's: never deleted
        "ema-6ba-sigma_rel0.1.safetensors",  # snapshot_keep=1 of ours
    ]
    assert load_snapshot(foreign).run == "someoneelse00000"


def test_reset_starts_a_new_run(tmp_path: Path) -> None:
    ctrl = EMAController.create(sigma_rel=0.1, snapshot_every="2ba")
    run = ctrl.snapshot_run
    ctrl.reset()
    assert ctrl.snapshot_run not in (None, run)
    assert EMAController.create(half_life="2ba").state_dict().get("snapshot_run") is None
