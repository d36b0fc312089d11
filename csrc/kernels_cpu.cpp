// fusedrl.kernels._cpu: vectorised CPU loops of the kernels layer (pybind11). Each loop is
// compiled for AVX-512, AVX2 + FMA and baseline x86-64 and picked once by CPU features;
// fusedrl/kernels keeps a PyTorch path for each (used when the extension is not built).
//   csrc/kl.cpp           k3_f32, k3_isa: the k3 KL estimator, value and gradient
//   csrc/policy_loss.cpp  ppo_clip_f32: the PPO / GRPO clipped surrogate's per-token pass
#include <pybind11/pybind11.h>

namespace py = pybind11;

void register_kl(py::module_& m);
void register_policy_loss(py::module_& m);

PYBIND11_MODULE(_cpu, m) {
  m.doc() = "fusedrl.kernels._cpu: vectorised CPU loops of the kernels (k3 KL, PPO clipped surrogate)";
  register_kl(m);
  register_policy_loss(m);
}
