"""What the test servers started on loopback share (SeaweedFS's S3, MLflow): one process writing to a log
in its work folder, a readiness wait that fails with the log's tail, and a stop that leaves no process
behind (the orphan guard ends them too if the test process dies)."""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from kubetune.dev import orphans


class LoopbackServer:
    """A server process of the tests. Subclasses name their log and error, build the command line and
    say when the server answers; `start_process` and `stop` do the rest."""

    log_name = "server.log"
    error: type[Exception] = RuntimeError

    def __init__(self, workdir: Path, *, ready_timeout: float = 120.0, pids_name: str = "server.pids") -> None:
        self.workdir = workdir
        self.ready_timeout = ready_timeout
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: Any = None
        self._guard = orphans.ProcessGuard(workdir / pids_name)
        self._group = False
        """Whether the server runs in a process group of its own (ended as a group: its workers too)."""

    def __enter__(self) -> Any:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        raise NotImplementedError

    def start_process(self, args: Sequence[str], answers: Callable[[], bool], *, what: str, poll_seconds: float,
                      group: bool = False, env: dict[str, str] | None = None) -> None:
        """Run `args` in the work folder and wait until `answers()`; stop and raise `error` with the log's
        tail if it exits or does not answer in `ready_timeout`."""
        self._group = group
        self._log = open(self.workdir / self.log_name, "ab")  # noqa: SIM115 - closed by stop()
        self._proc = subprocess.Popen(list(args), stdout=self._log, stderr=subprocess.STDOUT,
                                      stdin=subprocess.DEVNULL, cwd=self.workdir, env=env,
                                      start_new_session=group, preexec_fn=orphans.die_with_parent)
        self._guard.add(self._proc.pid)
        atexit.register(self.stop)
        deadline = time.monotonic() + self.ready_timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise self.error(f"{what} exited with {self._proc.returncode}: {self.log_tail()}")
            if answers():
                for pid in descendants(self._proc.pid):
                    self._guard.add(pid)
                return
            time.sleep(poll_seconds)
        self.stop()
        raise self.error(f"{what} did not answer in {self.ready_timeout:.0f}s: {self.log_tail()}")

    def log_tail(self, lines: int = 30) -> str:
        path = self.workdir / self.log_name
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""

    def stop(self) -> None:
        """Ends the server (SIGTERM, then SIGKILL after 10 s; its whole process group when it has one);
        idempotent."""
        proc, self._proc = self._proc, None
        if proc is not None:
            workers = descendants(proc.pid)
            if proc.poll() is None:
                self._signal(proc, signal.SIGTERM)
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    self._signal(proc, signal.SIGKILL)
                    proc.wait()
            if self._group:
                self._signal(proc, signal.SIGKILL)  # a worker left behind by its server
            for pid in (proc.pid, *workers):
                self._guard.discard(pid)
        if self._log is not None:
            self._log.close()
            self._log = None
        self._guard.close()
        with contextlib.suppress(Exception):
            atexit.unregister(self.stop)

    def _signal(self, proc: subprocess.Popen[bytes], signum: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            if self._group:
                os.killpg(proc.pid, signum)
            else:
                proc.send_signal(signum)


def descendants(pid: int) -> list[int]:
    """Child processes of `pid`, recursively (Linux /proc), so the guard can end a server's workers too."""
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):
            for child in (task / "children").read_text().split():
                found += [int(child), *descendants(int(child))]
    return found
