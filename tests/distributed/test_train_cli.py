"""`fusedrl train` under torchrun (gloo, CPU, FSDP2): the same run as one process, nodes, kill + resume.

World size 2 runs `torchrun --nproc-per-node 2 -m fusedrl train CONFIG` in a subprocess;
the one-process run is `run_training` on the same config in this process. Batch sizes are
global, so both train on the same sequences; the per-rank split is uneven (ranks get
different token loads and micro-batch counts, padded with zero-weight micro-batches).
AdamW eps = 1e-4: with the default 1e-8, Adam's update g / (|g| + eps) turns float32
summation-order noise in near-zero gradients into weight differences up to lr (see
docs/distributed.md), beyond 1e-6 for any two reduction orders.
"""
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fusedrl.train.metrics import read_metrics
from fusedrl.train.run import load_run_config, run_training
from tests.distributed._dist_helpers import free_port

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "examples" / "data"
MODEL = """
[model]
tokenizer = "char"
dtype = "float32"
arch = {model_type = "qwen2", hidden_size = 32, intermediate_size = 64, num_hidden_layers = 2, num_attention_heads = 4, num_key_value_heads = 2, max_position_embeddings = 64, tie_word_embeddings = true}
[optim]
lr = 3e-3
eps = 1e-4
[logging]
progress = false
plots = false
"""
STAGES = {
    "sft": f"""
[run]
stage = "sft"
device = "cpu"
seed = 3
num_threads = 1
[data]
train = "{DATA / 'sft_train.jsonl'}"
max_len = 48
token_budget = 64
micro_batches_per_step = 3
[loop]
max_steps = 4
[checkpoint]
every = 2
""",
    "dpo": f"""
[run]
stage = "dpo"
device = "cpu"
seed = 3
num_threads = 1
[data]
train = "{DATA / 'prefs_train.jsonl'}"
max_len = 32
token_budget = 160
micro_batches_per_step = 2
[loop]
max_steps = 2
[dpo]
loss = "dpo"
beta = 0.1
""",
    "grpo": f"""
[run]
stage = "grpo"
device = "cpu"
seed = 3
num_threads = 1
[data]
train = "{DATA / 'prompts_train.jsonl'}"
max_len = 32
[loop]
max_steps = 2
[rollout]
prompts_per_rollout = 3
group_size = 4
max_new_tokens = 6
temperature = 1.0
verifier = "tests.distributed._rewards:vowel_share"
token_budget = 48
[pg]
beta = 0.05
""",
}
# GRPO with a KL penalty: its frozen reference model is sharded and gathered for the rollout.
# PPO: the GRPO run with a critic (sharded, its own forward/backward per micro-batch) and old log-probs
STAGES["ppo"] = STAGES["grpo"].replace('stage = "grpo"', 'stage = "ppo"').replace("[pg]\nbeta = 0.05\n", "")
# Self-distillation (SDPO): the student is its own teacher; a sampling stage outside the GRPO family.
STAGES["distill"] = STAGES["grpo"].replace('stage = "grpo"', 'stage = "distill"').replace("[pg]\nbeta = 0.05\n", """\
[distill]
mode = "self"
correct_threshold = 0.2
resample_rounds = 0
demo_template = "{prompt}|{demo}|"
""")

# Rejection sampling: 5 prompts x 4 samples scored by the verifier, best per prompt, then SFT on them.
STAGES["rejection"] = f"""
[run]
stage = "rejection"
device = "cpu"
seed = 3
num_threads = 1
[data]
train = "{DATA / 'prompts_train.jsonl'}"
max_len = 32
token_budget = 40
micro_batches_per_step = 2
[loop]
max_steps = 2
[rejection]
verifier = "tests.distributed._rewards:vowel_share"
num_samples = 4
max_prompts = 5
selection = "best_per_prompt"
max_new_tokens = 6
temperature = 1.0
"""


def _config(tmp: Path, stage: str) -> Path:
    path = tmp / f"{stage}.toml"
    path.write_text(STAGES[stage] + MODEL)
    return path


def _env(**extra) -> dict:
    return dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", **extra)


def _torchrun(config: Path, out: Path, *args: str, nodes: int = 1, timeout: int = 300) -> str:
    port = free_port()
    if nodes == 1:
        launch = ["--nproc-per-node", "2", "--master-port", str(port)]
    else:
        launch = ["--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d",
                  "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "fusedrl-train"]
    cmd = [sys.executable, "-m", "torch.distributed.run", *launch, "--max-restarts", "0",
           "-m", "fusedrl", "train", str(config), f"--run.out_dir={out}", *args]
    procs = [subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(nodes)]
    logs = []
    for proc in procs:
        try:
            logs.append(proc.communicate(timeout=timeout)[0])
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            pytest.fail("torchrun hung")
    for proc, log in zip(procs, logs):
        assert proc.returncode == 0, log[-5000:]
    return "\n".join(logs)


def _one_process(config: Path, out: Path, resume: bool = False):
    return run_training(load_run_config(str(config), [("run.out_dir", str(out))]), resume=resume)


def _losses(run: Path):
    return [r["loss"] for r in read_metrics(run / "metrics.jsonl") if r["kind"] == "train"]


def _weights(run: Path) -> dict:
    weights = load_file(run / "final" / "model.safetensors")
    weights.pop("lm_head.weight", None)  # tied to the embeddings (the gathered state dict names both)
    return weights


def _assert_weights(a: Path, b: Path, atol: float) -> None:
    wa, wb = _weights(a), _weights(b)
    assert sorted(wa) == sorted(wb)
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], atol=atol, rtol=0, msg=lambda m: f"{name}: {m}")


@pytest.fixture(scope="module")
def sft_runs(tmp_path_factory):
    """SFT at world size 1 and 2 (shared by the tests below)."""
    tmp = tmp_path_factory.mktemp("sft")
    config = _config(tmp, "sft")
    _one_process(config, tmp / "one")
    log = _torchrun(config, tmp / "two")
    return tmp, config, log


def test_sft_world_size_2_matches_one_process(sft_runs):
    tmp, _, log = sft_runs
    one, two = _losses(tmp / "one"), _losses(tmp / "two")
    assert len(one) == len(two) == 4
    assert max(abs(a - b) for a, b in zip(one, two)) <= 1e-6, (one, two)
    _assert_weights(tmp / "one", tmp / "two", atol=1e-6)
    records = [r for r in read_metrics(tmp / "two" / "metrics.jsonl") if r["kind"] == "train"]
    assert all(1.0 <= r["dp_load_imbalance"] < 1.5 for r in records)
    assert any(r["dp_load_imbalance"] > 1.0 for r in records)  # an uneven split
    ckpt = tmp / "two" / "checkpoints" / "step_00000004"
    assert (ckpt / "dcp" / ".metadata").is_file() and (ckpt / "manifest.json").is_file()
    assert (tmp / "two" / "report.md").is_file()
    assert log.count("step 4/4") == 1  # rank 0 logs, rank 1 does not


@pytest.mark.parametrize("stage", ["dpo", "grpo", pytest.param("ppo", marks=pytest.mark.slow),
                                   pytest.param("distill", marks=pytest.mark.slow)])
def test_dpo_grpo_ppo_world_size_2_match_one_process(tmp_path, stage):
    config = _config(tmp_path, stage)
    _one_process(config, tmp_path / "one")
    _torchrun(config, tmp_path / "two")
    one, two = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert max(abs(a - b) for a, b in zip(one, two)) <= 1e-6, (one, two)
    records = read_metrics(tmp_path / "one" / "metrics.jsonl")
    assert any(abs(r.get("grad_norm", 0.0)) > 1e-4 for r in records)  # the steps did train something
    if stage != "dpo":  # the same samples at both world sizes
        for key in ("reward_mean", "generated_tokens", "groups_kept", "response_len"):
            a = [r.get(key) for r in records if r["kind"] == "train"]
            b = [r.get(key) for r in read_metrics(tmp_path / "two" / "metrics.jsonl") if r["kind"] == "train"]
            assert a == b, key
        # ... though each rank sampled only its share: rank 0 (which logs) 2 of the 3 prompts, rank 1 the third
        # (PPO samples at its first step and trains on that rollout at the second: steps_per_rollout = 2)
        sampled = [1, 0] if stage == "ppo" else [1, 1]
        shares = [r.get("rollout_prompts_this_rank") for r in read_metrics(tmp_path / "two" / "metrics.jsonl")
                  if r["kind"] == "train"]
        assert shares == [2.0 if s else None for s in sampled], shares
        assert [r.get("rollout_prompts_this_rank") for r in records if r["kind"] == "train"] == \
            [3.0 if s else None for s in sampled]
    _assert_weights(tmp_path / "one", tmp_path / "two", atol=1e-6)


def test_two_nodes_with_a_c10d_rendezvous_run_sft_to_the_end(sft_runs):
    tmp, config, _ = sft_runs
    _torchrun(config, tmp / "nodes", nodes=2)
    assert _losses(tmp / "nodes") == pytest.approx(_losses(tmp / "one"), abs=1e-6)
    _assert_weights(tmp / "one", tmp / "nodes", atol=1e-6)


def test_checkpoint_written_at_2_resumes_at_1(sft_runs):
    tmp, config, _ = sft_runs
    run = tmp / "two_to_one"
    shutil.copytree(tmp / "two", run)
    shutil.rmtree(run / "checkpoints" / "step_00000004")
    shutil.rmtree(run / "final")
    _one_process(config, run, resume=True)  # DCP reshards the 2-rank checkpoint of step 2 into one process
    _assert_weights(tmp / "two", run, atol=1e-5)
    assert (run / "checkpoints" / "step_00000004" / "dcp").is_dir()  # the run keeps its checkpoint format


def _launch_plain(config: Path, out: Path, *args: str):
    """Two ranks as plain processes with torchrun's environment (no agent that would stop the survivor)."""
    port = free_port()
    return [subprocess.Popen([sys.executable, "-m", "tests.distributed._train_worker", str(config), str(out), *args],
                             cwd=ROOT, env=_env(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(r),
                                                WORLD_SIZE="2", LOCAL_RANK=str(r), LOCAL_WORLD_SIZE="2"),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]


@pytest.mark.slow
def test_sigkill_of_a_rank_stops_the_other_and_resume_is_bit_identical(sft_runs, tmp_path):
    tmp, config, _ = sft_runs
    run = tmp_path / "killed"
    procs = _launch_plain(config, run, "--kill-at", "3")
    try:
        out1, _ = procs[1].communicate(timeout=240)  # the victim
        killed = time.monotonic()
        _, err0 = procs[0].communicate(timeout=120)
        stopped = time.monotonic()
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        pytest.fail("the surviving rank hung after its peer was killed")
    assert stopped - killed < 60  # bounded: the next collective fails, fail_together names the rank
    assert procs[1].returncode == -9, out1
    assert procs[0].returncode != 0
    assert "rank 1 failed" in err0, err0[-3000:]
    assert not (run / "final").exists()
    procs = _launch_plain(config, run, "--resume")
    for proc in procs:
        out, err = proc.communicate(timeout=240)
        assert proc.returncode == 0, err[-4000:]
    wa, wb = _weights(tmp / "two"), _weights(run)
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name  # bit for bit


@pytest.mark.slow
def test_ppo_critic_is_sharded_and_its_checkpoint_resumes_at_1(tmp_path):
    """PPO's critic is an FSDP2 root of its own (DTensor parameters), saved sharded in the DCP checkpoint
    beside the policy; the 2-rank checkpoint of step 2 resumed in one process redoes step 3 (a new rollout,
    whose values and value loss come from the restored critic) like the 2-rank run."""
    config = _config(tmp_path, "ppo")
    steps = ["--loop.max_steps=3", "--checkpoint.every=2"]
    log = _torchrun(config, tmp_path / "two", *steps)
    found = re.findall(r"FSDP2: (\w+) (\w+) sharded, (\d+) of (\d+) parameters are DTensors", log)
    assert ("trained", "FSDPScalarHeadModel") in [(role, cls) for role, cls, _, _ in found], found
    assert all(int(a) == int(b) > 0 for _, _, a, b in found), found
    ckpt = tmp_path / "two" / "checkpoints" / "step_00000002"
    from torch.distributed.checkpoint import FileSystemReader
    keys = FileSystemReader(str(ckpt / "dcp")).read_metadata().state_dict_metadata
    assert any(k.startswith("others.value.model.") for k in keys) and any(k.startswith("others.value.optim.")
                                                                           for k in keys), sorted(keys)[:5]
    run = tmp_path / "two_to_one"
    shutil.copytree(tmp_path / "two", run)
    shutil.rmtree(run / "checkpoints" / "step_00000003")
    shutil.rmtree(run / "final")
    overrides = [("run.out_dir", str(run)), ("loop.max_steps", "3"), ("checkpoint.every", "2")]
    run_training(load_run_config(str(config), overrides), resume=True)
    two = [r for r in read_metrics(tmp_path / "two" / "metrics.jsonl") if r["kind"] == "train"]
    one = [r for r in read_metrics(run / "metrics.jsonl") if r["kind"] == "train"]
    assert two[-1]["step"] == one[-1]["step"] == 3
    for key in ("loss", "value_loss", "value_grad_norm"):
        assert abs(two[-1][key] - one[-1][key]) <= 1e-5, (key, two[-1][key], one[-1][key])
    _assert_weights(tmp_path / "two", run, atol=1e-5)


def test_rejection_sampling_is_divided_and_world_size_2_matches_one_process(tmp_path):
    """Each rank samples and scores its share of the prompts (rank 0: 3 of 5), rank 0 alone writes the
    cache; the samples, rewards, selection, losses and final weights are the one-process run's."""
    config = _config(tmp_path, "rejection")
    _one_process(config, tmp_path / "one")
    log = _torchrun(config, tmp_path / "two")
    assert "rejection: sampled 5 x 4 completions" in log and "(3 prompts on this rank)" in log, log[-3000:]
    caches = [sorted((tmp_path / run / "rejection_cache").glob("*.json")) for run in ("one", "two")]
    assert [p.name for p in caches[0]] == [p.name for p in caches[1]] and len(caches[0]) == 2
    for a, b in zip(*caches):  # the samples and their scores
        assert json.loads(a.read_text()) == json.loads(b.read_text()), a.name
    assert not list((tmp_path / "two" / "rejection_cache").glob("*.tmp*"))
    records = [read_metrics(tmp_path / run / "metrics.jsonl") for run in ("one", "two")]
    train = [[r for r in rs if r["kind"] == "train"] for rs in records]
    assert len(train[0]) == len(train[1]) == 2
    for key in ("selected_reward", "random_reward", "sample_reward"):
        assert [r[key] for r in train[0]] == [r[key] for r in train[1]], key
    one, two = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert max(abs(a - b) for a, b in zip(one, two)) <= 1e-6, (one, two)
    _assert_weights(tmp_path / "one", tmp_path / "two", atol=1e-6)


def _teacher(tmp: Path, config: Path) -> Path:
    """A tiny Qwen2 teacher with the student's vocabulary, other weights (seed 11), saved as a HF folder."""
    from fusedrl.data.tokenizer import build_tokenizer
    from fusedrl.models.causal_lm import build_policy, save_model

    cfg = load_run_config(str(config))
    torch.manual_seed(11)
    teacher = build_policy(cfg.model, build_tokenizer(cfg.model), torch.device("cpu"))
    save_model(teacher, tmp / "teacher")
    return tmp / "teacher"


@pytest.mark.slow
def test_on_policy_distillation_shards_the_teacher_and_matches_one_process(tmp_path):
    """The distill teacher is an FSDP2 root of its own (DTensor parameters): gathered with the student for
    the rollout (its hidden states), its head gathered once for the loss; losses and weights = one process."""
    config = tmp_path / "distill_teacher.toml"
    config.write_text(STAGES["distill"].replace('mode = "self"', f'mode = "on_policy"\nteacher = "{tmp_path / "teacher"}"')
                      + MODEL)
    _teacher(tmp_path, config)
    _one_process(config, tmp_path / "one")
    log = _torchrun(config, tmp_path / "two")
    found = re.findall(r"FSDP2: (\w+) (\w+) sharded, (\d+) of (\d+) parameters are DTensors", log)
    assert [role for role, *_ in found] == ["policy", "frozen"] and all(int(a) == int(b) > 0 for *_, a, b in found)
    one, two = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert len(one) == 2 and max(abs(a - b) for a, b in zip(one, two)) <= 1e-6, (one, two)
    metrics = [[r["divergence"] for r in read_metrics(tmp_path / run / "metrics.jsonl") if r["kind"] == "train"]
               for run in ("one", "two")]
    assert all(d > 1e-3 for d in metrics[0]) and max(abs(a - b) for a, b in zip(*metrics)) <= 1e-6, metrics
    _assert_weights(tmp_path / "one", tmp_path / "two", atol=1e-6)
