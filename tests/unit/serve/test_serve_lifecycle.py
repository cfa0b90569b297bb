"""The server's life: port first, ready once loaded, graceful SIGTERM, clear failures at start."""

from __future__ import annotations

import concurrent.futures
import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from conftest import StartServer


def test_the_port_opens_before_the_model_loads_and_readyz_flips_once_loaded(
    start_server: StartServer, trained_model_dir: Path
) -> None:
    server = start_server("--model", trained_model_dir, wait="listening")
    # Loading imports torch and transformers in the background: seconds, while the port is already open.
    status, raw = server.get("/readyz")
    assert status == 503
    assert json.loads(raw)["status"] == "loading"
    assert server.get("/healthz")[0] == 200
    status, answer = server.post_json("/v1/completions", {"model": trained_model_dir.name, "prompt": "The"})
    assert status == 503
    assert answer["error"]["code"] == "model_not_ready"
    assert "GET /readyz" in answer["error"]["message"]

    server.wait_ready()
    assert json.loads(server.get("/readyz")[1]) == {"status": "ready", "model": trained_model_dir.name}
    status, answer = server.post_json("/v1/completions", {"model": trained_model_dir.name, "prompt": "The", "max_tokens": 2})
    assert status == 200, answer


def test_sigterm_lets_an_in_flight_stream_finish_then_exits_0(start_server: StartServer, endless_model_dir: Path) -> None:
    server = start_server("--model", endless_model_dir, "--max-tokens-limit", "300")
    body = {"model": endless_model_dir.name, "prompt": "A", "max_tokens": 300, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}  # fmt: skip
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        stream = pool.submit(server.post_stream, "/v1/completions", body)
        for _ in range(500):  # until the request is being generated
            if "kubetune_serve_requests_in_flight 1.0" in server.get("/metrics")[1].decode():
                break
            time.sleep(0.02)
        server.process.send_signal(signal.SIGTERM)
        status, _, events = stream.result(timeout=120)
    assert status == 200
    assert events[-1] == "[DONE]"
    assert json.loads(events[-2])["usage"]["completion_tokens"] == 300, "the stream was cut short"
    assert server.process.wait(60) == 0
    assert "shutting down" in server.log()


def test_a_new_connection_is_refused_while_an_in_flight_stream_drains_after_sigterm(
    start_server: StartServer, endless_model_dir: Path
) -> None:
    server = start_server("--model", endless_model_dir, "--max-tokens-limit", "500")
    body = {"model": endless_model_dir.name, "prompt": "A", "max_tokens": 500, "temperature": 0, "stream": True}  # the context holds 512
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        stream = pool.submit(server.post_stream, "/v1/completions", body)
        for _ in range(500):  # until the request is being generated
            if "kubetune_serve_requests_in_flight 1.0" in server.get("/metrics")[1].decode():
                break
            time.sleep(0.02)
        server.process.send_signal(signal.SIGTERM)
        for _ in range(500):  # until the server has begun to drain
            if "shutting down" in server.log():
                break
            time.sleep(0.02)
        try:
            status: int | None = server.get("/healthz")[0]
        except OSError:
            status = None
        # The refusal counts only if the server was still running, serving the stream, when it came.
        draining = server.process.poll() is None and not stream.done()
        streamed, _, events = stream.result(timeout=300)
    assert draining, "the stream ended before the new connection was tried: nothing was shown"
    assert status is None, f"a new connection during the drain got HTTP {status}"
    assert streamed == 200 and events[-1] == "[DONE]"
    assert server.process.wait(60) == 0


def _run_server(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kubetune.trainer.serve", "--host", "127.0.0.1", "--port", "0", *args],
        capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


class TestStartupFailures:
    def test_a_missing_model_path_exits_2_naming_it(self, tmp_path: Path) -> None:
        result = _run_server("--model", str(tmp_path / "nowhere"))
        assert result.returncode == 2
        assert "--model: no such file or folder" in result.stderr
        assert "listening" not in result.stdout

    def test_a_folder_that_is_no_model_exits_2_saying_what_was_expected(self, tmp_path: Path) -> None:
        (tmp_path / "notes.txt").write_text("hello")
        result = _run_server("--model", str(tmp_path))
        assert result.returncode == 2
        assert "config.json" in result.stderr and "adapter_config.json" in result.stderr and ".gguf" in result.stderr

    def test_an_adapter_whose_base_is_not_local_exits_2(self, tmp_path: Path) -> None:
        (tmp_path / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "openai-community/gpt2"}))
        result = _run_server("--model", str(tmp_path))
        assert result.returncode == 2
        assert "openai-community/gpt2" in result.stderr and "no hub access" in result.stderr

    def test_unloadable_weights_exit_1_after_the_port_opened(self, tmp_path: Path) -> None:
        (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 1}))
        (tmp_path / "model.safetensors").write_bytes(b"not safetensors")
        result = _run_server("--model", str(tmp_path))
        assert result.returncode == 1
        assert "listening on" in result.stdout
        assert "the model could not be loaded" in result.stderr

    def test_bad_option_values_are_refused(self, tmp_path: Path) -> None:
        result = _run_server("--model", str(tmp_path), "--max-tokens-limit", "0")
        assert result.returncode == 2
        assert "--max-tokens-limit: must be >= 1, got 0" in result.stderr
        for option, value, says in [("--threads", "-1", "--threads: must be >= 0 (0 = auto), got -1"),
                                    ("--adapter-config-interval", "0", "--adapter-config-interval: must be from 0.1")]:
            result = _run_server("--model", str(tmp_path), option, value)
            assert result.returncode == 2 and says in result.stderr, result.stderr
