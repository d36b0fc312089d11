"""The shared sampling interface: parameter validation, Completion invariants, prompt checks."""
import pytest

from fusedrl.rollout.sampling import Completion, Sampler, SamplingParams, check_prompts


@pytest.mark.parametrize("field, value", [
    ("n", 0), ("n", 1.5), ("temperature", -0.1), ("temperature", float("inf")), ("temperature", float("nan")),
    ("top_k", -1), ("top_p", 0.0), ("top_p", 1.5), ("min_p", 1.0), ("min_p", -0.1),
    ("max_new_tokens", 0), ("seed", "0"), ("logprobs_topk", -2), ("first_index", -1), ("first_index", True), ("stop_token_ids", (-1,)), ("stop_strings", ("",)),
])
def test_bad_params_name_the_field(field, value):
    with pytest.raises(ValueError, match=f"SamplingParams.{field} "):
        SamplingParams(**{field: value})


def test_params_normalise_and_greedy():
    p = SamplingParams(n=4, temperature=0, stop_token_ids=[2, 5], stop_strings=["\n"])
    assert p.greedy and p.stop_token_ids == (2, 5) and p.stop_strings == ("\n",)
    assert not SamplingParams(temperature=0.7).greedy
    with pytest.raises(Exception):  # frozen
        p.n = 3


def test_completion_invariants():
    Completion([1, 2], [-0.5, -0.1], "stop")
    with pytest.raises(ValueError, match="2 token_ids but 1 logprobs"):
        Completion([1, 2], [-0.5], "stop")
    with pytest.raises(ValueError, match="finish_reason"):
        Completion([1], [-0.5], "eos")


def test_check_prompts():
    assert check_prompts([(1, 2), [3]], vocab_size=4) == [[1, 2], [3]]
    with pytest.raises(ValueError, match=r"prompts\[1\] is empty"):
        check_prompts([[1], []])
    with pytest.raises(ValueError, match=r"prompts\[0\] has a token id outside \[0, 4\)"):
        check_prompts([[1, 4]], vocab_size=4)
    with pytest.raises(TypeError, match="prompts must be a list"):
        check_prompts("abc")


def test_sampler_defaults_are_noops():
    class Echo(Sampler):
        def generate(self, prompts, params):
            return [[Completion(list(p[:1]), [0.0], "length")] * params.n for p in prompts]

    s = Echo()
    s.sleep(); s.wake(); s.sync_weights()
    out = s.generate([[7, 8]], SamplingParams(n=2))
    assert [c.token_ids for c in out[0]] == [[7], [7]]
    with pytest.raises(TypeError):
        Sampler()
