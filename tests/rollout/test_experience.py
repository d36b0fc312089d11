"""Rollouts: verifier loading and errors, sampler vs learner log-probs, packing, dynamic sampling, shaping, state."""
import pytest
import torch

from fusedrl.rollout.rewards import (char_accuracy, ends_cleanly, exact_match, load_verifier, score_completions,
                                    shaped_match)
from fusedrl.rollout.experience import (Experience, PromptSampler, RewardSource, Rollout, Timer, constant_groups,
                                    pack_balanced, rollout_examples, shape_rewards,
                                    token_forward)

from fusedrl.models.causal_lm import token_logprobs
from fusedrl.rollout.completions import make_sampler, sample_rollout
from fusedrl.rollout.sampling import SamplingParams
from tests.helpers import rl_tiny as T

NOT_CALLABLE = 3


def two_required_keywords(prompt, completion, answer, extra):
    return 1.0


def nan_reward(prompt, completion, **fields):
    return float("nan")


# ----------------------------------------------------------------------------- verifiers


def test_load_verifier_finds_functions():
    assert load_verifier("fusedrl.rollout.rewards:exact_match") is exact_match
    assert load_verifier(T.REWARD)("p", "aab") == pytest.approx(2 / 3)


@pytest.mark.parametrize("spec, error, match", [
    ("fusedrl.rollout.rewards.exact_match", ValueError, "expected 'module:function'"),
    ("fusedrl.rollout.rewards:", ValueError, "expected 'module:function'"),
    ("no_such_module_xyz:f", ValueError, "cannot import module 'no_such_module_xyz'"),
    ("fusedrl.rollout.rewards:missing", ValueError, "has no attribute 'missing'"),
    ("tests.rollout.test_experience:NOT_CALLABLE", TypeError, "is a int, expected a function"),
    ("tests.rollout.test_experience:two_required_keywords", TypeError, r"must accept \(prompt, completion"),
    (42, TypeError, "expected a 'module:function' string, got int"),
])
def test_load_verifier_errors_are_clear(spec, error, match):
    with pytest.raises(error, match=match) as info:
        load_verifier(spec, what="rollout.verifier")
    assert "rollout.verifier" in str(info.value)


def test_score_completions_passes_record_fields_and_rejects_bad_scores():
    records = [{"prompt": "reverse: ab", "answer": "ba", "id": 3}, {"prompt": "reverse: cd", "answer": "dc", "id": 4}]
    scores = score_completions(exact_match, ["reverse: ab", "reverse: cd"], ["ba", "cc"], records)
    assert scores.tolist() == [1.0, 0.0] and scores.dtype == torch.float32
    with pytest.raises(ValueError, match="returned nan for sample 0"):
        score_completions(nan_reward, ["p"], ["c"], [{"prompt": "p"}], name="rollout.verifier")
    with pytest.raises(ValueError, match="equal lengths"):
        score_completions(exact_match, ["p"], [], [])


def test_builtin_verifiers():
    assert char_accuracy("p", "abx", answer="abc") == pytest.approx(2 / 3)
    assert char_accuracy("p", "ab", answer="abcd") == pytest.approx(0.5)  # missing characters count as wrong
    assert shaped_match("p", " abc ", answer="abc") == pytest.approx(2.0)
    assert ends_cleanly("p", "abc") == 1.0 and ends_cleanly("p", "abc ") == 0.0 and ends_cleanly("p", "") == 0.0
    with pytest.raises(ValueError, match="answer"):
        char_accuracy("p", "abc")


def test_reward_source_adds_the_weighted_format_score_and_reports_accuracy():
    rollout = Rollout([[1]] * 2, [[2], [3]], [[0.0], [0.0]], [True, True], [0, 1], ["aa ", "ab"], 2)
    records = [{"prompt": "x", "answer": "aa"}, {"prompt": "y", "answer": "aa"}]
    source = RewardSource(verifier=T.REWARD, format_verifier="fusedrl.rollout.rewards:ends_cleanly",
                          format_weight=0.5, accuracy_verifier="fusedrl.rollout.rewards:exact_match")
    assert source(rollout, records).tolist() == pytest.approx([2 / 3 + 0.0, 0.5 + 0.5])
    assert source.accuracy(rollout, records).tolist() == [1.0, 0.0]
    assert source.accuracy(rollout, [{"prompt": "x"}, {"prompt": "y"}]) is None  # no answers: no accuracy
    with pytest.raises(ValueError, match="need a verifier"):
        RewardSource()


# ----------------------------------------------------------------------------- sampling and log-probs


def test_backend_names_are_checked():
    from fusedrl.stages.configs_rl import RolloutConfig, check_rollout

    check_rollout(RolloutConfig(verifier=T.REWARD, backend="native"))
    check_rollout(RolloutConfig(verifier=T.REWARD, backend="hf"))
    with pytest.raises(ValueError, match="rollout.backend: 'vllm'"):
        make_sampler("vllm", None, None)


def test_hf_sampler_implements_the_interface():
    from fusedrl.rollout.hf import HFSampler
    from fusedrl.rollout.sampling import Sampler

    tok = T.tokenizer()
    model = T.tiny_policy(tok)
    sampler = make_sampler("hf", model, tok)
    assert isinstance(sampler, HFSampler) and isinstance(sampler, Sampler)
    prompts = [[1, 5, 6], [1, 7]]
    groups = sampler.generate(prompts, SamplingParams(n=3, max_new_tokens=4, seed=3))
    assert [len(g) for g in groups] == [3, 3]
    again = sampler.generate(prompts, SamplingParams(n=3, max_new_tokens=4, seed=3))
    assert [[c.token_ids for c in g] for g in groups] == [[c.token_ids for c in g] for g in again]  # seeded
    for c in (c for g in groups for c in g):
        assert len(c.token_ids) == len(c.logprobs) <= 4
        assert c.finish_reason == ("stop" if c.token_ids and c.token_ids[-1] == tok.eos_token_id else "length")
    greedy = sampler.generate(prompts, SamplingParams(n=2, temperature=0.0, max_new_tokens=4))
    assert greedy[0][0].token_ids == greedy[0][1].token_ids
    with pytest.raises(ValueError, match="min_p"):
        sampler.generate(prompts, SamplingParams(min_p=0.1))


def test_learner_logprobs_from_the_fused_kernel_equal_the_samplers():
    tok = T.tokenizer()
    model = T.tiny_policy(tok)
    sampler = make_sampler("hf", model, tok, generator=torch.Generator().manual_seed(0))
    rollout = sample_rollout(sampler, tok, T.records(), [0, 4, 5], SamplingParams(n=3, max_new_tokens=6, temperature=0.7))
    assert len(rollout) == 9 and rollout.record_index == [0, 0, 0, 4, 4, 4, 5, 5, 5]
    rollout.rewards = torch.zeros(9)
    exp = Experience.from_rollout(rollout)
    learner = token_forward(exp, lambda b: token_logprobs(model, b, 0.7), 40, torch.device("cpu"))
    for i in range(len(exp)):
        torch.testing.assert_close(learner[i], exp.tok["sampler_logp"][i], rtol=1e-4, atol=1e-4)
        assert torch.all(learner[i][: exp.prompt_lens[i]] == 0)


def test_pack_balanced_respects_the_budget_and_aligns_token_extras():
    generator = torch.Generator().manual_seed(3)
    lengths = torch.randint(3, 15, (23,), generator=generator).tolist()
    prompt_lens = [2] * 23
    rollout = Rollout([[1, 2]] * 23, [torch.randint(7, 11, (n - 2,), generator=generator).tolist() for n in lengths],
                      [torch.rand(n - 2, generator=generator).tolist() for n in lengths], [True] * 23,
                      list(range(23)), [""] * 23, 1, rewards=torch.arange(23.0))
    exp = Experience.from_rollout(rollout)
    assert exp.prompt_lens == prompt_lens
    batches = exp.pack(list(range(23)), 40)
    seen = []
    for batch in batches:
        assert batch.total <= 40
        bounds = batch.cu_seqlens.tolist()
        for k, i in enumerate(batch.extras["sample_index"].tolist()):
            seen.append(i)
            s, e = bounds[k], bounds[k + 1]
            trained = batch.labels[s:e] != -100
            assert batch.labels[s:e][trained].tolist() == rollout.completion_ids[i]
            torch.testing.assert_close(batch.extras["sampler_logp"][s:e][trained],
                                       torch.tensor(rollout.sampler_logp[i]))
            assert batch.extras["rewards"][k] == i
    assert sorted(seen) == list(range(23))
    # Balanced: as few micro-batches as best-fit decreasing, with token counts close to each other.
    sizes = [b.total for b in batches]
    assert max(sizes) - min(sizes) <= max(lengths)
    with pytest.raises(ValueError, match="exceeds budget"):
        pack_balanced(rollout_examples(rollout), 8)


def test_constant_groups_and_dynamic_sampling_drop_exactly_them():
    rewards = torch.tensor([1.0, 1.0, 0.9, 0.0, 0.5, 0.5, 0.2, 0.2, 0.2])
    assert constant_groups(rewards, 3).tolist() == [False, False, True]
    tok = T.tokenizer()
    model = T.tiny_policy(tok)
    # Prompts "a" and "b" always score 1.0; the others score the completion.
    stage = T.pg_stage(tok, algo="dapo", verifier="tests.helpers.rl_tiny:constant_for_ab", resample_rounds=0,
                       overlong_cache_len=0)
    kept, everything, n_kept, n_dropped = stage._sample_and_score(model, Timer())
    constant = constant_groups(everything.rewards, 4).tolist()
    expected = [g for g, c in enumerate(constant) if not c]
    prompts = {T.PROMPTS[everything.record_index[4 * g]] for g, c in enumerate(constant) if c}
    assert {"a", "b"} <= prompts  # the constant prompts are among the dropped groups
    assert kept.record_index == [everything.record_index[4 * g] for g in expected for _ in range(4)]
    assert torch.equal(kept.rewards, everything.select_groups(expected).rewards)
    assert (n_kept, n_dropped) == (len(expected), sum(constant))


def test_dynamic_sampling_refills_from_fresh_prompts():
    tok = T.tokenizer()
    model = T.tiny_policy(tok)
    stage = T.pg_stage(tok, algo="dapo", verifier="tests.helpers.rl_tiny:constant_for_ab", resample_rounds=2,
                       overlong_cache_len=0, rollout=T.rollout_cfg(prompts_per_rollout=4))
    kept, everything, n_kept, n_dropped = stage._sample_and_score(model, Timer())
    assert len(everything) > 16 and n_dropped >= 1  # a second round was drawn
    assert n_kept == kept.num_groups <= 4
    assert not constant_groups(kept.rewards, 4).any()


def test_overlong_shaping():
    rewards = torch.tensor([1.0, 1.0, 1.0, 1.0])
    shaped = shape_rewards(rewards, [4, 6, 7, 8], max_new_tokens=8, overlong_cache_len=4)
    assert shaped.tolist() == pytest.approx([1.0, 0.5, 0.25, 0.0])
    assert torch.equal(shape_rewards(rewards, [8] * 4, max_new_tokens=8, overlong_cache_len=0), rewards)


# ----------------------------------------------------------------------------- state


def test_prompt_sampler_covers_every_prompt_each_epoch_and_resumes():
    sampler = PromptSampler(5, seed=1)
    first = sampler.next(5)
    assert sorted(first) == list(range(5))
    sampler.next(2)
    state = sampler.state_dict()
    expected = sampler.next(6)
    resumed = PromptSampler(5, seed=1)
    resumed.load_state_dict(state)
    assert resumed.next(6) == expected
    with pytest.raises(ValueError, match="num_records"):
        PromptSampler(4, seed=1).load_state_dict(state)
    with pytest.raises(ValueError, match="num_records"):
        PromptSampler(0, seed=1)


def test_experience_state_round_trip():
    rollout = Rollout([[1, 2], [3]], [[4, 5, 6], [7]], [[-0.1, -0.2, -0.3], [-0.4]], [True, False], [0, 1],
                      ["", ""], 1, rewards=torch.tensor([0.5, -1.0]))
    exp = Experience.from_rollout(rollout)
    exp.set_from_completion_view("advantages", torch.tensor([1.0, 2.0, 3.0, 4.0]))
    back = Experience.from_state_dict(exp.state_dict())
    assert [e.input_ids for e in back.examples] == [[1, 2, 4, 5, 6], [3, 7]]
    assert [e.labels for e in back.examples] == [[-100, -100, 4, 5, 6], [-100, 7]]
    assert back.tok["advantages"][0].tolist() == [0, 0, 1, 2, 3] and back.tok["advantages"][1].tolist() == [0, 4]
    assert torch.equal(back.seq["rewards"], exp.seq["rewards"])
