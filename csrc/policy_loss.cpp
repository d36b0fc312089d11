// fusedrl.kernels._cpu: the per-token pass of the PPO / GRPO clipped surrogate on float32 host arrays.
//
//   ppo_clip_f32(d_ptr, ratio_ptr, adv_ptr, coef_ptr, mask_ptr, n, lo, hi, g_ptr)
//       -> (loss, clipped, ratio_sum, d_sum, approx_kl_sum)
//
// Per token (adv and d already 0 under the mask, ratio = exp(d) from PyTorch):
//     pg      = -min(r A, clamp(r, lo, hi) A)         loss   = sum pg * coef         (double)
//     clipped = (A > 0 and r > hi) or (A < 0 and r < lo)
//     g       = (clipped ? -0 : -(r A)) * coef        d loss / d logp, written to g_ptr
// and the metrics' token totals: clipped, r * mask, d, k3(d) (approx_kl) — all in double.
//
// fusedrl/kernels/_policy_loss_cpu.py calls it from `policy_loss_fast` for float32 CPU tensors
// (pointers from Tensor.data_ptr(), checked and allocated on the Python side) and keeps the
// PyTorch code of the same step for every other case. The gradient is the same float32 ops in
// the same order as that code (r * A, negate, times coef: no contraction, no reassociation), so
// both give it bitwise; the loss and the metric totals are double sums here, float32 dot
// products there (equal to ~1e-6 relative). ratio stays PyTorch's exp so that the two paths
// train bitwise the same.
#include <pybind11/pybind11.h>

#include <stdexcept>
#include <string>
#include <tuple>

#include "cpu_common.h"

namespace py = pybind11;

namespace {

struct ClipSums {
  double loss = 0, clipped = 0, ratio = 0, d = 0, approx_kl = 0;
};

constexpr int kBlock = 256;  // tokens per block: per-token terms go to L1-resident arrays ...
constexpr int kLanes = 16;   // ... then into independent double accumulators, the same sums on every ISA

// Two loops per block, each simple enough for the compiler to vectorise: the elementwise one
// (gradient and per-token terms, no reductions, no branches) and the lane-wise accumulation.
#define FUSEDRL_CLIP_LOOP(ATTR, SUFFIX)                                                              \
  ATTR void ppo_clip_loop##SUFFIX(const float* d, const float* ratio, const float* adv, const float* coef, \
                                  const float* mask, int64_t n, float lo, float hi, float* g, ClipSums* out) { \
    double acc[5][kLanes] = {};                                                                      \
    alignas(64) double terms[5][kBlock];                                                             \
    for (int64_t start = 0; start < n; start += kBlock) {                                            \
      int len = n - start < kBlock ? static_cast<int>(n - start) : kBlock;                          \
      const float *dd = d + start, *rr = ratio + start, *aa = adv + start, *cc = coef + start;       \
      const float* mm = mask + start;                                                                \
      float* gg = g + start;                                                                         \
      for (int i = 0; i < len; ++i) {                                                                \
        float r = rr[i], a = aa[i], c = cc[i];                                                       \
        float ra = r * a;                                                                            \
        float rc = r < lo ? lo : (r > hi ? hi : r);                                                  \
        float ca = rc * a;                                                                           \
        float pg = -(ra < ca ? ra : ca);                                                             \
        bool clip = ((a > 0.0f) & (r > hi)) | ((a < 0.0f) & (r < lo));                               \
        gg[i] = (clip ? -0.0f : -ra) * c;                                                            \
        terms[0][i] = static_cast<double>(pg) * static_cast<double>(c);                              \
        terms[1][i] = clip ? 1.0 : 0.0;                                                              \
        terms[2][i] = static_cast<double>(r) * static_cast<double>(mm[i]);                           \
        terms[3][i] = static_cast<double>(dd[i]);                                                    \
        terms[4][i] = fusedrl_cpu::k3_one(dd[i]).value;                                              \
      }                                                                                              \
      for (int i = len; i < (len + kLanes - 1) / kLanes * kLanes; ++i)                               \
        for (int t = 0; t < 5; ++t) terms[t][i] = 0.0;                                               \
      for (int t = 0; t < 5; ++t)                                                                    \
        for (int i = 0; i < len; i += kLanes)                                                        \
          for (int l = 0; l < kLanes; ++l) acc[t][l] += terms[t][i + l];                             \
    }                                                                                                \
    double total[5] = {};                                                                            \
    for (int t = 0; t < 5; ++t)                                                                      \
      for (int l = 0; l < kLanes; ++l) total[t] += acc[t][l];                                        \
    *out = {total[0], total[1], total[2], total[3], total[4]};                                       \
  }

FUSEDRL_CLIP_LOOP(, _base)
#ifdef FUSEDRL_X86_DISPATCH
FUSEDRL_CLIP_LOOP(FUSEDRL_AVX2, _avx2)
FUSEDRL_CLIP_LOOP(FUSEDRL_AVX512, _avx512)
#endif

using ClipLoop = void (*)(const float*, const float*, const float*, const float*, const float*, int64_t, float,
                          float, float*, ClipSums*);

ClipLoop pick_clip_loop() {
#ifdef FUSEDRL_X86_DISPATCH
  fusedrl_cpu::Isa isa = fusedrl_cpu::best_isa();
  if (isa == fusedrl_cpu::Isa::kAvx512) return ppo_clip_loop_avx512;
  if (isa == fusedrl_cpu::Isa::kAvx2) return ppo_clip_loop_avx2;
#endif
  return ppo_clip_loop_base;
}

std::tuple<double, double, double, double, double> ppo_clip_f32(uintptr_t d_ptr, uintptr_t ratio_ptr,
                                                                uintptr_t adv_ptr, uintptr_t coef_ptr,
                                                                uintptr_t mask_ptr, int64_t n, float lo, float hi,
                                                                uintptr_t g_ptr) {
  if (n < 0) throw std::invalid_argument("ppo_clip_f32: n must be >= 0");
  if (n > 0 && (!d_ptr || !ratio_ptr || !adv_ptr || !coef_ptr || !mask_ptr || !g_ptr))
    throw std::invalid_argument("ppo_clip_f32: null pointer");
  static const ClipLoop loop = pick_clip_loop();
  ClipSums sums;
  {
    py::gil_scoped_release release;
    loop(reinterpret_cast<const float*>(d_ptr), reinterpret_cast<const float*>(ratio_ptr),
         reinterpret_cast<const float*>(adv_ptr), reinterpret_cast<const float*>(coef_ptr),
         reinterpret_cast<const float*>(mask_ptr), n, lo, hi, reinterpret_cast<float*>(g_ptr), &sums);
  }
  return {sums.loss, sums.clipped, sums.ratio, sums.d, sums.approx_kl};
}

}  // namespace

void register_policy_loss(py::module_& m) {
  m.def("ppo_clip_isa", [] { return std::string(fusedrl_cpu::isa_name(fusedrl_cpu::best_isa())); },
        "The instruction set ppo_clip_f32 runs with here.");
  m.def("ppo_clip_f32", &ppo_clip_f32, py::arg("d_ptr"), py::arg("ratio_ptr"), py::arg("adv_ptr"),
        py::arg("coef_ptr"), py::arg("mask_ptr"), py::arg("n"), py::arg("lo"), py::arg("hi"), py::arg("g_ptr"),
        "The PPO / GRPO clipped surrogate's per-token pass over n float32 tokens: writes the gradient "
        "to g_ptr, returns (loss, clipped, ratio_sum, d_sum, approx_kl_sum) in double.");
}
