"""Process reward models: PRM data, the reward_model stage with kind = "process", its config, and a PRM as reward."""
import dataclasses
import json
from pathlib import Path

import pytest
import torch

from fusedrl.data.batch import IGNORE_INDEX
from fusedrl.data.packed import PackedDataset, build_batch
from fusedrl.data.records import tokenize_prompt
from fusedrl.data.prm import check_prm_record, prm_examples, step_class, tokenize_prm
from fusedrl.data.tokenizer import build_char_tokenizer
from fusedrl.models.process_head import ProcessRewardModel
from fusedrl.rollout.experience import Rollout
from fusedrl.rollout.prm_reward import ProcessRewardScorer, completion_step_ends
from fusedrl.stages.configs_alignment import RewardModelConfig, check_section
from fusedrl.stages.process_reward import ProcessRewardStage, prm_metrics
from fusedrl.train.loop import train
from tests.helpers import rl_tiny as T

ROOT = Path(__file__).resolve().parents[2]


def _records(name):
    return [json.loads(line) for line in (ROOT / "examples" / "data" / f"{name}.jsonl").read_text().splitlines()]


def test_tokenize_prm_puts_the_class_at_each_step_end():
    tok = build_char_tokenizer("abxyz\n")
    record = {"prompt": "ab", "steps": ["x", "yz"], "labels": [1, -1]}
    example, ends = tokenize_prm(record, tok, separator="\n", max_len=64, signed=True, num_classes=2)
    prompt = tokenize_prompt({"prompt": "ab"}, tok)
    p = len(prompt)
    enc = lambda s: tok.convert_tokens_to_ids(list(s))  # noqa: E731
    assert example.input_ids == list(prompt) + enc("x\n") + enc("yz\n") + [tok.eos_token_id]
    assert ends == [p + 1, p + 4]
    batch = build_batch([example], [0])
    steps = (batch.labels != IGNORE_INDEX).nonzero().flatten().tolist()
    assert steps == ends and batch.labels[ends].tolist() == [1, 0] and batch.num_tokens == 2
    # 3 classes: -1 -> 0, 0 -> 1, 1 -> 2; a step cut by max_len loses its label
    example, ends = tokenize_prm({**record, "labels": [0, 1]}, tok, separator="\n", max_len=p + 3, signed=True,
                                 num_classes=3)
    assert ends == [p + 1] and build_batch([example], [0]).labels[p + 1].item() == 1


def test_step_classes_and_record_checks():
    assert [step_class(v, signed=True, num_classes=3) for v in (-1, 0, 1)] == [0, 1, 2]
    assert [step_class(v, signed=True, num_classes=2, neutral_as=0) for v in (-1, 0, 1)] == [0, 0, 1]
    assert [step_class(v, signed=False, num_classes=2) for v in (0, 1)] == [0, 1]
    with pytest.raises(ValueError, match="3 classes"):
        step_class(1, signed=False, num_classes=3)
    for bad, match in [({"prompt": "a", "steps": [], "labels": []}, "steps"),
                       ({"prompt": "a", "steps": ["x"], "labels": [1, 1]}, "labels"),
                       ({"prompt": "a", "steps": ["x"], "labels": [2]}, "labels"),
                       ({"steps": ["x"], "labels": [1]}, "prompt")]:
        with pytest.raises(ValueError, match=match):
            check_prm_record(bad, 0)


@pytest.mark.parametrize("field,value", [("kind", "token"), ("prm_head", "linear"), ("prm_classes", 4),
                                         ("neutral_as", 2)])
def test_process_config_values_are_checked(field, value):
    with pytest.raises(ValueError, match=f"reward_model.{field}"):
        check_section(dataclasses.replace(RewardModelConfig(kind="process"), **{field: value}), "reward_model")
    check_section(RewardModelConfig(kind="process", prm_head="scalar", prm_classes=3), "reward_model")


def _prm(tok, head="classify", classes=2, seed=0):
    policy = T.tiny_policy(tok, seed=seed)
    return ProcessRewardModel.from_causal_lm(policy, head=head, num_classes=classes)


@pytest.mark.parametrize("head", ["classify", "scalar"])
def test_tiny_prm_beats_the_majority_rate_on_held_out_steps(head, tmp_path):
    tok = build_char_tokenizer("abcdefghijklmnoprsv: \n")
    common = dict(separator="\n", max_len=48, num_classes=2, signed=True)
    train_examples, _ = prm_examples(_records("prm_train"), tok, **common)
    eval_examples, _ = prm_examples(_records("prm_eval"), tok, **common)
    eval_set = PackedDataset(eval_examples, 512, seed=0, shuffle=False)
    eval_batches = eval_set.next_batches(len(eval_set))
    model = _prm(tok, head)
    stage = ProcessRewardStage(PackedDataset(train_examples, 256, seed=0), head=head, eval_batches=eval_batches)
    before = prm_metrics(model, eval_batches, head=head)
    cfg = T.train_cfg(40, lr=3e-3)
    train(model, stage, cfg, run_dir=tmp_path)
    after = prm_metrics(model, eval_batches, head=head)
    assert 0.5 < after["majority_rate"] < 0.7
    assert after["steps"] == sum(len(r["steps"]) for r in _records("prm_eval"))
    assert after["step_accuracy"] > after["majority_rate"] + 0.15, (before, after)
    # a solution is right when every step is: min and prod see every step, last only the final one
    assert after["solution_accuracy_min"] > 0.8 and after["solution_accuracy_prod"] > 0.8, after
    assert after["solution_accuracy_last"] < after["solution_accuracy_min"], after


def test_prm_save_and_load_round_trip(tmp_path):
    tok = T.tokenizer()
    model = _prm(tok, "classify", 3).eval()
    model.save_pretrained(tmp_path / "prm")
    loaded = ProcessRewardModel.from_pretrained(tmp_path / "prm")
    example, _ = tokenize_prm({"prompt": "ab", "steps": ["a", "b"], "labels": [1, 0]}, tok, separator="a",
                              max_len=32, signed=True, num_classes=3)
    batch = build_batch([example], [0])
    torch.testing.assert_close(loaded.token_logits(batch), model.token_logits(batch))
    assert loaded.head_kind == "classify" and loaded.num_classes == 3


class _FixedPRM(torch.nn.Module):
    """A stand-in PRM whose scalar logit at token t is a fixed function of the token id (hand-computable)."""

    head_kind = "scalar"

    def __init__(self, logit_by_token):
        super().__init__()
        self.table = torch.nn.Parameter(torch.tensor(logit_by_token, dtype=torch.float32), requires_grad=False)

    def token_logits(self, batch):
        return self.table[batch.input_ids]


def test_prm_as_reward_on_a_hand_computed_case():
    tok = build_char_tokenizer("ab\n")
    a, b, nl = tok.convert_tokens_to_ids(["a", "b", "\n"])
    logits = [0.0] * len(tok)
    logits[a], logits[b], logits[nl], logits[tok.eos_token_id] = 0.0, 1.0, 2.0, -1.0  # sigmoid .5 .731 .881 .269
    scorer = ProcessRewardScorer(_FixedPRM(logits), tok, separator="\n")
    s_nl, s_b, s_eos = (torch.sigmoid(torch.tensor(x)).item() for x in (2.0, 1.0, -1.0))
    completions = [[a, nl, b, nl], [a, b], [a, nl, a, b, tok.eos_token_id], []]
    assert [completion_step_ends(c, tok, "\n") for c in completions] == [[1, 3], [1], [1, 4], []]
    prompts = [[tok.bos_token_id, a]] * 4
    rollout = Rollout(prompts, completions, [[0.0] * len(c) for c in completions], [True] * 4, [0] * 4,
                      [tok.decode(c) for c in completions], 1)
    # sample 0: steps end at "\n", "\n": scores (s_nl, s_nl); sample 1: one step ending at "b": s_b
    # sample 2: "\n" then trailing "ab<eos>", a step ending at the last token (<eos>, index 4): (s_nl, s_eos)
    # sample 3: no step -> the empty score 0
    torch.testing.assert_close(scorer.outcome(rollout, how="min"), torch.tensor([s_nl, s_b, s_eos, 0.0]))
    torch.testing.assert_close(scorer.outcome(rollout, how="prod"),
                               torch.tensor([s_nl * s_nl, s_b, s_nl * s_eos, 0.0]))
    torch.testing.assert_close(scorer.outcome(rollout, how="last"), torch.tensor([s_nl, s_b, s_eos, 0.0]))
    dense = scorer.token_rewards(rollout, baseline=0.5)
    torch.testing.assert_close(dense[0], torch.tensor([0.0, s_nl - 0.5, 0.0, s_nl - 0.5]))
    torch.testing.assert_close(dense[1], torch.tensor([0.0, s_b - 0.5]))
    torch.testing.assert_close(dense[2], torch.tensor([0.0, s_nl - 0.5, 0.0, 0.0, s_eos - 0.5]))
    assert dense[3].numel() == 0
    with pytest.raises(ValueError, match="how"):
        scorer.outcome(rollout, how="mean")
