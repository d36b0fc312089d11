"""The script the two-"node" torchrun test launches: `torchrun ... -m tests.distributed._node_worker OUT MODE`.

MODE "fsdp": one model sharded over both ranks; "hsdp": dp_replicate=2 x dp_shard=1 (one replica
per node, the HSDP layout across nodes). Two SFT steps, a DCP checkpoint, the final HF model;
rank 0 writes records.json.
"""
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from fusedrl.train.dist_checkpoint import save_dist_checkpoint, save_final_hf
from fusedrl.train.fail_fast import fail_together
from fusedrl.train.parallel import ParallelConfig, apply_fsdp, init_distributed
from tests.distributed import _dist_helpers as h


def main(out: Path, mode: str) -> None:
    torch.set_num_threads(1)
    info = init_distributed(timeout_s=120)
    cfg = ParallelConfig(dp_replicate=2, dp_shard=1) if mode == "hsdp" else ParallelConfig()
    with fail_together(timeout_s=60):
        model = apply_fsdp(h.tiny_model(), cfg)
        optimizer = h.optimizer_for(model)
        records = [h.train_step(model, optimizer, step, algo="sft", rank=info.rank, world=info.world_size)
                   for step in range(2)]
        save_dist_checkpoint(out / "ckpt", 2, model=model, optimizer=optimizer, trainer_state={"step": 2})
        save_final_hf(model, out / "hf")
        mesh = model.model.layers[0].mlp.up_proj.weight.device_mesh
        if info.rank == 0:
            (out / "records.json").write_text(json.dumps({
                "records": records, "world": info.world_size, "mesh": list(mesh.mesh_dim_names)}))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
