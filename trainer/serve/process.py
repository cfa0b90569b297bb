"""Run the built-in server as a subprocess and talk to it: for tests, benchmarks and local mode.

`ServerProcess(["--model", path])` starts `python -m kubetune.trainer.serve`
on a free loopback port (`--port 0`; the server prints the port it got),
`wait_ready()` waits for `/readyz`, and `stop()` sends SIGTERM and returns the
exit code. The small HTTP helpers use only the standard library, so callers
see exactly what goes over the wire.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import IO, Any

LISTENING_PREFIX = "kubetune.serve listening on "
"""Start of the line the server prints on stdout once its port is open."""


class ServerProcess:
    """A `python -m kubetune.trainer.serve` subprocess on a free loopback port; output goes to `log_path`."""

    def __init__(self, args: list[str], log_path: Path, api_key: str | None = None) -> None:
        self.log_path = log_path
        """File receiving the server's stdout and stderr."""
        self.base_url = ""
        """`http://127.0.0.1:PORT`, known once `wait_listening` returned."""
        self._log: IO[bytes] = log_path.open("wb")
        self.api_key = api_key
        """The server's API key (passed in its environment); sent as a bearer token by these helpers."""
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
        env.pop("KUBETUNE_SERVE_API_KEY", None)
        if api_key is not None:
            env["KUBETUNE_SERVE_API_KEY"] = api_key
        self.process = subprocess.Popen(
            [sys.executable, "-m", "kubetune.trainer.serve", "--host", "127.0.0.1", "--port", "0", *args],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
        )
        """The server process."""

    def log(self) -> str:
        """Everything the server printed so far."""
        return self.log_path.read_text(errors="replace")

    def wait_listening(self, timeout: float = 60) -> str:
        """Wait for the 'listening on' line; return the base URL."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.log().splitlines():
                if line.startswith(LISTENING_PREFIX):
                    self.base_url = line[len(LISTENING_PREFIX) :].split()[0]
                    return self.base_url
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}:\n{self.log()}")
            time.sleep(0.05)
        raise RuntimeError(f"server did not open its port within {timeout}s:\n{self.log()}")

    def wait_ready(self, timeout: float = 180) -> None:
        """Wait until /readyz answers 200."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.get("/readyz")[0] == 200:
                return
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}:\n{self.log()}")
            time.sleep(0.1)
        raise RuntimeError(f"server not ready within {timeout}s:\n{self.log()}")

    def get(self, path: str) -> tuple[int, bytes]:
        """GET `path`; (status, body), also for 4xx/5xx."""
        return self.request("GET", path)

    def post_json(self, path: str, body: Any, timeout: float = 120) -> tuple[int, Any]:
        """POST a JSON body; (status, decoded JSON answer)."""
        status, raw = self.request("POST", path, json.dumps(body).encode(), timeout)
        return status, json.loads(raw)

    def post_stream(self, path: str, body: Any) -> tuple[int, str, list[str]]:
        """POST a streaming request; (status, content type, the `data:` payload of every event, in order)."""
        request = urllib.request.Request(self.base_url + path, data=json.dumps(body).encode(), method="POST")
        request.add_header("Content-Type", "application/json")
        self._authorize(request)
        with urllib.request.urlopen(request, timeout=120) as response:
            raw = response.read().decode()
            content_type = response.headers.get("Content-Type", "")
            status = response.status
        events = [event for event in raw.split("\n\n") if event]
        if not all(event.startswith("data: ") for event in events):
            raise ValueError(f"not a server-sent event stream:\n{raw}")
        return status, content_type, [event[len("data: ") :] for event in events]

    def request(self, method: str, path: str, data: bytes | None = None, timeout: float = 120) -> tuple[int, bytes]:
        """One HTTP request; (status, raw body), also for 4xx/5xx."""
        request = urllib.request.Request(self.base_url + path, data=data, method=method)
        if data is not None:
            request.add_header("Content-Type", "application/json")
        self._authorize(request)
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as error:
            return error.code, error.read()

    def _authorize(self, request: urllib.request.Request) -> None:
        if self.api_key is not None:
            request.add_header("Authorization", f"Bearer {self.api_key}")

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM, wait (SIGKILL after `timeout`), return the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
        return self.process.returncode
