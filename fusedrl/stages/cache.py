"""On-disk caches of the alignment stages, keyed by content hashes.

    key = content_key({"settings": ..., "model": model_fingerprint(model), "prompts": token_ids})
    save_tensors(folder / f"ref_{key}.safetensors", {"ref_logp": values})
    cached = load_tensors(folder / f"ref_{key}.safetensors")          # None when absent or unreadable

Writes go to a temporary file renamed into place, so a crash never leaves a
half-written entry that a later run would trust. Every tensor file carries the
sha256 of its tensors' names, dtypes, shapes and bytes in its safetensors metadata
(key "fusedrl_sha256", like a checkpoint's manifest); a file whose contents do not
match it, that has none, or that cannot be parsed is recomputed with a warning,
never used. Only safetensors and JSON are read back (never pickles).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Dict, Optional

import torch

logger = logging.getLogger("fusedrl")


def content_key(obj: Any) -> str:
    """A 20-hex-digit sha256 of ``obj`` rendered as canonical JSON (sorted keys)."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


@torch.no_grad()
def model_fingerprint(model: torch.nn.Module) -> str:
    """A hash of a model's config and weights: every tensor's name, shape, dtype, sum and first values.

    Costs one small host transfer for the whole model (all statistics are stacked first).
    """
    names, stats = [], []
    for name, tensor in sorted(model.state_dict().items()):
        flat = tensor.detach().reshape(-1)
        if flat.numel() == 0 or not (flat.is_floating_point() or flat.dtype in (torch.int32, torch.int64)):
            continue
        head = flat[:8].double()
        # Reductions with a float64 accumulator: no float64 copy of a (possibly huge) weight.
        total = flat.sum(dtype=torch.float64).reshape(1)
        norm = torch.linalg.vector_norm(flat.float() if not flat.is_floating_point() else flat, ord=1,
                                        dtype=torch.float64).reshape(1)
        stats.append(torch.cat([total, norm, torch.nn.functional.pad(head, (0, 8 - head.numel()))]))
        names.append(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}")
    # 10 significant digits: any real weight change shows, float64 summation-order noise does not.
    values = [f"{v:.10g}" for v in torch.stack(stats).cpu().reshape(-1).tolist()] if stats else []
    config = getattr(model, "config", None)
    config = config.to_json_string(use_diff=False) if hasattr(config, "to_json_string") else str(config)
    return content_key({"names": names, "values": values, "config": config})


def path_fingerprint(name_or_path: str) -> Dict[str, Any]:
    """Identity of a model given by path or hub id: the path and, for a local folder, its files' sizes and mtimes."""
    folder = Path(name_or_path)
    files = {}
    if folder.is_dir():
        for file in sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.json")):
            stat = file.stat()
            files[file.name] = [stat.st_size, int(stat.st_mtime)]
    return {"path": str(name_or_path), "files": files}


def _atomic_write(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    write(tmp)
    os.replace(tmp, path)


CHECKSUM_KEY = "fusedrl_sha256"


def tensors_digest(tensors: Dict[str, torch.Tensor]) -> str:
    """sha256 over every tensor's name, dtype, shape and bytes (in name order)."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().contiguous().cpu()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def save_tensors(path, tensors: Dict[str, torch.Tensor], metadata: Optional[Dict[str, str]] = None) -> None:
    """Write tensors to a safetensors file atomically, with their checksum in the metadata."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    metadata = {**(metadata or {}), CHECKSUM_KEY: tensors_digest(tensors)}
    _atomic_write(Path(path), lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def load_tensors(path) -> Optional[Dict[str, torch.Tensor]]:
    """The tensors of a safetensors file; None when it is absent, unreadable or fails its checksum (logged)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as handle:
            expected = (handle.metadata() or {}).get(CHECKSUM_KEY)
        # cloned: safetensors may map the file, and what was verified must not change under us
        tensors = {k: v.clone() for k, v in load_file(str(path)).items()}
    except Exception as err:  # a corrupt entry is recomputed, never trusted
        logger.warning("cache %s is unreadable (%s); recomputing", path, err)
        return None
    if expected is None:
        logger.warning("cache %s has no checksum (written by an older version); recomputing", path)
        return None
    if tensors_digest(tensors) != expected:
        logger.warning("cache %s fails its checksum (corrupt); recomputing", path)
        return None
    return tensors


def save_json(path, obj: Any) -> None:
    """Write JSON atomically."""
    _atomic_write(Path(path), lambda tmp: Path(tmp).write_text(json.dumps(obj)))


def load_json(path) -> Optional[Any]:
    """Parsed JSON, or None when the file is absent or unreadable (logged)."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        logger.warning("cache %s is unreadable (%s); recomputing", path, err)
        return None
