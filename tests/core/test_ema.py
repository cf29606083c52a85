"""The plain-loop API, tested by full simulated trainings against a hand-written reference."""

from __future__ import annotations

import io
import math

import pytest
import torch
from torch import nn

from ema_callbacks import EMA


def make(seed: int = 0) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))
    return model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)


def batches(
    n: int, seed: int = 1, sizes: list[int] | None = None
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        size = sizes[i % len(sizes)] if sizes else 8
        out.append(
            (torch.randn(size, 6, generator=gen), torch.randint(0, 3, (size,), generator=gen))
        )
    return out


def train_step(
    model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor
) -> None:
    loss = nn.functional.cross_entropy(model(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()


class ReferenceEMA:
    """The textbook loop, written out: copy at the first update, then e = b*e + (1-b)*p in
    float64; integer buffers copied."""

    def __init__(self) -> None:
        self.values: dict[str, torch.Tensor] | None = None

    def update(self, model: nn.Module, beta: float) -> None:
        state = model.state_dict()
        if self.values is None:
            self.values = {k: v.detach().double().clone() for k, v in state.items()}
            return
        for k, v in state.items():
            if not v.is_floating_point():
                self.values[k] = v.double().clone()
            else:
                self.values[k] = beta * self.values[k] + (1 - beta) * v.double()


def assert_close(ema: EMA, ref: ReferenceEMA) -> None:
    assert ref.values is not None
    assert set(ema.shadow) == set(ref.values)
    for k, v in ref.values.items():
        assert torch.allclose(ema.shadow[k].double(), v, rtol=1e-5, atol=1e-6), k


def test_every_step_matches_reference() -> None:
    model, opt = make()
    ema = EMA(model, half_life="5ba")
    ref = ReferenceEMA()
    beta = 2 ** (-1 / 5)
    for x, y in batches(30):
        train_step(model, opt, x, y)
        assert ema.step(model)
        ref.update(model, beta)
    assert ema.num_updates == 29
    assert ema.smoothing == pytest.approx(beta)
    assert_close(ema, ref)


def test_interval_start_and_epochs_match_reference() -> None:
    model, opt = make()
    ema = EMA(model, half_life="20ba", update_interval="3ba", start="6ba")
    ref = ReferenceEMA()
    step = 0
    for _epoch in range(3):
        for x, y in batches(10):
            train_step(model, opt, x, y)
            step += 1
            ema.step(model)
            if step >= 6 and step % 3 == 0:
                ref.update(model, 2 ** (-3 / 20))
        ema.end_epoch(model)
    assert_close(ema, ref)


def test_epoch_half_life_updates_at_epoch_end() -> None:
    model, opt = make()
    ema = EMA(model, half_life="2ep")
    ref = ReferenceEMA()
    for _epoch in range(4):
        for x, y in batches(5):
            train_step(model, opt, x, y)
            assert not ema.step(model)
        assert ema.end_epoch(model)
        ref.update(model, 2 ** (-1 / 2))
    assert ema.num_updates == 3
    assert_close(ema, ref)


def test_fractional_epoch_interval_with_steps_per_epoch() -> None:
    model, opt = make()
    ema = EMA(model, half_life="1ep", update_interval="0.5ep", steps_per_epoch=4)
    updated = []
    for _epoch in range(2):
        for x, y in batches(4):
            train_step(model, opt, x, y)
            updated.append(ema.step(model))
        ema.end_epoch(model)
    assert updated == [False, True, False, True, False, True, False, True]
    assert ema.smoothing == pytest.approx(2 ** (-0.5))


def test_half_life_in_samples_with_variable_batch_sizes() -> None:
    model, opt = make()
    sizes = [8, 3, 16, 5]
    data = batches(12, sizes=sizes)
    ema = EMA(model, half_life="40sp")
    ref = ReferenceEMA()
    for x, y in data:
        train_step(model, opt, x, y)
        ema.step(model, samples=len(x))
        ref.update(model, 2 ** (-len(x) / 40))
    assert_close(ema, ref)


def test_tokens_required_when_counting_tokens() -> None:
    model, _ = make()
    ema = EMA(model, half_life="1e4tok")
    with pytest.raises(ValueError, match="pass tokens="):
        ema.step(model)
    ema.step(model, tokens=torch.tensor(512))
    with pytest.raises(ValueError, match="tokens must be a non-negative integer; got -1"):
        EMA(model, half_life="1e4tok").step(model, tokens=-1)


def test_duration_half_life_needs_max_duration() -> None:
    model, opt = make()
    with pytest.raises(ValueError, match="max_duration"):
        EMA(model, half_life="0.1dur")
    ema = EMA(model, half_life="0.1dur", max_duration="50ba")
    for x, y in batches(3):
        train_step(model, opt, x, y)
        ema.step(model)
    # 1 of 50 batches per update = 0.02 dur; half-life 0.1 dur
    assert ema.smoothing == pytest.approx(2 ** (-0.02 / 0.1))


def test_swapped_evaluates_ema_and_restores() -> None:
    model, opt = make()
    ema = EMA(model, half_life="3ba")
    for x, y in batches(10):
        train_step(model, opt, x, y)
        ema.step(model)
    model.eval()
    x = torch.randn(4, 6)
    raw = model(x)
    with ema.swapped(model):
        averaged = model(x)
    assert not torch.allclose(raw, averaged)
    assert torch.equal(model(x), raw)
    assert torch.equal(ema.functional_call(model, x), averaged)


def test_swapped_before_start_keeps_training_weights() -> None:
    model, opt = make()
    ema = EMA(model, half_life="3ba", start="100ba")
    x, y = batches(1)[0]
    train_step(model, opt, x, y)
    ema.step(model)
    model.eval()
    out = model(x)
    with ema.swapped(model):
        assert torch.equal(model(x), out)  # not started: nothing to swap in
    assert not ema.started


def test_copy_to() -> None:
    model, opt = make()
    ema = EMA(model, smoothing=0.5)
    for x, y in batches(4):
        train_step(model, opt, x, y)
        ema.step()
    ema.copy_to(model)
    for k, v in model.state_dict().items():
        assert torch.equal(v.to(ema.shadow[k].dtype), ema.shadow[k])


@pytest.mark.parametrize("stop_at", [1, 7, 13])
def test_stop_and_resume_is_bit_identical(stop_at: int) -> None:
    data = batches(20, sizes=[8, 5])

    def fresh() -> tuple[nn.Module, torch.optim.Optimizer, EMA]:
        model, opt = make()
        return model, opt, EMA(model, half_life="4ba", warmup="tf", update_interval="2ba")

    model, opt, ema = fresh()
    for x, y in data:
        train_step(model, opt, x, y)
        ema.step(model)
    expected_ema = {k: v.clone() for k, v in ema.shadow.items()}
    expected_model = {k: v.clone() for k, v in model.state_dict().items()}

    model, opt, ema = fresh()
    for x, y in data[:stop_at]:
        train_step(model, opt, x, y)
        ema.step(model)
    buffer = io.BytesIO()
    torch.save(
        {"model": model.state_dict(), "opt": opt.state_dict(), "ema": ema.state_dict()}, buffer
    )
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)

    model, opt, ema = fresh()
    model.load_state_dict(saved["model"])
    opt.load_state_dict(saved["opt"])
    ema.load_state_dict(saved["ema"])
    for x, y in data[stop_at:]:
        train_step(model, opt, x, y)
        ema.step(model)
    for k, v in expected_ema.items():
        assert torch.equal(ema.shadow[k], v), k
    for k, v in expected_model.items():
        assert torch.equal(model.state_dict()[k], v), k


def test_state_dict_is_versioned_and_checks_names() -> None:
    model, _ = make()
    ema = EMA(model)
    state = ema.state_dict()
    assert state["format"] == "ema_callbacks" and state["version"] == 1
    assert state["config"]["schedule"]["half_life"] == "1000ba"
    other = EMA(nn.Linear(6, 3))
    with pytest.raises(ValueError, match="missing"):
        other.load_state_dict(state)
    with pytest.raises(ValueError, match="not an ema_callbacks EMA state"):
        other.load_state_dict({"shadow": {}})
    with pytest.raises(ValueError, match="newer"):
        other.load_state_dict({**state, "version": 99})


def test_nonfinite_update_skipped_counted_and_warned() -> None:
    model, opt = make()
    ema = EMA(model, half_life="2ba", nonfinite="skip")
    for x, y in batches(3):
        train_step(model, opt, x, y)
        ema.step(model)
    good = {k: v.clone() for k, v in ema.shadow.items()}
    with torch.no_grad():
        model[0].weight.fill_(math.inf)  # type: ignore[index]
    with pytest.warns(RuntimeWarning, match="NaN or Inf"):
        assert not ema.step(model)
    assert ema.num_skipped == 1
    for k, v in ema.shadow.items():
        assert torch.equal(v, good[k])


@pytest.mark.parametrize(
    ("kwargs", "error", "fragment"),
    [
        ({"half_life": "5 ba"}, ValueError, "half_life must not contain whitespace"),
        ({"half_life": None, "smoothing": 0.99, "sigma_rel": 0.1}, ValueError, "exactly one"),
        ({"buffers": "avg"}, ValueError, "buffers must be one of"),
        ({"steps_per_epoch": 0}, ValueError, "steps_per_epoch must be positive"),
        ({"steps_per_epoch": 2.5}, ValueError, "steps_per_epoch must be a non-negative integer"),
        ({"max_duration": "0.5dur"}, ValueError, "max_duration must be in"),
        ({"trainable_only": "yes"}, TypeError, "trainable_only must be True or False"),
        ({"dtype": "fp8"}, ValueError, "dtype must be one of"),
    ],
)
def test_bad_arguments(kwargs: dict, error: type[Exception], fragment: str) -> None:
    model, _ = make()
    with pytest.raises(error) as info:
        EMA(model, **kwargs)
    assert fragment in str(info.value)
    with pytest.raises(TypeError, match="torch.nn.Module"):
        EMA("model")  # type: ignore[arg-type]
