"""One rank of the failure tests: `python -m tests.distributed._failing_worker MODE VICTIM [CKPT_DIR]`.

Both ranks train the tiny model with FSDP2 inside `fail_together`; at step 2 the
victim rank SIGKILLs itself ("kill"), raises ("raise"), or SIGKILLs itself while
the other rank is busy outside any collective ("kill_busy"). "full" trains STEPS steps
undisturbed, "resume" continues from the newest checkpoint in CKPT_DIR to STEPS. With
CKPT_DIR a DCP checkpoint is written after every step and rank 0 saves the final weights
to CKPT_DIR/final.pt. Prints "STEP n" per step.
"""
import os
import signal
import sys
import time
from pathlib import Path

import torch

from fusedrl.train.dist_checkpoint import latest_dist_checkpoint, load_dist_checkpoint, save_dist_checkpoint
from fusedrl.train.fail_fast import fail_together
from fusedrl.train.parallel import ParallelConfig, apply_fsdp, init_distributed
from tests.distributed import _dist_helpers as h

STEPS = 5


def main(mode: str, victim: int, ckpt: Path = None) -> None:
    torch.set_num_threads(1)
    info = init_distributed(timeout_s=120)
    with fail_together(timeout_s=6, poll_s=0.25):
        model = apply_fsdp(h.tiny_model(), ParallelConfig())
        optimizer = h.optimizer_for(model)
        start = 0
        if mode == "resume":
            start = load_dist_checkpoint(latest_dist_checkpoint(ckpt), model=model, optimizer=optimizer)["trainer"]["step"]
        for step in range(start, STEPS if mode in ("full", "resume") else 50):
            if step == 2 and info.rank == victim and mode in ("kill", "raise", "kill_busy"):
                print(f"VICTIM {time.time()}", flush=True)
                if mode == "raise":
                    raise ValueError(f"boom on rank {info.rank}")
                os.kill(os.getpid(), signal.SIGKILL)
            if step == 2 and mode == "kill_busy":
                time.sleep(60)  # outside any collective: only the heartbeat can notice the dead peer
            h.train_step(model, optimizer, step % 2, algo="sft", rank=info.rank, world=info.world_size)
            if ckpt is not None:
                save_dist_checkpoint(ckpt, step + 1, model=model, optimizer=optimizer, trainer_state={"step": step + 1})
            print(f"STEP {step}", flush=True)
        if ckpt is not None:
            weights = h.full_weights(model)
            if info.rank == 0:
                torch.save(weights, ckpt / "final.pt")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), Path(sys.argv[3]) if len(sys.argv) > 3 else None)
