"""The GPU path of the policy-loss and GAE kernels compiles for sm_90 / sm_80 without a GPU (tests/kernels/_aot.py).

Policy loss: the constexpr flags come from the launcher's own `_flags` applied to real
`PolicyLossConfig`s, so every algorithm, every aggregation, every KL kind, dual clip, KL
clamps, entropy, sampler IS weights of every level / mode / scope and the Clip-Cov / KL-Cov
selection appear at least once, with bf16 and fp32 (and mixed) log-prob inputs; forward and
backward kernel of each. A representative subset of the flag combinations: the aggregation
is host-side, so it never changes the kernels. GAE: its one kernel.
"""
import pytest

from fusedrl.kernels._policy_config import AGGREGATIONS, ALGO_CODES, ALGOS

from ._aot import check_fits, run_aot

triton = pytest.importorskip("triton")
from fusedrl.kernels._policy_loss_triton import IS_LEVEL_CODES, KL_CODES  # noqa: E402

SCRIPT = r"""
import json, sys
from _aot import compile_kernel
import fusedrl.kernels._gae as GAE
import fusedrl.kernels._policy_loss_triton as P
from fusedrl.kernels.policy_loss import PolicyLossConfig

SCALARS = ("eps_low", "eps_high", "dual_clip", "tau_pos", "tau_neg", "kl_clamp", "kl_vclamp", "is_low", "is_cap",
           "kl_cov_coef")
FP32_PTRS = ("adv_ptr", "mask_ptr", "terms_ptr", "stats_ptr", "seq_ptr", "grad_ptr", "dlogp_ptr", "dent_ptr",
             "sel_ptr")


def policy_kernels(arch, cfg_kw, logp_dt, old_dt, has_ref, has_ent, has_sampler):
    cfg = PolicyLossConfig(**cfg_kw)
    has_sel = cfg.algo in ("clip_cov", "kl_cov")
    flags = P._flags(cfg, object() if has_ref else None, object() if has_ent else None,
                     object() if has_sampler else None, object() if has_sel else None)
    warps = flags.pop("num_warps")
    out = {}
    for kind, fn in (("fwd", P._policy_loss_fwd_kernel), ("bwd", P._policy_loss_bwd_kernel)):
        types = {a: "fp32" for a in SCALARS}
        types.update({a: "*fp32" for a in FP32_PTRS if a in fn.arg_names})
        # absent optional inputs are a dummy pointing at logp
        types.update(logp_ptr="*" + logp_dt, old_ptr="*" + old_dt, cu_seqlens_ptr="*i32",
                     ref_ptr="*" + (old_dt if has_ref else logp_dt),
                     sampler_ptr="*" + (old_dt if has_sampler else logp_dt))
        if kind == "fwd":
            types["ent_ptr"] = "*" + (old_dt if has_ent else logp_dt)
        name = f"sm_{arch} policy_{kind} {cfg.algo} {cfg.aggregation} {logp_dt}/{old_dt} " + \
            " ".join(f"{k}={int(v)}" for k, v in flags.items())
        out[name] = compile_kernel(fn, types, flags, arch, warps)
    return out


report = {}
payload = json.loads(sys.argv[1])
for case in payload["policy"]:
    report.update(policy_kernels(*case))
for arch in payload["gae"]:
    types = dict(rewards_ptr="*fp32", values_ptr="*fp32", cu_seqlens_ptr="*i32", adv_ptr="*fp32", ret_ptr="*fp32",
                 gamma="fp32", gamma_lam="fp32")
    report[f"sm_{arch} gae"] = compile_kernel(GAE._gae_fwd_kernel, types, {}, arch, 4)  # launch default
print(json.dumps(report))
"""

# (arch, PolicyLossConfig kwargs, logp dtype, old_logp/ref/sampler dtype, has ref, has entropy, has sampler)
POLICY_CASES = [
    ("90", dict(algo="ppo"), "fp32", "fp32", False, False, False),
    ("90", dict(algo="ppo", dual_clip=3.0, beta=0.04, kl_kind="k3", kl_clamp=10.0, c_ent=0.01,
                aggregation="seq_mean"), "bf16", "bf16", True, True, True),
    ("90", dict(algo="grpo", beta=0.04, kl_kind="k1", aggregation="seq_mean_fixed_len", max_len=64),
     "bf16", "fp32", True, False, False),
    ("90", dict(algo="gspo", dual_clip=3.0, beta=0.1, kl_kind="k2", c_ent=0.01), "fp32", "fp32", True, True, False),
    ("90", dict(algo="gspo", aggregation="seq_mean"), "bf16", "bf16", False, False, True),
    ("90", dict(algo="cispo", beta=0.04, kl_kind="k3+", kl_clamp=5.0, aggregation="seq_mean"),
     "fp32", "fp32", True, False, True),
    ("90", dict(algo="sapo", c_ent=0.01), "bf16", "bf16", False, True, False),
    ("90", dict(algo="reinforce", beta=0.02, kl_kind="k2", kl_clamp=3.0, aggregation="seq_mean_fixed_len",
                max_len=32), "fp32", "fp32", True, False, False),
    ("90", dict(algo="rloo", c_ent=0.01), "bf16", "bf16", False, True, True),
    ("80", dict(algo="grpo", dual_clip=2.0, beta=0.04, kl_kind="k3", kl_clamp=10.0, c_ent=0.01),
     "bf16", "bf16", True, True, True),
    ("80", dict(algo="gspo", beta=0.04, kl_kind="k1"), "fp32", "fp32", True, False, False),
    ("90", dict(algo="gspo_token", beta=0.04, kl_kind="abs", kl_value_clamp=10.0, is_level="sequence",
                is_mode="mask", is_low=0.5), "bf16", "fp32", True, False, True),
    ("90", dict(algo="gmpo", eps_low=0.4, eps_high=0.4, aggregation="seq_sum", is_level="geometric",
                is_scope="loss", c_ent=0.01), "bf16", "bf16", False, True, True),
    ("90", dict(algo="clip_cov", beta=0.04, kl_kind="k1+", kl_clamp=20.0, kl_value_clamp=10.0),
     "fp32", "fp32", True, False, False),
    ("90", dict(algo="kl_cov", is_mode="mask", is_scope="loss"), "bf16", "bf16", False, True, True),
    ("80", dict(algo="gmpo", beta=0.04, kl_kind="k3"), "fp32", "fp32", True, False, False),
]
GAE_ARCHS = ["90", "80"]


def test_objective_kernels_compile_ahead_of_time(tmp_path):
    report = run_aot(SCRIPT, {"policy": [list(c) for c in POLICY_CASES], "gae": GAE_ARCHS}, tmp_path)
    assert len(report) == 2 * len(POLICY_CASES) + len(GAE_ARCHS)  # every case named apart
    for name in report:
        arch = name.split()[0][3:]
        # the forward reduces each sequence across warps (shared memory); backward and GAE are elementwise
        check_fits(report, arch, name, uses_shared="policy_fwd" in name)
    fwd = [name.split() for name in report if "policy_fwd" in name]  # sm, kernel, algo, aggregation, dtypes, flags
    assert {n[2] for n in fwd} == set(ALGOS)
    assert {n[3] for n in fwd} == set(AGGREGATIONS)
    flags = [n[5:] for n in fwd]
    want = {"ALGO": len(set(ALGO_CODES.values())), "KL_KIND": len(KL_CODES), "IS_LEVEL": len(IS_LEVEL_CODES)}
    for flag in ("ALGO", "KL_KIND", "HAS_REF", "HAS_ENT", "HAS_SAMPLER", "HAS_SEL", "USE_DUAL", "USE_CLAMP",
                 "USE_VCLAMP", "IS_LEVEL", "IS_MODE", "IS_SCOPE"):
        values = {f for fs in flags for f in fs if f.startswith(flag + "=")}
        assert len(values) == want.get(flag, 2), (flag, values)  # the subset really covers every value of every flag
