"""Tied and shared tensors (``head.weight = emb.weight``): averaged once, written under every
name, in the plain loop, ``EMAWeights`` and the controller's state."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from ema_callbacks import EMA
from ema_callbacks.weights import EMAWeights, expand_aliases

VOCAB, DIM = 11, 4


class TiedLM(nn.Module):
    """An embedding/head pair sharing one weight, as most language models have."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, DIM)
        self.mid = nn.Linear(DIM, DIM)
        self.head = nn.Linear(DIM, VOCAB, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.mid(self.emb(ids))))


def _train(model: nn.Module, ema: EMA | None, steps: int = 4) -> list[torch.Tensor]:
    """SGD steps on a fixed batch; returns the tied weight after each step."""
    torch.manual_seed(1)
    ids = torch.randint(0, VOCAB, (8, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    seen = []
    for _ in range(steps):
        loss = nn.functional.cross_entropy(model(ids).reshape(-1, VOCAB), ids.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        seen.append(model.emb.weight.detach().clone())
        if ema is not None:
            ema.step(model)
    return seen


def _reference(seen: list[torch.Tensor], half_life: float) -> torch.Tensor:
    """The EMA of one tensor by hand: initialised at the first step, then averaged."""
    beta = 2 ** (-1 / half_life)
    ref = seen[0].clone()
    for value in seen[1:]:
        ref = beta * ref + (1 - beta) * value
    return ref


def test_a_tied_tensor_is_one_shadow_with_its_other_names_recorded() -> None:
    weights = EMAWeights(TiedLM())
    assert weights.names == ["emb.weight", "mid.bias", "mid.weight"]
    assert weights.aliases == {"head.weight": "emb.weight"}
    assert len(weights.shadow) == 3
    assert weights.state_dict(aliases=True)["head.weight"] is weights.shadow["emb.weight"]
    assert EMAWeights(nn.Linear(2, 2)).aliases == {}


def test_a_module_registered_twice_has_aliases_for_its_tensors() -> None:
    shared = nn.BatchNorm1d(3)
    model = nn.Module()
    model.a = shared
    model.b = shared
    weights = EMAWeights(model)
    names = ["bias", "num_batches_tracked", "running_mean", "running_var", "weight"]
    assert weights.names == [f"a.{n}" for n in names]
    assert weights.aliases == {f"b.{n}": f"a.{n}" for n in names}


def test_the_tied_ema_matches_a_hand_computed_average_under_every_name() -> None:
    model = TiedLM()
    ema = EMA(model, half_life="2ba")
    seen = _train(model, ema)
    expected = _reference(seen, 2.0)
    torch.testing.assert_close(ema.shadow["emb.weight"], expected)
    with ema.swapped(model):
        state = model.state_dict()
        torch.testing.assert_close(state["emb.weight"], expected)
        torch.testing.assert_close(state["head.weight"], expected)
        ids = torch.tensor([[1, 2, 3]])
        swapped_out = model(ids)
    torch.testing.assert_close(model.head.weight.detach(), seen[-1])
    torch.testing.assert_close(ema.functional_call(model, ids), swapped_out)
    tensors = ema.controller.weights.tensors_for(model)  # type: ignore[union-attr]
    assert tensors["head.weight"] is tensors["emb.weight"]


def test_copy_to_and_state_dict_load_strictly_into_a_fresh_tied_model() -> None:
    model = TiedLM()
    ema = EMA(model, half_life="2ba")
    seen = _train(model, ema)
    expected = _reference(seen, 2.0)
    weights = ema.controller.weights
    assert weights is not None
    # The EMA's tensors under every name: a strict load into the bare tied model.
    fresh = TiedLM()
    shadow = weights.state_dict(aliases=True)
    assert sorted(shadow) == sorted(fresh.state_dict())
    fresh.load_state_dict(shadow, strict=True)
    torch.testing.assert_close(fresh.head.weight.detach(), expected)
    # copy_to: the model itself, then a strict load of its state_dict elsewhere.
    ema.copy_to(model)
    torch.testing.assert_close(model.head.weight.detach(), expected)
    torch.testing.assert_close(model.emb.weight.detach(), expected)
    other = TiedLM()
    other.load_state_dict(model.state_dict(), strict=True)
    torch.testing.assert_close(other.head.weight.detach(), expected)


def test_the_state_records_aliases_and_round_trips() -> None:
    model = TiedLM()
    ema = EMA(model, half_life="2ba")
    _train(model, ema)
    state = ema.state_dict()
    assert state["aliases"] == {"head.weight": "emb.weight"}
    assert sorted(state["shadow"]) == ["emb.weight", "mid.bias", "mid.weight"]
    restored = EMA(copy.deepcopy(model), half_life="2ba")
    restored.load_state_dict(state)
    torch.testing.assert_close(restored.shadow["emb.weight"], ema.shadow["emb.weight"])
    # A state written before aliases existed (no key) still loads.
    old = {k: v for k, v in state.items() if k != "aliases"}
    EMA(copy.deepcopy(model), half_life="2ba").load_state_dict(old)
    # Untied models have no aliases key at all.
    assert "aliases" not in EMA(nn.Linear(2, 2), half_life="2ba").state_dict()


def test_shadow_loads_accept_every_name_of_a_tied_tensor() -> None:
    model = TiedLM()
    weights = EMAWeights(model)
    with torch.no_grad():
        model.emb.weight.add_(1.0)
    other = EMAWeights(copy.deepcopy(model))
    other.load_state_dict(weights.state_dict(aliases=True))  # strict: aliases are not extras
    torch.testing.assert_close(other.shadow["emb.weight"], weights.shadow["emb.weight"])
    # Only the alias given: it stands for the tracked name.
    only_alias = {k: v for k, v in weights.state_dict(aliases=True).items() if k != "emb.weight"}
    other.load_state_dict({**only_alias, "head.weight": torch.zeros(VOCAB, DIM)})
    assert float(other.shadow["emb.weight"].abs().sum()) == 0.0
    with pytest.raises(ValueError, match="unexpected \\['nope'\\]"):
        other.load_state_dict({**weights.state_dict(), "nope": torch.zeros(1)})


def test_expand_aliases_adds_every_name_once() -> None:
    t = torch.zeros(2)
    out = expand_aliases({"a": t}, {"b": "a", "c": "a", "d": "absent"})
    assert sorted(out) == ["a", "b", "c"]
    assert out["b"] is t and out["c"] is t
