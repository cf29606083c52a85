"""Composer shards the model with FSDP2 (2 CPU processes, torchrun, gloo); this library's EMA
keeps shard-local averages with no collectives and evaluates on them.

Marked ``slow`` only, not ``distributed``: the Composer suite runs with ``-m "not distributed"``
and this is its only FSDP2 check. No comparison with an unsharded run: on torch 2.7, FSDP2 over
gloo sums the gradients instead of averaging them; the reference EMA is computed from the
gathered training weights of this very run instead (see composer_fsdp2_run.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.process_group import torchrun

pytestmark = [pytest.mark.slow]

WORKER = Path(__file__).with_name("composer_fsdp2_run.py")
BATCHES = 8


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    out = tmp_path_factory.mktemp("composer_fsdp2")
    torchrun(WORKER, out, timeout=180)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


def test_composer_shards_the_model_and_the_shadow_holds_local_shards(
    results: list[dict],
) -> None:
    for r in results:
        assert r["world"] == 2 and r["sharded"]
        assert r["dtensor_params"] == 4  # every weight is a DTensor: Composer applied FSDP2
        assert r["ema_bytes"] == 4 * r["local_numel"]  # float32 shadow of the local shard only
        assert r["ema_bytes"] <= 0.6 * 4 * r["full_numel"]  # ~half (33 rows split 17 + 16)
    assert sum(r["ema_bytes"] for r in results) == 4 * results[0]["full_numel"]


def test_ema_of_the_shards_equals_the_reference_every_batch(results: list[dict]) -> None:
    for r in results:
        assert r["num_updates"] == BATCHES - 1  # started at the first batch, then every batch
        assert len(r["ema_diffs"]) == len(r["local_diffs"]) == BATCHES
        assert max(r["ema_diffs"]) < 1e-6
        assert max(r["local_diffs"]) < 1e-6


def test_the_algorithm_makes_no_collective_calls(results: list[dict]) -> None:
    for r in results:
        c = r["collectives"]
        assert c["batch_end_applies"] == BATCHES and c["applies"] > BATCHES
        assert c["comm_debug"] == 0  # CommDebugMode around every apply (update, eval swaps)
        assert c["wrapped"] == 0  # torch.distributed's collectives, wrapped and counted
        assert r["export_collectives"] > 0  # the counter does see the export's gathers


def test_eval_runs_on_the_ema_and_training_resumes_on_its_weights(results: list[dict]) -> None:
    for r in results:
        assert len(r["eval_diffs"]) == 4  # eval at 4ba and 8ba, 2 batches each
        assert max(r["eval_diffs"]) < 1e-6
        assert len(r["after_eval_diffs"]) == 2
        assert max(r["after_eval_diffs"]) == 0.0
