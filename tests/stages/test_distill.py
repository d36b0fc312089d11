"""The distill stage: on-policy distillation lowers the student's divergence to a teacher; mixed and self modes;
teacher alignment; the [distill] table's validation; the teacher stays out of checkpoints."""
import copy
import dataclasses

import pytest
import torch

from fusedrl.data.batch import IGNORE_INDEX
from fusedrl.data.packed import Example, build_batch
from fusedrl.models.causal_lm import hidden_states
from fusedrl.rollout.teacher import aligned_hidden, checked_teacher
from fusedrl.stages.configs_distill import DistillStageConfig, check_distill
from fusedrl.stages.distill import DistillStage, completion_pairs
from fusedrl.train.loop import train
from tests.helpers import rl_tiny as T


def sharp_teacher(tok, seed: int = 1, scale: float = 6.0):
    """A tiny random causal LM made confident (its LM head scaled up): a target far from a fresh student."""
    teacher = T.tiny_policy(tok, seed=seed)
    teacher.config.tie_word_embeddings = False
    with torch.no_grad():
        teacher.lm_head.weight = torch.nn.Parameter(teacher.lm_head.weight.detach().clone() * scale)
    return checked_teacher(teacher, device="cpu", vocab_size=len(tok))


def distill_stage(tok, *, mode="on_policy", teacher=None, rollout=None, **cfg):
    rollout = rollout or T.rollout_cfg(group_size=2, max_new_tokens=6)
    records = [{**r, "completion": "aaa"} for r in T.records()]
    distill = DistillStageConfig(mode=mode, teacher=None if mode == "self" else "given", **cfg)
    pairs = completion_pairs(records, tok, 32) if mode == "mixed" else None
    return DistillStage(records=records, tokenizer=tok, rollout=rollout, distill=distill, teacher=teacher,
                        rewards=T.rewards() if mode == "self" else None, data_pairs=pairs,
                        eval_records=records[:4], seed=0)


def _fixed_samples(stage, model, n=8):
    """Student samples drawn once (a fixed held-out set to measure the divergence on)."""
    g = torch.Generator().manual_seed(123)
    from fusedrl.rollout.completions import make_sampler, sample_rollout
    from fusedrl.rollout.sampling import SamplingParams
    rollout = sample_rollout(make_sampler("hf", model, stage.tokenizer, generator=g), stage.tokenizer, stage.records,
                             list(range(n)), SamplingParams(n=1, max_new_tokens=6))
    return [(list(p), list(c), list(p)) for p, c in zip(rollout.prompt_ids, rollout.completion_ids) if c]


def test_on_policy_distillation_lowers_the_divergence_to_the_teacher(tmp_path):
    tok = T.tokenizer()
    student = T.tiny_policy(tok, seed=0)
    stage = distill_stage(tok, teacher=sharp_teacher(tok))
    held_out = _fixed_samples(stage, student)
    before = stage.divergence(student, held_out)
    rows = []
    train(student, stage, T.train_cfg(25, lr=1e-2), run_dir=tmp_path,
          on_step_end=lambda step, metrics: rows.append(metrics["divergence"]))
    after = stage.divergence(student, _fixed_samples(stage, student))
    assert len(rows) == 25 and all(torch.isfinite(torch.tensor(rows)))
    assert sum(rows[-5:]) / 5 < 0.7 * sum(rows[:5]) / 5, rows
    assert after < 0.7 * before, (before, after)
    assert stage.evaluate(student)["divergence"] >= 0


def test_teacher_is_frozen_and_never_in_the_state_dict():
    tok = T.tokenizer()
    teacher = sharp_teacher(tok)
    stage = distill_stage(tok, teacher=teacher)
    student = T.tiny_policy(tok)
    (batch,) = stage.micro_batches(student, 0)[:1]
    loss, _ = stage.loss(student, batch, T_totals(batch))
    loss.backward()
    assert all(p.grad is None and not p.requires_grad for p in teacher.model.parameters())
    assert any(p.grad is not None for p in student.parameters())
    state = stage.state_dict()
    assert set(state) == {"prompts", "generator"}
    assert "trainables" not in dir(stage) or set(stage.trainables(student)) == {"policy"}


def T_totals(batch):
    from fusedrl.stages.base import StepTotals
    return StepTotals(batch.num_tokens, batch.num_seqs, batch.num_seqs)


def test_aligned_hidden_matches_the_teacher_on_its_own_prefix():
    tok = T.tokenizer()
    model = T.tiny_policy(tok)
    model.eval()
    prompt, completion, other = [1, 7, 8], [9, 10, 2], [1, 10, 10, 9, 7]
    student_batch = build_batch([Example(prompt + completion, [IGNORE_INDEX] * 3 + completion)], [0])
    h = aligned_hidden(model, student_batch, [other], [3], "cpu")
    teacher_batch = build_batch([Example(other + completion, [IGNORE_INDEX] * 5 + completion)], [0])
    ref = hidden_states(model, teacher_batch)
    torch.testing.assert_close(h[2:5], ref[4:7])  # positions predicting the completion tokens
    assert h[:2].abs().sum() == 0 and h[5].abs().sum() == 0
    same = aligned_hidden(model, student_batch, [prompt], [3], "cpu")
    torch.testing.assert_close(same[2:5], hidden_states(model, student_batch)[2:5])


def test_mixed_mode_alternates_student_samples_and_data_completions():
    tok = T.tokenizer()
    stage = distill_stage(tok, mode="mixed", teacher=sharp_teacher(tok), lam=0.5)
    student = T.tiny_policy(tok)
    kinds = []
    for step in range(12):
        batches = stage.micro_batches(student, step)
        kinds.append(stage.host_metrics()["on_policy"])
        if not kinds[-1]:  # the data's completion "aaa" (+ eos) is what is trained
            ids = torch.cat([b.labels[b.labels != IGNORE_INDEX] for b in batches]).tolist()
            assert ids.count(tok.convert_tokens_to_ids("a")) == 3 * 8
    assert 0 < sum(kinds) < 12


def test_self_mode_skips_groups_without_a_correct_completion(monkeypatch):
    tok = T.tokenizer()
    rollout = T.rollout_cfg(group_size=2, max_new_tokens=4, verifier="tests.helpers.rl_tiny:fraction_of_a")
    stage = distill_stage(tok, mode="self", rollout=rollout, correct_threshold=0.5, resample_rounds=1)
    student = T.tiny_policy(tok)
    batches = stage.micro_batches(student, 0)
    host = stage.host_metrics()
    assert host["groups_kept"] + host["groups_skipped"] >= 1
    loss, metrics = stage.loss(student, batches[0], T_totals(batches[0]))
    assert torch.isfinite(loss) and metrics["divergence"] >= 0
    # with an impossible threshold nothing is kept, the step still runs and trains nothing
    stage = distill_stage(tok, mode="self", rollout=rollout, correct_threshold=2.0, resample_rounds=0)
    (batch,) = stage.micro_batches(student, 0)
    assert batch.num_tokens == 0 and stage.host_metrics()["groups_kept"] == 0


def test_self_mode_teacher_prompt_shows_a_correct_sibling():
    tok = T.tokenizer()
    rollout = T.rollout_cfg(group_size=2, max_new_tokens=4, prompts_per_rollout=4)
    # threshold 0: every completion is correct, so sample j of a group is shown its sibling 1 - j
    stage = distill_stage(tok, mode="self", rollout=rollout, correct_threshold=0.0, demo_template="{prompt}{demo}")
    stage.rewards.verifier = lambda prompt, completion, **fields: 1.0
    student = T.tiny_policy(tok)
    samples = stage._self_samples(student)
    text = lambda ids: tok.decode(ids, skip_special_tokens=True)  # noqa: E731
    assert len(samples) == 8 and any(text(c) for _, c, _ in samples)
    for k in range(0, 8, 2):
        (p0, c0, t0), (p1, c1, t1) = samples[k], samples[k + 1]
        assert text(t0) == text(p0) + text(c1) and text(t1) == text(p1) + text(c0)
        assert p0 == p1 and (t0 != p0 or not text(c1))


@pytest.mark.parametrize("field,value,match", [
    ("mode", "offline", "distill.mode"), ("kind", "tv", "distill.kind"), ("beta", 1.5, "distill.beta"),
    ("temperature", 0.0, "distill.temperature"), ("lam", -0.1, "distill.lam"), ("top_k", -1, "distill.top_k"),
    ("aggregation", "sum", "distill.aggregation"), ("resample_rounds", -1, "distill.resample_rounds"),
    ("teacher", None, "distill.teacher")])
def test_config_validation_names_the_key(field, value, match):
    cfg = dataclasses.replace(DistillStageConfig(teacher="t"), **{field: value})
    with pytest.raises(ValueError, match=match):
        check_distill(cfg, T.rollout_cfg())


def test_self_mode_config_needs_a_verifier_siblings_and_a_template():
    good = DistillStageConfig(mode="self")
    check_distill(good, T.rollout_cfg(group_size=2))
    with pytest.raises(ValueError, match="rollout.verifier"):
        check_distill(good, T.rollout_cfg(verifier=None))
    with pytest.raises(ValueError, match="rollout.group_size"):
        check_distill(good, T.rollout_cfg(group_size=1))
    with pytest.raises(ValueError, match="distill.demo_template"):
        check_distill(dataclasses.replace(good, demo_template="{prompt}"), T.rollout_cfg())
    with pytest.raises(ValueError, match="rollout.max_new_tokens"):
        check_distill(DistillStageConfig(teacher="t"), T.rollout_cfg(max_new_tokens=0))


def test_teacher_with_another_vocabulary_is_refused():
    tok = T.tokenizer()
    with pytest.raises(ValueError, match="vocabulary"):
        checked_teacher(T.tiny_policy(tok), device="cpu", vocab_size=len(tok) + 1)


def test_offloaded_teacher_lives_on_the_cpu_between_uses():
    tok = T.tokenizer()
    teacher = sharp_teacher(tok)
    teacher.offload = True
    stage = distill_stage(tok, teacher=teacher)
    student = T.tiny_policy(tok)
    batches = stage.micro_batches(student, 0)
    assert next(teacher.model.parameters()).device.type == "cpu"
    weight, _ = teacher.head()
    assert weight.requires_grad is False and "teacher_hidden" in batches[0].extras


# ----------------------------------------------------------------------------- distillation as a reward


def _reverse_kl_oracle(student, teacher, example_ids):
    """KL(p_student || p_teacher) of every next-token distribution of one document, from full logits."""
    ids = torch.tensor([example_ids])
    with torch.no_grad():
        ls = torch.log_softmax(student(ids).logits[0].double(), -1)
        lt = torch.log_softmax(teacher(ids).logits[0].double(), -1)
    return (ls.exp() * (ls - lt)).sum(-1)  # (L,) position t: the distribution emitting token t + 1


@pytest.mark.parametrize("algo", ["grpo", "ppo"])
def test_distillation_reward_is_the_negative_reverse_kl_per_token(algo):
    from fusedrl.stages.ppo import PPOStage  # noqa: F401  (the PPO path is exercised below)

    tok = T.tokenizer()
    teacher = sharp_teacher(tok)
    policy = T.tiny_policy(tok)
    coef = 0.5
    if algo == "grpo":
        stage = T.pg_stage(tok, rollout=T.rollout_cfg(prompts_per_rollout=4))
    else:
        stage = T.ppo_stage(tok, policy, rollout=T.rollout_cfg(prompts_per_rollout=4), whiten=False, beta=0.0,
                            gamma=1.0, lam=1.0)
    stage.distill_teacher, stage.distill_coef = teacher, coef
    stage.micro_batches(policy, 0)
    exp = stage.exp
    for i in range(len(exp)):
        p, ids = exp.prompt_lens[i], exp.examples[i].input_ids
        oracle = _reverse_kl_oracle(policy, teacher.model, ids)
        got = exp.tok["distill_kl"][i]
        assert got[:p].abs().sum() == 0
        torch.testing.assert_close(got[p:].double(), oracle[p - 1:len(ids) - 1], atol=1e-4, rtol=1e-4)
    kl = exp.completion_view("distill_kl")
    lengths = torch.tensor(exp.completion_lengths())
    adv = exp.completion_view("advantages")
    if algo == "grpo":
        from fusedrl.kernels import grpo_advantages
        expected = torch.repeat_interleave(grpo_advantages(exp.seq["rewards"], 4, eps=1e-4).float(), lengths) - coef * kl
    else:  # gamma = lam = 1, zero initial values: A_t = sum_{s >= t} r_s with r_s = -coef KL_s (+ R at the end)
        r = -coef * kl
        ends = torch.cumsum(lengths, 0) - 1
        r[ends] += exp.seq["rewards"]
        seq = torch.repeat_interleave(torch.arange(len(lengths)), lengths)
        expected = torch.stack([r[(seq == seq[t]) & (torch.arange(len(r)) >= t)].sum() for t in range(len(r))])
    torch.testing.assert_close(adv, expected.float(), atol=1e-4, rtol=1e-4)
    assert stage.host_metrics()["distill_kl"] > 0


def test_distillation_reward_options_are_checked():
    from fusedrl.stages.configs_rl import PolicyGradientConfig, PPOConfig, check_policy_options

    with pytest.raises(ValueError, match="pg.distill_teacher"):
        check_policy_options("pg", PolicyGradientConfig(distill_coef=0.1))
    with pytest.raises(ValueError, match="ppo.distill_coef"):
        check_policy_options("ppo", PPOConfig(distill_coef=-1.0, distill_teacher="t"))
    check_policy_options("pg", PolicyGradientConfig(distill_coef=0.1, distill_teacher="t"))
    tok = T.tokenizer()
    with pytest.raises(ValueError, match="distill_teacher"):
        T.pg_stage(tok).__class__(records=T.records(), tokenizer=tok, rollout=T.rollout_cfg(),
                                  options=T.pg_stage(tok).opt, rewards=T.rewards(), distill_coef=0.5)
