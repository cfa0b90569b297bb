"""Concurrent requests are all answered correctly; beyond --max-concurrency they get 429."""

from __future__ import annotations

import concurrent.futures
import json
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kubetune.trainer.serve.process import ServerProcess

if TYPE_CHECKING:
    from conftest import Memorised, StartServer


def test_eight_concurrent_requests_all_succeed_with_their_own_answers(served: ServerProcess, memorised: Memorised) -> None:
    completion = {"model": memorised.model_name, "prompt": memorised.completion_prompt, "max_tokens": 40, "temperature": 0}
    chat = {"model": memorised.model_name, "temperature": 0, "messages": [{"role": "user", "content": memorised.chat_question}]}
    barrier = threading.Barrier(8)

    def call(i: int) -> tuple[int, str, Any]:
        barrier.wait()  # all eight leave at once
        if i % 4 == 3:
            status, _, events = served.post_stream("/v1/completions", {**completion, "stream": True})
            assert events[-1] == "[DONE]"
            return status, "stream", "".join(json.loads(e)["choices"][0]["text"] for e in events[:-1])
        if i % 2:
            status, answer = served.post_json("/v1/chat/completions", chat)
            return status, "chat", answer
        status, answer = served.post_json("/v1/completions", completion)
        return status, "completion", answer

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(call, range(8)))

    assert [status for status, _, _ in results] == [200] * 8
    ids = set()
    for _, kind, answer in results:
        if kind == "stream":
            assert answer == memorised.completion_answer
            continue
        ids.add(answer["id"])
        [choice] = answer["choices"]
        if kind == "chat":
            assert choice["message"]["content"] == memorised.chat_answer
        else:
            assert choice["text"] == memorised.completion_answer
        assert choice["finish_reason"] == "stop"
    assert len(ids) == 6, "every answer has its own id"


def test_requests_beyond_max_concurrency_get_429_and_later_ones_succeed(
    start_server: StartServer, endless_model_dir: Path
) -> None:
    server = start_server("--model", endless_model_dir, "--max-concurrency", "1", "--max-tokens-limit", "500")
    name = endless_model_dir.name
    long_stream = {"model": name, "prompt": "A", "max_tokens": 500, "temperature": 0, "stream": True}
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        running = pool.submit(server.post_stream, "/v1/completions", long_stream)
        # Wait until the long request holds the only slot (metrics show it in flight).
        for _ in range(200):
            if "kubetune_serve_requests_in_flight 1.0" in server.get("/metrics")[1].decode():
                break
            threading.Event().wait(0.02)
        status, answer = server.post_json("/v1/completions", {"model": name, "prompt": "A", "max_tokens": 1})
        assert status == 429, answer
        assert answer["error"]["code"] == "too_many_requests"
        assert "--max-concurrency 1" in answer["error"]["message"]
        assert running.result()[0] == 200
    status, answer = server.post_json("/v1/completions", {"model": name, "prompt": "A", "max_tokens": 1})
    assert status == 200, answer
