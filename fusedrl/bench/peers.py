"""Peers the benchmarks and `fusedrl profile` compare against, and their installed versions.

TRL's chunked log-prob head: TRL 1.16's GRPO, RLOO and KTO trainers no longer call the
row-looped `selective_log_softmax`; `trl.trainer.utils.add_fused_lm_head` patches the model
so `model(..., labels=..., fused_lm_head=True)` returns per-token log-probs computed by
`trl.kernels.ChunkedLogProbFunction` (public: it is in `trl.kernels.__all__`). That function
projects `hidden @ weight.T` in [4096 tokens x chunk_size vocab] tiles (cuBLAS), folds each
tile into online-logsumexp statistics (a Triton kernel on CUDA, torch ops elsewhere), never
keeps the (N, V) logits and recomputes each tile in backward. The peer calls it exactly as
`add_fused_lm_head` does: no bias, temperature 1, no softcap, logit scale 1, the trainers'
vocabulary chunk (`trl.trainer.utils._CHUNKED_LOGPROB_CHUNK_SIZE`, 32768 in 1.16; read when
present, else 32768), only the log-probs requested (outputs=()).
"""
from __future__ import annotations

import importlib
from typing import Dict, Optional

import torch

from fusedrl.bench.common import Provider

TRL_CHUNK_DEFAULT = 32768
# distribution name -> import name, in the order the provider list prints them
PEER_PACKAGES = {"trl": "trl", "liger-kernel": "liger_kernel", "cut-cross-entropy": "cut_cross_entropy",
                 "flash-attn": "flash_attn"}


def _distribution_version(dist: str, module: str) -> Optional[str]:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        pass
    try:  # a source install without metadata
        return getattr(importlib.import_module(module), "__version__", "unknown")
    except Exception:
        return None


def peer_versions() -> Dict[str, str]:
    """{peer: version or "absent"} for TRL, Liger-Kernel, CCE, flash-attn and torch's flex attention."""
    out = {dist: _distribution_version(dist, module) or "absent" for dist, module in PEER_PACKAGES.items()}
    try:
        from torch.nn.attention import flex_attention  # noqa: F401

        out["flex-attention"] = f"torch {torch.__version__}"
    except Exception:
        out["flex-attention"] = "absent"
    return out


def format_peer_versions(versions: Optional[Dict[str, str]] = None) -> str:
    """One line: "peers: trl 1.16.0, liger-kernel absent, ..."."""
    versions = peer_versions() if versions is None else versions
    return "peers: " + ", ".join(f"{name} {version}" for name, version in versions.items())


def trl_chunk_size() -> int:
    """The vocabulary chunk TRL's trainers pass to ChunkedLogProbFunction."""
    try:
        from trl.trainer import utils as trl_utils
    except Exception:
        return TRL_CHUNK_DEFAULT
    return int(getattr(trl_utils, "_CHUNKED_LOGPROB_CHUNK_SIZE", TRL_CHUNK_DEFAULT))


def trl_chunked_logp():
    """(fn(hidden (..., H), weight, labels (...)) -> log-probs (...), version) of TRL's head, or (None, reason)."""
    version = _distribution_version("trl", "trl")
    if version is None:
        return None, "trl not installed"
    try:
        from trl.kernels import ChunkedLogProbFunction
    except Exception as exc:  # a TRL without the chunked head (before 1.x) or a broken install
        return None, f"trl {version} has no trl.kernels.ChunkedLogProbFunction ({type(exc).__name__})"
    chunk = trl_chunk_size()

    def logp(hidden, weight, labels):
        flat = ChunkedLogProbFunction.apply(hidden.reshape(-1, hidden.shape[-1]), weight, None, labels.reshape(-1),
                                            1.0, chunk, None, 1.0, ())[0]
        return flat.view(labels.shape)

    return logp, version


def trl_chunked_provider(name: str = "trl chunked head") -> Provider:
    """TRL's chunked, logits-free log-prob head on inputs {"hidden" (N, H), "weight" (V, H), "labels" (N,)}."""
    logp, version = trl_chunked_logp()
    if logp is None:
        return Provider(name, None, reason=version)
    return Provider(f"{name} ({version})", lambda i: logp(i["hidden"], i["weight"], i["labels"]))
