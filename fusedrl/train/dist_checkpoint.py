"""Sharded checkpoints with torch.distributed.checkpoint (DCP), written atomically; the final HF model.

Layout of ROOT/step_00000040/ (ROOT on a filesystem every rank can reach):

    dcp/                   model + optimizer state, one file per rank plus .metadata (DCP);
                           keyed by parameter name, so it loads at any world size (resharding)
    ranks/rank_00000.pt    per rank: RNG states and its data position (`rank_state`)
    shared.pt              state equal on every rank, written by rank 0 (scheduler, ...)
    trainer.json           the loop's counters, plus the world size that wrote it
    manifest.json          sha256 of every file above, written last

All ranks write into ROOT/.tmp-step_00000040; after a barrier (every rank done)
rank 0 writes the manifest and renames the folder into place, so a run killed at
any moment leaves the whole checkpoint or none. Loading verifies the manifest
first, and reads only DCP files, JSON and `torch.load(weights_only=True)`.

The same functions work without a process group (one process, world size 1),
so a checkpoint written by 2 ranks loads into one unsharded model and vice versa.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

from fusedrl.train.checkpoint import _sha256, checkpoint_name, rng_state, set_rng_state

logger = logging.getLogger("fusedrl")
Others = Dict[str, Tuple[torch.nn.Module, Optional[torch.optim.Optimizer]]]

FORMAT = "fusedrl-dcp-1"
_NAME = re.compile(r"^step_(\d{8})$")


class DistCheckpointError(ValueError):
    """A checkpoint that is missing files, fails its checksums or does not fit the model."""


def _dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def _rank() -> int:
    return dist.get_rank() if _dist() else 0


def _world() -> int:
    return dist.get_world_size() if _dist() else 1


def _barrier() -> None:
    if _dist():
        dist.barrier()


@contextmanager
def _single_process_quiet():
    """Without a process group DCP warns that it assumes one process: that is the intended use here."""
    with warnings.catch_warnings():
        if not _dist():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        yield


def _one_state(model: torch.nn.Module, optimizer: Optional[torch.optim.Optimizer]):
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

    if optimizer is None:
        return {"model": get_model_state_dict(model)}
    model_sd, optim_sd = get_state_dict(model, optimizer)
    return {"model": model_sd, "optim": optim_sd}


def _train_state(model: torch.nn.Module, optimizer: Optional[torch.optim.Optimizer], others: Optional[Others]):
    state = _one_state(model, optimizer)
    if others:
        state["others"] = {name: _one_state(m, o) for name, (m, o) in sorted(others.items())}
    return state


def _set_one(model: torch.nn.Module, optimizer: Optional[torch.optim.Optimizer], state: Dict[str, Any]) -> None:
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_state_dict

    if optimizer is None:
        set_model_state_dict(model, state["model"])
    else:
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])


def _check_others(others) -> None:
    if others is None:
        return
    if not isinstance(others, dict) or not all(isinstance(k, str) and isinstance(v, tuple) and len(v) == 2
                                               and isinstance(v[0], torch.nn.Module) for k, v in others.items()):
        raise TypeError("others must be a dict {name: (module, optimizer or None)}")


def save_dist_checkpoint(root: str | Path, step: int, *, model: torch.nn.Module,
                         optimizer: Optional[torch.optim.Optimizer] = None,
                         trainer_state: Optional[Dict[str, Any]] = None,
                         rank_state: Optional[Dict[str, Any]] = None,
                         shared_state: Optional[Dict[str, Any]] = None, keep: int = 2,
                         others: Optional[Others] = None) -> Path:
    """Write checkpoint `step` under `root` from every rank (a collective: all ranks call it).

    Args:
        model: the (FSDP2-sharded or plain) model; optimizer: its optimizer, or None (frozen models).
        trainer_state: the loop's counters (JSON-serialisable, equal on all ranks; rank 0 writes it).
        rank_state: this rank's own state (its data position, ...): tensors, numbers, strings, lists, dicts.
        shared_state: state equal on every rank (scheduler.state_dict(), ...), written by rank 0.
        keep: newest checkpoints to keep (older ones are deleted by rank 0).
        others: more models saved in the same DCP checkpoint, sharded like `model`:
            {name: (module, optimizer or None)} (PPO's critic: {"value": (critic, its AdamW)}).
    Returns:
        The published folder root/step_XXXXXXXX.
    """
    import torch.distributed.checkpoint as dcp

    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be an integer >= 0, got {step!r}")
    if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
        raise ValueError(f"keep must be an integer >= 1, got {keep!r}")
    _check_others(others)
    root, rank = Path(root), _rank()
    final, tmp = root / checkpoint_name(step), root / f".tmp-{checkpoint_name(step)}"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / "ranks").mkdir(parents=True)
    _barrier()
    with _single_process_quiet():
        dcp.save(_train_state(model, optimizer, others), checkpoint_id=str(tmp / "dcp"))
    torch.save({"rng": rng_state(cuda="current"), "state": rank_state or {}}, tmp / "ranks" / f"rank_{rank:05d}.pt")
    if rank == 0:
        torch.save(shared_state or {}, tmp / "shared.pt")
        meta = {"format": FORMAT, "step": step, "world_size": _world(), "trainer": trainer_state or {}}
        (tmp / "trainer.json").write_text(json.dumps(meta, indent=1))
    _barrier()  # every rank's files are complete
    if rank == 0:
        _publish(tmp, final, step)
        for stale in root.glob(".tmp-step_*"):  # left by runs killed while saving
            shutil.rmtree(stale, ignore_errors=True)
        for old in list_dist_checkpoints(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def _publish(tmp: Path, final: Path, step: int) -> None:
    files = {str(p.relative_to(tmp)): _sha256(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
    (tmp / "manifest.json").write_text(json.dumps({"format": FORMAT, "step": step, "files": files}, indent=1))
    for path in tmp.rglob("*"):
        if path.is_file():
            with path.open("rb") as handle:
                os.fsync(handle.fileno())
    if final.exists():  # re-saving a step after a resume: move the old one aside first
        old = final.with_name(f".old-{final.name}")
        shutil.rmtree(old, ignore_errors=True)
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, final)


def list_dist_checkpoints(root: str | Path) -> List[Path]:
    """Published checkpoint folders under `root` by increasing step."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _NAME.match(p.name)]
    return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))


def verify_dist_checkpoint(path: str | Path) -> Dict[str, Any]:
    """Check every file of the manifest is present with its sha256; returns the manifest."""
    path = Path(path)
    try:
        manifest = json.loads((path / "manifest.json").read_text())
        files = manifest["files"]
    except FileNotFoundError:
        raise DistCheckpointError(f"checkpoint {path}: no manifest.json (partial or not a checkpoint)") from None
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise DistCheckpointError(f"checkpoint {path}: unreadable manifest.json ({err})") from None
    if manifest.get("format") != FORMAT:
        raise DistCheckpointError(f"checkpoint {path}: format {manifest.get('format')!r}, expected {FORMAT!r}")
    for required in ("trainer.json", "shared.pt", "dcp/.metadata"):
        if required not in files:
            raise DistCheckpointError(f"checkpoint {path}: manifest lists no {required}")
    for name, digest in files.items():
        if not (path / name).is_file():
            raise DistCheckpointError(f"checkpoint {path}: missing file {name}")
        if _sha256(path / name) != digest:
            raise DistCheckpointError(f"checkpoint {path}: checksum mismatch in {name} (corrupt)")
    return manifest


def _verify_once(path: Path) -> None:
    """Rank 0 hashes the files (one reader), the others get its verdict."""
    verdict = [None]
    if _rank() == 0:
        try:
            verify_dist_checkpoint(path)
        except DistCheckpointError as err:
            verdict[0] = str(err)
    if _dist():
        dist.broadcast_object_list(verdict, src=0)
    if verdict[0] is not None:
        raise DistCheckpointError(verdict[0])


def load_dist_checkpoint(path: str | Path, *, model: torch.nn.Module,
                         optimizer: Optional[torch.optim.Optimizer] = None,
                         others: Optional[Others] = None) -> Dict[str, Any]:
    """Verify, then restore model and optimizer state in place (a collective: all ranks call it).

    `others` ({name: (module, optimizer or None)}) are restored too: the checkpoint must hold the same
    names (`save_dist_checkpoint(..., others=)`).

    Works at any world size: DCP reshards to this run's layout. At the world size
    that wrote it, each rank also gets back its RNG states (restored here) and its
    `rank_state`; at another world size those are not restored (rank_state None) and the
    caller re-derives data positions from the trainer counters (batch sizes are global).

    Returns:
        {"trainer": counters, "shared": shared_state, "rank_state": this rank's state or None,
         "world_size": the writer's world size, "resharded": bool}.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    path = Path(path)
    _check_others(others)
    _verify_once(path)
    meta = json.loads((path / "trainer.json").read_text())
    state = _train_state(model, optimizer, others)
    try:
        with _single_process_quiet():
            dcp.load(state, checkpoint_id=str(path / "dcp"))
    except (Exception, CheckpointException) as err:  # CheckpointException derives from BaseException
        last = (str(err).strip().splitlines() or [""])[-1][:500]
        raise DistCheckpointError(f"checkpoint {path}: does not fit this model/optimizer: "
                                  f"{type(err).__name__}: {last}") from err
    _set_one(model, optimizer, state)
    for name, (module, optim) in sorted((others or {}).items()):
        _set_one(module, optim, state["others"][name])
    resharded = meta["world_size"] != _world()
    rank_state = None
    if not resharded:
        own = torch.load(path / "ranks" / f"rank_{_rank():05d}.pt", weights_only=True)
        set_rng_state(own["rng"])
        rank_state = own["state"]
    elif _rank() == 0:
        logger.warning("checkpoint %s was written by %d ranks, loading at %d: weights and optimizer state are "
                       "resharded; per-rank RNG and data positions are not restored", path, meta["world_size"],
                       _world())
    return {"trainer": meta["trainer"], "shared": torch.load(path / "shared.pt", weights_only=True),
            "rank_state": rank_state, "world_size": meta["world_size"], "resharded": resharded}


def latest_dist_checkpoint(root: str | Path) -> Optional[Path]:
    """The newest checkpoint under `root` whose manifest verifies (newer broken ones skipped with a warning)."""
    for path in reversed(list_dist_checkpoints(root)):
        try:
            verify_dist_checkpoint(path)
            return path
        except DistCheckpointError as err:
            logger.warning("skipping %s; falling back to an older checkpoint", err)
    return None


def save_final_hf(model: torch.nn.Module, out_dir: str | Path, *, tokenizer=None) -> Optional[Path]:
    """The final model once, in the `save_pretrained` layout (safetensors), from the gathered state.

    A collective on a sharded model (every rank gathers its shards to rank 0's CPU);
    only rank 0 writes. Returns out_dir on rank 0, None elsewhere.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    if not hasattr(model, "save_pretrained"):
        raise TypeError(f"model: save_final_hf needs a transformers model, got {type(model).__name__}")
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if _rank() != 0:
        _barrier()
        return None
    out_dir = Path(out_dir)
    import inspect

    if "state_dict" not in inspect.signature(model.save_pretrained).parameters:
        # fusedrl's own models (ScalarHeadModel) write self.state_dict(): hand them the gathered one
        model.state_dict = lambda *args, **kwargs: full
        try:
            model.save_pretrained(out_dir, tokenizer=tokenizer)
        finally:
            del model.state_dict
        _barrier()
        return out_dir
    model.save_pretrained(out_dir, state_dict=full)
    # An FSDP2 module's class is FSDP<cls>: record the model's own class for AutoModel.
    config_path = out_dir / "config.json"
    config = json.loads(config_path.read_text())
    config["architectures"] = [_hf_class_name(model)]
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    _barrier()
    return out_dir


def _hf_class_name(model: torch.nn.Module) -> str:
    from torch.distributed.fsdp import FSDPModule

    for cls in type(model).__mro__:
        if not issubclass(cls, FSDPModule) and issubclass(cls, torch.nn.Module):
            return cls.__name__
    return type(model).__name__
