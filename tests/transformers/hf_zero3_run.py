"""Run by ``torchrun`` from test_hf_zero3.py: the Hugging Face Trainer with DeepSpeed ZeRO-3 on
CPU (gloo) and the EMA callback. Run A trains 8 steps uninterrupted (checkpoints at 4 and 8);
run B resumes A's checkpoint-4 and trains to 8. After every optimizer step a probe records the
collective calls made by the EMA update, the whole EMA (gathered by ``full_state_dict``) and the
whole training weights (gathered by DeepSpeed); evaluations record the model's outputs. Each
rank writes what it saw to OUT/rank<r>.pt."""

from __future__ import annotations

import os
import sys
from typing import Any

COLLECTIVES = (
    "all_gather",
    "all_gather_into_tensor",
    "_all_gather_base",
    "all_gather_coalesced",
    "all_gather_object",
    "all_reduce",
    "all_reduce_coalesced",
    "all_to_all",
    "all_to_all_single",
    "barrier",
    "batch_isend_irecv",
    "broadcast",
    "broadcast_object_list",
    "gather",
    "irecv",
    "isend",
    "recv",
    "reduce",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "_reduce_scatter_base",
    "scatter",
    "send",
)


class CollectiveCounter:
    """Counts the calls of ``torch.distributed``'s collectives and point-to-point functions
    while active (DeepSpeed's communication goes through them too)."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self._saved: list[tuple[Any, str, Any]] = []

    def __enter__(self) -> CollectiveCounter:
        import torch.distributed as dist
        import torch.distributed.distributed_c10d as c10d

        for module in (dist, c10d):
            for name in COLLECTIVES:
                original = getattr(module, name, None)
                if original is not None:
                    self._saved.append((module, name, original))
                    setattr(module, name, self._counted(name, original))
        return self

    def _counted(self, name: str, original: Any) -> Any:
        def counted(*args: Any, **kwargs: Any) -> Any:
            self.calls.append(name)
            return original(*args, **kwargs)

        return counted

    def __exit__(self, *exc: Any) -> None:
        for module, name, original in reversed(self._saved):
            setattr(module, name, original)
        self._saved.clear()


def deepspeed_config() -> dict:
    """ZeRO-3; parameters of at most 1 element stay whole on every rank (``ds_persist``: the
    last bias here), so both the partitioned and the persistent path are exercised. Gathering
    the model on save avoids the Trainer's race on removing its dummy ``model.safetensors``
    when both ranks share the checkpoint folder."""
    return {
        "zero_optimization": {
            "stage": 3,
            "stage3_param_persistence_threshold": 1,
            "stage3_gather_16bit_weights_on_model_save": True,
        },
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "optimizer": {"type": "AdamW", "params": {"lr": "auto", "torch_adam": True}},
    }


def run(out: str, resume: str | None) -> dict[str, Any]:
    import deepspeed
    import torch
    from hf_tiny import TinyData, trainer
    from transformers import TrainerCallback

    from ema_callbacks.transformers import EMATrainerCallback

    ema = EMATrainerCallback(half_life="0.5ep", update_interval="1ba", final_weights="training")
    seen: dict[str, Any] = {"updates": {}, "ema": {}, "train": {}, "eval": {}, "after_eval": {}}
    counter: list[CollectiveCounter] = []

    def gathered_training(model: torch.nn.Module) -> dict[str, torch.Tensor]:
        params = list(model.parameters())
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            return {n: p.detach().clone() for n, p in model.named_parameters()}

    class Before(TrainerCallback):  # listed before the EMA callback: starts counting
        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            counter.append(CollectiveCounter().__enter__())

    class After(TrainerCallback):  # listed after it: stops counting, gathers what to compare
        def on_step_end(self, args: Any, state: Any, control: Any, model: Any, **kw: Any) -> None:
            done = counter.pop()
            done.__exit__()
            step = state.global_step
            seen["updates"][step] = list(done.calls)
            seen.setdefault("epoch", {})[step] = float(state.epoch)
            weights = ema.controller.weights
            seen["swapped"] = weights.is_swapped
            if weights.is_swapped:  # an evaluation follows: gather the EMA, not the weights
                weights.swap_out()
                seen["train"][step] = gathered_training(model)
                weights.swap_in()
            else:
                seen["train"][step] = gathered_training(model)
            with CollectiveCounter() as export:
                seen["ema"][step] = {k: v.clone() for k, v in weights.full_state_dict().items()}
            seen["export_calls"] = list(export.calls)
            seen["ema_bytes"] = weights.nbytes
            seen["partition_numel"] = {k: v.numel() for k, v in weights.shadow.items()}

    tr = trainer(
        out,
        [Before(), ema, After()],
        data=TinyData(16),
        num_train_epochs=1,
        per_device_train_batch_size=2,
        ddp_backend="gloo",
        eval_strategy="steps",
        eval_steps=3,
        save_strategy="steps",
        save_steps=4,
        deepspeed=deepspeed_config(),
        use_cpu=False,
    )
    inputs = TinyData(8, seed=5).x

    def evaluate(*args: Any, **kwargs: Any) -> dict[str, float]:
        """The Trainer's evaluation, minus accelerate's metric gather (which fails under CPU
        DeepSpeed): a forward through the ZeRO-3 module, then ``on_evaluate``."""
        step = tr.state.global_step
        with torch.no_grad():
            seen["eval"][step] = tr.model(inputs)["logits"].clone()
        tr.control = tr.callback_handler.on_evaluate(tr.args, tr.state, tr.control, {})
        with torch.no_grad():  # the training weights are back for the next step
            seen["after_eval"][step] = tr.model(inputs)["logits"].clone()
        return {}

    tr.evaluate = evaluate  # type: ignore[method-assign]
    tr.train(resume_from_checkpoint=resume)
    # a full (gathered) EMA loaded into the ZeRO-3 EMA: each rank takes its own partition
    weights = ema.controller.weights
    full = weights.full_state_dict()
    for shadow in weights.shadow.values():
        shadow.zero_()
    weights.load_state_dict(full)
    seen["reloaded"] = weights.full_state_dict()
    seen["inputs"] = inputs
    seen["world"] = tr.args.world_size
    return seen


def snapshots(out: str) -> dict[str, Any]:
    """Run C: post-hoc snapshots of a ZeRO-3 EMA (every rank gathers, rank 0 writes)."""
    from hf_tiny import TinyData, trainer
    from transformers import TrainerCallback

    from ema_callbacks.transformers import EMATrainerCallback

    ema = EMATrainerCallback(
        sigma_rel=0.1, snapshot_every="4ba", snapshot_dtype="float32", final_weights="training"
    )
    seen: dict[str, Any] = {"ema": {}}

    class After(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            weights = ema.controller.weights
            seen["ema"][state.global_step] = {
                k: v.clone() for k, v in weights.full_state_dict().items()
            }

    tr = trainer(
        out,
        [ema, After()],
        data=TinyData(16),
        num_train_epochs=1,
        per_device_train_batch_size=2,
        ddp_backend="gloo",
        deepspeed=deepspeed_config(),
        use_cpu=False,
    )
    tr.train()
    seen["run"] = ema.controller.snapshot_run
    return seen


def main(out: str) -> None:
    import torch

    first = run(os.path.join(out, "a"), None)
    resumed = run(os.path.join(out, "b"), os.path.join(out, "a", "checkpoint-4"))
    posthoc = snapshots(os.path.join(out, "c"))
    rank = int(os.environ["RANK"])
    torch.save({"a": first, "b": resumed, "c": posthoc}, os.path.join(out, f"rank{rank}.pt"))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()  # a clean exit; gloo aborts otherwise


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    main(sys.argv[1])
