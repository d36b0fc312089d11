"""attn_implementation="fusedrl": padding-free batches, padded batches and generation vs SDPA."""
import copy

import pytest
import torch

from fusedrl.integrations import apply_fusedrl, cu_seqlens_from_position_ids, register_attention
from tests.conftest import assert_close
from tests.integrations._tiny import VOCAB, tiny_model


def _docs(seed=0, lengths=(5, 9, 3)):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (n,), generator=gen) for n in lengths]


def _flatten(docs):
    """What transformers' DataCollatorWithFlattening / TRL padding_free pass: one row,
    position ids restarting at 0, no attention mask, -100 at each document's first label."""
    from transformers import DataCollatorWithFlattening

    feats = [{"input_ids": d.tolist(), "labels": d.tolist()} for d in docs]
    return DataCollatorWithFlattening(return_tensors="pt")(feats)


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma"])
def test_padding_free_batch_equals_separate_documents(family, monkeypatch):
    import fusedrl.integrations.attention as attn

    seen = []

    def spy(q, k, v, cu_seqlens, max_seqlen, **kw):
        seen.append((cu_seqlens.tolist(), max_seqlen))
        return varlen(q, k, v, cu_seqlens, max_seqlen, **kw)

    varlen = attn.varlen_attention
    monkeypatch.setattr(attn, "varlen_attention", spy)
    base = tiny_model(family)
    fused = apply_fusedrl(copy.deepcopy(base), logprobs=False)
    assert fused.config._attn_implementation == "fusedrl"
    docs = _docs()
    batch = _flatten(docs)
    assert "attention_mask" not in batch and int((batch["position_ids"] == 0).sum()) == 3
    packed = fused(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits[0]
    separate = torch.cat([base(input_ids=d[None]).logits[0] for d in docs])
    assert_close(packed, separate, atol=2e-5, rtol=1e-4, name="packed logits")
    assert seen == [([0, 5, 14, 17], 9)] * base.config.num_hidden_layers  # boundaries from the position ids
    # without boundaries, SDPA lets documents see each other: the test can tell the difference
    leaky = base(input_ids=batch["input_ids"]).logits[0]
    assert (leaky - separate).abs().max().item() > 1e-3


def test_padding_free_training_loss_and_grads_match_separate_documents():
    base = tiny_model("llama")
    fused = apply_fusedrl(copy.deepcopy(base))  # fused loss and fused attention together
    docs = _docs(seed=1)
    batch = _flatten(docs)
    loss = fused(**batch).loss
    loss.backward()
    total = sum(len(d) - 1 for d in docs)
    ref = sum(base(input_ids=d[None], labels=d[None]).loss * (len(d) - 1) for d in docs) / total
    ref.backward()
    assert abs(loss.item() - ref.item()) < 1e-5
    for (name, p), q in zip(fused.named_parameters(), base.parameters()):
        assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-4, name=name)


def test_flash_attn_kwargs_from_the_collator_are_used():
    base = tiny_model("qwen2")
    fused = apply_fusedrl(copy.deepcopy(base), logprobs=False)
    docs = _docs(seed=2, lengths=(4, 6))
    from transformers import DataCollatorWithFlattening

    batch = DataCollatorWithFlattening(return_tensors="pt", return_flash_attn_kwargs=True,
                                       return_position_ids=True)([{"input_ids": d.tolist()} for d in docs])
    assert "cu_seq_lens_q" in batch
    batch.pop("labels", None)
    packed = fused(**batch).logits[0]
    separate = torch.cat([base(input_ids=d[None]).logits[0] for d in docs])
    assert_close(packed, separate, atol=2e-5, rtol=1e-4, name="packed logits")


def test_padded_batch_and_generation_match_sdpa():
    base = tiny_model("mistral")
    fused = apply_fusedrl(copy.deepcopy(base), logprobs=False)
    ids = torch.randint(3, VOCAB, (2, 7), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding, as generation batches are
    ref = base(input_ids=ids, attention_mask=mask).logits
    got = fused(input_ids=ids, attention_mask=mask).logits
    keep = mask.bool()
    assert_close(got[keep], ref[keep], atol=2e-5, rtol=1e-4, name="padded logits")
    kw = dict(attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(fused.generate(ids, **kw), base.generate(ids, **kw))  # decoding falls back to SDPA


def test_cu_seqlens_from_position_ids():
    cu, longest = cu_seqlens_from_position_ids(torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3]]))
    assert cu.tolist() == [0, 3, 5, 9] and cu.dtype == torch.int32 and longest == 4
    with pytest.raises(ValueError, match="position_ids"):
        cu_seqlens_from_position_ids(torch.tensor([3, 4, 0, 1]))
    assert register_attention() == "fusedrl"


def test_from_pretrained_with_the_registered_name(tmp_path):
    from transformers import AutoModelForCausalLM

    tiny_model("qwen2").save_pretrained(tmp_path)
    register_attention()
    model = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="fusedrl")
    assert model.config._attn_implementation == "fusedrl"
    docs = _docs(seed=4, lengths=(3, 5))
    batch = _flatten(docs)
    packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits[0]
    model.set_attn_implementation("sdpa")
    separate = torch.cat([model(input_ids=d[None]).logits[0] for d in docs])
    assert_close(packed, separate, atol=2e-5, rtol=1e-4, name="packed logits")
