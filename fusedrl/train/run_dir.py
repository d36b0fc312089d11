"""A run folder's identity and lock: one run per folder, checked before anything is written.

    with open_run_dir(cfg, resume=False, overwrite=False) as run:    # validates, then locks
        ...                                                          # run.run_id, run.path
                                                                     # the lock is released on exit

Files it keeps in OUT_DIR:

    run.json     {"run_id", "stage", "config_hash", "created", "resumed": [...]} written when a run
                 starts (and updated by each resume); checkpoints carry the same run id
    run.lock     {"pid", "host", "pid_start", "run_id", "started"} while a run is live; a lock whose
                 process is gone (same host) is stale and taken over with a warning

Rules (every check happens before the first byte is written, so a refused run changes nothing):

- a fresh run (no --resume) into a folder that already holds a run refuses, unless `overwrite`,
  which moves the whole folder aside to OUT_DIR.old-YYYYmmdd-HHMMSS (nothing is deleted);
- a run into a folder locked by a live run refuses (with or without --resume / --overwrite);
- --resume checks the folder's stage and config (see `fusedrl.train.resume.check_resume_config`)
  and that a valid checkpoint exists; when every checkpoint is invalid it stops with the list of
  what is wrong with each.
"""
from __future__ import annotations

import datetime
import errno
import hashlib
import json
import logging
import os
import socket
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, Optional

logger = logging.getLogger("fusedrl")

RUN_FILE = "run.json"
LOCK_FILE = "run.lock"
# What makes a folder "hold a run" (anything else in it is the user's and is left alone).
RUN_MARKERS = (RUN_FILE, "config.toml", "metrics.jsonl", "checkpoints", "final")


class RunDirError(ValueError):
    """A run folder that cannot be used as asked (another run's, locked, not writable, nothing to resume)."""


@dataclass
class RunDir:
    path: Path
    run_id: str
    resumed: bool


def config_hash(cfg: Any) -> str:
    """sha256 of the config's TOML rendering (the values in force)."""
    from fusedrl.config import to_toml
    return hashlib.sha256(to_toml(cfg).encode()).hexdigest()


def read_run_info(folder: str | Path) -> Optional[Dict[str, Any]]:
    """The folder's run.json, or None when it has none; RunDirError when it is unreadable."""
    path = Path(folder) / RUN_FILE
    if not path.is_file():
        return None
    try:
        info = json.loads(path.read_text())
        if not isinstance(info, dict) or not isinstance(info.get("run_id"), str):
            raise ValueError("no run_id")
        return info
    except (OSError, ValueError) as err:
        raise RunDirError(f"run.out_dir: {path} is unreadable ({err}); move the folder aside "
                          "or pass --overwrite") from None


def folder_run_id(folder: str | Path) -> Optional[str]:
    """The run id recorded in `folder`/run.json, None when there is none (or it is unreadable)."""
    try:
        info = read_run_info(folder)
    except RunDirError:
        return None
    return info["run_id"] if info else None


def holds_a_run(folder: Path) -> bool:
    return folder.is_dir() and any((folder / name).exists() for name in RUN_MARKERS)


# ----------------------------------------------------------------------------- the lock

def _process_start(pid: int) -> Optional[str]:
    """The start time of process `pid` in clock ticks (Linux /proc), to tell a reused pid apart."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
        return text.rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(pid: int, start: Optional[str]) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    now = _process_start(pid)
    return start is None or now is None or now == start


def read_lock(folder: Path) -> Optional[Dict[str, Any]]:
    path = folder / LOCK_FILE
    if not path.exists():
        return None
    try:
        lock = json.loads(path.read_text())
        return lock if isinstance(lock, dict) else {}
    except (OSError, ValueError):
        return {}  # torn or garbage: treated as stale


def check_lock(folder: Path) -> None:
    """RunDirError when a live run holds `folder`; a stale lock is only reported (taken over later)."""
    lock = read_lock(folder)
    if lock is None:
        return
    pid, host = lock.get("pid"), lock.get("host")
    if host != socket.gethostname() and host is not None:
        raise RunDirError(f"run.out_dir: {folder} is locked by a run on host {host!r} (pid {pid}, since "
                          f"{lock.get('started')}); if that run is dead, delete {folder / LOCK_FILE}")
    if isinstance(pid, int) and pid != os.getpid() and _alive(pid, lock.get("pid_start")):
        raise RunDirError(f"run.out_dir: {folder} is in use by a live run (pid {pid} on {host}, since "
                          f"{lock.get('started')}); wait for it or choose another run.out_dir")


def _acquire(folder: Path, run_id: str) -> Path:
    """Create run.lock atomically (write a private file, then link it: fails if one exists)."""
    check_lock(folder)
    lock = folder / LOCK_FILE
    if lock.exists():
        logger.warning("run.out_dir: taking over the stale lock %s (%s)", lock, read_lock(folder))
        lock.unlink()
    body = {"pid": os.getpid(), "host": socket.gethostname(), "pid_start": _process_start(os.getpid()),
            "run_id": run_id, "started": _now()}
    tmp = folder / f".{LOCK_FILE}.{os.getpid()}"
    tmp.write_text(json.dumps(body))
    try:
        os.link(tmp, lock)
    except FileExistsError:
        raise RunDirError(f"run.out_dir: {folder} was locked by another run just now ({read_lock(folder)})") from None
    finally:
        tmp.unlink()
    return lock


def _release(folder: Path, run_id: str) -> None:
    lock = read_lock(folder)
    if lock and lock.get("pid") == os.getpid() and lock.get("run_id") == run_id:
        (folder / LOCK_FILE).unlink(missing_ok=True)


# ----------------------------------------------------------------------------- checks

def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _writable(folder: Path) -> None:
    """RunDirError naming the folder when it (or the nearest existing parent) cannot be written."""
    probe = folder
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise RunDirError(f"run.out_dir: {probe} exists and is not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise RunDirError(f"run.out_dir: {probe} is not writable (read-only folder or file system)")


def aside_path(folder: Path) -> Path:
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    target, n = folder.with_name(f"{folder.name}.old-{stamp}"), 1
    while target.exists():
        target, n = folder.with_name(f"{folder.name}.old-{stamp}-{n}"), n + 1
    return target


def check_checkpoints(folder: Path, run_id: Optional[str]) -> None:
    """For --resume: RunDirError listing every checkpoint and what is wrong with it when none is valid."""
    from fusedrl.train.checkpoint import CheckpointError, list_checkpoints, verify_checkpoint

    found = list_checkpoints(folder / "checkpoints")
    if not found:
        raise RunDirError(f"--resume: {folder} holds no checkpoint to resume from; start over with "
                          "--overwrite (the old contents are moved aside) or choose another run.out_dir")
    from fusedrl.train.dist_checkpoint import DistCheckpointError, verify_dist_checkpoint

    problems = []
    for path in found:
        try:
            if (path / "dcp").is_dir():  # written under torch.distributed (DCP, any world size resumes it)
                verify_dist_checkpoint(path)
            else:
                verify_checkpoint(path, run_id=run_id)
            return
        except (CheckpointError, DistCheckpointError) as err:
            problems.append(str(err))
    raise RunDirError(f"--resume: no valid checkpoint in {folder / 'checkpoints'}: " + "; ".join(problems))


def validate_run_dir(cfg: Any, *, resume: bool, overwrite: bool) -> Optional[Dict[str, Any]]:
    """Every check of `open_run_dir`, writing nothing; returns the folder's run.json (None: none)."""
    folder = Path(cfg.run.out_dir)
    if not str(cfg.run.out_dir).strip():
        raise RunDirError("run.out_dir: is empty; name the run folder")
    if resume and overwrite:
        raise RunDirError("--resume and --overwrite contradict each other; pass one")
    _writable(folder)
    if not folder.is_dir():
        if resume:
            raise RunDirError(f"--resume: run.out_dir {folder} does not exist; nothing to resume")
        return None
    check_lock(folder)
    info = read_run_info(folder) if not overwrite else None
    if not resume:
        if holds_a_run(folder) and not overwrite:
            what = f"run {info['run_id']} ({info.get('stage')})" if info else "an earlier run"
            raise RunDirError(f"run.out_dir: {folder} already holds {what}; continue it with --resume, "
                              "or pass --overwrite to move it aside and start over")
        return info
    from fusedrl.train.resume import check_resume_config
    check_resume_config(cfg, folder)
    check_checkpoints(folder, info["run_id"] if info else None)
    return info


def _progress(folder: Path) -> tuple:
    """What a run has produced so far: its checkpoints and the size of metrics.jsonl."""
    from fusedrl.train.checkpoint import list_checkpoints
    metrics = folder / "metrics.jsonl"
    return (tuple(p.name for p in list_checkpoints(folder / "checkpoints")),
            metrics.stat().st_size if metrics.is_file() else None)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


class _Rollback:
    """Restores run.json and config.toml (and removes a folder it created) when a run fails
    before it produced anything (no new checkpoint, metrics.jsonl untouched): a run that stops
    at load leaves the folder as it found it, so the same command can simply be run again."""

    def __init__(self, folder: Path, created: bool):
        self.folder, self.created = folder, created
        self.saved = {name: (folder / name).read_bytes() if (folder / name).is_file() else None
                      for name in (RUN_FILE, "config.toml")}
        self.progress = _progress(folder)

    def __call__(self) -> None:
        if _progress(self.folder) != self.progress:
            return
        for name, data in self.saved.items():
            if data is None:
                (self.folder / name).unlink(missing_ok=True)
            else:
                (self.folder / name).write_bytes(data)
        for leftover in ("checkpoints", "plots"):  # empty folders made on the way
            try:
                (self.folder / leftover).rmdir()
            except OSError:
                pass


@contextmanager
def open_run_dir(cfg: Any, *, resume: bool = False, overwrite: bool = False,
                 write: bool = True) -> Iterator[RunDir]:
    """Validate the run folder, then (rank 0, `write`) move it aside if asked, lock it, and write
    run.json and config.toml (the values in force). When the body raises before the run produced
    anything, both files are restored (a created folder is removed again).

    Raises:
        RunDirError (a ValueError) naming the folder and what is wrong, before anything is written.
    """
    folder = Path(cfg.run.out_dir)
    if not write:  # other ranks: rank 0 alone checks, locks and writes the folder
        yield RunDir(folder, folder_run_id(folder) or "", resume)
        return
    info = validate_run_dir(cfg, resume=resume, overwrite=overwrite)
    if overwrite and holds_a_run(folder):
        target = aside_path(folder)
        os.rename(folder, target)
        logger.warning("--overwrite: moved the old contents of %s to %s", folder, target)
    created = not folder.exists()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise RunDirError(f"run.out_dir: cannot create {folder}: {os.strerror(err.errno or errno.EIO)}") from None
    run_id = info["run_id"] if (resume and info) else uuid.uuid4().hex[:12]
    _acquire(folder, run_id)
    rollback = _Rollback(folder, created)
    try:
        from fusedrl.config import to_toml
        record = dict(info) if (resume and info) else {"run_id": run_id, "created": _now()}
        record.update(stage=cfg.run.stage, config_hash=config_hash(cfg))
        if resume:
            record["resumed"] = list(record.get("resumed", [])) + [_now()]
        _write_atomic(folder / RUN_FILE, json.dumps(record, indent=1))
        _write_atomic(folder / "config.toml", to_toml(cfg))
        yield RunDir(folder, run_id, resume)
    except BaseException:
        rollback()
        raise
    finally:
        _release(folder, run_id)
        if created and not any(folder.iterdir()):
            folder.rmdir()
