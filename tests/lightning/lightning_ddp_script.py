"""Run by ``test_lightning_ddp.py`` (Lightning's ``ddp`` launcher re-executes this file for
rank 1, so it must be a script): ``python lightning_ddp_script.py OUT``.

Three fits on ``strategy='ddp', devices=2, accelerator='cpu'``, ranks with different batch
sizes (4 and 6, so the sample count must be summed over ranks), ``half_life='40sp'``:

1. ``full``: 8 steps uninterrupted;
2. ``stop``: 4 steps, checkpoint at step 4;
3. ``resumed``: from that checkpoint to 8 steps;
4. ``fused``: as ``full``, with ``fused_optimizer=True`` (the sample count summed over the
   ranks inside the optimizer step).

Each rank writes ``OUT/{phase}_rank{r}.pt`` with its EMA, training weights and counters.
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def main(out: Path) -> None:
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    import torch
    from lightning.pytorch import Trainer
    from lightning.pytorch.callbacks import ModelCheckpoint

    from ema_callbacks.lightning import EMACallback
    from tests.lightning.lightning_tiny import IndexBatches, TinyRegression

    warnings.filterwarnings("ignore")
    rank = int(os.environ.get("LOCAL_RANK", "0"))
    size = 4 if rank == 0 else 6

    def run(phase: str, max_steps: int, ckpt_path: str | None = None) -> None:
        cb = EMACallback(
            half_life="40sp", final_weights="training", fused_optimizer=phase == "fused"
        )
        callbacks: list = [cb]
        if phase == "stop":
            callbacks.append(
                ModelCheckpoint(dirpath=out / "ckpt", every_n_train_steps=4, filename="{step}")
            )
        trainer = Trainer(
            strategy="ddp",
            devices=2,
            accelerator="cpu",
            max_steps=max_steps,
            callbacks=callbacks,
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            enable_checkpointing=phase == "stop",
            limit_val_batches=0,
        )
        # LayerNorm: unsynchronised BatchNorm statistics differ between ranks (DDP broadcasts
        # rank 0's buffers before each forward, not after), and so would their EMA; CPU has
        # no SyncBatchNorm.
        model = TinyRegression(norm="layer")
        trainer.fit(model, train_dataloaders=IndexBatches(8, sizes=[size] * 8), ckpt_path=ckpt_path)
        assert cb.controller.weights is not None
        torch.save(
            {
                "shadow": {k: v.clone() for k, v in cb.controller.weights.state_dict().items()},
                "model": {k: v.clone() for k, v in model.state_dict().items()},
                "schedule": cb.controller.state.to_dict(),
                "samples": cb._samples,
                "world_size": trainer.world_size,
            },
            out / f"{phase}_rank{rank}.pt",
        )

    run("full", 8)
    run("stop", 4)
    run("resumed", 8, ckpt_path=str(out / "ckpt" / "step=4.ckpt"))
    run("fused", 8)
    # A clean teardown: a gloo group left to the interpreter's exit can abort the process
    # ("terminate called without an active exception", exit -6) after all the work is done.
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
