"""A process reward model as the RL reward from the [rollout] table: config checks, the reward path of GRPO
(one aggregated score per completion, summed with a verifier) and PPO (per-token rewards at step ends, into
GAE), worked out by hand on a real saved PRM whose step score depends only on the step's last token."""
import json
import math
from pathlib import Path

import pytest
import torch

from fusedrl.config import load_config
from fusedrl.config_io import ConfigError
from fusedrl.data.tokenizer import build_char_tokenizer
from fusedrl.models.process_head import ProcessRewardModel
from fusedrl.models.scalar_head import ScalarHeadModel
from fusedrl.rollout.experience import Rollout, RewardSource, Timer, build_reward_source
from fusedrl.stages import STAGE_CONFIGS, check_stage_config
from fusedrl.stages.configs_rl import PPOConfig, PolicyGradientConfig, RolloutConfig, check_rollout, resolve_pg_options
from fusedrl.stages.policy_gradient import PolicyGradientStage
from fusedrl.stages.ppo import PPOStage, resolve_ppo_options
from tests.helpers import rl_tiny as T

ROOT = Path(__file__).resolve().parents[2]
# The PRM's logit of a step ending at each character: sigmoid(3) = .953, (1) = .731, (-1) = .269, (-2) = .119
LOGITS = {"a": 0.0, "b": 1.0, "\n": 3.0, "c": -1.0, "<eos>": -2.0}


def sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def fixed_prm(tok, logit_by_token: dict, folder: Path) -> Path:
    """Save a real scalar-head ProcessRewardModel whose logit at a token depends only on that token.

    Every layer's residual branch is zeroed (o_proj, down_proj), so the final hidden state is
    RMSNorm(embedding); embedding k is (cos t_k, sin t_k, 0, ...), normalised to sqrt(H) (cos t_k, sin t_k, 0, ...),
    and the head w = (L / sqrt(H), 0, ...) reads L cos t_k: t_k = arccos(logit_k / L) gives any logit in [-L, L].
    """
    policy = T.tiny_policy(tok)
    prm = ProcessRewardModel.from_causal_lm(policy, head="scalar")
    hidden, bound = policy.config.hidden_size, 4.0
    with torch.no_grad():
        for layer in prm.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        emb = prm.model.embed_tokens.weight
        emb.zero_()
        emb[:, 1] = 1.0  # cos t = 0: logit 0 for every token not listed
        for token, logit in logit_by_token.items():
            k = tok.convert_tokens_to_ids(token)
            emb[k, 0], emb[k, 1] = logit / bound, math.sqrt(1.0 - (logit / bound) ** 2)
        prm.score.weight.zero_()
        prm.score.weight[0, 0] = bound / math.sqrt(hidden)
        prm.score.bias.zero_()
    prm.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tok():
    return build_char_tokenizer("abc\n")


@pytest.fixture(scope="module")
def prm_folder(tok, tmp_path_factory):
    return fixed_prm(tok, LOGITS, tmp_path_factory.mktemp("prm") / "prm")


# Four completions of prompt "a" (one group of 4), with their step ends and the PRM's step scores:
#   "a\nb\n"     steps end at the two "\n" (1, 3)               scores (s(3), s(3))
#   "a\nc"       "\n" (1), then a trailing step ending at "c" (2)  (s(3), s(-1))
#   "bb"         one step, ending at the last "b" (1)             (s(1),)
#   "c\na<eos>"  "\n" (1), then "a<eos>" ending at <eos> (3)       (s(3), s(-2))
TEXTS = ["a\nb\n", "a\nc", "bb", "c\na"]
STEP_SCORES = [[sig(3), sig(3)], [sig(3), sig(-1)], [sig(1)], [sig(3), sig(-2)]]
STEP_ENDS = [[1, 3], [1, 2], [1], [1, 3]]
VERIFIER = [t.count("a") / len(t) for t in TEXTS]  # tests.helpers.rl_tiny:fraction_of_a


def fixed_rollout(tok) -> Rollout:
    ids = [tok.convert_tokens_to_ids(list(t)) for t in TEXTS]
    ids[3] = ids[3] + [tok.eos_token_id]
    prompt = tok("a", add_special_tokens=False)["input_ids"]
    return Rollout([list(prompt)] * 4, ids, [[0.0] * len(c) for c in ids], [True] * 4, [0] * 4, list(TEXTS), 4)


def _patch_sampling(monkeypatch, rollout):
    import fusedrl.rollout.completions as completions
    import fusedrl.stages.policy_gradient as pg

    monkeypatch.setattr(pg, "make_sampler", lambda *a, **k: None)
    monkeypatch.setattr(completions, "sample_rollout", lambda *a, **k: rollout)  # under sample_rollout_divided


def _rollout_cfg(folder, **overrides) -> RolloutConfig:
    base = dict(prompts_per_rollout=1, group_size=4, max_new_tokens=8, token_budget=128, verifier=T.REWARD,
                process_reward_model=str(folder), prm_weight=2.0, prm_step_separator="\n")
    return RolloutConfig(**{**base, **overrides})


@pytest.mark.parametrize("how, pick", [("min", min), ("product", math.prod), ("prod", math.prod),
                                       ("last", lambda s: s[-1])])
def test_grpo_advantages_from_a_prm_plus_a_verifier_by_hand(tok, prm_folder, monkeypatch, how, pick):
    rollout_cfg = _rollout_cfg(prm_folder, prm_aggregation=how)
    check_rollout(rollout_cfg)
    _patch_sampling(monkeypatch, fixed_rollout(tok))
    options = resolve_pg_options(PolicyGradientConfig(algo="grpo"), rollout_cfg)
    stage = PolicyGradientStage(records=[{"prompt": "a"}], tokenizer=tok, rollout=rollout_cfg, options=options,
                                rewards=build_reward_source(rollout_cfg, "cpu", tokenizer=tok), seed=0)
    exp = stage._make_experience(T.tiny_policy(tok), Timer())
    # R_i = verifier_i + 2 * aggregate(step scores); A_i = (R_i - mean R) / (unbiased std R + 1e-4)
    rewards = [v + 2.0 * pick(s) for v, s in zip(VERIFIER, STEP_SCORES)]
    mean = sum(rewards) / 4
    std = math.sqrt(sum((r - mean) ** 2 for r in rewards) / 3)
    adv = [(r - mean) / (std + 1e-4) for r in rewards]
    torch.testing.assert_close(exp.seq["rewards"], torch.tensor(rewards))
    torch.testing.assert_close(exp.seq["advantages"], torch.tensor(adv))
    want = torch.cat([torch.full((n,), a) for n, a in zip(exp.completion_lengths(), adv)])
    torch.testing.assert_close(exp.completion_view("advantages"), want)
    assert "dense_rewards" not in exp.tok


def test_ppo_gae_takes_the_prm_step_rewards_by_hand(tok, prm_folder, monkeypatch):
    rollout_cfg = _rollout_cfg(prm_folder, prm_baseline=0.5)
    _patch_sampling(monkeypatch, fixed_rollout(tok))
    ppo = PPOConfig(beta=0.0, whiten=False, gamma=1.0, lam=1.0)
    policy = T.tiny_policy(tok)
    value = ScalarHeadModel.from_causal_lm(T.tiny_policy(tok), init_std=0.0)  # V = 0 everywhere
    stage = PPOStage(value_model=value, ppo=ppo, records=[{"prompt": "a"}], tokenizer=tok, rollout=rollout_cfg,
                     options=resolve_ppo_options(ppo),
                     rewards=build_reward_source(rollout_cfg, "cpu", tokenizer=tok, prm_dense=True), seed=0)
    exp = stage._make_experience(policy, Timer())
    torch.testing.assert_close(exp.seq["rewards"], torch.tensor(VERIFIER))  # the PRM is not in the sequence reward
    lengths = exp.completion_lengths()
    assert lengths == [4, 3, 2, 4]
    want_adv = []
    for n, ends, scores, v in zip(lengths, STEP_ENDS, STEP_SCORES, VERIFIER):
        r = [0.0] * n  # r_t = 2 (s_k - 0.5) at the token ending step k, + R on the last token
        for e, s in zip(ends, scores):
            r[e] += 2.0 * (s - 0.5)
        r[-1] += v
        want_adv += [sum(r[t:]) for t in range(n)]  # gamma = lam = 1, V = 0: A_t = sum of the rewards from t on
    torch.testing.assert_close(exp.completion_view("advantages"), torch.tensor(want_adv))
    torch.testing.assert_close(exp.completion_view("returns"), torch.tensor(want_adv))
    dense = exp.completion_view("dense_rewards")
    assert dense[1].item() == pytest.approx(2 * (sig(3) - 0.5), abs=1e-5) and dense[0].item() == 0.0
    resumed = type(exp).from_state_dict(exp.state_dict())
    torch.testing.assert_close(resumed.completion_view("dense_rewards"), dense)


def test_prm_only_reward_and_the_rollout_keeps_dense_rewards_through_selection(tok, prm_folder):
    cfg = _rollout_cfg(prm_folder, verifier=None, prm_weight=1.0, prm_aggregation="last")
    check_rollout(cfg)  # the PRM alone is a reward
    source = build_reward_source(cfg, "cpu", tokenizer=tok)
    rollout = fixed_rollout(tok)
    torch.testing.assert_close(source(rollout, [{"prompt": "a"}]), torch.tensor([s[-1] for s in STEP_SCORES]))
    assert source.token_rewards(rollout) is None
    dense = build_reward_source(cfg, "cpu", tokenizer=tok, prm_dense=True)
    torch.testing.assert_close(dense(rollout, [{"prompt": "a"}]), torch.zeros(4))
    rollout.token_rewards = dense.token_rewards(rollout)
    both = Rollout.concat([rollout, rollout])
    assert len(both.token_rewards) == 8 and both.select_groups([1]).token_rewards[2] is rollout.token_rewards[2]


def test_bad_prm_keys_raise_config_errors_naming_them(tok, prm_folder, tmp_path):
    for key, value in (("prm_aggregation", "mean"), ("prm_step_separator", ""), ("prm_weight", float("nan")),
                       ("prm_baseline", "x")):
        with pytest.raises(ConfigError, match=f"rollout.{key}"):
            check_rollout(_rollout_cfg(prm_folder, **{key: value}))
    (tmp_path / "rm").mkdir()
    (tmp_path / "rm" / "config.json").write_text(json.dumps({"model_type": "qwen2"}))
    for folder in (tmp_path / "missing", tmp_path / "rm"):
        with pytest.raises(ConfigError, match="rollout.process_reward_model: .* is not a process reward model"):
            check_rollout(_rollout_cfg(folder))
    toml = tmp_path / "grpo.toml"
    toml.write_text(f'[run]\nstage = "grpo"\n[rollout]\nprocess_reward_model = "{prm_folder}"\n'
                    'prm_aggregation = "avg"\n')
    with pytest.raises(ConfigError, match="rollout.prm_aggregation"):  # at load time
        check_stage_config(load_config(toml, cls=STAGE_CONFIGS["grpo"]), "grpo")
    with pytest.raises(ValueError, match="tokenizer"):
        build_reward_source(_rollout_cfg(prm_folder), "cpu")
    with pytest.raises(ConfigError, match="vocabulary"):
        build_reward_source(_rollout_cfg(prm_folder), "cpu", tokenizer=build_char_tokenizer("abcdefgh\n"))
    with pytest.raises(ValueError, match="prm_aggregation"):
        RewardSource(verifier=T.REWARD, prm_aggregation="mean")


@pytest.mark.parametrize("stage", ["grpo", "ppo"])
def test_fusedrl_train_with_a_prm_reward_from_the_config(tmp_path, caplog, stage):
    """`fusedrl train examples/{grpo,ppo}_tiny.toml` rewarded by a saved PRM named in [rollout] (no verifier)."""
    from fusedrl.cli import main
    from fusedrl.data.tokenizer import build_tokenizer

    example = ROOT / "examples" / f"{stage}_tiny.toml"
    tok = build_tokenizer(load_config(example, cls=STAGE_CONFIGS[stage]).model)  # the policy's tokenizer
    folder = fixed_prm(tok, {t: 1.0 for t in tok.get_vocab()}, tmp_path / "prm")  # every step scores sigmoid(1)
    out = tmp_path / "run"
    argv = ["train", str(example), f"--run.out_dir={out}", "--logging.progress=false", "--logging.plots=false",
            "--run.num_threads=1", f"--data.train={ROOT / 'examples/data/prompts_train.jsonl'}",
            f"--data.eval={ROOT / 'examples/data/prompts_eval.jsonl'}", "--loop.max_steps=2", "--loop.eval_every=0",
            "--rollout.verifier=none", f"--rollout.process_reward_model={folder}", "--rollout.prm_weight=2.0"]
    assert main([*argv, "--rollout.prm_aggregation=mean"]) == 2  # a bad key fails at load time, exit 2
    assert "rollout.prm_aggregation" in caplog.text
    assert main(argv) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["kind"] == "train"]
    assert [r["step"] for r in train] == [1, 2] and all(math.isfinite(r["loss"]) for r in train)
    if stage == "grpo":  # one score per completion: 2 sigmoid(1) per completion with a step, 0 for an empty one
        assert all(0.0 < r["reward_mean"] <= 2 * sig(1.0) + 1e-5 for r in train if "reward_mean" in r), train
    else:  # PPO: the PRM is in the per-token rewards, not the sequence reward (0 without a verifier)
        assert all(r["reward_mean"] == 0.0 for r in train if "reward_mean" in r), train
        assert all(0.0 < r["dense_reward"] <= 2 * sig(1.0) * 8 + 1e-5 for r in train if "reward_mean" in r), train
    assert any("reward_mean" in r for r in train)
