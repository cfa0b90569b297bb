"""Admission before work: oversized bodies and prompts are refused before they cost the server anything.

The body size is checked from Content-Length before reading, a prompt that
cannot fit the context is refused from its length in characters without being
tokenised, and what parsing and tokenising remains runs off the event loop, so
`/healthz` keeps answering within 100 ms while a 4 MiB prompt is refused.
"""

from __future__ import annotations

import http.client
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import openai
import pytest

from kubetune.trainer.serve.process import ServerProcess

if TYPE_CHECKING:
    from conftest import Memorised

FOUR_MIB = 4 * 1024 * 1024


def _raw_post(server: ServerProcess, path: str, body: bytes) -> tuple[int, dict[str, object]]:
    host, port = server.base_url.split("://", 1)[1].rsplit(":", 1)
    connection = http.client.HTTPConnection(host, int(port), timeout=120)
    try:
        connection.request("POST", path, body=body, headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


PROBER = """
import json, os, sys, time, urllib.request
url, stop = sys.argv[1], sys.argv[2]
latencies = []
while not os.path.exists(stop):
    started = time.perf_counter()
    with urllib.request.urlopen(url, timeout=30) as answer:
        assert answer.status == 200
    latencies.append(time.perf_counter() - started)
    time.sleep(0.005)
print(json.dumps(latencies))
"""
"""Probes /healthz until the stop file exists and prints every latency. A process of its own: in the
test's process the probes would wait for the GIL while the client encodes 4 MiB of JSON, and time that."""


def test_a_4_mib_prompt_is_refused_naming_the_prompt_while_healthz_stays_fast(
    served: ServerProcess, memorised: Memorised, tmp_path: Path
) -> None:
    client = openai.OpenAI(base_url=served.base_url + "/v1", api_key="unused", max_retries=0, timeout=120)
    prompt = "the operator watches " * (FOUR_MIB // 21 - 10)  # just under 4 MiB of JSON
    stop = tmp_path / "stop"
    prober = subprocess.Popen([sys.executable, "-c", PROBER, served.base_url + "/healthz", str(stop)],
                              stdout=subprocess.PIPE, text=True)
    try:
        time.sleep(0.3)
        for _ in range(3):
            with pytest.raises(openai.BadRequestError) as refused:
                client.completions.create(model=memorised.model_name, prompt=prompt, max_tokens=4)
            body = refused.value.body
            assert isinstance(body, dict)
            assert body["param"] == "prompt" and body["code"] == "context_length_exceeded"
            assert f"The prompt has {len(prompt)} characters" in body["message"]
            with pytest.raises(openai.BadRequestError) as refused_chat:
                client.chat.completions.create(model=memorised.model_name, max_tokens=4,
                                               messages=[{"role": "user", "content": prompt}])
            assert isinstance(refused_chat.value.body, dict) and refused_chat.value.body["param"] == "messages"
    finally:
        stop.touch()
        output, _ = prober.communicate(timeout=60)
    latencies = json.loads(output)
    assert len(latencies) >= 10
    p50, p99 = statistics.median(latencies), statistics.quantiles(latencies, n=100, method="inclusive")[98]
    # Before admission moved off the event loop, tokenising one such prompt held /healthz for seconds.
    # With the prober in its own process, p99 stayed under the 100 ms target on the shared 2-core
    # machine at load average 18-22 (60 ms and 89 ms in two runs).
    figures = f"/healthz over {len(latencies)} probes: p50 {p50 * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms, " \
              f"max {max(latencies) * 1000:.0f} ms"
    print(figures)
    assert p50 < 0.1 and p99 < 0.1, figures


def test_a_body_over_4_mib_is_refused_with_413_from_its_length(served: ServerProcess) -> None:
    body = json.dumps({"model": "x", "prompt": "a" * (FOUR_MIB + 10)}).encode()
    status, answer = _raw_post(served, "/v1/completions", body)
    assert status == 413
    error = answer["error"]
    assert isinstance(error, dict) and error["code"] == "request_entity_too_large"
    assert f"{len(body)} bytes; at most {FOUR_MIB}" in str(error["message"])


def test_a_token_id_prompt_longer_than_the_context_is_refused_before_decoding(
    served: ServerProcess, memorised: Memorised
) -> None:
    status, answer = served.post_json("/v1/completions", {"model": memorised.model_name, "prompt": [1] * 200_000,
                                                          "max_tokens": 4, "echo": True})
    assert status == 400
    assert answer["error"]["param"] == "prompt" and answer["error"]["code"] == "context_length_exceeded"
    assert "200000 tokens" in answer["error"]["message"]


def test_a_prompt_that_fits_is_still_answered(served: ServerProcess, memorised: Memorised) -> None:
    status, answer = served.post_json("/v1/completions", {"model": memorised.model_name, "temperature": 0,
                                                          "prompt": memorised.completion_prompt, "max_tokens": 40})
    assert status == 200 and answer["choices"][0]["text"] == memorised.completion_answer
