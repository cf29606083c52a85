"""The weights engine: update, buffers, filters, dtypes, swap, view, state, guard, names."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from ema_callbacks.weights import EMAWeights, NonFiniteWeightsError, normalize_name, unwrap_model


def net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))


def perturb(model: nn.Module, scale: float = 1.0) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * scale)
        model[1].running_mean.add_(1.0)  # type: ignore[index]
        model[1].num_batches_tracked.add_(3)  # type: ignore[index]


def test_update_matches_reference_formula() -> None:
    model = net()
    w = EMAWeights(model)
    ref = {k: v.clone().double() for k, v in w.shadow.items()}
    for _ in range(5):
        perturb(model)
        w.update_(0.1)
        live = dict(model.state_dict())
        for name in ref:
            if name.endswith("num_batches_tracked"):
                ref[name] = live[name].double()
            else:
                ref[name] = ref[name] + 0.1 * (live[name].double() - ref[name])
    for name, value in ref.items():
        assert torch.allclose(w.shadow[name].double(), value, rtol=1e-6, atol=1e-6), name


def test_integer_buffers_are_copied_not_averaged() -> None:
    model = net()
    w = EMAWeights(model, buffers="average")
    perturb(model)
    w.update_(0.5)
    nbt = w.shadow["1.num_batches_tracked"]
    assert nbt.dtype == torch.long
    assert int(nbt) == int(model[1].num_batches_tracked)  # type: ignore[index]
    # float buffers are averaged
    assert torch.allclose(w.shadow["1.running_mean"], model[1].running_mean - 0.5)  # type: ignore[index]


def test_buffer_policies() -> None:
    model = net()
    copy_w = EMAWeights(model, buffers="copy")
    ignore_w = EMAWeights(model, buffers="ignore")
    perturb(model)
    copy_w.update_(0.5)
    assert torch.equal(copy_w.shadow["1.running_mean"], model[1].running_mean)  # type: ignore[index]
    assert not any("running" in n or "num_batches" in n for n in ignore_w.names)
    with pytest.raises(ValueError, match="buffers must be one of"):
        EMAWeights(model, buffers="mean")


def test_include_exclude_and_frozen() -> None:
    model = net()
    model[0].weight.requires_grad_(False)  # type: ignore[index]
    w = EMAWeights(model)
    assert "0.weight" not in w.names and "0.bias" in w.names
    assert "0.weight" in EMAWeights(model, trainable_only=False).names
    only = EMAWeights(model, include=["3.*"], buffers="ignore")
    assert only.names == ["3.bias", "3.weight"]
    assert "3.bias" not in EMAWeights(model, exclude="*.bias").names
    with pytest.raises(ValueError, match="no weights to average"):
        EMAWeights(model, include="1.running_*", buffers="ignore")
    with pytest.raises(ValueError, match="include pattern 'nothing.*' matches no weight"):
        EMAWeights(model, include="nothing.*")
    with pytest.raises(TypeError, match="include must be a glob"):
        EMAWeights(model, include=3)  # type: ignore[arg-type]


def test_low_precision_gets_float32_shadow_that_keeps_moving() -> None:
    torch.manual_seed(0)
    model = nn.Linear(64, 64).to(torch.bfloat16)
    w32 = EMAWeights(model)
    w16 = EMAWeights(model, dtype="bfloat16")
    assert w32.shadow["weight"].dtype == torch.float32
    ref = w32.shadow["weight"].double().clone()
    target = torch.randn(64, 64).to(torch.bfloat16)
    with torch.no_grad():
        model.weight.copy_(target)
    beta = 2 ** (-1 / 1000)  # half-life 1000ba: a bf16 shadow rounds every update away
    for _ in range(50):
        w32.update_(1 - beta)
        w16.update_(1 - beta)
        ref = ref + (1 - beta) * (target.double() - ref)
    assert torch.allclose(w32.shadow["weight"].double(), ref, rtol=1e-5, atol=1e-6)
    moved16 = (w16.shadow["weight"].double() - w32.shadow["weight"].double()).abs().max()
    assert moved16 > 1e-3  # the bf16 shadow lags far behind: why float32 is the default


def test_mixed_dtype_large_tensor_is_chunked_exactly() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(512, 512), nn.Linear(512, 3)).to(torch.float16)
    w = EMAWeights(model)
    w._scratch_numel = 1000  # force the chunked path for the big weight and batching for the rest
    w._scratch.clear()
    ref = {k: v.clone() for k, v in w.shadow.items()}
    perturb_fp16 = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.add_(perturb_fp16[n])
    w.update_(0.3)
    for n, p in model.named_parameters():
        expected = torch.lerp(ref[n], p.float(), 0.3)
        assert torch.equal(w.shadow[n], expected), n


def test_swap_exchanges_storage_and_is_idempotent() -> None:
    model = net()
    w = EMAWeights(model)
    perturb(model)
    train_ptr = model[0].weight.data_ptr()  # type: ignore[index]
    train_vals = {k: v.clone() for k, v in model.state_dict().items()}
    shadow_ptr = w.shadow["0.weight"].data_ptr()
    w.swap_in()
    w.swap_in()  # idempotent
    assert model[0].weight.data_ptr() == shadow_ptr  # type: ignore[index]  # O(1): no copy
    for k, v in model.state_dict().items():
        assert torch.equal(v, w.shadow[k])
    w.swap_out()
    w.swap_out()
    assert model[0].weight.data_ptr() == train_ptr  # type: ignore[index]
    for k, v in model.state_dict().items():
        assert torch.equal(v, train_vals[k])


def test_optimizer_step_after_swap_round_trip_is_bit_identical() -> None:
    def train(swap: bool) -> dict[str, torch.Tensor]:
        model = net(1)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        w = EMAWeights(model)
        gen = torch.Generator().manual_seed(5)
        data = [torch.randn(16, 4, generator=gen) for _ in range(6)]
        for step, x in enumerate(data):
            loss = model(x).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            w.update_(0.2)
            if swap and step % 2 == 0:
                with w.swapped(model), torch.no_grad():
                    model.eval()
                    model(torch.randn(3, 4))
                    model.train()
        return {k: v.clone() for k, v in model.state_dict().items()}

    a, b = train(False), train(True)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_swapped_restores_on_exception() -> None:
    model = net()
    w = EMAWeights(model)
    perturb(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RuntimeError, match="boom"), w.swapped(model):
        raise RuntimeError("boom")
    assert not w.is_swapped
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


def test_update_while_swapped_refused() -> None:
    model = net()
    w = EMAWeights(model)
    w.swap_in()
    with pytest.raises(RuntimeError, match="swap them out"):
        w.update_(0.5)


def test_cast_swap_for_mixed_dtype() -> None:
    # bf16 weights, float32 average: one cast pass into a reusable bf16 tensor, whose storage
    # is exchanged with the training weights' (back in swap_out, as for same-dtype tensors)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8)).to(torch.bfloat16)
    w = EMAWeights(model)
    with torch.no_grad():
        model[0].weight.add_(1.0)
    model(torch.randn(4, 8, dtype=torch.bfloat16))  # BatchNorm statistics move: bf16 buffers
    w.update_(0.5)
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    param, ptr = model[0].weight, model[0].weight.data_ptr()
    seen = []
    for _ in range(2):
        with w.swapped(model):
            assert model[0].weight is param and param.dtype == torch.bfloat16
            assert torch.equal(param, w.shadow["0.weight"].to(torch.bfloat16))
            stats = model[1].running_mean
            assert torch.equal(stats, w.shadow["1.running_mean"].to(torch.bfloat16))
            assert torch.equal(w.training_state_dict()["0.weight"], before["0.weight"])
            seen.append(param.data_ptr())
        assert param.data_ptr() == ptr
        for k, v in model.state_dict().items():
            assert torch.equal(v, before[k]), k
    assert seen[0] == seen[1] != ptr  # the same bf16 tensor each time: nothing allocated


def test_functional_call_view_leaves_model_untouched() -> None:
    model = net().eval()
    w = EMAWeights(model)
    perturb(model)
    x = torch.randn(5, 4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    viewed = w.functional_call(model, x)
    with w.swapped(model):
        swapped = model(x)
    assert torch.equal(viewed, swapped)
    assert not torch.equal(viewed, model(x))
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


def test_state_dict_round_trip_and_name_errors() -> None:
    model = net()
    w = EMAWeights(model)
    perturb(model)
    w.update_(0.5)
    saved = {k: v.clone() for k, v in w.state_dict().items()}
    other = EMAWeights(net(3))
    other.load_state_dict(saved)
    for k in saved:
        assert torch.equal(other.shadow[k], saved[k])
    bad = dict(saved)
    bad.pop("0.bias")
    bad["extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"missing \['0.bias'\], unexpected \['extra.weight'\]"):
        other.load_state_dict(bad)
    with pytest.raises(ValueError, match="shape"):
        other.load_state_dict({**saved, "0.bias": torch.zeros(3)})


def test_load_state_dict_casts_to_shadow_dtype() -> None:
    model = nn.Linear(2, 2).to(torch.bfloat16)
    w = EMAWeights(model)
    w.load_state_dict({"weight": torch.ones(2, 2, dtype=torch.float64), "bias": torch.zeros(2)})
    assert w.shadow["weight"].dtype == torch.float32


def test_nonfinite_guard() -> None:
    model = net()
    assert EMAWeights(model).nonfinite == "ignore"  # opt-in: the check costs a read per update
    w = EMAWeights(model, nonfinite="skip")
    before = {k: v.clone() for k, v in w.shadow.items()}
    with torch.no_grad():
        model[0].weight[0, 0] = float("nan")  # type: ignore[index]
    assert w.update_(0.5) is False
    for k, v in w.shadow.items():
        assert torch.equal(v, before[k])
    with pytest.raises(NonFiniteWeightsError):
        EMAWeights(net(), nonfinite="error").update_(0.5, model)
    ignoring = EMAWeights(net(), nonfinite="ignore")
    assert ignoring.update_(0.5, model) is True
    assert torch.isnan(ignoring.shadow["0.weight"]).any()
    with pytest.raises(ValueError, match="nonfinite must be one of"):
        EMAWeights(model, nonfinite="warn")


def test_names_normalised_across_wrappers() -> None:
    assert normalize_name("module._orig_mod.a._fsdp_wrapped_module.b") == "a.b"
    assert normalize_name("_checkpoint_wrapped_module.layer.weight") == "layer.weight"
    model = net()
    w = EMAWeights(model)
    wrapped = nn.DataParallel(model)
    assert unwrap_model(wrapped) is model
    perturb(model)
    w.update_(1.0, wrapped)  # binds by normalised name through the wrapper
    assert torch.equal(w.shadow["0.weight"], model[0].weight)  # type: ignore[index]
    compiled = torch.compile(model)  # lazily compiled: unwrapping does not trigger compilation
    assert unwrap_model(compiled) is model
    w.bind(compiled)


def test_bind_reports_missing_and_unexpected() -> None:
    w = EMAWeights(net())
    with pytest.raises(ValueError, match="missing") as info:
        w.bind(nn.Linear(4, 8))
    assert "unexpected" in str(info.value)
    with pytest.raises(TypeError, match="torch.nn.Module"):
        EMAWeights("model")  # type: ignore[arg-type]


def test_copy_to_and_training_state() -> None:
    model = net()
    w = EMAWeights(model)
    snapshot = copy.deepcopy(model.state_dict())
    perturb(model)
    w.copy_to(model)
    for k, v in model.state_dict().items():
        assert torch.equal(v, snapshot[k])
    w.swap_in()
    assert set(w.training_state_dict()) == set(w.names)
    w.swap_out()
    w.load_training_({k: torch.zeros_like(v) for k, v in w.shadow.items()})
    assert model[0].weight.abs().sum().item() == 0.0  # type: ignore[index]


def test_device_argument_validated() -> None:
    with pytest.raises(ValueError, match="device must be"):
        EMAWeights(net(), device="gpu0")
    w = EMAWeights(net(), device="cpu")
    assert w.shadow["0.weight"].device.type == "cpu"
    with pytest.raises(ValueError, match="dtype must be one of"):
        EMAWeights(net(), dtype="int8")


def test_stream_option_is_ignored_on_cpu() -> None:
    model = net()
    a, b = EMAWeights(model), EMAWeights(model, stream=True)
    perturb(model)
    a.update_(0.3)
    b.update_(0.3)
    for k in a.shadow:
        assert torch.equal(a.shadow[k], b.shadow[k])
    with pytest.raises(TypeError, match="stream must be True or False"):
        EMAWeights(model, stream="yes")  # type: ignore[arg-type]


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@cuda
def test_cuda_side_stream_matches_default_stream() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 256), nn.Linear(256, 4)).cuda()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    plain, streamed = EMAWeights(model), EMAWeights(model, stream=True)
    for _ in range(20):
        loss = model(torch.randn(64, 256, device="cuda")).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()  # the global optimizer hook waits for the streamed update of the last step
        plain.update_(0.1)
        streamed.update_(0.1)
    streamed.synchronize()
    for k in plain.shadow:
        assert torch.equal(plain.shadow[k], streamed.shadow[k]), k


@cuda
def test_cuda_offloaded_shadow_matches_on_device_shadow() -> None:
    torch.manual_seed(0)
    model = nn.Linear(512, 512).cuda().to(torch.bfloat16)
    on_device, offloaded = EMAWeights(model), EMAWeights(model, device="cpu")
    assert offloaded.shadow["weight"].is_pinned()
    with torch.no_grad():
        model.weight.add_(1.0)
    on_device.update_(0.25)
    offloaded.update_(0.25)
    assert torch.equal(on_device.shadow["weight"].cpu(), offloaded.shadow["weight"])
    raw = model.weight.detach().clone()
    before = torch.cuda.memory_allocated()
    with offloaded.swapped(model):
        assert torch.equal(model.weight, offloaded.shadow["weight"].to("cuda", torch.bfloat16))
        assert torch.cuda.memory_allocated() == before  # the backup lives on the CPU
    assert torch.equal(model.weight, raw)


def test_fsdp1_refused_with_alternative_named() -> None:
    class FullyShardedDataParallel(nn.Module):  # stands in for the FSDP1 wrapper's class
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner = inner

    with pytest.raises(ValueError, match="fully_shard"):
        EMAWeights(FullyShardedDataParallel(nn.Linear(2, 2)))


def test_shadow_built_in_inference_mode_can_be_updated_later() -> None:
    model = torch.nn.Linear(3, 2)
    with torch.inference_mode():
        w = EMAWeights(model)
    assert not any(t.is_inference() for t in w.shadow.values())
    with torch.no_grad():
        model.weight.add_(1.0)
    w.update_(0.5, model)  # an inference tensor would raise here
    assert torch.allclose(w.shadow["weight"], model.weight - 0.5)
