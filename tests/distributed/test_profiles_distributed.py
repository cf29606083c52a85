"""Several averages (three EMA profiles, BEMA and uniform, in one fused update) under DDP and FSDP2 on 2 CPU processes
(torchrun, gloo): every profile's EMA, on each rank's shards and gathered, equals a
single-process run's; updates and evaluation swaps of every profile make no collective call."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.process_group import torchrun

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

WORKER = Path(__file__).with_name("profiles_worker.py")


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    out = tmp_path_factory.mktemp("profiles")
    torchrun(WORKER, out, timeout=300)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.mark.parametrize("kind", ["ddp", "fsdp2"])
def test_every_profile_equals_a_single_process_run(results: list[dict], kind: str) -> None:
    for r in results:
        got = r[kind]
        assert got["profiles"] == ["ema_4ba", "ema_8ba", "ema_sigma_rel0.1", "bema", "swa"]
        assert got["num_updates"] == {
            "ema_4ba": 9,
            "ema_8ba": 4,
            "ema_sigma_rel0.1": 9,
            "bema": 9,
            "swa": 7,  # steps 3..10: the copy at 3, then 7 updates
        }
        for name in got["profiles"]:
            assert got["ema_diff"][name] < 1e-6, name  # gathered whole
            assert got["shard_diff"][name] < 1e-6, name  # this rank's own shard
            assert got["eval_diff"][name] < 1e-5, name  # what evaluation saw


@pytest.mark.parametrize("kind", ["ddp", "fsdp2"])
def test_no_collectives_per_update_or_swap(results: list[dict], kind: str) -> None:
    for r in results:
        assert r["counter_sees_all_reduce"] > 0  # the counter works for c10d collectives
        assert r[kind]["collectives"] == {"update": 0, "swap": 0}


def test_fsdp2_profiles_hold_only_their_shards(results: list[dict]) -> None:
    assert results[0]["fsdp2"]["sharded"] and not results[0]["ddp"]["sharded"]
    for name in results[0]["fsdp2"]["profiles"]:
        per_rank = [r["fsdp2"]["nbytes"][name][0] for r in results]
        whole = results[0]["fsdp2"]["nbytes"][name][1]
        assert sum(per_rank) == whole  # the shards add up to one EMA, none held twice
        assert max(per_rank) <= 0.55 * whole
        assert all(r["ddp"]["nbytes"][name] == [whole, whole] for r in results)  # replicated
