// Shared by the CPU kernels of fusedrl.kernels._cpu (csrc/kl.cpp, csrc/policy_loss.cpp):
// the k3 estimator of one token in double, and the per-ISA dispatch macros.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>

#if (defined(__GNUC__) || defined(__clang__)) && defined(__x86_64__)
#define FUSEDRL_X86_DISPATCH 1
#define FUSEDRL_AVX2 __attribute__((target("avx2,fma")))
#define FUSEDRL_AVX512 __attribute__((target("avx512f,avx512dq,avx512vl,avx512bw,avx2,fma")))
#endif

#if defined(__GNUC__) || defined(__clang__)
#define FUSEDRL_INLINE __attribute__((always_inline)) inline  // inlined into each ISA's loop
#else
#define FUSEDRL_INLINE inline
#endif

namespace fusedrl_cpu {

enum class Isa { kBaseline, kAvx2, kAvx512 };

// The widest instruction set this CPU supports (features, not model: any x86-64 runs the wheel),
// or a narrower one named by FUSEDRL_CPU_ISA ("baseline", "avx2"; tests run every build this way).
inline Isa best_isa() {
  Isa isa = Isa::kBaseline;
#ifdef FUSEDRL_X86_DISPATCH
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bw"))
    isa = Isa::kAvx512;
  else if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
    isa = Isa::kAvx2;
#endif
  const char* cap = std::getenv("FUSEDRL_CPU_ISA");
  if (cap && std::strcmp(cap, "baseline") == 0) return Isa::kBaseline;
  if (cap && std::strcmp(cap, "avx2") == 0 && isa == Isa::kAvx512) return Isa::kAvx2;
  return isa;
}

inline const char* isa_name(Isa isa) {
  return isa == Isa::kAvx512 ? "avx512" : isa == Isa::kAvx2 ? "avx2" : "baseline";
}

FUSEDRL_INLINE double exp_reduced(double x) {
  // exp(x) for x in [-708, 709]: x = k ln2 + r, |r| <= ln2 / 2, exp(r) by its Taylor polynomial
  // to r^9 / 9! (truncation < 1e-11, enough beyond |d| = 1/4), times 2^k built in the exponent bits.
  const double shifter = 6755399441055744.0;  // 1.5 * 2^52: adding it rounds to an integer in the low bits
  const double log2e = 1.4426950408889634;
  const double ln2_hi = 0.6931471805599453;   // ln 2 split in two for an exact k * ln2_hi
  const double ln2_lo = 2.3190468138462996e-17;
  double t = x * log2e + shifter;
  double k = t - shifter;
  double r = (x - k * ln2_hi) - k * ln2_lo;
  double p = 1.0 / 362880.0;  // 1/9!
  p = p * r + 1.0 / 40320.0;
  p = p * r + 1.0 / 5040.0;
  p = p * r + 1.0 / 720.0;
  p = p * r + 1.0 / 120.0;
  p = p * r + 1.0 / 24.0;
  p = p * r + 1.0 / 6.0;
  p = p * r + 0.5;
  p = p * r + 1.0;
  p = p * r + 1.0;
  uint64_t bits;
  std::memcpy(&bits, &t, sizeof bits);
  uint64_t scale_bits = (bits + 1023) << 52;  // the low bits of t hold k + 2^51; the rest shifts out
  double scale;
  std::memcpy(&scale, &scale_bits, sizeof scale);
  return p * scale;
}

struct K3 {
  double value, grad;
};

FUSEDRL_INLINE K3 k3_one(double d) {
  const double below = 0.25;
  const double nan = std::numeric_limits<double>::quiet_NaN();
  const double neg_inf = -std::numeric_limits<double>::infinity();
  // the series (|d| < 1/4; terms to d^9 / 9!, truncation < 1e-10 relative)
  double s = d * (-1.0 / 362880.0) + 1.0 / 40320.0;
  s = s * d - 1.0 / 5040.0;
  s = s * d + 1.0 / 720.0;
  s = s * d - 1.0 / 120.0;
  s = s * d + 1.0 / 24.0;
  s = s * d - 1.0 / 6.0;
  s = s * d + 0.5;
  double series_value = d * d * s;
  double g = d * (1.0 / 40320.0) - 1.0 / 5040.0;  // 1 - e^-d = d (1 - d/2 + d^2/6 - ... - d^7/8!)
  g = g * d + 1.0 / 720.0;
  g = g * d - 1.0 / 120.0;
  g = g * d + 1.0 / 24.0;
  g = g * d - 1.0 / 6.0;
  g = g * d + 0.5;
  g = g * d - 1.0;
  double series_grad = -d * g;
  // exp(-d) beyond (x clamped so that 2^k stays a normal double; NaN passes the comparisons)
  double x = -d;
  x = x > 709.0 ? 709.0 : x;
  x = x < -708.0 ? -708.0 : x;
  double e = exp_reduced(x);
  double exp_value = (e - 1.0) + d;
  exp_value = d == neg_inf ? nan : exp_value;  // inf - inf, as torch's expm1(-d) + d
  double exp_grad = 1.0 - e;
  exp_grad = d == neg_inf ? neg_inf : exp_grad;
  bool small = std::fabs(d) < below;
  return {small ? series_value : exp_value, small ? series_grad : exp_grad};
}

}  // namespace fusedrl_cpu
