"""World size 2 with FSDP2 (CPU, gloo) against one process on the same global batch.

FSDP2 runs on CPU with gloo in this torch (all_gather_into_tensor and
reduce_scatter_tensor are supported), so the sharded path itself is tested here,
not a DDP stand-in. Sequences are split unevenly (7 of uneven lengths over 2
ranks, micro-batch counts that differ per rank), GRPO groups stay whole.
"""
import pytest
import torch
import torch.distributed as dist

from tests.distributed import _dist_helpers as h

STEPS = ["sft", "sft", "grpo", "dpo"]
RESUME_AT = 2  # the checkpoint is written before this step
TOL = dict(atol=1e-6, rtol=0)


def _worker(rank, world, port, out_dir):
    from torch.distributed.tensor import DTensor

    from fusedrl.train.dist_checkpoint import save_dist_checkpoint, save_final_hf
    from fusedrl.train.fail_fast import fail_together
    from fusedrl.train.parallel import ParallelConfig, apply_fsdp, gathered_params, init_distributed

    h.setup_rank(rank, world, port)
    info = init_distributed()
    with fail_together(timeout_s=60):
        model = apply_fsdp(h.tiny_model(), ParallelConfig())
        with gathered_params(model) as report, torch.no_grad():
            gathered = {"shape": tuple(model.lm_head.weight.shape),
                        "plain": not isinstance(model.lm_head.weight, DTensor), "report": report,
                        "logits": model(torch.arange(11)[None] % h.VOCAB).logits}
        gathered["resharded"] = isinstance(model.lm_head.weight, DTensor)
        ref = apply_fsdp(h.frozen_reference(), ParallelConfig())  # frozen: sharded, no grads
        optimizer = h.optimizer_for(model)
        records, snapshots = [], []
        for step, algo in enumerate(STEPS):
            if step == RESUME_AT:
                save_dist_checkpoint(out_dir / "ckpt", step, model=model, optimizer=optimizer,
                                     trainer_state={"step": step}, rank_state={"rank": rank})
            records.append(h.train_step(model, optimizer, step, algo=algo, rank=rank, world=world, ref=ref))
            snapshots.append(h.full_weights(model))
        gathered["ref_resharded"] = all(isinstance(p, DTensor) and p.grad is None for p in ref.parameters())
        resumed = _resume_same_world(out_dir, rank, world, ref)
        save_final_hf(model, out_dir / "hf")
        if rank == 0:
            torch.save({"records": records, "snapshots": snapshots, "gathered": gathered, "resumed": resumed,
                        "world": info.world_size, "backend": info.backend}, out_dir / "ws2.pt")
    dist.destroy_process_group()


def _resume_same_world(out_dir, rank, world, ref):
    """A fresh sharded model + optimizer loads the step-2 checkpoint and redoes the last step."""
    from fusedrl.train.dist_checkpoint import load_dist_checkpoint
    from fusedrl.train.parallel import ParallelConfig, apply_fsdp

    model = apply_fsdp(h.tiny_model(seed=7), ParallelConfig())
    optimizer = h.optimizer_for(model)
    restored = load_dist_checkpoint(out_dir / "ckpt" / "step_00000002", model=model, optimizer=optimizer)
    for step in range(RESUME_AT, len(STEPS)):
        h.train_step(model, optimizer, step, algo=STEPS[step], rank=rank, world=world, ref=ref)
    return {"weights": h.full_weights(model), "rank_state": restored["rank_state"],
            "resharded": restored["resharded"]}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp")
    h.spawn(_worker, 2, out)
    ws2 = torch.load(out / "ws2.pt", weights_only=False)
    model = h.tiny_model()
    optimizer = h.optimizer_for(model)
    records, snapshots = [], []
    for step, algo in enumerate(STEPS):
        records.append(h.train_step(model, optimizer, step, algo=algo, rank=0, world=1, ref=h.frozen_reference()))
        snapshots.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    return {"out": out, "ws2": ws2, "records": records, "snapshots": snapshots, "model": model,
            "optimizer": optimizer}


def _assert_weights(actual, expected, label):
    assert set(actual) <= set(expected), f"{label}: unexpected keys {set(actual) - set(expected)}"
    for name, value in actual.items():
        torch.testing.assert_close(value, expected[name], **TOL, msg=lambda m: f"{label} {name}: {m}")


def test_split_is_uneven():
    # The parity below covers ranks with different micro-batch counts (the padding path).
    counts = [h.micro_batch_counts(step, algo, 2) for step, algo in enumerate(STEPS)]
    assert all(counts[step][0] != counts[step][1] for step in (1, 2, 3)), counts


def test_process_group_is_gloo_world_2(runs):
    assert runs["ws2"]["world"] == 2 and runs["ws2"]["backend"] == "gloo"


@pytest.mark.parametrize("step", [0, 1], ids=["sft-step1", "sft-step2"])
def test_sft_step_matches_one_process(runs, step):
    got, want = runs["ws2"]["records"][step], runs["records"][step]
    assert abs(got["loss"] - want["loss"]) <= 1e-6, (got, want)
    assert abs(got["grad_norm"] - want["grad_norm"]) <= 1e-6 * max(1.0, want["grad_norm"]), (got, want)
    _assert_weights(runs["ws2"]["snapshots"][step], runs["snapshots"][step], f"after sft step {step + 1}")


@pytest.mark.parametrize("step", [2, 3], ids=["grpo", "dpo"])
def test_rl_and_preference_steps_match_one_process(runs, step):
    # GRPO (KL penalty) and DPO against a frozen reference model, itself sharded with FSDP2;
    # GRPO groups and DPO pairs stay on one rank.
    got, want = runs["ws2"]["records"][step], runs["records"][step]
    assert want["loss"] != 0.0
    assert abs(got["loss"] - want["loss"]) <= 1e-6, (got, want)
    assert abs(got["grad_norm"] - want["grad_norm"]) <= 1e-6 * max(1.0, want["grad_norm"]), (got, want)
    _assert_weights(runs["ws2"]["snapshots"][step], runs["snapshots"][step], f"after the {STEPS[step]} step")


def test_weights_moved(runs):
    before = h.tiny_model().state_dict()
    moved = max((runs["snapshots"][-1][k] - before[k]).abs().max().item() for k in before)
    assert moved > 1e-3  # the parity above is not the trivial "nothing changed"


def test_gathered_params_for_rollout(runs):
    g = runs["ws2"]["gathered"]
    assert g["shape"] == (h.VOCAB, 32) and g["plain"] and g["resharded"]
    assert g["ref_resharded"]  # the frozen reference frees its gathered root after forward, has no grads
    report = g["report"]
    full = sum(p.numel() * 4 for p in h.tiny_model().parameters())
    assert report.full_bytes == full
    assert 0 < report.sharded_bytes < full and report.extra_bytes == full  # the shards stay allocated
    with torch.no_grad():
        want = h.tiny_model()(torch.arange(11)[None] % h.VOCAB).logits
    torch.testing.assert_close(g["logits"], want, atol=1e-6, rtol=0)


def test_resume_at_same_world_size_is_bit_identical(runs):
    resumed = runs["ws2"]["resumed"]
    assert resumed["rank_state"] == {"rank": 0} and not resumed["resharded"]
    final = runs["ws2"]["snapshots"][-1]
    for name, value in resumed["weights"].items():
        assert torch.equal(value, final[name]), name


def test_dcp_checkpoint_ws2_loads_at_ws1(runs):
    from fusedrl.train.dist_checkpoint import latest_dist_checkpoint, load_dist_checkpoint

    path = latest_dist_checkpoint(runs["out"] / "ckpt")
    assert path is not None and path.name == "step_00000002"
    model = h.tiny_model(seed=123)  # different weights: the load must overwrite all of them
    optimizer = h.optimizer_for(model)
    restored = load_dist_checkpoint(path, model=model, optimizer=optimizer)
    assert restored["trainer"] == {"step": 2} and restored["world_size"] == 2 and restored["resharded"]
    assert restored["rank_state"] is None
    saved = runs["ws2"]["snapshots"][RESUME_AT - 1]
    for name, value in model.state_dict().items():
        assert torch.equal(value, saved[name]), name  # loading is a copy: bit for bit
    # The optimizer state came along: the grpo step at world size 1 gives the one-process run's weights.
    record = h.train_step(model, optimizer, RESUME_AT, algo=STEPS[RESUME_AT], rank=0, world=1,
                          ref=h.frozen_reference())
    assert abs(record["loss"] - runs["records"][RESUME_AT]["loss"]) <= 1e-6
    _assert_weights(model.state_dict(), runs["snapshots"][RESUME_AT], "grpo step after the ws2 -> ws1 load")


def test_final_model_is_hf_loadable(runs):
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(runs["out"] / "hf")
    assert type(loaded).__name__ == "Qwen2ForCausalLM"
    final = runs["ws2"]["snapshots"][-1]
    for name, value in loaded.state_dict().items():
        assert torch.equal(value, final[name]), name
