"""fusedrl: a lean RLHF post-training engine built on fused kernels.

Layers (lower never imports higher): `fusedrl.kernels` (fused ops, torch alone),
`fusedrl._C` / `fusedrl.packing` (C++ packing core with a Python fallback),
`fusedrl.engine` (the training loop, stages, CLI).
"""

__version__ = "0.1.0"
