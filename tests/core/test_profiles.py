"""Several EMAs in one controller: the shared multi-tensor update, names, swaps, state, snapshots."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from ema_callbacks import EMA
from ema_callbacks.controller import EMAController, profile_name
from ema_callbacks.posthoc import find_snapshots, load_snapshot, reconstruct
from ema_callbacks.schedule import Clock, Schedule
from ema_callbacks.weights import EMAWeights, update_together_


def _model(dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5), nn.Linear(5, 3))
    return model.to(dtype)


def _drift(model: nn.Module, step: int) -> None:
    g = torch.Generator().manual_seed(step)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 + 0.1 * torch.randn(p.shape, generator=g).to(p.dtype))
        for b in model.buffers():
            if b.is_floating_point():
                b.add_(0.05)
            else:
                b.add_(1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scratch", [None, 7])
def test_update_together_equals_separate_updates(dtype: torch.dtype, scratch: int | None) -> None:
    model = _model(dtype)
    factors = [0.3, 1.0, 0.0, 0.05]
    together = [EMAWeights(model, buffers="average") for _ in factors]
    separate = [EMAWeights(model, buffers="average") for _ in factors]
    if scratch is not None:  # force the chunked staging path for the mixed-dtype group
        for w in (*together, *separate):
            w._scratch_numel = scratch
            w._scratch.clear()
    for step in range(1, 6):
        _drift(model, step)
        assert update_together_(together, factors, model)
        for w, f in zip(separate, factors, strict=True):
            w.update_(f, model)
    for a, b in zip(together, separate, strict=True):
        for name in a.names:
            assert torch.equal(a.shadow[name], b.shadow[name]), name
    # the integer buffer is copied by every EMA that updated
    assert int(together[0].shadow["1.num_batches_tracked"]) == int(model[1].num_batches_tracked)
    if dtype is torch.bfloat16:
        assert together[0].shadow["0.weight"].dtype == torch.float32


def test_one_fused_call_per_group_whatever_the_number_of_emas(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model = _model()
    calls: list[int] = []
    real = torch._foreach_lerp_

    def counting(shadow, source, weight):  # type: ignore[no-untyped-def]
        calls.append(len(shadow))
        return real(shadow, source, weight)

    monkeypatch.setattr(torch, "_foreach_lerp_", counting)
    one = [EMAWeights(model)]
    update_together_(one, [0.1], model)
    single = list(calls)
    calls.clear()
    three = [EMAWeights(model) for _ in range(3)]
    update_together_(three, [0.1, 0.01, 0.001], model)
    assert len(calls) == len(single)
    assert sum(calls) == 3 * sum(single)


def test_update_together_rejects_mismatched_emas() -> None:
    model = _model()
    a, b = EMAWeights(model), EMAWeights(model, exclude="0.*")
    with pytest.raises(ValueError, match="same tensors with the same options"):
        update_together_([a, b], [0.1, 0.1], model)
    with pytest.raises(ValueError, match="one weight per EMA"):
        update_together_([a], [0.1, 0.2], model)
    with pytest.raises(ValueError, match="between 0 and 1"):
        update_together_([a], [1.5], model)


def _train(controller: EMAController, model: nn.Module, steps: range) -> None:
    for step in steps:
        _drift(model, step)
        controller.batch_end(model, Clock(batch=step, epoch=0))


def test_each_profile_equals_its_own_single_ema() -> None:
    options = [
        {"half_life": "3ba"},
        {"half_life": "20ba", "update_interval": "2ba"},
        {"sigma_rel": 0.1},
        {"smoothing": 0.9, "warmup": "tf", "start": "4ba"},
    ]
    model = _model()
    multi = EMAController.create(profiles=options)
    multi.fit_start(model, Clock(batch=0))
    singles = []
    for o in options:
        m = copy.deepcopy(_model())
        c = EMAController.create(**o)
        c.fit_start(m, Clock(batch=0))
        singles.append((c, m))
    for step in range(1, 31):
        _drift(model, step)
        multi.batch_end(model, Clock(batch=step, epoch=0))
        for c, m in singles:
            _drift(m, step)
            c.batch_end(m, Clock(batch=step, epoch=0))
    for p, (c, _) in zip(multi.profiles, singles, strict=True):
        assert p.state.to_dict() == c.state.to_dict(), p.name
        for name, t in c.weights.state_dict().items():
            assert torch.equal(p.weights.shadow[name], t), (p.name, name)
    assert multi.names == ["ema_3ba", "ema_20ba", "ema_sigma_rel0.1", "ema_0.9"]


def test_names_and_construction_errors() -> None:
    assert EMAController.create(half_life=["100ba", "1000ba"]).names == ["ema_100ba", "ema_1000ba"]
    assert profile_name(Schedule(half_life="2e6tok")) == "ema_2000000tok"
    single = EMAController.create(half_life="10ba")
    assert single.names == ["ema_10ba"] and single.eval_all is False
    assert EMAController.create(smoothing=[0.9, 0.99]).eval_all is True
    assert EMAController.create(smoothing=[0.9, 0.99], eval_with_ema=False).eval_all is False
    cases = [
        ({"half_life": ["10ba", "10ba"]}, ValueError, "share the name 'ema_10ba'"),
        ({"half_life": ["10ba"], "sigma_rel": [0.1]}, ValueError, "only one of"),
        ({"half_life": []}, ValueError, "must not be an empty list"),
        ({"half_life": ["10ba"], "smoothing": 0.9}, ValueError, "exactly one of"),
        ({"profiles": [{"half_life": "1ba"}], "half_life": "2ba"}, ValueError, "not both"),
        ({"profiles": [{"half_lif": "1ba"}]}, ValueError, r"unknown keys \['half_lif'\]"),
        ({"profiles": [{"name": "a b", "half_life": "1ba"}]}, ValueError, "letters, digits"),
        ({"profiles": "fast"}, TypeError, "list of mappings"),
        ({"profiles": []}, ValueError, "must not be empty"),
        (
            {"half_life": ["1ba", "2ba"], "train_with_ema_weights": True},
            ValueError,
            "single EMA",
        ),
        ({"eval_all": True, "eval_with_ema": False}, ValueError, "eval_with_ema=True"),
        ({"eval_all": "yes"}, TypeError, "eval_all must be"),
        ({"half_life": "10ba", "snapshot_every": "10ba"}, ValueError, "no(ne)?.*sigma_rel"),
        ({"sigma_rel": 0.1, "snapshot_every": "0ba"}, ValueError, "^snapshot_every"),
        ({"sigma_rel": 0.1, "snapshot_dtype": "int8"}, ValueError, "snapshot_dtype"),
        ({"sigma_rel": 0.1, "snapshot_keep": 0}, ValueError, "snapshot_keep"),
        ({"half_life": ["1ba", "bad"]}, ValueError, "half_life"),
    ]
    for kwargs, error, match in cases:
        with pytest.raises(error, match=match):
            EMAController.create(**kwargs)


def test_swaps_choose_a_profile_and_always_restore() -> None:
    model = _model()
    ctrl = EMAController.create(half_life=["2ba", "50ba"])
    ctrl.fit_start(model, Clock(batch=0))
    _train(ctrl, model, range(1, 8))
    training = {k: v.clone() for k, v in model.state_dict().items()}
    fast, slow = (p.weights.state_dict() for p in ctrl.profiles)
    fast = {k: v.clone() for k, v in fast.items()}
    slow = {k: v.clone() for k, v in slow.items()}
    # eval_all: the trainer's own evaluation sees the training weights
    ctrl.eval_start(model)
    assert ctrl.weights_active == "training"
    with ctrl.ema_weights(model, "ema_50ba"):
        assert torch.equal(model[0].weight, slow["0.weight"])
        with ctrl.ema_weights(model, "ema_2ba"):
            assert torch.equal(model[0].weight, fast["0.weight"])
        assert ctrl.active_profile == "ema_50ba"
        assert torch.equal(model[0].weight, slow["0.weight"])
    with pytest.raises(RuntimeError, match="boom"), ctrl.ema_weights(model, "ema_2ba"):
        raise RuntimeError("boom")
    ctrl.eval_end(model)
    for k, v in model.state_dict().items():
        assert torch.equal(v, training[k]), k
    with pytest.raises(KeyError, match=r"the profiles are \['ema_2ba', 'ema_50ba'\]"):
        with ctrl.ema_weights(model, "ema_3ba"):
            pass
    # final weights: the primary profile
    ctrl.fit_end(model)
    assert ctrl.active_profile == "ema_2ba"
    assert torch.equal(model[0].weight, fast["0.weight"])


def test_state_round_trip_and_resume_is_bit_identical() -> None:
    def run(stop: int | None) -> EMAController:
        model = _model()
        ctrl = EMAController.create(half_life=["3ba", "30ba"], sigma_rel=None)
        ctrl.fit_start(model, Clock(batch=0))
        if stop is None:
            _train(ctrl, model, range(1, 21))
            return ctrl
        _train(ctrl, model, range(1, stop + 1))
        with ctrl.ema_weights(model, "ema_30ba"):  # saved mid-evaluation
            state = copy.deepcopy(ctrl.state_dict())
            model_state = copy.deepcopy(model.state_dict())
        assert "training" in state and set(state["profiles"]) == {"ema_30ba"}
        model2 = _model()
        model2.load_state_dict(model_state)
        ctrl2 = EMAController.create(half_life=["3ba", "30ba"])
        ctrl2.load_state_dict(state)
        ctrl2.fit_start(model2, Clock(batch=stop))
        _train(ctrl2, model2, range(stop + 1, 21))
        return ctrl2

    whole = run(None)
    resumed = run(9)
    for a, b in zip(whole.profiles, resumed.profiles, strict=True):
        assert a.state.to_dict() == b.state.to_dict()
        for k, v in a.weights.state_dict().items():
            assert torch.equal(v, b.weights.state_dict()[k]), (a.name, k)


def test_loading_other_profiles_is_an_error_and_a_single_state_warns() -> None:
    model = _model()
    ctrl = EMAController.create(half_life=["3ba", "30ba"])
    ctrl.fit_start(model, Clock(batch=0))
    _train(ctrl, model, range(1, 4))
    other = EMAController.create(half_life=["3ba", "40ba"])
    with pytest.raises(ValueError, match=r"missing \['ema_40ba'\], unexpected \['ema_30ba'\]"):
        other.load_state_dict(ctrl.state_dict())
    single = EMAController.create(half_life="3ba")
    single.fit_start(model, Clock(batch=3))
    with pytest.warns(UserWarning, match=r"profiles \['ema_30ba'\] start afresh"):
        ctrl.load_state_dict(single.state_dict())
    assert not ctrl.profile("ema_30ba").started


def test_plain_ema_with_several_half_lives() -> None:
    model = _model()
    ema = EMA(model, half_life=["2ba", "20ba"])
    for step in range(1, 10):
        _drift(model, step)
        ema.step(model)
    assert ema.profiles == ["ema_2ba", "ema_20ba"]
    fast, slow = ema.shadow_of("ema_2ba"), ema.shadow_of("ema_20ba")
    w = model[0].weight.detach()
    # the short half-life follows the drifting model more closely
    assert float((fast["0.weight"] - w).norm()) < float((slow["0.weight"] - w).norm())
    with ema.swapped(model, profile="ema_20ba"):
        assert torch.equal(model[0].weight, slow["0.weight"])


def test_snapshots_on_their_interval_reconstruct_a_tracked_profile(tmp_path) -> None:
    model = nn.Linear(8, 4)
    ctrl = EMAController.create(
        sigma_rel=[0.05, 0.07, 0.10], snapshot_every="25ba", snapshot_dtype="float32"
    )
    ctrl.fit_start(model, Clock(batch=0))
    for step in range(1, 201):
        _drift(model, step)
        ctrl.batch_end(model, Clock(batch=step))
        if ctrl.snapshot_due(Clock(batch=step)):
            ctrl.write_snapshots(tmp_path, Clock(batch=step))
    found = find_snapshots(tmp_path)
    assert sorted({s.time for s in found}) == [25.0 * k for k in range(1, 9)]
    assert {s.sigma_rel for s in found} == {0.05, 0.07, 0.10}
    assert (tmp_path / "ema-200ba-sigma_rel0.05.safetensors").is_file()
    used = [s for s in found if s.sigma_rel != 0.07]
    out = reconstruct(used, sigma_rel=0.07)
    direct = ctrl.profile("ema_sigma_rel0.07").weights.state_dict()
    lo, hi = (
        ctrl.profile(n).weights.state_dict() for n in ("ema_sigma_rel0.05", "ema_sigma_rel0.1")
    )

    def dist(a, b):  # type: ignore[no-untyped-def]
        return math.sqrt(sum(float((a[k].float() - b[k].float()).pow(2).sum()) for k in a))

    assert dist(out, direct) < 0.01 * dist(lo, hi)
    # the snapshot clock is part of the state (a resume does not write a snapshot twice)
    assert ctrl.state_dict()["snapshot"]["last"]["ba"] == 200.0


def test_snapshot_keep_rotates_old_times_and_dtype_is_float16(tmp_path) -> None:
    model = nn.Linear(3, 2)
    ctrl = EMAController.create(sigma_rel=0.1, snapshot_every="2ba", snapshot_keep=2)
    ctrl.fit_start(model, Clock(batch=0))
    for step in range(1, 11):
        _drift(model, step)
        ctrl.batch_end(model, Clock(batch=step))
        if ctrl.snapshot_due(Clock(batch=step)):
            ctrl.write_snapshots(tmp_path, Clock(batch=step))
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "ema-10ba-sigma_rel0.1.safetensors",
        "ema-8ba-sigma_rel0.1.safetensors",
    ]
    snap = load_snapshot(tmp_path / "ema-10ba-sigma_rel0.1.safetensors")
    assert snap.tensors()["weight"].dtype == torch.float16


def test_plain_ema_writes_snapshots_on_its_interval(tmp_path) -> None:
    model = nn.Linear(4, 2)
    ema = EMA(
        model,
        sigma_rel=[0.05, 0.10],
        snapshot_every="5ba",
        snapshot_folder=tmp_path / "snaps",
    )
    for step in range(1, 21):
        _drift(model, step)
        ema.step(model)
    found = find_snapshots(tmp_path / "snaps")
    assert sorted({s.time for s in found}) == [5.0, 10.0, 15.0, 20.0]
    assert len(reconstruct(found, sigma_rel=0.07)) == 2
    with pytest.raises(ValueError, match="needs snapshot_folder"):
        EMA(model, sigma_rel=0.1, snapshot_every="5ba")
    with pytest.raises(ValueError, match="only used with snapshot_every"):
        EMA(model, sigma_rel=0.1, snapshot_folder=tmp_path)
