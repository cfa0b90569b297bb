"""Make sure the processes the dev tooling starts never outlive it.

``PR_SET_PDEATHSIG`` is the first line of defence, but some kernels (the
Firecracker VMs this project is developed on, for one) do not deliver it. So a
:class:`ProcessGuard` also starts a small watchdog process: it polls its own
parent, and once the parent is gone (even killed with SIGKILL) it terminates
every process listed in the guard's pid file, then exits.

``python -m kubetune.dev.orphans PARENT_PID PIDFILE`` is the watchdog itself.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

POLL_SECONDS = 0.5
"""How often the watchdog checks its parent: the longest an orphan survives."""

GRACE_SECONDS = 5.0
"""Time between SIGTERM and SIGKILL for each orphan."""


def die_with_parent() -> None:
    """A ``preexec_fn``: ask the kernel for SIGKILL when the parent dies.

    SIGKILL, not SIGTERM: with the parent gone nobody waits for a graceful
    shutdown, and kube-apiserver's takes tens of seconds.
    """
    with contextlib.suppress(OSError):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class ProcessGuard:
    """A pid file of processes to kill if this Python process dies, plus its watchdog."""

    def __init__(self, pidfile: Path) -> None:
        self.pidfile = pidfile
        self._pids: set[int] = set()
        self._watchdog: subprocess.Popen[bytes] | None = None
        self._lock = threading.RLock()
        """The local node adds and discards pids from many threads; one pid-file write at a time."""

    def add(self, pid: int) -> None:
        """Guard ``pid``; starts the watchdog on first use."""
        with self._lock:
            self._pids.add(pid)
            self._write()
        if self._watchdog is None or self._watchdog.poll() is not None:
            self._watchdog = subprocess.Popen(
                [sys.executable, "-m", "kubetune.dev.orphans", str(os.getpid()), str(self.pidfile)],
                # No die_with_parent here: the parent's death is the watchdog's cue to act.
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )

    def discard(self, pid: int) -> None:
        """Stop guarding ``pid`` (it was stopped on purpose)."""
        with self._lock:
            self._pids.discard(pid)
            self._write()

    def close(self) -> None:
        """Stops the watchdog; the caller has stopped every guarded process."""
        self._pids.clear()
        self._write()
        if self._watchdog is not None and self._watchdog.poll() is None:
            self._watchdog.terminate()
            self._watchdog.wait()
        self._watchdog = None

    def _write(self) -> None:
        with self._lock:
            tmp = self.pidfile.with_suffix(".tmp")
            tmp.write_text("".join(f"{pid}\n" for pid in sorted(self._pids)))
            tmp.replace(self.pidfile)


def _read_pids(pidfile: Path) -> list[int]:
    try:
        return [int(line) for line in pidfile.read_text().split()]
    except (OSError, ValueError):
        return []


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def kill_all(pids: list[int]) -> None:
    """SIGTERM each, then SIGKILL what is still there after the grace period."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + GRACE_SECONDS
    while time.monotonic() < deadline and any(_alive(pid) for pid in pids):
        time.sleep(0.1)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def watch(parent: int, pidfile: Path) -> None:
    """Waits for ``parent`` to go away, then kills what the pid file lists."""
    while os.getppid() == parent:
        time.sleep(POLL_SECONDS)
    kill_all(_read_pids(pidfile))


if __name__ == "__main__":
    watch(int(sys.argv[1]), Path(sys.argv[2]))
