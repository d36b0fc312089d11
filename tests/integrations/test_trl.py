"""One TRL training step with fusedrl's trainers equals TRL's own (loss and updated weights, 1e-5).

Tiny Llama and word-level tokenizer saved to tmp_path (no network), CPU, float32, SGD so the
weight update is lr * gradient and a gradient difference shows in the weights.
"""
import pytest
import torch

trl = pytest.importorskip("trl")

from fusedrl.integrations import trl as fused_trl  # noqa: E402
from tests.integrations._trl_setup import preferences, prompts, reward_len_w5, save_tiny  # noqa: E402

COMMON = dict(max_steps=1, learning_rate=0.1, optim="sgd", report_to="none", use_cpu=True, bf16=False,
              save_strategy="no", logging_steps=1, seed=0, disable_tqdm=True)


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("tiny"))


def _spy(monkeypatch, name):
    calls = []
    real = getattr(fused_trl, name)

    def wrapped(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(fused_trl, name, wrapped)
    return calls


def _train(trainer_cls, path, tmp_path, tag, **kwargs):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path)
    trainer = trainer_cls(model=model, processing_class=AutoTokenizer.from_pretrained(path), **kwargs)
    trainer.args.output_dir = str(tmp_path / tag)
    out = trainer.train()
    return trainer, out.training_loss, {n: p.detach().clone() for n, p in trainer.model.named_parameters()}


def _same_step(ref, got, initial):
    (_, ref_loss, ref_w), (trainer, loss, w) = ref, got
    assert abs(loss - ref_loss) < 1e-5, (loss, ref_loss)
    moved = max(float((ref_w[n] - initial[n]).abs().max()) for n in ref_w)
    assert moved > 1e-4  # the step did update the weights
    for name in ref_w:
        assert float((w[name] - ref_w[name]).abs().max()) < 1e-5, name
    assert getattr(trainer.model, "_fusedrl_patched", False)


def _initial(path):
    from transformers import AutoModelForCausalLM

    return {n: p.detach().clone() for n, p in AutoModelForCausalLM.from_pretrained(path).named_parameters()}


@pytest.mark.parametrize("loss_type,beta", [("grpo", 0.0), ("dr_grpo", 0.0), ("dapo", 0.0), ("grpo", 0.04)])
def test_grpo_step_matches_trl(tiny_path, tmp_path, monkeypatch, loss_type, beta):
    from trl import GRPOConfig

    def run(cls, tag):
        args = GRPOConfig(output_dir=str(tmp_path / tag), per_device_train_batch_size=8, num_generations=4,
                          max_completion_length=6, loss_type=loss_type, beta=beta, use_bias_correction_kl=False,
                          **COMMON)
        return _train(cls, tiny_path, tmp_path, tag, reward_funcs=reward_len_w5, args=args,
                      train_dataset=prompts(8))

    ref = run(trl.GRPOTrainer, "trl")
    calls = _spy(monkeypatch, "policy_loss")
    got = run(fused_trl.FusedGRPOTrainer, "fused")
    assert got[0].fused_loss_supported() and calls  # fusedrl's loss ran
    _same_step(ref, got, _initial(tiny_path))
    assert "clip_ratio/region_mean" in got[0].state.log_history[0]


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "apo_zero"])
def test_dpo_step_matches_trl(tiny_path, tmp_path, monkeypatch, loss_type):
    from trl import DPOConfig

    def run(cls, tag):
        args = DPOConfig(output_dir=str(tmp_path / tag), per_device_train_batch_size=4, loss_type=[loss_type],
                         beta=0.1, **COMMON)
        return _train(cls, tiny_path, tmp_path, tag, args=args, train_dataset=preferences(4))

    ref = run(trl.DPOTrainer, "trl")
    calls = _spy(monkeypatch, {"sigmoid": "dpo_loss", "ipo": "ipo_loss", "apo_zero": "apo_zero_loss"}[loss_type])
    got = run(fused_trl.FusedDPOTrainer, "fused")
    assert got[0].fused_loss_supported() and calls
    _same_step(ref, got, _initial(tiny_path))
    logged, ref_logged = got[0].state.log_history[0], ref[0].state.log_history[0]
    for key in ("rewards/margins", "logits/chosen", "mean_token_accuracy", "entropy"):
        assert abs(logged[key] - ref_logged[key]) < 1e-4, key  # TRL's metrics, from the fused pass


def test_unsupported_configuration_keeps_trls_loss(tiny_path, tmp_path):
    from trl import GRPOConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer

    args = GRPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=4,
                      max_completion_length=4, loss_type="cispo", **COMMON)
    trainer = fused_trl.FusedGRPOTrainer(model=AutoModelForCausalLM.from_pretrained(tiny_path),
                                         reward_funcs=reward_len_w5, args=args, train_dataset=prompts(4),
                                         processing_class=AutoTokenizer.from_pretrained(tiny_path))
    assert not trainer.fused_loss_supported()
    assert torch.isfinite(torch.tensor(trainer.train().training_loss))
