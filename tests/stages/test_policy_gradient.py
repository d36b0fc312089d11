"""Policy-gradient stages on a tiny model: learning, every algorithm's step, KL/reference, reuse and resume."""
import copy

import pytest
import torch

from fusedrl.train.loop import train
from fusedrl.stages.configs_rl import PolicyGradientConfig
from fusedrl.stages import policy_gradient as pg_module
from fusedrl.stages.policy_gradient import ALGORITHMS, resolve_pg_options

from tests.helpers import rl_tiny as T


def run(stage, model, steps, tmp_path, lr=1e-2):
    """Train `steps` steps; return the per-rollout reward means and the last record."""
    rewards, records = [], []

    def on_step_end(step, record):
        records.append(record)
        if "reward_mean" in record:
            rewards.append(record["reward_mean"])

    train(model, stage, T.train_cfg(steps, lr), run_dir=tmp_path, on_step_end=on_step_end)
    return rewards, records


@pytest.mark.parametrize("algo", ["grpo", "rloo", "reinforce"])
def test_main_algorithms_raise_the_reward(algo, tmp_path):
    tok = T.tokenizer()
    model = T.tiny_policy(tok)
    stage = T.pg_stage(tok, algo=algo)
    rewards, records = run(stage, model, 8, tmp_path)
    assert len(rewards) == 8  # one rollout per step
    first, last = sum(rewards[:2]) / 2, sum(rewards[-2:]) / 2
    # Untrained, about 1 character in 4-5 is an 'a'; a few steps push it well above.
    assert last > first + 0.25, rewards
    for key in ("loss", "grad_norm", "clip_frac", "entropy", "approx_kl", "reward_std", "accuracy",
                "response_len", "time_generate", "generate_tokens_per_s", "time_score", "time_update",
                "update_tokens_per_s"):
        assert key in records[-1], key


# dapo, dr_grpo, gspo, cispo and sapo: each objective's defining property is in test_objectives.py.


def _keys(state):
    """Every key of a nested state dict."""
    if isinstance(state, dict):
        for key, value in state.items():
            yield key
            yield from _keys(value)
    elif isinstance(state, (list, tuple)):
        for value in state:
            yield from _keys(value)


def test_beta_zero_builds_no_reference(monkeypatch, tmp_path):
    tok = T.tokenizer()
    model = T.tiny_policy(tok)

    def no_reference(*args):
        raise AssertionError("a reference model was built with beta = 0")

    monkeypatch.setattr(pg_module, "load_reference", no_reference)
    monkeypatch.setattr(T, "frozen_reference", no_reference)
    stage = T.pg_stage(tok, beta=0.0, iterations=2, rollout=T.rollout_cfg(prompts_per_rollout=4))
    _, records = run(stage, model, 2, tmp_path)
    assert stage.ref_model is None
    assert "ref_logp" not in stage.exp.tok and "kl_ref" not in records[-1]


@pytest.mark.parametrize("kl_in", ["loss", "reward"])
def test_kl_to_a_frozen_reference(kl_in, tmp_path):
    tok = T.tokenizer()
    model = T.tiny_policy(tok)
    initial = copy.deepcopy(model.state_dict())
    stage = T.pg_stage(tok, beta=0.1, kl_kind="k3", kl_in=kl_in, rollout=T.rollout_cfg(prompts_per_rollout=4),
                       policy=model)
    _, records = run(stage, model, 2, tmp_path, lr=3e-2)
    ref = stage.ref_model
    assert ref is not None and not any(p.requires_grad for p in ref.parameters())
    for key, value in ref.state_dict().items():  # the reference is the policy as it was before training
        torch.testing.assert_close(value, initial[key])
    assert records[0]["kl_ref"] == pytest.approx(0.0, abs=1e-6)  # first step: policy == reference
    assert records[-1]["kl_ref"] > 0
    if kl_in == "reward":
        assert "kl_reward" in records[-1]


def test_several_steps_per_rollout_and_truncated_is(tmp_path):
    tok = T.tokenizer()
    model = T.tiny_policy(tok)
    stage = T.pg_stage(tok, iterations=2, mini_batches=2, tis_cap=2.0, rollout=T.rollout_cfg(prompts_per_rollout=4))
    _, records = run(stage, model, 4, tmp_path, lr=3e-2)
    assert [("reward_mean" in r) for r in records] == [True, False, False, False]  # one rollout for 4 steps
    assert [r["rollout_phase"] for r in records] == [0, 1, 2, 3]
    assert records[0]["ratio_mean"] == pytest.approx(1.0, abs=1e-4)  # old log-probs: the learner before updating
    assert records[-1]["approx_kl"] > 0  # later steps are off-policy w.r.t. the stored old log-probs
    assert "is_weight_mean" in records[-1]
    assert stage.rollouts_done == 1


def test_mini_batches_partition_the_rollout_each_pass():
    tok = T.tokenizer()
    model = T.tiny_policy(tok)
    stage = T.pg_stage(tok, iterations=2, mini_batches=2, rollout=T.rollout_cfg(prompts_per_rollout=4))
    seen = []
    for step in range(4):
        batches = stage.micro_batches(model, step)
        seen.append(sorted(i for b in batches for i in b.extras["sample_index"].tolist()))
    n = len(stage.exp)
    assert sorted(seen[0] + seen[1]) == list(range(n)) and sorted(seen[2] + seen[3]) == list(range(n))
    assert seen[0] != seen[2]  # each pass reshuffles


def test_resume_in_the_middle_of_a_rollout_batch():
    tok = T.tokenizer()
    model = T.tiny_policy(tok)
    a = T.pg_stage(tok, iterations=2, rollout=T.rollout_cfg(prompts_per_rollout=4))
    a.micro_batches(model, 0)
    state = copy.deepcopy(a.state_dict())
    b = T.pg_stage(tok, iterations=2, rollout=T.rollout_cfg(prompts_per_rollout=4))
    with pytest.raises(RuntimeError, match="not in memory"):
        b.micro_batches(model, 1)
    b.load_state_dict(state)
    for x, y in zip(a.micro_batches(model, 1), b.micro_batches(model, 1)):
        assert torch.equal(x.input_ids, y.input_ids)
        for key in x.extras:
            assert torch.equal(x.extras[key], y.extras[key]), key
    # The next rollout (step 2) draws the same prompts and samples in both.
    assert torch.equal(a.micro_batches(model, 2)[0].input_ids, b.micro_batches(model, 2)[0].input_ids)


def test_resolve_options_defaults_and_errors():
    rollout = T.rollout_cfg(max_new_tokens=8)
    dapo = resolve_pg_options(PolicyGradientConfig(algo="dapo"), rollout)
    assert (dapo.eps_high, dapo.aggregation, dapo.dynamic_sampling, dapo.overlong_cache_len) == (0.28, "token_mean",
                                                                                                 True, 2)
    dr = resolve_pg_options(PolicyGradientConfig(algo="dr_grpo", eps_high=0.3), rollout)
    assert (dr.aggregation, dr.eps_high, dr.advantage) == ("seq_mean_fixed_len", 0.3, "dr_grpo")
    with pytest.raises(ValueError, match="pg.algo"):
        resolve_pg_options(PolicyGradientConfig(algo="trpo"), rollout)
    with pytest.raises(ValueError, match="group_size"):
        resolve_pg_options(PolicyGradientConfig(algo="grpo"), T.rollout_cfg(group_size=1))
    with pytest.raises(ValueError, match="pg.kl_in"):
        resolve_pg_options(PolicyGradientConfig(kl_in="both"), rollout)
    with pytest.raises(ValueError, match="pg.aggregation"):
        resolve_pg_options(PolicyGradientConfig(aggregation="sum"), rollout)
    with pytest.raises(ValueError, match="pg.overlong_cache_len"):
        resolve_pg_options(PolicyGradientConfig(overlong_cache_len=9), rollout)
    reinforce = resolve_pg_options(PolicyGradientConfig(algo="reinforce"), T.rollout_cfg(group_size=1))
    assert reinforce.advantage == "reinforce"  # no groups needed


def test_evaluate_scores_greedy_completions():
    tok = T.tokenizer()
    model = T.tiny_policy(tok)
    stage = T.pg_stage(tok, evaluate=True)
    model.eval()
    with torch.no_grad():
        result = stage.evaluate(model)
    assert set(result) == {"reward", "accuracy"} and 0.0 <= result["reward"] <= 1.0


def test_builders_read_the_config_tables(tmp_path):
    import json

    from fusedrl.stages.configs_rl import RLTrainConfig
    from fusedrl.stages.policy_gradient import PG_STAGES

    assert sorted(PG_STAGES) == sorted(ALGORITHMS)
    tok = T.tokenizer()
    model = T.tiny_policy(tok)
    data = tmp_path / "prompts.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in T.records()))
    cfg = RLTrainConfig()
    cfg.rollout = T.rollout_cfg(prompts_per_rollout=2)
    with pytest.raises(ValueError, match="data.train"):
        PG_STAGES["rloo"](cfg, model, tok)
    cfg.data.train = str(data)
    cfg.pg.beta = 0.05
    stage = PG_STAGES["rloo"](cfg, model, tok)
    assert stage.name == "rloo" and stage.opt.advantage == "rloo"
    # model.name_or_path is unset: the reference is a frozen copy of the policy, made now, before training
    assert stage.ref_model is not None and stage.ref_model is not model
    assert not any(p.requires_grad for p in stage.ref_model.parameters())
    stage.micro_batches(model, 0)
    assert not set(model.state_dict()) & set(_keys(stage.state_dict())), "no model weights in the stage state"
    cfg.rollout.verifier = "tests.helpers.rl_tiny:missing"
    with pytest.raises(ValueError, match="rollout.verifier: module 'tests.helpers.rl_tiny' has no attribute"):
        PG_STAGES["grpo"](cfg, model, tok)
    cfg.rollout.verifier = None
    with pytest.raises(ValueError, match="rollout: set rollout.verifier"):
        PG_STAGES["grpo"](cfg, model, tok)


@pytest.mark.parametrize("algo", ["grpo", "cispo"])  # sequence- and token-normalised
def test_micro_batch_split_gives_the_big_batch_loss_gradient_and_metrics(algo):
    from fusedrl.train.loop import step_totals

    tok = T.tokenizer()
    model = T.tiny_policy(tok)
    results = []
    for budget in (512, 24):  # one micro-batch, then several
        stage = T.pg_stage(tok, algo=algo, rollout=T.rollout_cfg(prompts_per_rollout=4, token_budget=budget))
        batches = stage.micro_batches(model, 0)
        totals = step_totals(batches, torch.device("cpu"))
        model.zero_grad()
        loss, metrics = 0.0, {}
        for batch in batches:
            part, parts = stage.loss(model, batch, totals)
            part.backward()
            loss += part.item()
            for k, v in parts.items():
                metrics[k] = metrics.get(k, 0.0) + v.item()
        grads = torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.grad is not None])
        results.append((len(batches), loss, metrics, grads))
    (n1, loss1, m1, g1), (n2, loss2, m2, g2) = results
    assert n1 == 1 and n2 > 2
    assert loss2 == pytest.approx(loss1, rel=1e-5, abs=1e-7)
    torch.testing.assert_close(g2, g1, rtol=1e-4, atol=1e-6)
    for key in ("entropy", "ratio_mean", "approx_kl"):
        assert m2[key] == pytest.approx(m1[key], rel=1e-5), key
