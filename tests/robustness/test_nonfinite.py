"""A run whose final weights or evaluation are not finite never exits 0 and never writes final/."""
import math

import pytest
import torch

from fusedrl.train.loop import NonFiniteError, TrainResult, TrainState
from fusedrl.train.run import check_finite_outcome

from tests.robustness._helpers import argv, assert_one_line_error, cli


def test_a_nonfinite_final_eval_loss_exits_2_without_final(tmp_path, capsys):
    out = tmp_path / "run"
    # lr 1e30: the first update makes weights ~1e30 (finite) and the final evaluation's loss non-finite
    code, errors, err = cli(argv("sft_tiny", out, "--optim.lr=1e30", "--schedule.warmup_steps=0",
                                 "--loop.max_steps=1"), capsys)
    assert_one_line_error(code, errors, err, "NonFiniteError", "eval/loss", "final/ was not written")
    assert not (out / "final").exists() and not (out / "report.md").exists()
    assert not (out / "run.lock").exists()


def test_too_many_nonfinite_steps_is_one_line(tmp_path, capsys):
    out = tmp_path / "run"
    code, errors, err = cli(argv("sft_tiny", out, "--optim.lr=1e30", "--schedule.warmup_steps=0",
                                 "--loop.max_steps=4", "--loop.max_nonfinite_in_a_row=1"), capsys)
    assert_one_line_error(code, errors, err, "NonFiniteError", "loop.max_nonfinite_in_a_row")
    assert not (out / "final").exists()


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_a_nonfinite_final_evaluation_is_refused(value):
    model = torch.nn.Linear(2, 2)
    check_finite_outcome(model, TrainResult(state=TrainState(), eval_metrics={"loss": 1.0}))
    with pytest.raises(NonFiniteError, match="eval.*loss"):
        check_finite_outcome(model, TrainResult(state=TrainState(), eval_metrics={"eval/loss": value}))


def test_a_nonfinite_weight_is_named():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    with torch.no_grad():
        model[1].bias[0] = math.nan
    with pytest.raises(NonFiniteError, match=r"1 tensors, first 1\.bias"):
        check_finite_outcome(model, TrainResult(state=TrainState()))
