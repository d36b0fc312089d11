"""fusedrl.kernels._ranges: a user's torch.profiler trace names fusedrl's ops and loop phases; ~free when off."""
import json
import timeit

import pytest
import torch

import fusedrl.kernels as K
from fusedrl.kernels import _ranges
from fusedrl.kernels._ranges import op_range, phase_range
from tests.helpers import rl_tiny as T


def _trace_names(prof, tmp_path) -> set:
    path = tmp_path / "trace.json"
    prof.export_chrome_trace(str(path))
    return {event.get("name") for event in json.loads(path.read_text())["traceEvents"]}


def _call_public_ops():
    g = torch.Generator().manual_seed(0)
    b, t, h, v = 2, 7, 5, 29
    hidden = torch.randn(b, t, h, generator=g, requires_grad=True)
    weight = torch.randn(v, h, generator=g, requires_grad=True)
    labels = torch.randint(0, v, (b, t), generator=g)
    logp = K.linear_logprobs(hidden, weight, labels)
    logp.sum().backward()
    old, adv = logp.detach() + 0.1, torch.randn(b, generator=g)
    K.policy_loss(logp.detach().requires_grad_(), old, adv)
    K.linear_policy_loss(hidden, weight, labels, old, adv)
    K.kl_penalty(logp.detach(), old, "k3")
    K.linear_distill_loss(hidden, weight, hidden.detach(), weight.detach())
    q, k = torch.randn(9, 2, 8, generator=g), torch.randn(9, 1, 8, generator=g)
    K.varlen_attention(q, k, k, torch.tensor([0, 4, 9], dtype=torch.int32), 5)


def test_a_user_trace_names_the_public_ops(tmp_path):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        _call_public_ops()
    names = _trace_names(prof, tmp_path)
    for op in ("linear_logprobs", "policy_loss", "linear_policy_loss", "kl_penalty", "linear_distill_loss",
               "varlen_attention"):
        assert f"fusedrl.{op}" in names, op


def test_no_range_without_a_profiler_and_results_unchanged(monkeypatch):
    entered = []
    monkeypatch.setattr(_ranges, "_recorded", lambda label: entered.append(label))
    wrapped = op_range("double")(lambda x: 2 * x)
    assert wrapped(torch.ones(3)).tolist() == [2.0, 2.0, 2.0] and entered == []
    with phase_range("idle"):
        pass
    assert entered == [] and not _ranges.active()


def test_wrapped_ops_keep_name_doc_signature_and_autocast_policy():
    import inspect

    from fusedrl.kernels.logprobs import linear_logprobs

    assert linear_logprobs.__name__ == "linear_logprobs" and "log" in (linear_logprobs.__doc__ or "")
    assert linear_logprobs.__fusedrl_range__ == "fusedrl.linear_logprobs"
    assert linear_logprobs.__autocast_policy__ == "keep"
    assert list(inspect.signature(linear_logprobs).parameters)[:3] == ["hidden", "weight", "labels"]


def test_phase_ranges_nest_and_close_on_error(tmp_path):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        with phase_range("outer"):
            with pytest.raises(RuntimeError):
                with phase_range("inner"):
                    raise RuntimeError("boom")
            torch.ones(2).sum()
    events = {e.key: e for e in prof.key_averages()}
    assert events["fusedrl.phase.outer"].count == 1 and events["fusedrl.phase.inner"].count == 1


def test_nvtx_push_pop_pair_when_enabled(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda.nvtx, "range_push", lambda label: calls.append(("push", label)))
    monkeypatch.setattr(torch.cuda.nvtx, "range_pop", lambda: calls.append(("pop",)))
    _ranges.set_nvtx(True)
    try:
        op_range("toy")(lambda: None)()
        with pytest.raises(ValueError):
            with phase_range("generate"):
                raise ValueError("x")
    finally:
        _ranges.set_nvtx(False)
    assert calls == [("push", "fusedrl.toy"), ("pop",), ("push", "fusedrl.phase.generate"), ("pop",)]


def test_bad_names_and_flags_are_rejected():
    with pytest.raises(ValueError, match="name"):
        op_range("two words")
    with pytest.raises(ValueError, match="name"):
        with phase_range(""):
            pass
    with pytest.raises(TypeError, match="enabled"):
        _ranges.set_nvtx(1)
    with pytest.raises(TypeError, match="enabled"):
        _ranges.set_sync_phases("yes")


def test_wrapper_steps_aside_under_torch_compile():
    wrapped = op_range("double")(lambda x: 2 * x)
    compiled = torch.compile(lambda x: wrapped(x) + 1, backend="eager", fullgraph=True)  # no graph break
    assert compiled(torch.ones(2)).tolist() == [3.0, 3.0]


def test_overhead_without_a_profiler_is_below_a_few_microseconds():
    """The measured cost of the wrapper when no profiler is on (min over repeats; a loaded CI box is slower)."""
    def bare(x):
        return x

    wrapped = op_range("bare")(bare)
    n = 20000
    t_bare = min(timeit.repeat(lambda: bare(1), number=n, repeat=7)) / n
    t_wrapped = min(timeit.repeat(lambda: wrapped(1), number=n, repeat=7)) / n
    assert t_wrapped - t_bare < 5e-6, (t_bare, t_wrapped)


def test_a_training_step_trace_names_the_loop_and_rollout_phases(tmp_path):
    from fusedrl.train.loop import train

    tok = T.tokenizer()
    model = T.tiny_policy(tok)
    stage = T.pg_stage(tok, beta=0.1, kl_kind="k3", rollout=T.rollout_cfg(prompts_per_rollout=2), policy=model)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        train(model, stage, T.train_cfg(1), run_dir=tmp_path / "run")
    names = _trace_names(prof, tmp_path)
    for phase in ("step", "batches", "generate", "score", "logprobs", "advantages", "forward_backward", "optimizer"):
        assert f"fusedrl.phase.{phase}" in names, phase
    assert "fusedrl.linear_policy_loss" in names or "fusedrl.policy_loss" in names
