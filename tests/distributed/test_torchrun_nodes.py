"""Two "nodes" on one machine: two torchrun invocations, --nnodes 2, a localhost c10d rendezvous.

Each invocation is one node with one CPU process (gloo); together they run two SFT steps
with FSDP2 (one shard group over both nodes) or HSDP (one replica per node), write a DCP
checkpoint and the final HF model, and must match one process on the same global batch.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.distributed import _dist_helpers as h

ROOT = Path(__file__).resolve().parents[2]


def _two_nodes(out: Path, mode: str) -> None:
    port = h.free_port()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
           "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", f"fusedrl-{mode}",
           "--max-restarts", "0", "-m", "tests.distributed._node_worker", str(out), mode]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    nodes = [subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(2)]
    logs = []
    for node in nodes:
        try:
            logs.append(node.communicate(timeout=300)[0])
        except subprocess.TimeoutExpired:
            for n in nodes:
                n.kill()
            pytest.fail("a torchrun node hung")
    for node, log in zip(nodes, logs):
        assert node.returncode == 0, log[-4000:]


@pytest.mark.parametrize("mode", ["fsdp", pytest.param("hsdp", marks=pytest.mark.slow)])
def test_two_torchrun_nodes_run_to_the_end(tmp_path, mode):
    _two_nodes(tmp_path, mode)
    result = json.loads((tmp_path / "records.json").read_text())
    assert result["world"] == 2
    assert result["mesh"] == (["dp_replicate", "dp_shard"] if mode == "hsdp" else ["dp_shard"])
    assert (tmp_path / "ckpt" / "step_00000002" / "manifest.json").is_file()
    model = h.tiny_model()
    optimizer = h.optimizer_for(model)
    want = [h.train_step(model, optimizer, step, algo="sft", rank=0, world=1) for step in range(2)]
    for got, expected in zip(result["records"], want):
        assert abs(got["loss"] - expected["loss"]) <= 1e-6, (got, expected)
    from transformers import AutoModelForCausalLM

    final = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").state_dict()
    for name, value in model.state_dict().items():
        torch.testing.assert_close(final[name], value, atol=1e-6, rtol=0, msg=lambda m: f"{name}: {m}")
