"""PPO: GAE on packed sequences equals a per-sequence loop, the critic trains, the reward rises, builders."""
import json

import pytest
import torch

from fusedrl.train.loop import train
from fusedrl.stages.configs_rl import PPOConfig, RLTrainConfig
from fusedrl.stages import policy_gradient as pg_module
from fusedrl.stages.ppo import build_ppo_stage, resolve_ppo_options

from tests.helpers import rl_tiny as T


def gae_loop(rewards, values, gamma, lam):
    """Textbook GAE of one sequence, V past the end = 0."""
    adv, running = [0.0] * len(rewards), 0.0
    for t in reversed(range(len(rewards))):
        next_value = values[t + 1] if t + 1 < len(rewards) else 0.0
        running = rewards[t] + gamma * next_value - values[t] + gamma * lam * running
        adv[t] = running
    return adv, [a + v for a, v in zip(adv, values)]


def test_gae_through_the_stage_equals_a_per_sequence_loop():
    tok = T.tokenizer()
    model = T.tiny_policy(tok)
    stage = T.ppo_stage(tok, model, whiten=False, gamma=0.9, lam=0.8, beta=0.0, epochs=1, mini_batches=1)
    with torch.no_grad():  # a random head so the values are not all 0
        stage.value_model.score.weight.normal_(0.0, 0.5)
    batches = stage.micro_batches(model, 0)
    exp = stage.exp
    lengths = exp.completion_lengths()
    assert len(set(lengths)) > 1  # sequences of different lengths packed together
    for i in range(len(exp)):
        p = exp.prompt_lens[i]
        values = exp.tok["old_values"][i][p:].tolist()
        rewards = [0.0] * len(values)
        rewards[-1] = float(exp.seq["rewards"][i])  # the sequence reward on the last completion token
        adv, ret = gae_loop(rewards, values, 0.9, 0.8)
        torch.testing.assert_close(exp.tok["advantages"][i][p:], torch.tensor(adv), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(exp.tok["returns"][i][p:], torch.tensor(ret), rtol=1e-5, atol=1e-5)
    # The packed batches carry them at the positions whose label is the token (shifted like the labels).
    for batch in batches:
        bounds = batch.cu_seqlens.tolist()
        for k, i in enumerate(batch.extras["sample_index"].tolist()):
            s, e = bounds[k], bounds[k + 1]
            trained = batch.labels[s:e] != -100
            assert torch.equal(batch.extras["advantages"][s:e][trained], exp.tok["advantages"][i][exp.prompt_lens[i]:])
    # old_values come from the value model on the same packed layout the loss sees.
    for batch in batches:
        with torch.no_grad():
            values = stage.value_model.token_values(batch)
        trained = batch.labels != -100
        torch.testing.assert_close(values[trained], batch.extras["old_values"][trained], rtol=1e-5, atol=1e-5)


def test_ppo_raises_the_reward_and_trains_the_critic(tmp_path):
    tok = T.tokenizer()
    model = T.tiny_policy(tok)
    stage = T.ppo_stage(tok, model, epochs=1, mini_batches=2, beta=0.01)
    head_before = stage.value_model.score.weight.detach().clone()
    rewards, records = [], []

    def on_step_end(step, record):
        records.append(record)
        if "reward_mean" in record:
            rewards.append(record["reward_mean"])

    train(model, stage, T.train_cfg(12), run_dir=tmp_path, on_step_end=on_step_end)
    assert len(rewards) == 6  # a rollout every epochs * mini_batches = 2 steps
    assert sum(rewards[-2:]) / 2 > sum(rewards[:2]) / 2 + 0.25, rewards
    assert not torch.equal(stage.value_model.score.weight, head_before)  # the critic's own optimizer stepped
    for key in ("value_loss", "vf_clip_frac", "value_grad_norm", "kl_ref", "kl_reward", "clip_frac", "time_logprobs"):
        assert any(key in r for r in records), key
    # The critic tracks the rising reward: its mean prediction moves up from the zero-initialised head.
    assert records[-1]["value_mean"] > 0.2


def test_value_update_is_applied_before_the_next_step_and_in_state_dict():
    tok = T.tokenizer()
    model = T.tiny_policy(tok)
    stage = T.ppo_stage(tok, model, epochs=1, mini_batches=1, rollout=T.rollout_cfg(prompts_per_rollout=2))
    (batch,) = stage.micro_batches(model, 0)
    loss, _ = stage.loss(model, batch, batch.num_tokens)
    loss.backward()
    head = stage.value_model.score.weight.detach().clone()
    state = stage.state_dict()  # applies the pending value update
    assert not torch.equal(stage.value_model.score.weight, head)
    assert torch.equal(state["value_model"]["score.weight"], stage.value_model.score.weight)
    assert all(p.grad is None for p in stage.value_model.parameters())


def test_resolve_ppo_options_errors():
    assert resolve_ppo_options(PPOConfig(epochs=3, mini_batches=4)).steps_per_rollout == 12
    with pytest.raises(ValueError, match="ppo.epochs"):
        resolve_ppo_options(PPOConfig(epochs=0))
    with pytest.raises(ValueError, match="ppo.lam"):
        resolve_ppo_options(PPOConfig(lam=1.5))
    with pytest.raises(ValueError, match="ppo.kl_in"):
        resolve_ppo_options(PPOConfig(kl_in="value"))


def test_builder_with_a_reward_model_and_no_reference(tmp_path, monkeypatch):
    """The config path: prompts from a file, rewards from a saved scalar-head model, value model from it."""
    from fusedrl.models.scalar_head import ScalarHeadModel

    tok = T.tokenizer()
    model = T.tiny_policy(tok)
    torch.manual_seed(1)
    ScalarHeadModel.from_causal_lm(T.tiny_policy(tok, seed=1)).save_pretrained(tmp_path / "rm")
    data = tmp_path / "prompts.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in T.records()))
    cfg = RLTrainConfig()
    cfg.data.train = str(data)
    cfg.rollout = T.rollout_cfg(verifier=None, reward_model=str(tmp_path / "rm"), prompts_per_rollout=2)
    cfg.ppo.beta = 0.0
    cfg.ppo.epochs = cfg.ppo.mini_batches = 1

    def no_reference(*args):
        raise AssertionError("a reference model was built with beta = 0")

    monkeypatch.setattr(pg_module.PolicyGradientStage, "_reference", no_reference)
    monkeypatch.setattr("fusedrl.stages.ppo.load_reference", no_reference)
    stage = build_ppo_stage(cfg, model, tok)
    (batch,) = stage.micro_batches(model, 0)
    assert stage.ref_model is None
    rm = stage.rewards.reward_model
    saved = ScalarHeadModel.from_pretrained(tmp_path / "rm", device="cpu")
    torch.testing.assert_close(stage.value_model.score.weight, saved.score.weight)  # critic starts as the RM
    assert stage.value_model.score.weight.data_ptr() != rm.score.weight.data_ptr()  # ... as a copy
    # Rewards are the reward model's scores of prompt + completion at the last token.
    exp = stage.exp
    from fusedrl.rollout.experience import reward_model_scores

    torch.testing.assert_close(exp.seq["rewards"], reward_model_scores(saved, exp.examples, 64))


def test_resume_mid_rollout_through_the_loop_equals_an_uninterrupted_run(tmp_path):
    """Checkpoint after step 1 of a 2-step rollout batch, resume, and end with the same policy and critic."""
    def fresh():
        tok = T.tokenizer()
        model = T.tiny_policy(tok)
        stage = T.ppo_stage(tok, model, epochs=2, mini_batches=1, beta=0.05,
                            rollout=T.rollout_cfg(prompts_per_rollout=4))
        return model, stage

    model_a, stage_a = fresh()
    train(model_a, stage_a, T.train_cfg(3), run_dir=tmp_path / "a")
    stage_a.finish()
    model_b, stage_b = fresh()
    train(model_b, stage_b, T.train_cfg(1), run_dir=tmp_path / "b")
    model_c, stage_c = fresh()
    with torch.no_grad():  # the resumed run must not depend on its own initial weights
        for p in model_c.parameters():
            p.add_(0.1)
    train(model_c, stage_c, T.train_cfg(3), run_dir=tmp_path / "b", resume=True)
    stage_c.finish()
    for (name, a), c in zip(model_a.state_dict().items(), model_c.state_dict().values()):
        torch.testing.assert_close(c, a, rtol=1e-5, atol=1e-6, msg=name)
    for (name, a), c in zip(stage_a.value_model.state_dict().items(), stage_c.value_model.state_dict().values()):
        torch.testing.assert_close(c, a, rtol=1e-5, atol=1e-6, msg=name)
