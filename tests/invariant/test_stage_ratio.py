"""Every RL stage reports ratio_ne_1_frac at the first step of each rollout: 0 in invariant mode."""
import pytest
import torch

from fusedrl.kernels.invariant import invariant
from fusedrl.train.loop import train

from tests.helpers import rl_tiny as T


def _records(stage, model, steps, tmp_path):
    records = []
    train(model, stage, T.train_cfg(steps), run_dir=tmp_path, on_step_end=lambda step, r: records.append(r))
    return records


@pytest.mark.parametrize("kind", ["grpo", "ppo"])
def test_ratio_ne_1_frac_is_zero_in_invariant_mode_and_reported_in_both(kind, tmp_path):
    tok = T.tokenizer()
    fractions = {}
    for mode in (False, True):
        model = T.tiny_policy(tok)
        rollout = T.rollout_cfg(prompts_per_rollout=4)
        if kind == "ppo":
            stage = T.ppo_stage(tok, model, rollout=rollout, epochs=2, mini_batches=1)
        else:
            stage = T.pg_stage(tok, rollout=rollout, iterations=2)
        with invariant(mode):
            records = _records(stage, model, 4, tmp_path / f"{kind}{mode}")
        # iterations=2: steps 0 and 2 start a rollout (the sampler's weights), steps 1 and 3 reuse it
        assert [("ratio_ne_1_frac" in r) for r in records] == [True, False, True, False]
        fractions[mode] = [records[0]["ratio_ne_1_frac"], records[2]["ratio_ne_1_frac"]]
        assert all(0.0 <= f <= 1.0 for f in fractions[mode])
    assert fractions[True] == [0.0, 0.0]
    # The default mode's figure is whatever the layouts give; it is a real fraction, not a constant.
    assert all(isinstance(f, float) for f in fractions[False])


def test_ratio_counts_only_trained_tokens_that_differ():
    from types import SimpleNamespace

    from fusedrl.stages.policy_gradient import PolicyGradientStage
    from fusedrl.stages.base import StepTotals

    torch.manual_seed(0)
    hidden, weight = torch.randn(6, 8), torch.randn(11, 8)
    labels = torch.tensor([-100, 3, 4, -100, 7, 1])
    from fusedrl.kernels import linear_logprobs

    exact = linear_logprobs(hidden, weight, labels)
    sampler = exact.clone()
    sampler[2] += 1e-3  # one trained token differs
    sampler[3] += 1.0  # an untrained one: not counted
    stage = SimpleNamespace(rollout=SimpleNamespace(temperature=1.0))
    frac = PolicyGradientStage._ratio_ne_1(stage, hidden, weight, None, SimpleNamespace(labels=labels), sampler,
                                           StepTotals(tokens=4.0, sequences=2.0, groups=2.0))
    assert float(frac) == 0.25
