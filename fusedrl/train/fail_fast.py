"""A failure on one rank stops every rank, with that rank's message, within a bounded time.

    with fail_together(timeout_s=60):
        train(...)

Inside, a watchdog thread per rank beats a heartbeat into the process group's
key-value store (the c10d store torchrun / init_process_group already run) and
watches the others:

- an exception on rank r is written to the store ("rank r: ValueError: ...")
  and re-raised on r; every other rank prints "stopping: rank r failed: ..."
  and exits with status 1 within about `poll_s`, even when blocked in a collective;
- a rank that dies without a word (SIGKILL, OOM killer) stops beating; the others
  stop after `timeout_s` with "rank r stopped responding", or sooner when a
  collective fails first (gloo/NCCL see the closed connection), naming the dead rank;
- a lost store (the launcher or its host died) stops the rank with that message.

Under torchrun the elastic agent also stops the other local workers when one
exits; this guard gives the reason and covers the ranks on other nodes.
Without a process group it does nothing.
"""
from __future__ import annotations

import os
import sys
import threading
import time
import traceback
from contextlib import contextmanager
from typing import Dict, Iterator, Optional

import torch.distributed as dist

EXIT_CODE = 1
_generation = [0]  # every rank enters the guard the same number of times: a shared key namespace per use


class RankFailure(RuntimeError):
    """Raised on a rank whose work failed because another rank failed or died."""


def _stop_process(message: str) -> None:
    sys.stderr.write(f"fusedrl: {message}\n")
    sys.stderr.flush()
    os._exit(EXIT_CODE)


class _Watchdog(threading.Thread):
    def __init__(self, store, prefix: str, rank: int, world: int, timeout_s: float, poll_s: float):
        super().__init__(name="fusedrl-fail-fast", daemon=True)
        self.store, self.prefix, self.rank, self.world = store, prefix, rank, world
        self.timeout_s, self.poll_s = timeout_s, poll_s
        self.stopping = threading.Event()
        self.beats = 0
        self.seen: Dict[int, tuple] = {}  # peer -> (last beat value, local time it changed)

    def key(self, name: str) -> str:
        return f"{self.prefix}/{name}"

    def failure(self) -> Optional[str]:
        if self.store.check([self.key("failed")]):
            return self.store.get(self.key("failed")).decode(errors="replace")
        return None

    def stale_peers(self, after_s: float):
        now = time.monotonic()
        stale = []
        for peer in range(self.world):
            if peer == self.rank or self.store.check([self.key(f"done/{peer}")]):
                continue
            beat = self.store.get(self.key(f"hb/{peer}")) if self.store.check([self.key(f"hb/{peer}")]) else b""
            last = self.seen.get(peer)
            if last is None or last[0] != beat:
                self.seen[peer] = (beat, now)
            elif now - last[1] > after_s:
                stale.append(peer)
        return stale

    def run(self):
        while not self.stopping.is_set():
            try:
                self.beats += 1
                self.store.set(self.key(f"hb/{self.rank}"), str(self.beats))
                message = self.failure()
                if message is not None and not self.stopping.is_set():
                    _stop_process(f"rank {self.rank} stopping: {message}")
                stale = self.stale_peers(self.timeout_s)
                if stale and not self.stopping.is_set():
                    report(self.store, self.prefix, f"rank {stale[0]} failed: it stopped responding for "
                                                    f"{self.timeout_s:.0f}s (killed, crashed or hung)")
                    _stop_process(f"rank {self.rank} stopping: rank {stale[0]} stopped responding for "
                                  f"{self.timeout_s:.0f}s (killed, crashed or hung)")
            except Exception as err:  # noqa: BLE001 - any store error means the job lost its coordinator
                if not self.stopping.is_set():
                    _stop_process(f"rank {self.rank} stopping: lost the rendezvous store (the launcher or "
                                  f"rank 0 died?): {type(err).__name__}: {err}")
            self.stopping.wait(self.poll_s)


def report(store, prefix: str, message: str) -> bool:
    """Publish `message` as the job's failure unless another rank published one first."""
    if store.add(f"{prefix}/nfailed", 1) == 1:
        store.set(f"{prefix}/failed", message)
        return True
    return False


def _diagnose(watchdog: _Watchdog, err: BaseException) -> Optional[str]:
    """After a local error: another rank's published failure, or a peer that died (no heartbeat)."""
    deadline = time.monotonic() + min(watchdog.timeout_s, max(5 * watchdog.poll_s, 2.0) + watchdog.poll_s)
    while time.monotonic() < deadline:
        message = watchdog.failure()
        if message is not None:
            return message
        stale = watchdog.stale_peers(max(4 * watchdog.poll_s, 1.5))
        if stale:
            return f"rank {stale[0]} failed: it stopped responding (killed or crashed); here: {type(err).__name__}: {err}"
        time.sleep(watchdog.poll_s / 2)
    return None


@contextmanager
def fail_together(timeout_s: float = 120.0, poll_s: float = 0.5) -> Iterator[None]:
    """Run the body on every rank so that any rank's failure stops all of them (see the module doc).

    Args:
        timeout_s: how long a silent peer may go without a heartbeat before the others stop; keep it
            above the longest pause a rank may spend holding the GIL (the heartbeat is a Python thread).
            Dead peers are usually caught sooner, by the next collective failing.
        poll_s: heartbeat / check period (seconds).
    Raises:
        The body's own exception on the failing rank; RankFailure (with the first failing rank's
        message) on a rank whose collective failed because of another rank.
    """
    if not (isinstance(timeout_s, (int, float)) and timeout_s > 0):
        raise ValueError(f"timeout_s must be a number > 0, got {timeout_s!r}")
    if not (isinstance(poll_s, (int, float)) and 0 < poll_s <= timeout_s):
        raise ValueError(f"poll_s must be a number in (0, timeout_s], got {poll_s!r}")
    if not (dist.is_available() and dist.is_initialized()):
        yield
        return
    _generation[0] += 1
    prefix = f"fusedrl/fail_together/{_generation[0]}"
    store = dist.distributed_c10d._get_default_store()
    rank, world = dist.get_rank(), dist.get_world_size()
    watchdog = _Watchdog(store, prefix, rank, world, float(timeout_s), float(poll_s))
    watchdog.start()
    try:
        yield
        dist.barrier()  # nobody leaves (and takes the store down) while a peer still works
    except BaseException as err:
        watchdog.stopping.set()
        try:
            other = _diagnose(watchdog, err)
        except Exception as store_err:  # noqa: BLE001 - the store host is gone too
            other = f"lost the rendezvous store (rank 0 or the launcher died?): {type(store_err).__name__}"
        if other is not None and not other.startswith(f"rank {rank} failed"):
            raise RankFailure(f"rank {rank} stopping: {other}") from err
        tail = "".join(traceback.format_exception_only(type(err), err)).strip()
        try:
            report(store, prefix, f"rank {rank} failed: {tail}")
        except Exception:  # noqa: BLE001
            pass
        time.sleep(2 * poll_s)  # let the peers read the message before this process (maybe the store) exits
        raise
    finally:
        watchdog.stopping.set()
        watchdog.join(timeout=2 * poll_s + 1)
        try:
            store.set(f"{prefix}/done/{rank}", "1")
        except Exception:  # noqa: BLE001 - the store may be gone already
            pass
