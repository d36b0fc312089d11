"""The vllm backend: the missing-extra error, the mapping to and from vLLM's public classes (against a
duck-typed fake of vLLM driven by a tiny HF model), and a real run where vllm and a GPU are present."""
import copy
import importlib.util
from types import SimpleNamespace

import pytest
import torch

from fusedrl.config_io import ConfigError
from fusedrl.rollout import vllm as V
from fusedrl.rollout.native import NativeEngine
from fusedrl.rollout.sampling import SamplingParams

from ._tiny import random_prompts, tiny_model

# ----------------------------------------------------------------------------- a fake of vLLM's public API


class FakeSamplingParams:
    def __init__(self, **kwargs):
        self.kwargs = kwargs


class _FakeVLLMModel:
    """What the worker extension sees as `model_runner.model`: load_weights over (name, tensor) pairs."""

    def __init__(self, hf):
        self.hf = hf

    def load_weights(self, weights):
        params = dict(self.hf.named_parameters())
        for name, tensor in weights:
            params[name].data.copy_(tensor)


class _FakeWorker(V.WeightSyncWorker):
    def __init__(self, hf):
        self.model_runner = SimpleNamespace(model=_FakeVLLMModel(hf))


class FakeLLM:
    """Greedy / sampled decoding with the fake worker's own copy of the weights (random at start, like
    load_format="dummy"); returns RequestOutput-like objects with processed (temperature) log-probs."""

    def __init__(self, model, shuffle_outputs=False, finish_reason=None):
        self.hf = copy.deepcopy(model)
        with torch.no_grad():
            for p in self.hf.parameters():
                p.normal_()
        self.worker = _FakeWorker(self.hf)
        self.calls, self.shuffle, self.finish_reason = [], shuffle_outputs, finish_reason

    def collective_rpc(self, method, args=()):
        self.calls.append(method)
        return [getattr(self.worker, method)(*args)]

    def reset_prefix_cache(self):
        self.calls.append("reset_prefix_cache")

    def sleep(self, level):
        self.calls.append(f"sleep{level}")

    def wake_up(self):
        self.calls.append("wake_up")

    @torch.no_grad()
    def _sample(self, prompt, kw, index):
        g = torch.Generator().manual_seed(kw["seed"] + index)
        ids, tokens, logprobs = list(prompt), [], []
        for _ in range(kw["max_tokens"]):
            logits = self.hf(torch.tensor([ids])).logits[0, -1].double()
            t = kw["temperature"]
            logp = torch.log_softmax(logits / (t or 1.0), -1)
            token = int(logits.argmax()) if t == 0 else int(torch.multinomial(logp.exp(), 1, generator=g))
            order = logp.argsort(descending=True).tolist()
            entry = {token: SimpleNamespace(logprob=float(logp[token]), rank=order.index(token) + 1)}
            for v in order[: kw["logprobs"]]:
                entry[v] = SimpleNamespace(logprob=float(logp[v]), rank=order.index(v) + 1)
            tokens.append(token)
            logprobs.append(entry)
            ids.append(token)
            if token in kw.get("stop_token_ids", ()):
                return tokens, logprobs, self.finish_reason or "stop"
        return tokens, logprobs, self.finish_reason or "length"

    def generate(self, requests, params, use_tqdm=True):
        self.calls.append("generate")
        outs = []
        for req, sp in zip(requests, params):
            kw = sp.kwargs
            comps = [SimpleNamespace(index=j, **dict(zip(("token_ids", "logprobs", "finish_reason"),
                                                          self._sample(req["prompt_token_ids"], kw, j))))
                     for j in range(kw["n"])]
            outs.append(SimpleNamespace(outputs=comps[::-1] if self.shuffle else comps))
        return outs


FAKE_VLLM = SimpleNamespace(SamplingParams=FakeSamplingParams)

# ----------------------------------------------------------------------------- the missing extra


def test_missing_extra_is_a_one_line_config_error(monkeypatch):
    from fusedrl.rollout.backends import make_sampler
    from fusedrl.stages.configs_rl import RolloutConfig, check_rollout

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real(name, *a))
    for call in (lambda: check_rollout(RolloutConfig(verifier="fusedrl.rollout.rewards:exact_match",
                                                     backend="vllm")),
                 lambda: make_sampler("vllm", tiny_model(), None)):
        with pytest.raises(ConfigError) as info:
            call()
        msg = str(info.value)
        assert "\n" not in msg and "pip install fusedrl[vllm]" in msg and msg.startswith("rollout.backend:")
        assert info.value.field == "rollout.backend" and info.value.allowed == ["native", "hf"]
    with pytest.raises(ConfigError, match="vllm extra"):
        V.VLLMSampler(tiny_model(), None)


def test_unknown_backend_still_named():
    from fusedrl.rollout.backends import make_sampler

    with pytest.raises(ValueError, match="rollout.backend: 'sglang'"):
        make_sampler("sglang", None, None)

# ----------------------------------------------------------------------------- params -> vLLM kwargs


def test_params_map_to_vllm_kwargs():
    p = SamplingParams(n=4, temperature=0.7, top_k=20, top_p=0.9, min_p=0.05, max_new_tokens=33,
                       stop_token_ids=(2, 5), stop_strings=("###",), seed=11, logprobs_topk=3)
    kw = V.to_vllm_kwargs(p, prompt_index=2)
    assert kw == dict(n=4, temperature=0.7, top_k=20, top_p=0.9, min_p=0.05, max_tokens=33, stop_token_ids=[2, 5],
                      stop=["###"], logprobs=3, seed=V.prompt_seed(11, 2))
    plain = V.to_vllm_kwargs(SamplingParams(temperature=0.0, max_new_tokens=5))
    # off switches are left to vLLM's defaults; no stop strings: no detokenisation needed
    assert plain == dict(n=1, temperature=0.0, max_tokens=5, logprobs=0, seed=V.prompt_seed(0, 0), detokenize=False)
    seeds = {V.prompt_seed(s, i) for s in range(3) for i in range(5)}
    assert len(seeds) == 15 and all(0 <= s < 2 ** 63 for s in seeds)
    assert V.truncates(p) and not V.truncates(SamplingParams(top_k=5, temperature=0.0))
    assert not V.truncates(SamplingParams(temperature=1.3))
    with pytest.raises(TypeError, match="params"):
        V.to_vllm_kwargs({"n": 1})


def test_vllm_config_is_checked():
    for bad in (dict(gpu_memory_utilization=0.0), dict(sleep_level=3), dict(max_model_len=0)):
        with pytest.raises(ValueError, match="VLLMConfig." + next(iter(bad))):
            V.VLLMConfig(**bad)

# ----------------------------------------------------------------------------- RequestOutput -> Completion


def _out(index, tokens, logps, reason="length", extra=None):
    entries = []
    for k, (t, lp) in enumerate(zip(tokens, logps)):
        e = {t: SimpleNamespace(logprob=lp, rank=1)}
        e.update((extra or [{}] * len(tokens))[k])
        entries.append(e)
    return SimpleNamespace(index=index, token_ids=tokens, logprobs=entries, finish_reason=reason)


def test_request_output_maps_to_completions():
    req = SimpleNamespace(outputs=[_out(1, [7, 2], [-0.5, -0.25], "stop"), _out(0, [3], [-1.5])])
    got = V.to_completions(req, SamplingParams(n=2))
    assert [c.token_ids for c in got] == [[3], [7, 2]]
    assert [c.logprobs for c in got] == [[-1.5], [-0.5, -0.25]]
    assert [c.finish_reason for c in got] == ["length", "stop"] and got[0].top_logprobs is None
    top = V.to_completions(SimpleNamespace(outputs=[_out(0, [4], [-2.0], extra=[
        {9: SimpleNamespace(logprob=-0.1, rank=1), 8: SimpleNamespace(logprob=-0.9, rank=2)}])]),
        SamplingParams(logprobs_topk=2))
    assert top[0].top_logprobs == [[(9, -0.1), (8, -0.9)]] and top[0].logprobs == [-2.0]


@pytest.mark.parametrize("bad, match", [
    (SimpleNamespace(outputs=[_out(0, [3], [-1.0], "abort")]), "finish_reason"),
    (SimpleNamespace(outputs=[_out(1, [3], [-1.0])]), "indexed"),
    (SimpleNamespace(outputs=[SimpleNamespace(index=0, token_ids=[3, 4], logprobs=[{3: -1.0}],
                                              finish_reason="length")]), "log-prob entries"),
    (SimpleNamespace(outputs=[SimpleNamespace(index=0, token_ids=[3], logprobs=[{5: -1.0}],
                                              finish_reason="length")]), "sampled token 3"),
])
def test_bad_request_outputs_raise(bad, match):
    with pytest.raises(ValueError, match=match):
        V.to_completions(bad, SamplingParams())

# ----------------------------------------------------------------------------- the sampler over the fake


def test_sampler_pushes_weights_sleeps_and_matches_the_native_engine():
    model = tiny_model("qwen2", seed=1)
    fake = FakeLLM(model, shuffle_outputs=True)
    sampler = V.VLLMSampler(model, None, llm=fake, vllm_module=FAKE_VLLM)
    prompts = random_prompts(5, 1, 20, seed=2)
    params = SamplingParams(n=2, temperature=0.0, max_new_tokens=6)
    got = sampler.generate(prompts, params)
    want = NativeEngine(model).generate(prompts, params)
    assert [[c.token_ids for c in g] for g in got] == [[c.token_ids for c in g] for g in want]
    for g, h in zip(got, want):
        for a, b in zip(g, h):
            torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), rtol=0, atol=1e-5)
    assert fake.calls == ["fusedrl_load_weights", "reset_prefix_cache", "generate", "sleep1"]
    # unchanged weights: no push, a wake before generating
    sampler.generate(prompts[:1], params)
    assert fake.calls[4:] == ["wake_up", "generate", "sleep1"]
    # an optimizer step on the policy is pushed before the next generate, in place in the worker's model
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    model(torch.tensor([prompts[0]]), labels=torch.tensor([prompts[0]])).loss.backward()
    opt.step()
    got = sampler.generate(prompts, params)
    assert fake.calls[7:] == ["wake_up", "fusedrl_load_weights", "reset_prefix_cache", "generate", "sleep1"]
    for (name, p), q in zip(model.named_parameters(), fake.hf.parameters()):
        assert torch.equal(p, q), name
    want = NativeEngine(model).generate(prompts, params)
    assert [[c.token_ids for c in g] for g in got] == [[c.token_ids for c in g] for g in want]


def test_sampler_fills_eos_and_draws_seeds_from_the_stream():
    model = tiny_model("llama", seed=3)
    fake = FakeLLM(model)
    tok = SimpleNamespace(eos_token_id=5)
    g = torch.Generator().manual_seed(0)
    sampler = V.VLLMSampler(model, tok, llm=fake, vllm_module=FAKE_VLLM, generator=g,
                            config=V.VLLMConfig(sleep_level=0))
    seen = []
    real_generate = fake.generate

    def spy(requests, params, use_tqdm=True):
        seen.append([sp.kwargs for sp in params])
        return real_generate(requests, params, use_tqdm)

    fake.generate = spy
    prompts = random_prompts(3, 2, 9, seed=4)
    a = sampler.generate(prompts, SamplingParams(n=3, temperature=1.0, max_new_tokens=8))
    b = sampler.generate(prompts, SamplingParams(n=3, temperature=1.0, max_new_tokens=8))
    assert all(kw["stop_token_ids"] == [5] for kw in seen[0])
    assert seen[0][0]["seed"] != seen[1][0]["seed"]  # a fresh seed per call from the stream
    assert len({kw["seed"] for kw in seen[0]}) == 3  # one seed per prompt
    assert [len(grp) for grp in a] == [3, 3, 3] and a != b
    assert "sleep1" not in fake.calls and "wake_up" not in fake.calls  # sleep_level=0: never sleeps
    g.manual_seed(0)
    assert [[c.token_ids for c in grp] for grp in sampler.generate(prompts, SamplingParams(
        n=3, temperature=1.0, max_new_tokens=8))] == [[c.token_ids for c in grp] for grp in a]
    with pytest.raises(ValueError, match="prompts\\[0\\]"):
        sampler.generate([[]], SamplingParams())

# ----------------------------------------------------------------------------- the real thing


@pytest.mark.gpu
def test_real_vllm_greedy_matches_the_native_engine(tmp_path):
    pytest.importorskip("vllm", reason="the vllm extra is not installed")
    if not torch.cuda.is_available():
        pytest.skip("vllm needs a CUDA device")
    # head dim 64 in bf16: what every vLLM attention backend takes (not the other tests' 8 in fp32)
    model = tiny_model("qwen2", seed=1, vocab_size=512, hidden_size=256, intermediate_size=512,
                       num_attention_heads=4, num_key_value_heads=2).cuda().to(torch.bfloat16)
    sampler = V.VLLMSampler(model, None, config=V.VLLMConfig(gpu_memory_utilization=0.2, max_model_len=128,
                                                             llm_kwargs=dict(enforce_eager=True)))
    prompts = random_prompts(8, 1, 40, seed=2)
    params = SamplingParams(n=2, temperature=0.0, max_new_tokens=8)
    got = sampler.generate(prompts, params)
    want = NativeEngine(model).generate(prompts, params)
    same = sum(a.token_ids == b.token_ids for g, h in zip(got, want) for a, b in zip(g, h))
    assert same >= 12, f"{same}/16 greedy completions agree"  # bf16: a rare near-tie may flip
    sampled = sampler.generate(prompts, SamplingParams(n=4, temperature=1.0, max_new_tokens=8, seed=3))
    for grp in sampled:
        for c in grp:
            assert len(c.token_ids) == len(c.logprobs) and all(lp <= 0 for lp in c.logprobs)
