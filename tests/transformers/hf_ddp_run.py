"""Run by ``torchrun`` from test_hf_distributed.py: DDP (or DeepSpeed) on CPU (gloo) with the
EMA callback; each rank writes its EMA and the training weights it saw to OUT/rank<r>.pt."""

from __future__ import annotations

import os
import sys


def deepspeed_config(mode: str) -> dict:
    """``mode`` is 'zero2' or 'zero3' (every parameter partitioned: no persistence threshold)."""
    zero = (
        {"stage": 3, "stage3_param_persistence_threshold": 0} if mode == "zero3" else {"stage": 2}
    )
    return {
        "zero_optimization": zero,
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "optimizer": {"type": "AdamW", "params": {"lr": "auto", "torch_adam": True}},
    }


def main(out: str, mode: str) -> None:
    import torch
    from hf_tiny import Recorder, TinyData, trainer

    from ema_callbacks.transformers import EMATrainerCallback

    rec, ema = (
        Recorder(),
        EMATrainerCallback(half_life="0.5ep", update_interval="1ba", final_weights="training"),
    )
    tr = trainer(
        out,
        [rec, ema],
        data=TinyData(16),
        num_train_epochs=2,
        per_device_train_batch_size=2,
        ddp_backend="gloo",
        eval_strategy="steps"
        if mode == "ddp"
        else "no",  # accelerate's eval gather fails under CPU DeepSpeed
        eval_steps=3,
        save_strategy="steps",
        save_steps=4,
        **({"deepspeed": deepspeed_config(mode), "use_cpu": False} if mode != "ddp" else {}),
    )
    tr.train()
    rank = int(os.environ["RANK"])
    fused = {}
    if mode == "ddp":  # the separate update and fused_optimizer=True, on the same run
        for name, on in (("separate", False), ("fused", True)):
            cb = EMATrainerCallback(half_life="3ba", final_weights="training", fused_optimizer=on)
            run = trainer(
                os.path.join(out, name),
                [cb],
                data=TinyData(16),
                num_train_epochs=2,
                per_device_train_batch_size=2,
                ddp_backend="gloo",
            )
            run.train()
            fused[name] = cb.controller.state_dict()["shadow"]
    torch.save(
        {
            "ema": ema.controller.state_dict()["shadow"],
            "steps": rec.steps,
            "eval": rec.eval_weights,
            "world": tr.args.world_size,
            **fused,
        },
        os.path.join(out, f"rank{rank}.pt"),
    )
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()  # a clean exit; gloo aborts otherwise


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "ddp")
