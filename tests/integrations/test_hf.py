"""apply_fusedrl on tiny HF models of each family: loss, gradients, per-token outputs, families."""
import copy

import pytest
import torch

from fusedrl.integrations import (FusedLogprobsOutput, apply_fusedrl, apply_fusedrl_to_llama, apply_fusedrl_to_qwen2,
                                  revert_fusedrl_patches, token_logprobs)
from tests.conftest import assert_close
from tests.integrations._tiny import VOCAB, tiny_model

FAMILIES = ["llama", "qwen2", "qwen3", "mistral", "gemma", "gemma2", "gemma3"]


def _batch(seed=0, batch=3, length=11):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, length), generator=gen)
    labels = ids.clone()
    labels[0, :4] = -100  # a prompt
    labels[2, 7:] = -100  # padding at the end
    return ids, labels


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family", FAMILIES)
def test_loss_and_gradients_match_transformers(family):
    base = tiny_model(family)
    fused = apply_fusedrl(copy.deepcopy(base), attention=False)
    ids, labels = _batch()
    ref = base(input_ids=ids, labels=labels)
    ref.loss.backward()
    out = fused(input_ids=ids, labels=labels)
    out.loss.backward()
    assert out.logits is None
    assert abs(out.loss.item() - ref.loss.item()) < 1e-5
    g_ref, g_out = _grads(base), _grads(fused)
    assert g_ref.keys() == g_out.keys()
    for name in g_ref:
        assert_close(g_out[name], g_ref[name], atol=1e-5, rtol=1e-4, name=name)


def test_num_items_in_batch_is_the_normaliser():
    base = tiny_model("llama")
    fused = apply_fusedrl(copy.deepcopy(base), attention=False)
    ids, labels = _batch(seed=1)
    n = torch.tensor(37)
    ref = base(input_ids=ids, labels=labels, num_items_in_batch=n).loss
    got = fused(input_ids=ids, labels=labels, num_items_in_batch=n).loss
    assert abs(float(got) - float(ref)) < 1e-5
    assert abs(float(got) - float(fused(input_ids=ids, labels=labels).loss)) > 1e-3  # 37 is not the token count


def test_generation_path_is_unchanged():
    base = tiny_model("qwen2")
    fused = apply_fusedrl(copy.deepcopy(base), attention=False)
    ids, _ = _batch(seed=2)
    assert torch.equal(fused(input_ids=ids).logits, base(input_ids=ids).logits)


def _exact(model, ids, labels, tau=1.0):
    logits = model(input_ids=ids).logits[:, :-1].double() / tau
    target = labels[:, 1:]
    valid = target != -100
    logq = torch.log_softmax(logits, -1)
    logp = logq.gather(-1, target.clamp(min=0)[..., None])[..., 0] * valid
    ent = -(logq.exp() * logq).sum(-1) * valid
    return logp, ent, logits.mean(-1) * valid, (logits.argmax(-1) == target) & valid


@pytest.mark.parametrize("family", ["llama", "gemma"])
def test_fused_lm_head_outputs(family):
    from fusedrl.integrations import patch_causal_lm

    base = tiny_model(family)
    fused = patch_causal_lm(copy.deepcopy(base), temperature=0.7,
                            outputs=("log_probs", "entropy", "mean_logits", "is_top1"))
    ids, labels = _batch(seed=3)
    out = fused(input_ids=ids, labels=labels, fused_lm_head=True)
    assert isinstance(out, FusedLogprobsOutput)
    logp, ent, mean, top1 = _exact(base, ids, labels, tau=0.7)
    assert_close(out.log_probs.double(), logp, atol=1e-5, rtol=1e-5, name="log_probs")
    assert_close(out.entropy.double(), ent, atol=1e-5, rtol=1e-5, name="entropy")
    assert_close(out.mean_logits.double(), mean, atol=1e-5, rtol=1e-5, name="mean_logits")
    assert torch.equal(out.is_top1, top1)
    assert torch.equal(out.label_mask, labels[:, 1:] != -100)


def test_token_logprobs_on_an_unpatched_model():
    model = tiny_model("mistral")
    ids, labels = _batch(seed=4)
    logp, ent = token_logprobs(model, ids, labels, return_entropy=True)
    exp_logp, exp_ent, _, _ = _exact(model, ids, labels)
    assert logp.shape == (3, 10)
    assert_close(logp.double(), exp_logp, atol=1e-5, rtol=1e-5, name="logp")
    assert_close(ent.double(), exp_ent, atol=1e-5, rtol=1e-5, name="entropy")
    unshifted = token_logprobs(model, ids[:, :-1], labels[:, 1:], shift=False)
    assert_close(unshifted, logp, atol=1e-6, rtol=1e-6, name="shift=False")


def test_family_patch_applies_to_new_instances_and_reverts():
    try:
        apply_fusedrl_to_llama(attention=False)
        apply_fusedrl_to_qwen2()
        llama, qwen = tiny_model("llama"), tiny_model("qwen2")
        assert getattr(llama, "_fusedrl_patched", False) and getattr(qwen, "_fusedrl_patched", False)
        assert qwen.config._attn_implementation == "fusedrl" and llama.config._attn_implementation == "sdpa"
        ids, labels = _batch(seed=5)
        assert llama(input_ids=ids, labels=labels).logits is None
    finally:
        revert_fusedrl_patches()
    assert not getattr(tiny_model("llama"), "_fusedrl_patched", False)


def test_bad_arguments_raise():
    model = tiny_model("llama")
    with pytest.raises(TypeError, match="logprobs"):
        apply_fusedrl(model, logprobs="yes")
    capped = tiny_model("gemma2", final_logit_softcapping=30.0)
    with pytest.raises(ValueError, match="final_logit_softcapping"):
        apply_fusedrl(capped)
    apply_fusedrl(capped, logprobs=False, attention=False)  # nothing to refuse
    with pytest.raises(ValueError, match="attn_logit_softcapping"):
        apply_fusedrl(tiny_model("gemma2", attn_logit_softcapping=50.0), logprobs=False)
    from fusedrl.integrations import apply_fusedrl_to_family, patch_causal_lm
    with pytest.raises(ValueError, match="family"):
        apply_fusedrl_to_family("gpt2")
    with pytest.raises(ValueError, match="outputs"):
        patch_causal_lm(model, outputs=("log_probs", "logits"))
    with pytest.raises(ValueError, match="temperature"):
        patch_causal_lm(model, temperature=0)


def test_transformers_trainer_step_matches(tmp_path):
    """Two micro-batches of gradient accumulation: the Trainer passes num_items_in_batch."""
    from datasets import Dataset
    from transformers import DataCollatorWithFlattening, Trainer, TrainingArguments

    gen = torch.Generator().manual_seed(7)
    rows = [torch.randint(3, VOCAB, (int(n),), generator=gen).tolist() for n in (5, 9, 4, 7)]
    ds = Dataset.from_dict({"input_ids": rows, "labels": rows})

    def step(model, tag):
        args = TrainingArguments(output_dir=str(tmp_path / tag), per_device_train_batch_size=2, max_steps=1,
                                 gradient_accumulation_steps=2, learning_rate=0.1, optim="sgd", report_to="none",
                                 use_cpu=True, save_strategy="no", seed=0, disable_tqdm=True)
        trainer = Trainer(model=model, args=args, train_dataset=ds, data_collator=DataCollatorWithFlattening())
        loss = trainer.train().training_loss
        return loss, {n: p.detach().clone() for n, p in model.named_parameters()}

    base = tiny_model("llama").train()
    fused = apply_fusedrl(copy.deepcopy(base))
    ref_loss, ref_w = step(base, "stock")
    loss, w = step(fused, "fused")
    assert abs(loss - ref_loss) < 1e-5
    for name in ref_w:
        assert_close(w[name], ref_w[name], atol=1e-5, rtol=1e-4, name=name)


def test_moe_with_router_aux_loss_is_refused():
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=16, num_hidden_layers=1,
                           num_attention_heads=2, num_key_value_heads=1, num_local_experts=2,
                           output_router_logits=True)
    with pytest.raises(ValueError, match="output_router_logits"):
        apply_fusedrl(MixtralForCausalLM(config), attention=False)
