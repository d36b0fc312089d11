"""A run killed with a real SIGKILL and resumed with `fusedrl train --resume` ends with exactly
the weights of an uninterrupted run."""
import json
import os
import signal
import subprocess
import sys
import textwrap

import torch
from safetensors.torch import load_file

from fusedrl.train.checkpoint import list_checkpoints
from fusedrl.config import load_config
from fusedrl.train.metrics import read_metrics
from fusedrl.train.run import run_training
from fusedrl.demo.tasks import make_records

CONFIG = """
[run]
device = "cpu"
seed = 7
[model]
tokenizer = "char"
[model.arch]
model_type = "qwen2"
hidden_size = 32
intermediate_size = 64
num_hidden_layers = 2
num_attention_heads = 4
num_key_value_heads = 2
max_position_embeddings = 64
[data]
train = "{train}"
max_len = 48
token_budget = 96
micro_batches_per_step = 2
[optim]
lr = 0.01
weight_decay = 0.01
[schedule]
warmup_steps = 2
[loop]
max_steps = 8
[checkpoint]
every = 2
keep = 2
[logging]
progress = false
plots = false
"""

# Runs the config and SIGKILLs itself right after step 5 (checkpoints exist for steps 2 and 4).
KILLER = textwrap.dedent("""
    import os, signal, sys
    from fusedrl.config import load_config
    from fusedrl.train.run import run_training

    def hook(step, record):
        if step == 5:
            os.kill(os.getpid(), signal.SIGKILL)

    run_training(load_config(sys.argv[1], [("run.out_dir", sys.argv[2])]), on_step_end=hook)
""")


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([os.getcwd(), env.get("PYTHONPATH", "")])
    return env


def test_sigkill_then_resume_matches_an_uninterrupted_run(tmp_path):
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in make_records("reverse", 40, seed=1)))
    config = tmp_path / "run.toml"
    config.write_text(CONFIG.format(train=train))
    killed = tmp_path / "killed"

    proc = subprocess.run([sys.executable, "-c", KILLER, str(config), str(killed)], env=_env(),
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert [p.name for p in list_checkpoints(killed / "checkpoints")] == ["step_00000002", "step_00000004"]
    assert not (killed / "final").exists()
    assert max(r["step"] for r in read_metrics(killed / "metrics.jsonl")) == 5

    proc = subprocess.run([sys.executable, "-m", "fusedrl.cli", "train", str(config), "--resume",
                           f"--run.out_dir={killed}"], env=_env(), capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "resumed from" in proc.stderr and "step_00000004" in proc.stderr

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same intra-op threading as the subprocesses
    try:
        run_training(load_config(config, [("run.out_dir", str(tmp_path / "straight"))]))
    finally:
        torch.set_num_threads(threads)

    resumed = load_file(str(killed / "final" / "model.safetensors"))
    straight = load_file(str(tmp_path / "straight" / "final" / "model.safetensors"))
    assert resumed.keys() == straight.keys()
    for name in straight:
        assert torch.equal(resumed[name], straight[name]), name
    # The resumed run's log continues the killed one; its last 3 steps equal the straight run's.
    last = {r["step"]: r["loss"] for r in read_metrics(killed / "metrics.jsonl") if r["kind"] == "train"}
    ref = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "straight" / "metrics.jsonl") if r["kind"] == "train"}
    assert sorted(last) == list(range(1, 9)) and all(last[s] == ref[s] for s in (6, 7, 8))
