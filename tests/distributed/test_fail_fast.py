"""A failing or SIGKILLed rank stops the other with a clear message within a bounded time (no hang).

Each rank is a plain subprocess (no torchrun, whose agent would stop the others itself):
what is tested is `fail_together` plus the collective timeout.
"""
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fusedrl.train.fail_fast import RankFailure, fail_together
from tests.distributed._dist_helpers import free_port

ROOT = Path(__file__).resolve().parents[2]
BOUND_S = 60  # generous: two cold imports of torch + transformers on a loaded 2-core machine


def _launch(mode: str, victim: int, *extra: str):
    port = free_port()
    procs = []
    for rank in range(2):
        env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                   LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2", PYTHONPATH=str(ROOT))
        procs.append(subprocess.Popen([sys.executable, "-m", "tests.distributed._failing_worker", mode, str(victim),
                                       *extra],
                                      cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = []
    deadline = time.monotonic() + 240
    for proc in procs:
        try:
            out, err = proc.communicate(timeout=max(deadline - time.monotonic(), 1))
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            pytest.fail(f"{mode}: a rank hung (no exit within the bound)")
        outs.append((proc.returncode, out, err, time.time()))
    return outs


def _victim_time(out: str) -> float:
    return float(next(line.split()[1] for line in out.splitlines() if line.startswith("VICTIM")))


@pytest.mark.parametrize("victim", [1, pytest.param(0, marks=pytest.mark.slow)],
                         ids=["kill-rank1", "kill-rank0-store-host"])
def test_sigkill_stops_the_other_rank(victim):
    outs = _launch("kill", victim)
    survivor = 1 - victim
    rc_victim, out_victim, _, _ = outs[victim]
    rc, out, err, ended = outs[survivor]
    assert rc_victim == -9, outs[victim]
    assert rc != 0, (out, err)
    assert "STEP 1" in out and "STEP 2" not in out  # it got as far as the kill, no further
    assert ended - _victim_time(out_victim) < BOUND_S
    expected = "rank 1 failed: it stopped responding" if victim == 1 else "lost the rendezvous store"
    assert expected in err, err[-3000:]


def test_exception_on_one_rank_names_it_on_the_other():
    outs = _launch("raise", 1)
    rc, out, err, ended = outs[0]
    assert outs[1][0] != 0 and "ValueError: boom on rank 1" in outs[1][2]
    assert rc != 0 and "rank 1 failed: ValueError: boom on rank 1" in err, err[-3000:]
    assert ended - _victim_time(outs[1][1]) < BOUND_S


@pytest.mark.slow
def test_sigkill_while_the_other_is_busy_is_caught_by_the_heartbeat():
    outs = _launch("kill_busy", 1)
    rc, out, err, ended = outs[0]
    assert outs[1][0] == -9
    assert rc != 0 and "rank 1 stopped responding for 6s" in err, err[-3000:]
    assert ended - _victim_time(outs[1][1]) < 30  # the 6 s heartbeat timeout, not the 60 s sleep


@pytest.mark.slow
def test_resume_after_sigkill_reproduces_the_uninterrupted_run(tmp_path):
    import torch

    killed = _launch("kill", 1, str(tmp_path / "killed"))
    assert killed[1][0] == -9 and killed[0][0] != 0
    resumed = _launch("resume", -1, str(tmp_path / "killed"))
    full = _launch("full", -1, str(tmp_path / "full"))
    for rc, out, err, _ in resumed + full:
        assert rc == 0, err[-3000:]
    assert "STEP 1" not in resumed[0][1] and "STEP 2" in resumed[0][1]  # continued from the step-2 checkpoint
    got, want = torch.load(tmp_path / "killed" / "final.pt"), torch.load(tmp_path / "full" / "final.pt")
    assert got.keys() == want.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), name  # bit for bit


def test_guard_is_a_no_op_without_a_process_group():
    with pytest.raises(ZeroDivisionError):
        with fail_together():
            1 / 0
    with pytest.raises(ValueError, match="timeout_s"):
        with fail_together(timeout_s=0):
            pass
    assert issubclass(RankFailure, RuntimeError)
