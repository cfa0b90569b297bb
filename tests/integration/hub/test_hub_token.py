"""Hub models with a token: `HF_TOKEN` (from `spec.credentials.hub`) and `HF_ENDPOINT` (the platform's
mirror) reach the hub calls `from_pretrained` makes, and a refused token ends validation with
`ModelUnavailable`. The hub cannot be reached from tests: a local HTTP server speaking the endpoints
`from_pretrained` uses (`/{repo}/resolve/{revision}/{file}`, HEAD and GET, and `/api/models/{repo}`)
stands in for it — a stand-in, not the hub, serving a tiny model folder to one token only."""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from kubetune.api import process as api_process
from kubetune.dev import tinymodel

pytestmark = pytest.mark.integration

TOKEN = "hf_standin_" + "0123456789abcdef"
REPO_ID = "example-org/tiny-private"


class HubStandIn(http.server.ThreadingHTTPServer):
    """Serves one private repository (a folder) to requests carrying `Bearer <token>`; records each request."""

    def __init__(self, folder: Path, token: str) -> None:
        self.folder, self.token = folder, token
        self.requests: list[tuple[str, str, str]] = []
        super().__init__(("127.0.0.1", 0), _HubHandler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _HubHandler(http.server.BaseHTTPRequestHandler):
    server: HubStandIn

    def _answer(self, with_body: bool) -> None:
        path = self.path.split("?")[0]
        self.server.requests.append((self.command, path, self.headers.get("Authorization") or ""))
        if self.headers.get("Authorization") != f"Bearer {self.server.token}":
            # The hub answers a private repository's unauthorised caller with 401 and this error code.
            self._send(401, b'{"error": "Invalid credentials in Authorization header"}',
                       {"X-Error-Code": "RepoNotFound", "X-Error-Message": "Invalid credentials"}, with_body)
            return
        if path == f"/api/models/{REPO_ID}":
            siblings = [{"rfilename": p.name} for p in sorted(self.server.folder.iterdir())]
            body = json.dumps({"id": REPO_ID, "sha": "a" * 40, "siblings": siblings, "private": True}).encode()
            self._send(200, body, {"Content-Type": "application/json"}, with_body)
            return
        prefix = f"/{REPO_ID}/resolve/"
        if path.startswith(prefix):
            file = self.server.folder / path[len(prefix):].partition("/")[2]
            if file.is_file():
                data = file.read_bytes()
                self._send(200, data, {"X-Repo-Commit": "a" * 40, "ETag": f'"{hashlib.sha256(data).hexdigest()}"'},
                           with_body)
                return
            self._send(404, b"", {"X-Error-Code": "EntryNotFound"}, with_body)
            return
        self._send(404, b"", {}, with_body)

    def _send(self, code: int, body: bytes, headers: dict[str, str], with_body: bool) -> None:
        self.send_response(code)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if with_body:
            self.wfile.write(body)

    def do_HEAD(self) -> None:  # noqa: N802 - http.server's naming
        self._answer(False)

    def do_GET(self) -> None:  # noqa: N802
        self._answer(True)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HubStandIn]:
    folder = tinymodel.create_tiny_model(tmp_path_factory.mktemp("hub-repo"), arch="gpt2")
    server = HubStandIn(folder, TOKEN)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def validate(tmp_path: Path, hub: HubStandIn, token: str) -> tuple[int, dict[str, object], str]:
    """`--validate-only` in its own process, with the environment a pod gets (huggingface_hub reads
    HF_ENDPOINT when imported, so an in-process run could not change it)."""
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps({"text": t}) + "\n" for t in tinymodel.default_corpus(60, seed=4)))
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"model": {"source": f"hf://{REPO_ID}"},
                                  "dataset": {"format": "text", "train": {"source": str(train)}},
                                  "output": {"dir": str(tmp_path / "out")}}))
    log = tmp_path / "termination-log"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "KUBETUNE_"))}
    env |= {"HF_ENDPOINT": hub.url, "HF_TOKEN": token, "HF_HOME": str(tmp_path / "hf-home"),
            api_process.ENV_TERMINATION_LOG: str(log)}
    proc = subprocess.run([sys.executable, "-m", "kubetune.trainer", "--config", str(config), "--validate-only"],
                          env=env, capture_output=True, text=True, timeout=600)
    return proc.returncode, json.loads(log.read_text()), proc.stderr


def test_the_token_and_the_endpoint_reach_the_hub_calls(tmp_path: Path, hub: HubStandIn) -> None:
    hub.requests.clear()
    code, summary, stderr = validate(tmp_path, hub, TOKEN)
    assert code == api_process.EXIT_OK, stderr[-3000:]
    assert summary["outcome"] == "validated"
    # The revision in the path is `main` or the commit the stand-in reported for it.
    downloads = {path.rsplit("/", 1)[-1] for method, path, _ in hub.requests
                 if method == "GET" and path.startswith(f"/{REPO_ID}/resolve/")}
    assert {"config.json", "tokenizer.json"} <= downloads
    repository_calls = [(path, auth) for _, path, auth in hub.requests if REPO_ID in path]
    assert repository_calls and all(auth == f"Bearer {TOKEN}" for _, auth in repository_calls), repository_calls


def test_a_refused_token_is_model_unavailable(tmp_path: Path, hub: HubStandIn) -> None:
    code, summary, stderr = validate(tmp_path, hub, "hf_wrong_token")
    assert code == api_process.EXIT_PERMANENT, stderr[-3000:]
    assert summary["reason"] == "ModelUnavailable"
    assert str(summary["message"]).startswith("model.source: "), summary
    assert "hf_wrong_token" not in json.dumps(summary) and "hf_wrong_token" not in stderr
