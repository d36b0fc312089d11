// fusedrl.kernels._cpu: the k3 KL estimator on float32 host arrays, value and gradient in one pass.
//
//   k3_f32(delta_ptr, n, value_ptr, grad_ptr, ref_ptr=0)
//       value[i] = exp(-d) - 1 + d      (d = delta[i], or delta[i] - ref[i]; float32 in and out)
//       grad[i]  = 1 - exp(-d)          (= d value / d d; skipped when grad_ptr is 0)
//
// fusedrl/kernels/kl.py calls it through `k3_and_grad` for contiguous float32 CPU tensors
// (pointers from Tensor.data_ptr(); the Python side checks dtype, device, contiguity and
// allocates the outputs) and keeps a PyTorch path for every other case and when the
// extension is not built.
//
// Precision: both are computed in double and rounded once to float32, so they are within
// ~1 float32 ulp of the exact values for every float32 d (the tests hold them to 1 ulp of a
// float64 reference; measured <= 0.5). Near 0, exp(-d) - 1 + d cancels every digit, so |d| < 1/4 uses
// the Taylor series k3 = d^2 (1/2 - d/6 + d^2/24 - ...) (and 1 - e^-d = d (1 - d/2 + ...));
// beyond, e = exp(-d) from a range-reduced polynomial (relative error ~1e-15), whose
// cancellation in e - 1 + d costs at most a factor 2 / (1/4)^2 = 32: ~1e-11 relative.
// Non-finite inputs give what torch's expm1(-d) + d gives: NaN -> NaN, +inf -> (inf, 1),
// -inf -> (NaN, -inf).
//
// Speed: the loop has no calls and no branches (both formulas computed, one selected), so
// the compiler vectorises it; on x86-64 it is compiled for AVX-512, AVX2 + FMA and the
// baseline, the best chosen once from the CPU's features (`k3_isa()` says which).
#include <pybind11/pybind11.h>

#include <stdexcept>
#include <string>

#include "cpu_common.h"

namespace py = pybind11;
using fusedrl_cpu::K3;
using fusedrl_cpu::k3_one;

namespace {

// One loop per (gradient or not) x instruction set, the set chosen once by CPU features (no
// -march flag: the wheel must run on any x86-64). With `ref` the input is d = delta[i] - ref[i],
// a float32 subtraction like torch's (so the same d), saving a pass and a temporary.
#define FUSEDRL_K3_LOOPS(ATTR, SUFFIX)                                                              \
  ATTR void k3_value_loop##SUFFIX(const float* delta, const float* ref, int64_t n, float* value) { \
    if (ref) {                                                                                     \
      for (int64_t i = 0; i < n; ++i) value[i] = static_cast<float>(k3_one(delta[i] - ref[i]).value); \
    } else {                                                                                       \
      for (int64_t i = 0; i < n; ++i) value[i] = static_cast<float>(k3_one(delta[i]).value);      \
    }                                                                                              \
  }                                                                                                \
  ATTR void k3_value_grad_loop##SUFFIX(const float* delta, const float* ref, int64_t n, float* value, \
                                       float* grad) {                                              \
    if (ref) {                                                                                     \
      for (int64_t i = 0; i < n; ++i) {                                                            \
        K3 k = k3_one(delta[i] - ref[i]);                                                          \
        value[i] = static_cast<float>(k.value);                                                    \
        grad[i] = static_cast<float>(k.grad);                                                      \
      }                                                                                            \
    } else {                                                                                       \
      for (int64_t i = 0; i < n; ++i) {                                                            \
        K3 k = k3_one(delta[i]);                                                                   \
        value[i] = static_cast<float>(k.value);                                                    \
        grad[i] = static_cast<float>(k.grad);                                                      \
      }                                                                                            \
    }                                                                                              \
  }

FUSEDRL_K3_LOOPS(, _base)
#ifdef FUSEDRL_X86_DISPATCH
FUSEDRL_K3_LOOPS(FUSEDRL_AVX2, _avx2)
FUSEDRL_K3_LOOPS(FUSEDRL_AVX512, _avx512)
#endif

using ValueLoop = void (*)(const float*, const float*, int64_t, float*);
using ValueGradLoop = void (*)(const float*, const float*, int64_t, float*, float*);

struct K3Loops {
  ValueLoop value = k3_value_loop_base;
  ValueGradLoop value_grad = k3_value_grad_loop_base;
  const char* isa = "baseline";
};

K3Loops pick_loops() {
  K3Loops loops;
#ifdef FUSEDRL_X86_DISPATCH
  fusedrl_cpu::Isa isa = fusedrl_cpu::best_isa();
  if (isa == fusedrl_cpu::Isa::kAvx512) loops = {k3_value_loop_avx512, k3_value_grad_loop_avx512, "avx512"};
  if (isa == fusedrl_cpu::Isa::kAvx2) loops = {k3_value_loop_avx2, k3_value_grad_loop_avx2, "avx2"};
#endif
  return loops;
}

const K3Loops& loops() {
  static const K3Loops picked = pick_loops();
  return picked;
}

void k3_f32(uintptr_t delta_ptr, int64_t n, uintptr_t value_ptr, uintptr_t grad_ptr, uintptr_t ref_ptr) {
  if (n < 0) throw std::invalid_argument("k3_f32: n must be >= 0");
  if (n > 0 && (delta_ptr == 0 || value_ptr == 0)) throw std::invalid_argument("k3_f32: null pointer");
  py::gil_scoped_release release;
  const float* delta = reinterpret_cast<const float*>(delta_ptr);
  float* value = reinterpret_cast<float*>(value_ptr);
  float* grad = reinterpret_cast<float*>(grad_ptr);
  const float* ref = reinterpret_cast<const float*>(ref_ptr);
  if (grad)
    loops().value_grad(delta, ref, n, value, grad);
  else
    loops().value(delta, ref, n, value);
}

}  // namespace

void register_kl(py::module_& m) {
  m.def("k3_f32", &k3_f32, py::arg("delta_ptr"), py::arg("n"), py::arg("value_ptr"), py::arg("grad_ptr"),
        py::arg("ref_ptr") = 0,
        "k3 = exp(-d) - 1 + d and its gradient 1 - exp(-d) of n contiguous float32 values (data "
        "pointers; grad_ptr 0 skips the gradient; with ref_ptr, of delta - ref), each within ~1 ulp of "
        "the exact value.");
  m.def("k3_isa", [] { return std::string(loops().isa); }, "The instruction set k3_f32 runs with here.");
}
