"""BEMA, uniform (SWA) averaging and ``update_bn_batches`` through the real Composer ``Trainer``:
each average against a float64 reference built from the training weights recorded after every
batch, evaluation on the average, several averages as profiles, BatchNorm statistics against
``torch.optim.swa_utils.update_bn``, stop-and-resume from a Composer checkpoint."""

from __future__ import annotations

import copy
import os
from typing import Any

import pytest
import torch
from composer import Callback
from composer.core import State
from composer.loggers import InMemoryLogger, Logger
from composer_runs import EMA, Recorder, make_loader, make_model, model_tensors, run
from torch import nn
from torch.optim.swa_utils import update_bn as swa_update_bn

from ema_callbacks.weights import normalize_name
from tests.averager_reference import BEMA_DEFAULTS, ReferenceBEMA, ReferenceUniform, due

pytestmark = [
    pytest.mark.composer,
    # Resuming at an epoch's last batch replays the epoch end over an empty remainder.
    pytest.mark.filterwarnings("ignore:No batches were trained:UserWarning"),
    pytest.mark.filterwarnings("ignore:The ``compute`` method of metric:UserWarning"),
]

N = 12
Tensors = dict[str, torch.Tensor]
BN = ("1.running_mean", "1.running_var")  # the BatchNorm1d statistics, by normalised name


# -- comparisons and the BatchNorm reference ---------------------------------------------------


def assert_close(got: Tensors | None, expected: Tensors, where: Any = "") -> None:
    assert got is not None, where
    assert sorted(got) == sorted(expected), where
    for k, v in expected.items():
        g = got[k].double()
        assert torch.allclose(g, v, rtol=1e-5, atol=1e-6), (where, k, (g - v).abs().max().item())


def same(a: Tensors | None, b: Tensors | None) -> bool:
    assert a is not None and b is not None
    return sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


def parameters_of(tensors: Tensors) -> Tensors:
    """The learnable tensors (not the BatchNorm statistics)."""
    return {k: v for k, v in tensors.items() if k not in BN}


def bn_reference(parameters: Tensors, batches: int) -> Tensors:
    """``swa_utils.update_bn`` over the first ``batches`` training batches (composer_runs' train
    loader, seed 0, in order) on a copy of the network holding ``parameters``."""
    model = copy.deepcopy(make_model(5))
    state = model.state_dict()
    model.load_state_dict(
        {k: parameters.get(normalize_name(k), v) for k, v in state.items()}, strict=True
    )
    # The adapter feeds ``composer_model((x, y))``, which calls the inner network on x.
    loader = [x for i, (x, _) in enumerate(make_loader(0)) if i < batches]
    swa_update_bn(loader, model.module)
    return {k: v for k, v in model_tensors(model).items() if k in BN}


# -- recorders ---------------------------------------------------------------------------------


class Extra(Callback):
    """At every BATCH_END (after the algorithm ran): the primary average's extra buffers (BEMA's
    running EMA and theta0); at every BATCH_START: the global RNG state."""

    def __init__(self, algo: EMA) -> None:
        self.algo = algo
        self.extra: list[dict[str, Tensors]] = []
        self.rng: list[torch.Tensor] = []

    def batch_start(self, state: State, logger: Logger) -> None:
        self.rng.append(torch.random.get_rng_state())

    def batch_end(self, state: State, logger: Logger) -> None:
        weights = self.algo.controller.weights
        extra = {} if weights is None else weights.extra_state_dict()
        self.extra.append({b: {n: t.clone() for n, t in d.items()} for b, d in extra.items()})


class Profiles(Callback):
    """Every started profile's evaluated weights at each BATCH_END and EVAL_START, and the eval
    metric values at each EVAL_END."""

    def __init__(self, algo: EMA) -> None:
        self.algo = algo
        self.ema: list[dict[str, Tensors]] = []
        self.eval_ema: list[dict[str, Tensors]] = []
        self.eval_values: list[dict[str, float]] = []

    def _shadows(self) -> dict[str, Tensors]:
        return {
            p.name: {
                k: v.clone() for k, v in p.weights.state_dict().items() if v.is_floating_point()
            }
            for p in self.algo.controller.profiles
            if p.started and p.weights is not None
        }

    def batch_end(self, state: State, logger: Logger) -> None:
        self.ema.append(self._shadows())

    def eval_start(self, state: State, logger: Logger) -> None:
        self.eval_ema.append(self._shadows())

    def eval_end(self, state: State, logger: Logger) -> None:
        self.eval_values.append({k: float(v) for k, v in state.eval_metric_values.items()})


def evaluate(weights: Tensors) -> float:
    """composer_runs' evaluation by hand: ``weights`` in a fresh model, its CrossEntropy over
    ``run``'s eval loader (seed + 1, two batches)."""
    model = make_model(7)
    state = model.state_dict()
    model.load_state_dict({k: weights.get(normalize_name(k), v) for k, v in state.items()})
    model.eval()
    metric = copy.deepcopy(model.get_metrics(is_train=False)["CrossEntropy"])
    with torch.no_grad():
        for batch in make_loader(1, 2):
            model.update_metric(batch, model.eval_forward(batch), metric)
    return float(metric.compute())


# -- (1) BEMA ----------------------------------------------------------------------------------

_RUNS: dict[tuple[tuple[str, Any], ...], tuple[EMA, Recorder, Extra]] = {}


def bema_run(options: dict[str, Any]) -> tuple[EMA, Recorder, Extra]:
    """An uninterrupted 12-batch run with ``EMA(**options)``, evaluated every 3 batches (shared
    by the reference and the resume tests)."""
    key = tuple(sorted(options.items()))
    if key not in _RUNS:
        algo = EMA(**options)
        extra = Extra(algo)
        _, rec = run(algo, f"{N}ba", callbacks=[extra])
        _RUNS[key] = (algo, rec, extra)
    return _RUNS[key]


BEMA_RUNS = [
    ({"ema_power": 0.5, "update_interval": "1ba"}, 1, 0),
    ({"ema_power": 0.5, "update_interval": "2ba", "ema_start": "1ba"}, 2, 1),
    (
        {
            "ema_power": 0.7,
            "bias_power": 0.4,
            "lag": 3,
            "multiplier": 2.0,
            "update_interval": "1ba",
        },
        1,
        0,
    ),
    ({"lag": 4, "min_ema_multiplier": 0.3, "update_interval": "2ba", "ema_start": "1ba"}, 2, 1),
]


@pytest.mark.parametrize(
    ("options", "interval", "start"),
    BEMA_RUNS,
    ids=[",".join(f"{k}={v}" for k, v in o.items()) for o, _, _ in BEMA_RUNS],
)
def test_bema_matches_a_float64_reference_and_is_evaluated(
    options: dict[str, Any], interval: int, start: int
) -> None:
    algo, rec, _ = bema_run(options)
    names = algo.controller.names  # 'bema', or with the non-default options in the name
    assert len(names) == 1 and names[0].startswith("bema")
    bema = {k: v for k, v in options.items() if k in BEMA_DEFAULTS}
    ref = ReferenceBEMA(**bema)
    for step in range(1, N + 1):
        if due(step, interval, start):
            ref.update(step, rec.training[step - 1])
        if ref.s0 is None:
            assert rec.ema[step - 1] is None, step
        else:
            assert_close(rec.ema[step - 1], ref.evaluated, step)
    assert ref.s0 == interval  # 1ba: step 1; 2ba from 1ba: step 2
    # After fit: the primary shadow, and the model holds it (final_weights='ema').
    shadow = {k: v for k, v in algo.controller.weights.shadow.items() if v.is_floating_point()}
    assert_close(shadow, ref.evaluated, "after fit")
    assert same(model_tensors(algo.controller.weights.bound_model), shadow)
    # Bias correction matters here: the evaluated weights are not the running EMA.
    running = algo.controller.weights.extra_state_dict()["ema"]
    assert_close({k: running[k] for k in ref.ema}, ref.ema, "running EMA")
    assert any(not torch.allclose(running[k].double(), shadow[k].double()) for k in ref.ema)
    # Evaluation (every 3 batches) ran on the evaluated weights of that moment.
    assert len(rec.eval_weights) == N // 3
    for i, batch in enumerate(range(3, N + 1, 3)):
        assert same(rec.eval_weights[i], rec.ema[batch - 1]), batch
        assert not same(rec.eval_weights[i], rec.training[batch - 1]), batch
        assert rec.eval_metrics[i] == evaluate(rec.ema[batch - 1]), batch  # type: ignore[arg-type]


# -- (2) uniform (SWA) -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "interval", "start"),
    [({}, 1, 0), ({"update_interval": "2ba", "ema_start": "3ba"}, 2, 3)],
    ids=["every-batch", "2ba-from-3ba"],
)
def test_uniform_is_the_mean_of_the_weights_at_the_due_steps(
    options: dict[str, Any], interval: int, start: int
) -> None:
    algo = EMA(uniform=True, **options)
    assert algo.controller.names == ["uniform"]
    _, rec = run(algo, f"{N}ba")
    ref = ReferenceUniform()
    steps = []
    for step in range(1, N + 1):
        if due(step, interval, start):
            ref.update(step, rec.training[step - 1])
            steps.append(step)
        if ref.seen:
            assert_close(rec.ema[step - 1], ref.evaluated, step)
        else:
            assert rec.ema[step - 1] is None, step
    assert steps == (list(range(1, N + 1)) if interval == 1 else [3, 4, 6, 8, 10, 12])
    shadow = {k: v for k, v in algo.controller.weights.shadow.items() if v.is_floating_point()}
    assert_close(shadow, ref.evaluated, "after fit")
    for i, batch in enumerate(range(3, N + 1, 3)):
        assert same(rec.eval_weights[i], rec.ema[batch - 1]), batch


# -- (3) update_bn_batches ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def bn_runs() -> dict[str, Any]:
    """The same uniform run with and without ``update_bn_batches=2``, evaluated every 3
    batches."""
    out: dict[str, Any] = {}
    for key, extra in (("bn", {"update_bn_batches": 2}), ("plain", {})):
        algo = EMA(uniform=True, final_weights="ema", **extra)
        extra_rec = Extra(algo)
        trainer, rec = run(algo, f"{N}ba", callbacks=[extra_rec])
        out[key] = {"algo": algo, "trainer": trainer, "rec": rec, "extra": extra_rec}
    return out


def test_update_bn_after_fit_matches_swa_utils(bn_runs: dict[str, Any]) -> None:
    bn, plain = bn_runs["bn"], bn_runs["plain"]
    final = model_tensors(bn["trainer"].state.model)  # the EMA, statistics recomputed
    averaged = model_tensors(plain["trainer"].state.model)  # the EMA, statistics averaged
    # The same average of the parameters; the statistics are those of update_bn over the first
    # two training batches on a copy holding the average.
    assert same(parameters_of(final), parameters_of(averaged))
    expected = bn_reference(parameters_of(final), batches=2)
    for k in BN:
        got = final[k]
        assert torch.allclose(got, expected[k], rtol=1e-6, atol=1e-6), (k, got - expected[k])
        assert not torch.allclose(got, averaged[k], rtol=1e-4, atol=1e-4), k
        assert not torch.allclose(got, bn["rec"].training[-1][k], rtol=1e-4, atol=1e-4), k
    # Two batches, not the whole training set (four).
    four = bn_reference(parameters_of(final), batches=4)
    assert not torch.allclose(final["1.running_var"], four["1.running_var"], atol=1e-4)
    # The average itself holds the recomputed statistics.
    shadow = bn["algo"].controller.weights.shadow
    for k in BN:
        assert torch.equal(shadow[k], final[k]), k


def test_update_bn_before_each_evaluation(bn_runs: dict[str, Any]) -> None:
    rec: Recorder = bn_runs["bn"]["rec"]
    plain: Recorder = bn_runs["plain"]["rec"]
    assert len(rec.eval_weights) == N // 3
    for i, batch in enumerate(range(3, N + 1, 3)):
        weights = rec.eval_weights[i]
        # The average of the parameters at that batch, statistics recomputed for it.
        assert same(parameters_of(weights), parameters_of(plain.eval_weights[i])), batch
        expected = bn_reference(parameters_of(weights), batches=2)
        for k in BN:
            assert torch.allclose(weights[k], expected[k], rtol=1e-6, atol=1e-6), (batch, k)
    # Different statistics, different metrics than the run with averaged statistics.
    assert rec.eval_metrics != plain.eval_metrics


def test_update_bn_leaves_training_bit_identical(bn_runs: dict[str, Any]) -> None:
    bn, plain = bn_runs["bn"], bn_runs["plain"]
    assert len(bn["rec"].training) == len(plain["rec"].training) == N
    for i in range(N):
        # Training weights, their own BatchNorm statistics included.
        assert same(bn["rec"].training[i], plain["rec"].training[i]), f"batch {i + 1}"
    # The recomputation's loader kept the global RNG state.
    assert len(bn["extra"].rng) == len(plain["extra"].rng) == N
    for i, (a, b) in enumerate(zip(bn["extra"].rng, plain["extra"].rng, strict=True)):
        assert torch.equal(a, b), f"RNG state at batch {i + 1}"
    # fit left the EMA in; the training weights are still there to swap back.
    model = bn["trainer"].state.model
    assert same(model_tensors(bn["algo"].get_training_model(model)), bn["rec"].training[-1])


def test_update_bn_needs_buffers() -> None:
    with pytest.raises(ValueError, match="buffers") as info:
        EMA(uniform=True, buffers="ignore", update_bn_batches=2)
    assert "update_bn_batches" in str(info.value)
    with pytest.raises(ValueError, match="update_bn_batches"):
        EMA(ema_power=0.5, update_bn_batches=0)


def test_update_bn_needs_batchnorm() -> None:
    from composer.metrics import CrossEntropy
    from composer.models import ComposerClassifier

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    model = ComposerClassifier(net, num_classes=3, val_metrics=CrossEntropy())
    with pytest.raises(ValueError, match="BatchNorm"):
        run(EMA(uniform=True, update_bn_batches=2), "2ba", model=model)


# -- (4) several profiles ----------------------------------------------------------------------

PROFILES = [
    {"name": "bema", "ema_power": 0.5},
    {"name": "swa", "uniform": True},
    {"half_life": "4ba"},
]
NAMES = ["bema", "swa", "ema_4ba"]


def test_profiles_are_evaluated_and_logged_under_their_names() -> None:
    algo = EMA(profiles=PROFILES)
    assert algo.controller.names == NAMES
    logger = InMemoryLogger()
    profiles = Profiles(algo)
    trainer, rec = run(algo, f"{N}ba", callbacks=[profiles], loggers=[logger])
    metrics = trainer.state.eval_metrics["eval"]
    assert sorted(metrics) == sorted(["CrossEntropy", *(f"{n}/CrossEntropy" for n in NAMES)])
    keys = {k for k in logger.data if k.startswith("metrics/eval/")}
    assert keys == {"metrics/eval/CrossEntropy"} | {f"metrics/eval/{n}/CrossEntropy" for n in NAMES}
    evals = list(range(3, N + 1, 3))
    assert len(profiles.eval_values) == len(evals)
    for i, batch in enumerate(evals):
        values = profiles.eval_values[i]
        # The trainer's own metric: the training weights'.
        assert same(rec.eval_weights[i], rec.training[batch - 1]), batch
        assert values["CrossEntropy"] == evaluate(rec.training[batch - 1]), batch
        for name in NAMES:
            shadow = profiles.eval_ema[i][name]
            assert same(shadow, profiles.ema[batch - 1][name]), (batch, name)
            assert values[f"{name}/CrossEntropy"] == evaluate(shadow), (batch, name)
            series = logger.data[f"metrics/eval/{name}/CrossEntropy"]
            logged = [float(v) for ts, v in series if int(ts.batch) == batch]
            assert logged == [values[f"{name}/CrossEntropy"]], (batch, name)
        assert len({values[f"{n}/CrossEntropy"] for n in NAMES} | {values["CrossEntropy"]}) == 4
    # Each profile is the average a single-profile run computes; training untouched by the
    # profiles' evaluations.
    for name, single in (("bema", {"ema_power": 0.5}), ("swa", {"uniform": True})):
        alone = EMA(**single)
        _, rec_alone = run(alone, f"{N}ba", eval_interval=None)
        for i in range(N):
            assert same(rec_alone.ema[i], profiles.ema[i][name]), (name, i + 1)
            assert same(rec_alone.training[i], rec.training[i]), (name, i + 1)
    # And the BEMA profile is BEMA, the SWA profile the mean.
    bema, swa = ReferenceBEMA(), ReferenceUniform()
    for step in range(1, N + 1):
        bema.update(step, rec.training[step - 1])
        swa.update(step, rec.training[step - 1])
    assert_close(profiles.ema[-1]["bema"], bema.evaluated, "bema")
    assert_close(profiles.ema[-1]["swa"], swa.evaluated, "swa")


# -- (5) stop and resume -----------------------------------------------------------------------

RESUMES = [
    ({"ema_power": 0.5, "update_interval": "1ba"}, 5),  # mid-epoch, after the evaluation at 3
    ({"ema_power": 0.5, "update_interval": "1ba"}, 8),  # an epoch boundary
    # between two updates, mid-epoch
    ({"ema_power": 0.5, "update_interval": "2ba", "ema_start": "1ba"}, 7),
]


@pytest.mark.slow
@pytest.mark.parametrize(("options", "k"), RESUMES, ids=[f"{','.join(o)}-{k}" for o, k in RESUMES])
def test_bema_resume_is_bit_identical(options: dict[str, Any], k: int, tmp_path: Any) -> None:
    def go(max_duration: str, **kw: Any) -> tuple[Recorder, Extra]:
        algo = EMA(**options)
        extra = Extra(algo)
        _, rec = run(algo, max_duration, callbacks=[extra], **kw)
        return rec, extra

    _, full, full_extra = bema_run(options)
    go(
        f"{k}ba",
        save_folder=str(tmp_path),
        save_interval=f"{k}ba",
        save_filename="ba{batch}.pt",
    )
    path = os.path.join(tmp_path, f"ba{k}.pt")
    assert os.path.exists(path)
    rec, extra = go(f"{N}ba", load_path=path)
    assert len(rec.ema) == N - k
    for i in range(k, N):
        j = i - k
        assert same(rec.training[j], full.training[i]), f"training weights, batch {i + 1}"
        assert same(rec.ema[j], full.ema[i]), f"evaluated BEMA, batch {i + 1}"
        assert sorted(extra.extra[j]) == ["ema", "theta0"]
        for buffer in ("ema", "theta0"):
            assert same(extra.extra[j][buffer], full_extra.extra[i][buffer]), (buffer, i + 1)
    # The evaluations after the resume saw the same BEMA and computed the same metrics.
    n = len(rec.eval_metrics)
    assert n >= 1 and rec.eval_metrics == full.eval_metrics[-n:]
