"""API keys: with `KUBETUNE_SERVE_API_KEY` set, `/v1/*` needs `Authorization: Bearer <key>`.

Tested with the official `openai` client (right key, wrong key, no key) and
raw HTTP; probes and metrics stay open because kubelet and Prometheus hold
no key. Without the variable the server needs no key (the other tests).
"""

from __future__ import annotations

import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING

import openai
import pytest

from kubetune.trainer.serve.process import ServerProcess

if TYPE_CHECKING:
    from conftest import Memorised, StartServer

KEY = "sk-test-0123456789abcdef"


@pytest.fixture(scope="module")
def keyed(trained_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> ServerProcess:
    server = ServerProcess(["--model", str(trained_model_dir), "--served-model-name", "tiny-operator"],
                           tmp_path_factory.mktemp("keyed") / "server.log", api_key=KEY)
    try:
        server.wait_listening()
        server.wait_ready()
        yield server  # type: ignore[misc]
    finally:
        server.stop()


def client(server: ServerProcess, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key=key, max_retries=0, timeout=60)


def test_the_right_key_is_served(keyed: ServerProcess, memorised: Memorised) -> None:
    answer = client(keyed, KEY).chat.completions.create(
        model="tiny-operator", temperature=0, messages=[{"role": "user", "content": memorised.chat_question}])
    assert answer.choices[0].message.content == memorised.chat_answer
    assert [m.id for m in client(keyed, KEY).models.list()] == ["tiny-operator"]


@pytest.mark.parametrize("key", ["wrong-key", KEY + "x", KEY[:-1]])
def test_a_wrong_key_gets_401_in_the_openai_shape(keyed: ServerProcess, key: str) -> None:
    with pytest.raises(openai.AuthenticationError) as refused:
        client(keyed, key).completions.create(model="tiny-operator", prompt="The operator", max_tokens=2)
    assert refused.value.status_code == 401
    body = refused.value.body
    assert isinstance(body, dict) and body["code"] == "invalid_api_key" and body["type"] == "invalid_request_error"
    assert "Incorrect API key" in body["message"]
    with pytest.raises(openai.AuthenticationError):
        client(keyed, key).models.list()


def test_no_key_gets_401_saying_how_to_send_one(keyed: ServerProcess) -> None:
    request = urllib.request.Request(keyed.base_url + "/v1/models")
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=30)
    assert refused.value.code == 401
    assert refused.value.headers["WWW-Authenticate"].startswith("Bearer")
    text = refused.value.read().decode()
    assert '"code": "missing_api_key"' in text and "Authorization: Bearer" in text


def test_probes_and_metrics_need_no_key(keyed: ServerProcess) -> None:
    for path in ("/healthz", "/readyz", "/metrics"):
        with urllib.request.urlopen(keyed.base_url + path, timeout=30) as response:
            assert response.status == 200, path


def test_without_the_variable_no_key_is_needed(start_server: StartServer, trained_model_dir: Path) -> None:
    server = start_server("--model", trained_model_dir)
    models = client(server, "anything").models.list()
    assert [m.id for m in models] == [trained_model_dir.name]
