"""Resumable checkpoints, written atomically and verified before loading.

Layout of OUT_DIR/checkpoints/step_00000040/:

    model/           the model in the save_pretrained layout (safetensors), or
                     model/model.safetensors for a plain nn.Module
    optimizer.pt     optimizer.state_dict()        (tensors and numbers only)
    scheduler.pt     scheduler.state_dict()
    NAME/, optimizer_NAME.pt, scheduler_NAME.pt
                     the same for every other module the stage trains (PPO: value/)
    rng.pt           torch / cuda / numpy / python RNG states, as tensors and ints
    stage.pt         the stage's state_dict() (data position, ...)
    trainer.json     step, skipped steps, ... (the loop's counters)
    manifest.json    sha256 of every file above and the run id, written last

Everything is written into a temporary sibling folder (".tmp-step_...") that
is renamed into place only when complete, so a run killed at any moment
leaves either the whole checkpoint or none. Each checkpoint records the run id
of its folder (OUT_DIR/run.json, see `fusedrl.train.run_dir`): pruning and the
clean-up of temporary folders touch only this run's own files, and a resume
refuses a checkpoint of another run. Loading checks the manifest
(every file present, every checksum equal) and reads tensors only through
safetensors or `torch.load(weights_only=True)`: never an arbitrary pickle.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import torch
from safetensors.torch import load_file, save_model as save_safetensors_module

logger = logging.getLogger("fusedrl")

FORMAT_VERSION = 1
REQUIRED = ("optimizer.pt", "scheduler.pt", "rng.pt", "stage.pt", "trainer.json")
_NAME = re.compile(r"^step_(\d{8})$")


class CheckpointError(ValueError):
    """A checkpoint that is missing files, fails its checksums or cannot be read."""


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ----------------------------------------------------------------------------- RNG

def rng_state(cuda: str = "all") -> Dict[str, Any]:
    """All RNG states as tensors / ints / lists (loadable with weights_only=True).

    cuda: "all" (every visible device's generator: one process driving them all) or "current"
    (this process's device only, for one process per GPU under torchrun).
    """
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": np_kind, "keys": torch.from_numpy(np_keys.astype(np.int64)), "pos": int(np_pos),
                  "has_gauss": int(np_has_gauss), "cached_gaussian": float(np_gauss)},
        "python": {"version": py_version, "internal": list(py_internal), "gauss_next": py_gauss},
    }
    if cuda == "current":
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda_device"] = torch.cuda.get_rng_state()
    elif torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    numpy_state = state["numpy"]
    np.random.set_state((numpy_state["kind"], numpy_state["keys"].numpy().astype(np.uint32), numpy_state["pos"],
                         numpy_state["has_gauss"], numpy_state["cached_gaussian"]))
    python_state = state["python"]
    random.setstate((python_state["version"], tuple(python_state["internal"]), python_state["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "cuda_device" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda_device"])


# ----------------------------------------------------------------------------- model weights

def save_weights(model: torch.nn.Module, path: Path) -> None:
    """save_pretrained layout for transformers models, one safetensors file otherwise."""
    if hasattr(model, "save_pretrained"):
        from fusedrl.models.causal_lm import save_model
        save_model(model, path)
    else:
        path.mkdir(parents=True, exist_ok=True)
        save_safetensors_module(model, str(path / "model.safetensors"))


def load_weights(model: torch.nn.Module, path: Path) -> None:
    """Load every *.safetensors file under `path` into `model` (strict, tied weights allowed)."""
    from fusedrl.models.lora import is_peft_model, load_adapter

    if is_peft_model(model):  # a LoRA run saves and restores its adapters only
        try:
            return load_adapter(model, path)
        except ValueError as err:
            raise CheckpointError(str(err)) from None
    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{path}: no .safetensors weights found")
    state: Dict[str, torch.Tensor] = {}
    for file in files:
        state.update(load_file(str(file)))
    result = model.load_state_dict(state, strict=False)
    # save_pretrained drops tied copies (lm_head.weight = embed_tokens.weight): a missing key
    # is fine when its tensor shares storage with a loaded one.
    own = model.state_dict()
    loaded_ptrs = {own[k].data_ptr() for k in state if k in own}
    missing = [k for k in result.missing_keys if own[k].data_ptr() not in loaded_ptrs]
    if missing or result.unexpected_keys:
        raise CheckpointError(f"{path}: weights do not match the model: missing {missing[:5]}, "
                              f"unexpected {list(result.unexpected_keys)[:5]}")


# ----------------------------------------------------------------------------- save

def save_checkpoint(
    root: str | Path,
    step: int,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    stage_state: Dict[str, Any],
    trainer_state: Dict[str, Any],
    keep: int = 2,
    others: Optional[Dict[str, tuple]] = None,
    run_id: Optional[str] = None,
) -> Path:
    """Write checkpoint `step` under `root` atomically; keep the newest `keep` checkpoints of this run.

    Args:
        others: {name: (module, optimizer, scheduler)} for the modules trained besides `model`.
        run_id: the run the checkpoint belongs to; default: the run id in root/../run.json ("" if none).

    Returns:
        The final checkpoint folder, root/step_XXXXXXXX.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    run_id = _run_id(root) if run_id is None else run_id
    final = root / checkpoint_name(step)
    tmp = root / f".tmp-{checkpoint_name(step)}-{run_id}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_weights(model, tmp / "model")
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    for name, (module, other_optimizer, other_scheduler) in (others or {}).items():
        _check_name(name)
        save_weights(module, tmp / name)
        torch.save(other_optimizer.state_dict(), tmp / f"optimizer_{name}.pt")
        torch.save(other_scheduler.state_dict(), tmp / f"scheduler_{name}.pt")
    torch.save(rng_state(), tmp / "rng.pt")
    torch.save(stage_state, tmp / "stage.pt")
    (tmp / "trainer.json").write_text(json.dumps({**trainer_state, "step": step}, indent=1))
    files = {str(p.relative_to(tmp)): _sha256(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
    manifest = {"format": FORMAT_VERSION, "step": step, "run_id": run_id, "files": files}
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
    _fsync_tree(tmp)
    if final.exists():  # re-saving a step (a resumed run): move the old one aside first
        old = root / f".old-{final.name}-{os.getpid()}"
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, final)
    _prune(root, keep, run_id)
    return final


def _check_name(name: str) -> None:
    if not re.fullmatch(r"[a-z][a-z0-9_]*", name) or name == "model":
        raise ValueError(f"others: module name {name!r} must be lower-case letters, digits and _ (not 'model')")


def _fsync_tree(folder: Path) -> None:
    """Flush file contents before the rename publishes them (a power cut must not leave empty files)."""
    for path in folder.rglob("*"):
        if path.is_file():
            with path.open("rb") as handle:
                os.fsync(handle.fileno())


def _run_id(root: Path) -> str:
    from fusedrl.train.run_dir import folder_run_id
    return folder_run_id(root.parent) or ""


def checkpoint_run_id(path: Path) -> Optional[str]:
    """The run id in a checkpoint's manifest ("" from before run ids; None: unreadable)."""
    try:
        return json.loads((Path(path) / "manifest.json").read_text()).get("run_id") or ""
    except (OSError, ValueError, AttributeError):
        return None


def _prune(root: Path, keep: int, run_id: str) -> None:
    """Delete this run's stale temporary folders and its checkpoints beyond the newest `keep`."""
    for stale in root.glob(f".tmp-step_*-{run_id}-*"):  # left by killed attempts of this run
        if re.fullmatch(rf"\.tmp-step_\d{{8}}-{re.escape(run_id)}-\d+", stale.name):
            shutil.rmtree(stale, ignore_errors=True)
    ours = [p for p in list_checkpoints(root) if checkpoint_run_id(p) == run_id]
    for old in ours[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


# ----------------------------------------------------------------------------- load

def list_checkpoints(root: str | Path) -> List[Path]:
    """Checkpoint folders under `root` by increasing step (temporary folders excluded)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _NAME.match(p.name)]
    return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))


def verify_checkpoint(path: str | Path, *, run_id: Optional[str] = None) -> Dict[str, Any]:
    """Check a checkpoint is complete and intact (and of run `run_id`, when given); returns its manifest.

    Raises:
        CheckpointError naming the checkpoint and the missing file or the file whose checksum differs.
    """
    path = Path(path)
    manifest_path = path / "manifest.json"
    if not manifest_path.is_file():
        raise CheckpointError(f"checkpoint {path}: no manifest.json (partial or not a checkpoint)")
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise CheckpointError(f"checkpoint {path}: unreadable manifest.json ({err})") from None
    if run_id and manifest.get("run_id") not in (None, "", run_id):
        raise CheckpointError(f"checkpoint {path}: belongs to run {manifest.get('run_id')}, not to this "
                              f"folder's run {run_id}")
    for name in REQUIRED:
        if name not in files:
            raise CheckpointError(f"checkpoint {path}: manifest lists no {name}")
    if not any(name.startswith("model/") and name.endswith(".safetensors") for name in files):
        raise CheckpointError(f"checkpoint {path}: manifest lists no model/*.safetensors")
    for name, digest in files.items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"checkpoint {path}: missing file {name}")
        if _sha256(file) != digest:
            raise CheckpointError(f"checkpoint {path}: checksum mismatch in {name} (corrupt)")
    return manifest


def load_checkpoint(
    path: str | Path,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    others: Optional[Dict[str, tuple]] = None,
) -> Dict[str, Any]:
    """Verify, then restore model, optimizer, scheduler (and `others`, as in save_checkpoint) and RNG states.

    Returns:
        {"stage": the stage's saved state, "trainer": the loop's counters (dict)}.
    """
    path = Path(path)
    verify_checkpoint(path, run_id=_run_id(path.parent))
    map_location = next(iter(model.parameters())).device
    name = "model"
    try:
        load_weights(model, path / "model")
        name = "optimizer.pt"
        optimizer.load_state_dict(_load_tensors_file(path / name, map_location))
        name = "scheduler.pt"
        scheduler.load_state_dict(_load_tensors_file(path / name))
        for module_name, (module, other_optimizer, other_scheduler) in (others or {}).items():
            name = f"optimizer_{module_name}.pt"
            if not (path / name).is_file():
                raise CheckpointError(f"checkpoint {path}: has no state of the trained module {module_name!r}")
            name = module_name
            load_weights(module, path / module_name)
            device = next(iter(module.parameters())).device
            name = f"optimizer_{module_name}.pt"
            other_optimizer.load_state_dict(_load_tensors_file(path / name, device))
            name = f"scheduler_{module_name}.pt"
            other_scheduler.load_state_dict(_load_tensors_file(path / name))
        name = "stage.pt"
        stage_state = _load_tensors_file(path / name)
        name = "trainer.json"
        trainer_state = json.loads((path / name).read_text())
        name = "rng.pt"
        set_rng_state(_load_tensors_file(path / name))
    except CheckpointError:
        raise
    except Exception as err:  # an unreadable file that still matches its checksum: a format mismatch
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise CheckpointError(f"checkpoint {path}: {name} cannot be loaded: {type(err).__name__}: {first}") from err
    return {"stage": stage_state, "trainer": trainer_state}


def _load_tensors_file(path: Path, map_location=None):
    """torch.load with weights_only=True: tensors, numbers, strings and containers only, never code."""
    import pickle
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:
        raise CheckpointError(f"checkpoint {path.parent}: {path.name} cannot be loaded: it holds a pickled object "
                              "that is not plain data (refused: loading it could run code)") from None


def latest_valid_checkpoint(root: str | Path) -> Optional[Path]:
    """The newest checkpoint under `root` that passes `verify_checkpoint`, or None.

    Invalid newer checkpoints (and those of another run than root/../run.json's) are skipped
    with a warning naming what is wrong.
    """
    run_id = _run_id(Path(root))
    for path in reversed(list_checkpoints(root)):
        try:
            verify_checkpoint(path, run_id=run_id)
            return path
        except CheckpointError as err:
            logger.warning("skipping %s; falling back to an older checkpoint", err)
    return None
