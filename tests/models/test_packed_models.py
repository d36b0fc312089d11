"""Stock transformers models on packed batches through "fusedrl_varlen".

Oracle: the same model run on each document alone (unpadded, SDPA). The packed
run must match it in hidden states, in a loss and in every parameter gradient.
Models are tiny and built from configs (no download), float32 on CPU.
"""
import pytest
import torch

from fusedrl.models.packed_attention import (
    ATTN_IMPLEMENTATION,
    packed_attention_kwargs,
    packed_forward,
    register_varlen_attention,
)
from fusedrl.kernels import force_backend
from tests.conftest import assert_close

transformers = pytest.importorskip("transformers")

VOCAB = 101
LENGTHS = [7, 1, 12, 5]
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny CPU shapes: extra intra-op threads only contend on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _build(kind: str):
    if kind == "qwen2":
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**COMMON))
    elif kind == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**COMMON))
    elif kind == "qwen3":
        model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(head_dim=16, **COMMON))
    elif kind == "mistral":
        # A window shorter than the longest document, so the sliding window really masks.
        model = transformers.MistralForCausalLM(transformers.MistralConfig(sliding_window=4, **COMMON))
    else:
        raise AssertionError(kind)
    return model.float().eval()


def _packed_batch(position_restart: bool = True):
    docs = [torch.randint(0, VOCAB, (length,)) for length in LENGTHS]
    input_ids = torch.cat(docs)
    total = input_ids.numel()
    if position_restart:
        position_ids = torch.cat([torch.arange(length) for length in LENGTHS])
    else:
        position_ids = torch.arange(total)
    bounds = torch.tensor([0] + LENGTHS).cumsum(0)
    cu_seqlens = bounds.to(torch.int32)
    return docs, input_ids, position_ids, cu_seqlens, max(LENGTHS)


def _per_document(model, docs, position_ids, cu_seqlens):
    """The oracle: each document alone through the model's SDPA path, concatenated."""
    model.set_attn_implementation("sdpa")
    outs = []
    for i, doc in enumerate(docs):
        start = int(cu_seqlens[i])
        pos = position_ids[start : start + doc.numel()]
        outs.append(model.model(input_ids=doc[None], position_ids=pos[None]).last_hidden_state[0])
    return torch.cat(outs)


def _loss(hidden, projection):
    return (hidden * projection).sum()


def _grads(model):
    return {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("kind", ["qwen2", "llama", "qwen3", "mistral"])
def test_packed_matches_per_document(kind, seed):
    model = _build(kind)
    docs, input_ids, position_ids, cu_seqlens, max_seqlen = _packed_batch()
    projection = torch.randn(input_ids.numel(), model.config.hidden_size)

    packed = packed_forward(model, input_ids, position_ids, cu_seqlens, max_seqlen)
    assert model.config._attn_implementation == ATTN_IMPLEMENTATION
    assert packed.shape == (input_ids.numel(), model.config.hidden_size)
    _loss(packed, projection).backward()
    packed_grads = _grads(model)
    model.zero_grad(set_to_none=True)

    expected = _per_document(model, docs, position_ids, cu_seqlens)
    _loss(expected, projection).backward()
    expected_grads = _grads(model)

    assert_close(packed, expected, atol=2e-5, rtol=1e-4, name=f"{kind} hidden")
    assert_close(_loss(packed, projection), _loss(expected, projection), atol=1e-3, rtol=1e-4, name="loss")
    assert packed_grads.keys() == expected_grads.keys() and len(packed_grads) > 10
    for name, grad in packed_grads.items():
        assert_close(grad, expected_grads[name], atol=5e-5, rtol=1e-4, name=f"{kind} grad {name}")


def test_boundaries_come_from_cu_seqlens_not_position_ids(seed):
    """Position ids 0..total-1 (no restarts): documents must still be isolated."""
    model = _build("qwen2")
    docs, input_ids, position_ids, cu_seqlens, max_seqlen = _packed_batch(position_restart=False)
    packed = packed_forward(model, input_ids, position_ids, cu_seqlens, max_seqlen)
    expected = _per_document(model, docs, position_ids, cu_seqlens)
    assert_close(packed, expected, atol=2e-5, rtol=1e-4, name="hidden")

    # The same row declared as ONE document differs: isolation really comes from cu_seqlens.
    one_doc = torch.tensor([0, input_ids.numel()], dtype=torch.int32)
    leaked = packed_forward(model, input_ids, position_ids, one_doc, input_ids.numel())
    first_end = LENGTHS[0]
    assert_close(leaked[:first_end], expected[:first_end], atol=2e-5, rtol=1e-4, name="first doc")
    assert (leaked[first_end:] - expected[first_end:]).abs().max() > 1e-2


def test_packed_forward_triton_backend_matches(seed):
    """The same integration with the Triton kernel (interpreter on CPU)."""
    model = _build("llama")
    docs, input_ids, position_ids, cu_seqlens, max_seqlen = _packed_batch()
    with force_backend("reference"):
        expected = packed_forward(model, input_ids, position_ids, cu_seqlens, max_seqlen)
    with force_backend("triton"):
        packed = packed_forward(model, input_ids, position_ids, cu_seqlens, max_seqlen)
    assert_close(packed, expected, atol=2e-5, rtol=1e-4, name="hidden")


def test_unpacked_call_falls_back_to_one_document_per_row(seed):
    """No cu_seqlens: each row is one document; a 2-D padding mask drops the padded keys."""
    model = _build("qwen2")
    input_ids = torch.randint(0, VOCAB, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, 6:] = 0  # right padding on row 1
    model.set_attn_implementation("sdpa")
    expected = model.model(input_ids=input_ids, attention_mask=mask).last_hidden_state
    model.set_attn_implementation(register_varlen_attention())
    got = model.model(input_ids=input_ids, attention_mask=mask).last_hidden_state
    assert_close(got[0], expected[0], atol=2e-5, rtol=1e-4, name="full row")
    assert_close(got[1, :6], expected[1, :6], atol=2e-5, rtol=1e-4, name="padded row")
    unmasked = model.model(input_ids=input_ids).last_hidden_state
    assert_close(unmasked[0], expected[0], atol=2e-5, rtol=1e-4, name="no mask")


def test_register_is_idempotent():
    from transformers import AttentionInterface

    assert register_varlen_attention() == register_varlen_attention() == ATTN_IMPLEMENTATION
    assert ATTN_IMPLEMENTATION in AttentionInterface()


def test_kv_cache_runs_through_sdpa_inside_the_packed_attention(seed):
    """Cached decoding on "fusedrl_varlen" (key length != query length) equals SDPA's; packed rows
    with a cache are still refused."""
    from fusedrl.models.packed_attention import varlen_attention_forward

    model = _build("llama").eval()
    prompt = torch.randint(0, VOCAB, (1, 4))
    expected = model.generate(prompt, max_new_tokens=3, do_sample=False)
    model.set_attn_implementation(register_varlen_attention())
    assert torch.equal(model.generate(prompt, max_new_tokens=3, do_sample=False), expected)
    layer = model.model.layers[0].self_attn
    q, kv = torch.randn(1, 4, 1, 8), torch.randn(1, 2, 3, 8)
    with pytest.raises(ValueError, match="key length == query length for packed rows"):
        varlen_attention_forward(layer, q, kv, kv, None, cu_seq_lens_q=torch.tensor([0, 1], dtype=torch.int32),
                                 cu_seq_lens_k=torch.tensor([0, 1], dtype=torch.int32), max_length_q=1,
                                 max_length_k=1)


def test_bad_arguments():
    cu = torch.tensor([0, 3], dtype=torch.int32)
    with pytest.raises(ValueError, match="cu_seqlens must be a 1-D int32"):
        packed_attention_kwargs(cu.long(), 3)
    with pytest.raises(TypeError, match="cu_seqlens must be a torch.Tensor"):
        packed_attention_kwargs([0, 3], 3)
    with pytest.raises(TypeError, match="max_seqlen must be a host int"):
        packed_attention_kwargs(cu, torch.tensor(3))
    kwargs = packed_attention_kwargs(cu, 3)
    assert kwargs["cu_seq_lens_q"] is cu and kwargs["max_length_k"] == 3
    model = _build("llama")
    with pytest.raises(ValueError, match="input_ids must have shape"):
        packed_forward(model, torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 3, dtype=torch.long), cu, 3)
    with pytest.raises(ValueError, match="position_ids must have the shape"):
        packed_forward(model, torch.zeros(3, dtype=torch.long), torch.zeros(4, dtype=torch.long), cu, 3)
