"""DeepSpeed ZeRO-3 with the Trainer: a partition-local EMA (2 processes, torchrun, gloo, CPU),
and the per-rank checkpoint files it writes."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from hf_tiny import TinyRegressor, reference_ema

from ema_callbacks.controller import EMAController
from ema_callbacks.transformers import EMATrainerCallback, load_ema_state, save_ema_state
from tests.process_group import torchrun

HERE = Path(__file__).parent


def _close(ema: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> None:
    assert sorted(ema) == sorted(reference)
    for name, value in ema.items():
        torch.testing.assert_close(value.double(), reference[name], rtol=1e-6, atol=2e-7)


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def zero3_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict]]:
    pytest.importorskip("deepspeed")
    out = tmp_path_factory.mktemp("zero3")
    torchrun(HERE / "hf_zero3_run.py", out, timeout=300, env={"DS_ACCELERATOR": "cpu"})
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    return out, ranks


def _reference(run: dict, upto: int) -> dict[str, torch.Tensor]:
    """The EMA computed by hand from DeepSpeed's own gathered training weights."""
    steps = {k: v for k, v in run["train"].items() if k <= upto}
    epoch = run["epoch"]
    elapsed = {k: epoch[k] - epoch[k - 1] for k in steps if k > 1}
    return reference_ema(steps, elapsed, 0.5)


@pytest.mark.slow
@pytest.mark.distributed
def test_zero3_ema_is_partition_local_and_exact(zero3_run):
    out, ranks = zero3_run
    for rank in ranks:
        run = rank["a"]
        assert sorted(run["ema"]) == list(range(1, 9))
        # (a) each rank's shadow is its own flat partition: 25 of the model's 49 elements
        # (the 1-element bias is padded to 2 and split), i.e. about 1/world of the EMA
        full_bytes = sum(v.numel() * v.element_size() for v in run["ema"][8].values())
        assert full_bytes == 196
        assert run["ema_bytes"] == 100
        assert run["partition_numel"] == {
            "net.0.bias": 4,
            "net.0.weight": 16,
            "net.2.bias": 1,
            "net.2.weight": 4,
        }
        # (b) no collective call in any EMA update; the same counter sees the export's
        # all-gathers (one per partitioned parameter), so it does count
        assert run["updates"] == {step: [] for step in range(1, 9)}
        assert run["export_calls"] == ["all_gather"] * 4
        # (c) after every step, the gathered EMA equals the EMA computed from the gathered
        # training weights
        for step in range(1, 9):
            _close(run["ema"][step], _reference(run, step))
        # evaluations (steps 3, 6 and the last) ran on the EMA; training weights were back
        # in the very next forward
        assert sorted(run["eval"]) == [3, 6, 8]
        for step, logits in run["eval"].items():
            ema_model, train_model = TinyRegressor(), TinyRegressor()
            ema_model.load_state_dict({k: v.float() for k, v in _reference(run, step).items()})
            train_model.load_state_dict(run["train"][step])
            with torch.no_grad():
                torch.testing.assert_close(logits, ema_model(run["inputs"])["logits"])
                torch.testing.assert_close(
                    run["after_eval"][step], train_model(run["inputs"])["logits"]
                )
    assert _equal(ranks[0]["a"]["ema"][8], ranks[1]["a"]["ema"][8])
    for rank in ranks:  # loading a full EMA slices each rank's partition out of it
        assert _equal(rank["a"]["reloaded"], rank["a"]["ema"][8])
    # every rank wrote its own part; the parts reassemble into the gathered EMA
    names = sorted(os.listdir(out / "a" / "checkpoint-4"))
    for r in (0, 1):
        assert f"ema_state-rank{r}-of2.json" in names
        assert f"ema_state-rank{r}-of2.safetensors" in names
    assert "ema_state.json" not in names
    merged = load_ema_state(out / "a" / "checkpoint-8")
    assert _equal(merged["shadow"], ranks[0]["a"]["ema"][8])
    # `ema-callbacks export` reassembles the rank files offline too
    from safetensors.torch import load_file

    from ema_callbacks.cli import main

    exported_path = out / "exported.safetensors"
    assert main(["export", str(out / "a" / "checkpoint-8"), "-o", str(exported_path)]) == 0
    exported = load_file(exported_path)
    for key, value in ranks[0]["a"]["ema"][8].items():
        assert torch.equal(exported[key], value), key


@pytest.mark.slow
@pytest.mark.distributed
def test_zero3_resume_is_bit_identical(zero3_run):
    _, ranks = zero3_run
    for rank in ranks:
        first, resumed = rank["a"], rank["b"]
        assert sorted(resumed["ema"]) == [5, 6, 7, 8]
        for step in (5, 6, 7, 8):  # (d) resumed from checkpoint-4 vs. uninterrupted
            assert _equal(resumed["ema"][step], first["ema"][step]), step
            assert _equal(resumed["train"][step], first["train"][step]), step


@pytest.mark.slow
@pytest.mark.distributed
def test_zero3_posthoc_snapshots_hold_the_whole_ema(zero3_run):
    """snapshot_every under ZeRO-3: the partitions are gathered into whole tensors, rank 0
    writes one file per snapshot time, and it equals the gathered EMA at that step."""
    from ema_callbacks.posthoc import find_snapshots

    out, ranks = zero3_run
    found = find_snapshots(out / "c" / "ema_snapshots")
    assert [(s.time, s.sigma_rel) for s in found] == [(4.0, 0.1), (8.0, 0.1)]
    assert {s.run for s in found} == {ranks[0]["c"]["run"]}
    for snap in found:
        tensors = snap.tensors()
        step = int(snap.time)
        assert _equal(tensors, ranks[0]["c"]["ema"][step])  # whole tensors, model shapes
        assert tensors["net.0.weight"].shape == (8, 4)


def _partitions(full: torch.Tensor, world: int) -> list[torch.Tensor]:
    """DeepSpeed's rule: flatten, zero-pad to a multiple of ``world``, equal chunks."""
    flat = full.reshape(-1)
    size = -(-flat.numel() // world)
    flat = torch.cat([flat, flat.new_zeros(size * world - flat.numel())])
    return list(flat.split(size))


def test_rank_files_reassemble_and_a_world_mismatch_names_the_fix(tmp_path):
    ctrl = EMAController.create(half_life="4ba")
    ctrl.fit_start(torch.nn.Linear(3, 1))
    state = ctrl.state_dict()
    full = {k: v.clone() for k, v in state["shadow"].items()}
    shapes = {k: list(v.shape) for k, v in full.items()}
    for r in range(2):
        part = {**state, "shadow": {k: _partitions(v, 2)[r] for k, v in full.items()}}
        save_ema_state(part, tmp_path, shard=(r, 2), full_shapes=shapes)
    assert load_ema_state(tmp_path, shard=(1, 2))["shadow"]["weight"].shape == (2,)
    assert _equal(load_ema_state(tmp_path)["shadow"], full)

    cb = EMATrainerCallback(half_life="4ba")
    cb._run.shard = (0, 4)  # as on_train_begin sets it under ZeRO-3 with 4 processes
    with pytest.raises(ValueError, match="written by 2 ZeRO-3 ranks and this run has 4") as err:
        cb._load(tmp_path)
    assert "export the full EMA first" in str(err.value)
    # the fix it names: a full EMA in the checkpoint, which any world size loads
    save_ema_state(load_ema_state(tmp_path), tmp_path)
    assert _equal(cb._load(tmp_path)["shadow"], full)

    os.remove(tmp_path / "ema_state-rank1-of2.json")
    os.remove(tmp_path / "ema_state.json")
    with pytest.raises(FileNotFoundError, match=r"only the files of ranks \[0\]"):
        load_ema_state(tmp_path)
