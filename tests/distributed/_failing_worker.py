"""One rank of the failure tests: `python -m tests.distributed._failing_worker MODE VICTIM`.

Both ranks train the tiny model with FSDP2 inside `fail_together`; at step 2 the
victim rank SIGKILLs itself ("kill"), raises ("raise"), or SIGKILLs itself while
the other rank is busy outside any collective ("kill_busy"). Prints "STEP n" per step.
"""
import os
import signal
import sys
import time

import torch

from fusedrl.train.fail_fast import fail_together
from fusedrl.train.parallel import ParallelConfig, apply_fsdp, init_distributed
from tests.distributed import _dist_helpers as h


def main(mode: str, victim: int) -> None:
    torch.set_num_threads(1)
    info = init_distributed(timeout_s=120)
    with fail_together(timeout_s=6, poll_s=0.25):
        model = apply_fsdp(h.tiny_model(), ParallelConfig())
        optimizer = h.optimizer_for(model)
        for step in range(50):
            if step == 2 and info.rank == victim:
                print(f"VICTIM {time.time()}", flush=True)
                if mode == "raise":
                    raise ValueError(f"boom on rank {info.rank}")
                os.kill(os.getpid(), signal.SIGKILL)
            if step == 2 and mode == "kill_busy":
                time.sleep(60)  # outside any collective: only the heartbeat can notice the dead peer
            h.train_step(model, optimizer, step % 2, algo="sft", rank=info.rank, world=info.world_size)
            print(f"STEP {step}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
