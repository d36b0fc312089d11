"""Triton kernels: per-token log-probs and entropy straight from hidden states.

    z = (h @ W^T + b) / tau        h (N, H), W (V, H), b (V,), labels (N,)
    lse = logsumexp_v z,  logp = z[label] - lse,  entropy = lse - sum_v p_v z_v,  p = softmax(z)
    dz = g_logp (onehot(label) - p) - g_ent p (z - sum_v p_v z_v);   d(logits) = dz / tau
    dh = d(logits) @ W,  dW = d(logits)^T @ h,  db = colsum(d(logits))

Forward (no (N, V) tensor): one program per (BLOCK_N x BLOCK_V) logits tile, tiles in
grouped order so concurrent programs share W and h tiles in L2 (as in a matmul). Each
tile reduces its logits to a per-row partial log-sum-exp and partial sum p*z, and the
tile holding a row's label writes that label logit; `_lse_combine_kernel` merges the
(N, cdiv(V, BLOCK_V)) partials. Tokens go in host-side chunks so the partials stay under
`PARTIALS_BYTES`. Saved for backward: lse and sum_v p_v z_v, float32 (N,) each.
With STATS (`return_logit_stats`), each tile also writes the row's sum of z and the max of
z before and after the label column (three more (N, P) partials); the combine kernel turns
them into mean_logits = sum / V and is_top1 = z[label] > max_before and >= max_after (argmax
with ties to the first maximum). No gradient flows through them.

Backward: V is walked in host-side chunks of VC columns, VC chosen so the chunk's
d(logits) (N, VC), in the input dtype, stays under `DZ_BYTES` (256 MiB). Per chunk:
`_linear_logprobs_bwd_kernel` recomputes the logits tile by tile (float32 accumulation)
and writes d(logits); dW[chunk] = d(logits)^T @ h is one cuBLAS matmul (float32
accumulation over all N inside it) written straight into the weight gradient, so no
float32 (V, H) buffer exists; dh += d(logits) @ W[chunk] goes through
`_matmul_accumulate_kernel` into a float32 (N, H) accumulator; db is a float32 column
sum. No atomics: results are deterministic. Peak extra memory ~ N*H*4 + DZ_BYTES.
Cost: 4 matmuls (the forward logits, their recomputation, dh, dW) = 8 N H V FLOP.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ._autocast import autocast_off_backward
from ._dispatch import TRITON_INTERPRET

# Loop bounds (H, V, the partial count, the chunk width) are constexpr: H and V are model
# constants, so this costs no recompilation in practice, and Triton's interpreter (numpy >= 2.4)
# cannot iterate `range` over a runtime scalar argument.

PARTIALS_BYTES = 128 << 20  # forward per-tile partials per token chunk
DZ_BYTES = 256 << 20  # backward d(logits) chunk
_MIN_ROWS = 256  # forward token chunks are multiples of this


def _dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs follow torch's TF32 matmul policy (off by default; always IEEE when interpreted).
    For fp16/bf16 the setting is ignored by tl.dot; pass Triton's own default."""
    if TRITON_INTERPRET:
        return "ieee"
    if dtype != torch.float32:
        return "tf32"
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"


def _upcast(dtype: torch.dtype) -> bool:
    """Triton's interpreter multiplies bf16 tiles as raw uint16 bits: feed its tl.dot float32
    (exact for bf16 products, float32 accumulation as on the GPU). Never on the GPU."""
    return TRITON_INTERPRET and dtype == torch.bfloat16


@triton.jit
def _tile_ids(pid, num_pid_n, num_pid_v, GROUP_N: tl.constexpr):
    """Grouped tile order: GROUP_N row-blocks sweep the vocabulary together (L2 reuse of W)."""
    width = GROUP_N * num_pid_v
    first_n = (pid // width) * GROUP_N
    size = tl.minimum(num_pid_n - first_n, GROUP_N)
    return first_n + (pid % width) % size, (pid % width) // size


@triton.jit
def _logits_tile(h_ptr, w_ptr, b_ptr, rows, cols, N, V, H: tl.constexpr, stride_hn, stride_hh, stride_wv, stride_wh,
                 inv_tau,
                 HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
                 DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """(BLOCK_N, BLOCK_V) float32 scaled logits; columns >= V are -inf."""
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for k0 in range(0, H, BLOCK_H):
        ks = k0 + tl.arange(0, BLOCK_H)
        hb = tl.load(h_ptr + rows[:, None] * stride_hn + ks[None, :] * stride_hh,
                     mask=(rows[:, None] < N) & (ks[None, :] < H), other=0.0)
        wb = tl.load(w_ptr + cols[:, None] * stride_wv + ks[None, :] * stride_wh,
                     mask=(cols[:, None] < V) & (ks[None, :] < H), other=0.0)
        if UPCAST:
            hb, wb = hb.to(tl.float32), wb.to(tl.float32)
        acc = tl.dot(hb, tl.trans(wb), acc, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=cols < V, other=0.0).to(tl.float32)[None, :]
    return tl.where(cols[None, :] < V, acc * inv_tau, float("-inf"))


@triton.jit
def _linear_logprobs_fwd_kernel(
    h_ptr,  # (N, H) any strides, input dtype
    w_ptr,  # (V, H) any strides, input dtype
    b_ptr,  # (V,) or dummy when not HAS_BIAS
    labels_ptr,  # (N,) int32/int64
    lse_part_ptr,  # (N, num_pid_v) float32, contiguous: per-tile logsumexp
    pz_part_ptr,  # (N, num_pid_v) float32: per-tile sum softmax_tile(z) * z (ENTROPY only)
    zl_ptr,  # (N,) float32, zero-initialised: the label's logit
    stats_part_ptr,  # (3, N, num_pid_v) float32 (STATS only): per-tile sum z, max z before / after the label
    N, V, H: tl.constexpr, stride_hn, stride_hh, stride_wv, stride_wh, inv_tau,
    HAS_BIAS: tl.constexpr, ENTROPY: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, GROUP_N: tl.constexpr,
    STATS: tl.constexpr = False,
):
    pid = tl.program_id(0).to(tl.int64)
    num_pid_v = tl.cdiv(V, BLOCK_V)
    pid_n, pid_v = _tile_ids(pid, tl.cdiv(N, BLOCK_N), num_pid_v, GROUP_N)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    cols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V).to(tl.int64)
    z = _logits_tile(h_ptr, w_ptr, b_ptr, rows, cols, N, V, H, stride_hn, stride_hh, stride_wv, stride_wh,
                     inv_tau, HAS_BIAS, BLOCK_N, BLOCK_V, BLOCK_H, DOT_PRECISION, UPCAST)
    row_ok = rows < N
    m = tl.max(z, axis=1)
    e = tl.exp(z - m[:, None])
    s = tl.sum(e, axis=1)
    tl.store(lse_part_ptr + rows * num_pid_v + pid_v, m + tl.log(s), mask=row_ok)
    if ENTROPY:
        # -inf columns carry e = 0; replace their z by 0 so 0 * -inf does not make NaN
        pz = tl.sum(e * tl.where(cols[None, :] < V, z, 0.0), axis=1) / s
        tl.store(pz_part_ptr + rows * num_pid_v + pid_v, pz, mask=row_ok)
    labels = tl.load(labels_ptr + rows, mask=row_ok, other=-1).to(tl.int64)
    zl = tl.sum(tl.where(cols[None, :] == labels[:, None], z, 0.0), axis=1)
    mine = row_ok & (labels >= pid_v * BLOCK_V) & (labels < pid_v * BLOCK_V + BLOCK_V) & (labels < V)
    tl.store(zl_ptr + rows, zl, mask=mine)
    if STATS:  # z is -inf past V: those columns add 0 to the sum and never win a max
        plane = N * num_pid_v
        part = stats_part_ptr + rows * num_pid_v + pid_v
        tl.store(part, tl.sum(tl.where(cols[None, :] < V, z, 0.0), axis=1), mask=row_ok)
        tl.store(part + plane, tl.max(tl.where(cols[None, :] < labels[:, None], z, float("-inf")), axis=1), mask=row_ok)
        tl.store(part + 2 * plane, tl.max(tl.where(cols[None, :] > labels[:, None], z, float("-inf")), axis=1),
                 mask=row_ok)


@triton.jit
def _lse_combine_kernel(
    lse_part_ptr,  # (N, P) float32
    pz_part_ptr,  # (N, P) float32 (ENTROPY only)
    zl_ptr,  # (N,) float32
    labels_ptr,  # (N,) int
    logp_ptr,  # (N,) float32 out
    ent_ptr,  # (N,) float32 out (ENTROPY only)
    lse_ptr,  # (N,) float32 out, saved for backward
    pz_ptr,  # (N,) float32 out, saved for backward (ENTROPY only)
    stats_part_ptr,  # (3, N, P) float32 (STATS only)
    mean_ptr,  # (N,) float32 out: mean scaled logit (STATS only)
    top1_ptr,  # (N,) int8 out: label is the first argmax (STATS only)
    N, P: tl.constexpr, ignore_index, V,
    ENTROPY: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr, STATS: tl.constexpr = False,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    row_ok = rows < N
    m = tl.full((BLOCK_R,), float("-inf"), tl.float32)
    s = tl.zeros((BLOCK_R,), tl.float32)
    t = tl.zeros((BLOCK_R,), tl.float32)
    z_sum = tl.zeros((BLOCK_R,), tl.float32)
    max_before = tl.full((BLOCK_R,), float("-inf"), tl.float32)
    max_after = tl.full((BLOCK_R,), float("-inf"), tl.float32)
    for p0 in range(0, P, BLOCK_P):
        ps = p0 + tl.arange(0, BLOCK_P)
        mask = row_ok[:, None] & (ps[None, :] < P)
        part = tl.load(lse_part_ptr + rows[:, None] * P + ps[None, :], mask=mask, other=float("-inf"))
        m_new = tl.maximum(m, tl.max(part, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows past N stay all -inf
        e = tl.exp(part - m_safe[:, None])
        scale = tl.exp(m - m_safe)
        s = s * scale + tl.sum(e, axis=1)
        if ENTROPY:
            pz_part = tl.load(pz_part_ptr + rows[:, None] * P + ps[None, :], mask=mask, other=0.0)
            t = t * scale + tl.sum(e * pz_part, axis=1)
        if STATS:
            sp = stats_part_ptr + rows[:, None] * P + ps[None, :]
            z_sum += tl.sum(tl.load(sp, mask=mask, other=0.0), axis=1)
            max_before = tl.maximum(max_before, tl.max(tl.load(sp + N * P, mask=mask, other=float("-inf")), axis=1))
            max_after = tl.maximum(max_after, tl.max(tl.load(sp + 2 * N * P, mask=mask, other=float("-inf")), axis=1))
        m = m_new
    lse = m + tl.log(tl.where(row_ok, s, 1.0))
    valid = tl.load(labels_ptr + rows, mask=row_ok, other=ignore_index) != ignore_index
    zl = tl.load(zl_ptr + rows, mask=row_ok, other=0.0)
    tl.store(logp_ptr + rows, tl.where(valid, zl - lse, 0.0), mask=row_ok)
    tl.store(lse_ptr + rows, lse, mask=row_ok)
    if ENTROPY:
        pz = t / tl.where(row_ok, s, 1.0)
        tl.store(ent_ptr + rows, tl.where(valid, lse - pz, 0.0), mask=row_ok)
        tl.store(pz_ptr + rows, pz, mask=row_ok)
    if STATS:  # argmax semantics: ties go to the first maximum, as torch.argmax
        tl.store(mean_ptr + rows, tl.where(valid, z_sum / V, 0.0), mask=row_ok)
        top1 = valid & (zl > max_before) & (zl >= max_after)
        tl.store(top1_ptr + rows, top1.to(tl.int8), mask=row_ok)


@triton.jit
def _linear_logprobs_bwd_kernel(
    h_ptr,  # (N, H) any strides
    w_ptr,  # (VC, H): the chunk's rows of W
    b_ptr,  # (VC,) the chunk's bias, or dummy
    labels_ptr,  # (N,) int, absolute vocabulary ids
    lse_ptr,  # (N,) float32
    pz_ptr,  # (N,) float32 (ENTROPY only)
    g_logp_ptr,  # (N,) float32 upstream gradient of logp
    g_ent_ptr,  # (N,) float32 upstream gradient of entropy (ENTROPY only)
    dz_ptr,  # (N, VC) contiguous, input dtype: d(loss)/d(logits) of the chunk
    N, VC, v0, H: tl.constexpr, stride_hn, stride_hh, stride_wv, stride_wh, inv_tau, ignore_index,
    HAS_BIAS: tl.constexpr, ENTROPY: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, GROUP_N: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    pid_n, pid_v = _tile_ids(pid, tl.cdiv(N, BLOCK_N), tl.cdiv(VC, BLOCK_V), GROUP_N)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    cols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V).to(tl.int64)
    z = _logits_tile(h_ptr, w_ptr, b_ptr, rows, cols, N, VC, H, stride_hn, stride_hh, stride_wv, stride_wh,
                     inv_tau, HAS_BIAS, BLOCK_N, BLOCK_V, BLOCK_H, DOT_PRECISION, UPCAST)
    row_ok = rows < N
    labels = tl.load(labels_ptr + rows, mask=row_ok, other=ignore_index).to(tl.int64)
    valid = row_ok & (labels != ignore_index)
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    p = tl.exp(z - lse[:, None])  # 0 on columns past the chunk
    g_logp = tl.where(valid, tl.load(g_logp_ptr + rows, mask=row_ok, other=0.0), 0.0)
    dz = tl.where(cols[None, :] + v0 == labels[:, None], g_logp[:, None], 0.0) - g_logp[:, None] * p
    if ENTROPY:
        g_ent = tl.where(valid, tl.load(g_ent_ptr + rows, mask=row_ok, other=0.0), 0.0)
        pz = tl.load(pz_ptr + rows, mask=row_ok, other=0.0)
        z_safe = tl.where(cols[None, :] < VC, z, 0.0)
        dz -= g_ent[:, None] * p * (z_safe - pz[:, None])
    dz = dz * inv_tau
    tl.store(dz_ptr + rows[:, None] * VC + cols[None, :], dz.to(dz_ptr.dtype.element_ty),
             mask=row_ok[:, None] & (cols[None, :] < VC))


@triton.jit
def _matmul_accumulate_kernel(
    acc_ptr,  # (M, K2) float32, contiguous: acc += a @ b
    a_ptr,  # (M, K) contiguous, input dtype
    b_ptr,  # (K, K2) any strides, input dtype
    M, K, K2, stride_bk, stride_bn,
    K_CHUNK: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_N: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    pid_m, pid_n = _tile_ids(pid, tl.cdiv(M, BLOCK_M), tl.cdiv(K2, BLOCK_N), GROUP_N)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    out = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K_CHUNK, BLOCK_K):  # K <= K_CHUNK; constexpr bound (see note below)
        ks = (k0 + tl.arange(0, BLOCK_K)).to(tl.int64)  # ks * stride_bk may pass 2**31 for a wide chunk
        a = tl.load(a_ptr + rows[:, None] * K + ks[None, :], mask=(rows[:, None] < M) & (ks[None, :] < K), other=0.0)
        b = tl.load(b_ptr + ks[:, None] * stride_bk + cols[None, :] * stride_bn,
                    mask=(ks[:, None] < K) & (cols[None, :] < K2), other=0.0)
        if UPCAST:
            a, b = a.to(tl.float32), b.to(tl.float32)
        out = tl.dot(a, b, out, input_precision=DOT_PRECISION)
    ptrs = acc_ptr + rows[:, None] * K2 + cols[None, :]
    mask = (rows[:, None] < M) & (cols[None, :] < K2)
    tl.store(ptrs, tl.load(ptrs, mask=mask, other=0.0) + out, mask=mask)


# ---- block sizes: the one place they are chosen ------------------------------------------
FWD_BLOCK_V = 32 if TRITON_INTERPRET else 128  # fixed: it sets the partials' layout
_VC_ALIGN = 32 if TRITON_INTERPRET else 256  # backward V-chunk width multiple (of every BLOCK_V)


SMEM_BYTES = 200 << 10  # shared memory a config's pipelined tiles may use (H100/H200 allow 227 KiB)
_SMEM_RESERVE = 27 << 10  # left for the epilogue and Triton's own scratch


@functools.lru_cache(maxsize=None)
def smem_budget(device_index: int) -> int:
    """SMEM_BYTES, or less on a chip with less opt-in shared memory per block (A100: 163 KiB)."""
    optin = getattr(torch.cuda.get_device_properties(device_index), "shared_memory_per_block_optin", 0)
    return min(SMEM_BYTES, optin - _SMEM_RESERVE) if optin > _SMEM_RESERVE else SMEM_BYTES


def smem_prune(a_name: str, m_key: str, n_key: str, k_key: str):
    """Autotune pruner: drop configs whose num_stages x (M + N) x K input tiles overflow the
    device's shared memory for this call's dtype (fp32 inputs need twice the bf16 room);
    keep at least one."""
    def prune(configs, named_args, **kwargs):
        tensor = named_args[a_name]
        elem = tensor.element_size()
        budget = smem_budget(tensor.device.index or 0) if tensor.is_cuda else SMEM_BYTES

        def need(cfg):
            size = {k: cfg.kwargs.get(k, kwargs.get(k)) for k in (m_key, n_key, k_key)}
            return cfg.num_stages * (size[m_key] + size[n_key]) * size[k_key] * elem
        fitting = [c for c in configs if need(c) <= budget]
        return fitting or [min(configs, key=need)]
    return prune


def _tuned(kernel, configs, key, interpret_meta, prune, **autotune_kw):
    """(kernel, fixed meta): autotuned over a small, pruned list on GPU; fixed small tiles under the interpreter."""
    if TRITON_INTERPRET:
        return kernel, interpret_meta
    cfgs = [triton.Config(kw, num_warps=w, num_stages=s) for kw, w, s in configs]
    return triton.autotune(configs=cfgs, key=key, prune_configs_by={"early_config_prune": prune},
                           **autotune_kw)(kernel), {}


_FWD, _FWD_META = _tuned(_linear_logprobs_fwd_kernel, [
    (dict(BLOCK_N=128, BLOCK_H=64, GROUP_N=8), 8, 3),
    (dict(BLOCK_N=128, BLOCK_H=64, GROUP_N=8), 4, 4),
    (dict(BLOCK_N=64, BLOCK_H=64, GROUP_N=8), 4, 4),
    (dict(BLOCK_N=256, BLOCK_H=64, GROUP_N=8), 8, 3),
    (dict(BLOCK_N=128, BLOCK_H=64, GROUP_N=16), 8, 3),
], ["H", "V"], dict(BLOCK_N=16, BLOCK_H=16, GROUP_N=2), smem_prune("h_ptr", "BLOCK_N", "BLOCK_V", "BLOCK_H"))
_BWD, _BWD_META = _tuned(_linear_logprobs_bwd_kernel, [
    (dict(BLOCK_N=128, BLOCK_V=128, BLOCK_H=64, GROUP_N=8), 8, 3),
    (dict(BLOCK_N=128, BLOCK_V=256, BLOCK_H=64, GROUP_N=8), 8, 3),
    (dict(BLOCK_N=64, BLOCK_V=128, BLOCK_H=64, GROUP_N=8), 4, 4),
    (dict(BLOCK_N=128, BLOCK_V=64, BLOCK_H=64, GROUP_N=8), 4, 4),
], ["H", "VC"], dict(BLOCK_N=16, BLOCK_V=32, BLOCK_H=16, GROUP_N=2),
    smem_prune("h_ptr", "BLOCK_N", "BLOCK_V", "BLOCK_H"))
_ACC, _ACC_META = _tuned(_matmul_accumulate_kernel, [
    (dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_N=8), 8, 3),
    (dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=64, GROUP_N=8), 4, 4),
    (dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, GROUP_N=8), 4, 4),
], ["K_CHUNK", "K2"], dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=32, GROUP_N=2),
    smem_prune("a_ptr", "BLOCK_M", "BLOCK_N", "BLOCK_K"), restore_value=["acc_ptr"])
_COMBINE_META = dict(BLOCK_R=16, BLOCK_P=16) if TRITON_INTERPRET else dict(BLOCK_R=32, BLOCK_P=128, num_warps=4)
# Invariant mode (fusedrl.kernels.invariant): pinned tiles, no autotuning, a fixed backward V chunk,
# so a row's reduction order never depends on how many rows share the launch.
_PIN = dict(num_warps=4, num_stages=3)
_FWD_INV = (_FWD, _FWD_META) if TRITON_INTERPRET else (
    _linear_logprobs_fwd_kernel, dict(BLOCK_N=64, BLOCK_H=64, GROUP_N=8, **_PIN))
_BWD_INV = (_BWD, _BWD_META) if TRITON_INTERPRET else (
    _linear_logprobs_bwd_kernel, dict(BLOCK_N=64, BLOCK_V=128, BLOCK_H=64, GROUP_N=8, **_PIN))
_ACC_INV = (_ACC, _ACC_META) if TRITON_INTERPRET else (
    _matmul_accumulate_kernel, dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, GROUP_N=8, **_PIN))
_VC_INV = 8 * _VC_ALIGN


# ---- host launchers ----------------------------------------------------------------------
def _promote(hidden, weight):
    """tl.dot needs one input dtype: use the wider of hidden's and weight's."""
    dtype = torch.promote_types(hidden.dtype, weight.dtype)
    return hidden.to(dtype), weight.to(dtype)


def linear_logprobs_fwd(hidden, weight, bias, labels, temperature, ignore_index, entropy, stats=False,
                        invariant=False):
    """hidden (N, H), weight (V, H) one dtype, bias (V,)|None, labels (N,) ->
    (logp, entropy|None, lse, pz|None), float32 (N,) each; with `stats` also
    (mean_logits float32 (N,), is_top1 bool (N,))."""
    n, hdim = hidden.shape
    vocab = weight.shape[0]
    dev = hidden.device
    f32 = dict(dtype=torch.float32, device=dev)
    logp, lse = torch.empty(n, **f32), torch.empty(n, **f32)
    ent, pz = (torch.empty(n, **f32), torch.empty(n, **f32)) if entropy else (None, None)
    num_vb = triton.cdiv(vocab, FWD_BLOCK_V)
    step = max(_MIN_ROWS, PARTIALS_BYTES // (num_vb * 4 * (1 + entropy + 3 * stats)) // _MIN_ROWS * _MIN_ROWS)
    rows = min(n, step)
    lse_part = torch.empty(rows, num_vb, **f32)
    pz_part = torch.empty(rows, num_vb, **f32) if entropy else lse_part
    stats_part = torch.empty(3, rows, num_vb, **f32) if stats else lse_part
    mean = torch.empty(n, **f32) if stats else logp
    top1 = torch.empty(n, dtype=torch.int8, device=dev) if stats else None
    zl = torch.empty(rows, **f32)
    b = bias if bias is not None else lse  # dummy pointer, never read
    dot = dict(DOT_PRECISION=_dot_precision(hidden.dtype), UPCAST=_upcast(hidden.dtype))
    fwd, fwd_meta = _FWD_INV if invariant else (_FWD, _FWD_META)
    for s in range(0, n, step):
        e = min(n, s + step)
        m, h = e - s, hidden[s:e]
        zl.zero_()
        grid = lambda meta: (triton.cdiv(m, meta["BLOCK_N"]) * num_vb,)  # noqa: E731
        fwd[grid](h, weight, b, labels[s:e], lse_part, pz_part, zl, stats_part, m, vocab, hdim, h.stride(0),
                   h.stride(1), weight.stride(0), weight.stride(1), 1.0 / temperature, HAS_BIAS=bias is not None,
                   ENTROPY=entropy, **dot, BLOCK_V=FWD_BLOCK_V, STATS=stats, **fwd_meta)
        cgrid = (triton.cdiv(m, _COMBINE_META["BLOCK_R"]),)
        _lse_combine_kernel[cgrid](lse_part, pz_part, zl, labels[s:e], logp[s:e], ent[s:e] if entropy else logp,
                                   lse[s:e], pz[s:e] if entropy else lse, stats_part, mean[s:e],
                                   top1[s:e] if stats else zl, m, num_vb, ignore_index, vocab,
                                   ENTROPY=entropy, STATS=stats, **_COMBINE_META)
    if stats:
        return logp, ent, lse, pz, mean, top1.bool()
    return logp, ent, lse, pz


def linear_logprobs_bwd(hidden, weight, bias, labels, lse, pz, g_logp, g_ent, temperature, ignore_index,
                        need_h, need_w, need_b, invariant=False):
    """Exact (dh float32 (N, H) | None, dW (V, H) in weight's dtype | None, db float32 (V,) | None)."""
    n, hdim = hidden.shape
    vocab = weight.shape[0]
    dev = hidden.device
    entropy = pz is not None
    dh = torch.zeros(n, hdim, dtype=torch.float32, device=dev) if need_h else None
    dw = torch.empty(weight.shape, dtype=weight.dtype, device=dev) if need_w else None  # contiguous rows for out=
    db = torch.empty(vocab, dtype=torch.float32, device=dev) if need_b else None
    if n == 0:
        for t in (dw, db):
            if t is not None:
                t.zero_()
        return dh, dw, db
    elem = hidden.element_size()
    # a power-of-two multiple of _VC_ALIGN (or V itself): few distinct K_CHUNK specialisations
    vc = _VC_ALIGN << max(0, (DZ_BYTES // (n * elem * _VC_ALIGN)).bit_length() - 1)
    vc = min(vocab, _VC_INV if invariant else vc)
    bwd, bwd_meta = _BWD_INV if invariant else (_BWD, _BWD_META)
    acc, acc_meta = _ACC_INV if invariant else (_ACC, _ACC_META)
    dz = torch.empty(n, vc, dtype=hidden.dtype, device=dev)
    g_logp = g_logp.float().contiguous()
    g_ent = g_ent.float().contiguous() if entropy else g_logp
    dot = dict(DOT_PRECISION=_dot_precision(hidden.dtype), UPCAST=_upcast(hidden.dtype))
    for v0 in range(0, vocab, vc):
        v1 = min(vocab, v0 + vc)
        w, d = weight[v0:v1], dz.view(-1)[: n * (v1 - v0)].view(n, v1 - v0)  # contiguous (N, width)
        b = bias[v0:v1] if bias is not None else lse
        grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]) * triton.cdiv(v1 - v0, meta["BLOCK_V"]),)  # noqa: E731
        bwd[grid](hidden, w, b, labels, lse, pz if entropy else lse, g_logp, g_ent, d, n, v1 - v0, v0, hdim,
                   hidden.stride(0), hidden.stride(1), w.stride(0), w.stride(1), 1.0 / temperature, ignore_index,
                   HAS_BIAS=bias is not None, ENTROPY=entropy, **dot, **bwd_meta)
        if need_w:
            torch.mm(d.t(), hidden, out=dw[v0:v1])  # cuBLAS: float32 accumulation over all N
        if need_b:
            torch.sum(d, 0, dtype=torch.float32, out=db[v0:v1])
        if need_h:
            agrid = lambda meta: (triton.cdiv(n, meta["BLOCK_M"]) * triton.cdiv(hdim, meta["BLOCK_N"]),)  # noqa: E731
            k_chunk = triton.cdiv(v1 - v0, _VC_ALIGN) * _VC_ALIGN  # the last, narrower chunk loops less
            acc[agrid](dh, d, w, n, v1 - v0, hdim, w.stride(0), w.stride(1), K_CHUNK=k_chunk, **dot,
                       **acc_meta)
    return dh, dw, db


class LinearLogprobsTriton(torch.autograd.Function):
    """Fused Triton op on 2-D hidden (N, H), weight (V, H), bias (V,)|None, labels (N,)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, temperature, ignore_index, return_entropy, return_stats=False,
                invariant=False):
        h, w = _promote(hidden, weight)
        out = linear_logprobs_fwd(h, w, bias, labels, temperature, ignore_index, return_entropy, return_stats,
                                  invariant)
        logp, ent, lse, pz = out[:4]
        ctx.save_for_backward(hidden, weight, bias, labels, lse, pz)
        ctx.temperature, ctx.ignore_index, ctx.invariant = temperature, ignore_index, invariant
        if return_stats:  # statistics of the logits: no gradient
            ctx.mark_non_differentiable(*out[4:])
            return ((logp, ent) if return_entropy else (logp,)) + tuple(out[4:])
        return (logp, ent) if return_entropy else logp

    @staticmethod
    @autocast_off_backward
    def backward(ctx, g_logp, *rest):
        g_ent = rest[0] if ctx.saved_tensors[5] is not None else None
        hidden, weight, bias, labels, lse, pz = ctx.saved_tensors
        h, w = _promote(hidden, weight)
        dh, dw, db = linear_logprobs_bwd(h, w, bias, labels, lse, pz, g_logp, g_ent, ctx.temperature,
                                         ctx.ignore_index, *ctx.needs_input_grad[:3], invariant=ctx.invariant)
        return (None if dh is None else dh.to(hidden.dtype), None if dw is None else dw.to(weight.dtype),
                None if db is None else db.to(bias.dtype), None, None, None, None, None, None)
