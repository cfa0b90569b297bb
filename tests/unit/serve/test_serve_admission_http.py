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
import threading
import time
from typing import TYPE_CHECKING

import openai
import pytest

from kubetune.trainer.serve_process import ServerProcess

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


def _probe_latencies(server: ServerProcess, until: threading.Event) -> list[float]:
    latencies: list[float] = []
    while not until.is_set():
        started = time.perf_counter()
        status, _ = server.get("/healthz")
        latencies.append(time.perf_counter() - started)
        assert status == 200
        time.sleep(0.005)
    return latencies


def test_a_4_mib_prompt_is_refused_naming_the_prompt_while_healthz_stays_fast(
    served: ServerProcess, memorised: Memorised
) -> None:
    client = openai.OpenAI(base_url=served.base_url + "/v1", api_key="unused", max_retries=0, timeout=120)
    prompt = "the operator watches " * (FOUR_MIB // 21 - 10)  # just under 4 MiB of JSON
    done = threading.Event()
    latencies: list[float] = []
    prober = threading.Thread(target=lambda: latencies.extend(_probe_latencies(served, done)))
    prober.start()
    try:
        time.sleep(0.05)
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
        done.set()
        prober.join()
    assert len(latencies) >= 3
    # Before admission moved off the event loop, tokenising one such prompt held /healthz for seconds.
    # The median is the 100 ms target; single probes on the shared 2-core test machine (load average
    # ~18) are sometimes delayed a few hundred ms by the OS scheduler alone, hence the 1 s ceiling.
    assert statistics.median(latencies) < 0.1, f"/healthz median {statistics.median(latencies) * 1000:.0f} ms"
    assert max(latencies) < 1.0, f"/healthz took up to {max(latencies) * 1000:.0f} ms while the prompts were refused"


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
