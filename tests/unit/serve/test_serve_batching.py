"""Concurrent requests are decoded together in batches, and batching changes no answer.

In-process (`Engine.generate_batch`): rows of different prompt lengths,
settings and seeds, decoded together, produce exactly what each produces alone.
Over HTTP with the official client: eight concurrent streamed chat completions
each equal the non-streaming answer for the same request, greedy and seeded
sampling alike, and the server's batch-size histogram shows they shared
batches; 32 concurrent clients all get answers (no 429 below
--max-concurrency).
"""

from __future__ import annotations

import concurrent.futures
import re
import threading
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING, Any

import openai
import pytest

from kubetune.trainer.serve.engine import Engine, GenerationParams, GenerationRequest, load_engine, resolve_model_source
from kubetune.trainer.serve.process import ServerProcess

if TYPE_CHECKING:
    from conftest import Memorised

QUESTIONS = (
    "What does the operator do?",
    "Hi",
    "How do I pause a job?",
    "What is a checkpoint, and when does the trainer write one to the output claim?",
    "Explain LoRA.",
    "Which metrics does the job report while it trains?",
    "Why?",
    "Tell me about serving.",
)


@pytest.fixture(scope="module")
def engine(trained_model_dir: Path) -> Engine:
    return load_engine(resolve_model_source(trained_model_dir), device="cpu")


def _alone(engine: Engine, prompt: list[int], params: GenerationParams) -> tuple[str, int, str]:
    result = engine.generate(prompt, params)
    return result.text, result.completion_tokens, result.finish_reason


class TestABatchComputesWhatEachRowComputesAlone:
    def test_greedy_and_seeded_rows_of_different_lengths(self, engine: Engine, memorised: Memorised) -> None:
        prompts = [engine.encode_prompt(memorised.completion_prompt), engine.encode_prompt("A"),
                   engine.encode_prompt("Kubernetes schedules each pod on a node"),
                   engine.encode_prompt(memorised.completion_prompt)]
        settings = [GenerationParams(max_new_tokens=40, temperature=0),
                    GenerationParams(max_new_tokens=12, temperature=0.9, seed=7),
                    GenerationParams(max_new_tokens=20, temperature=1.0, top_p=0.8, seed=123),
                    GenerationParams(max_new_tokens=5, temperature=0, stop=("job",))]
        expected = [_alone(engine, p, s) for p, s in zip(prompts, settings, strict=True)]
        rows = [GenerationRequest(p, s) for p, s in zip(prompts, settings, strict=True)]
        engine.generate_batch(rows)
        got = [(r.result().text, r.result().completion_tokens, r.result().finish_reason) for r in rows]
        assert got == expected
        assert expected[0] == (memorised.completion_answer, got[0][1], "stop"), "the memorised answer, then EOS"

    def test_a_finished_row_resolves_before_the_batch_ends(self, engine: Engine) -> None:
        short = GenerationRequest(engine.encode_prompt("A"), GenerationParams(max_new_tokens=1, temperature=0))
        resolved_while_long_ran: list[bool] = []
        long_row: GenerationRequest

        def on_text(_: str) -> None:
            resolved_while_long_ran.append(short.future.done())

        long_row = GenerationRequest(engine.encode_prompt("A"), GenerationParams(max_new_tokens=30, temperature=0.7,
                                                                                 seed=1), on_text)
        engine.generate_batch([short, long_row])
        assert short.result().completion_tokens == 1
        assert long_row.result().completion_tokens > 1
        assert resolved_while_long_ran and resolved_while_long_ran[-1], "the short row did not wait for the long one"

    def test_a_cancelled_row_leaves_and_the_others_go_on(self, engine: Engine) -> None:
        cancelled = threading.Event()
        gone = GenerationRequest(engine.encode_prompt("A"), GenerationParams(max_new_tokens=30, temperature=0),
                                 lambda _: cancelled.set(), cancelled)
        kept = GenerationRequest(engine.encode_prompt("A"), GenerationParams(max_new_tokens=30, temperature=0.7, seed=3))
        expected = _alone(engine, kept.prompt_ids, kept.params)
        engine.generate_batch([gone, kept])
        assert gone.result().completion_tokens < 30
        assert (kept.result().text, kept.result().completion_tokens, kept.result().finish_reason) == expected


class TestRowsJoinARunningBatch:
    def test_rows_that_join_mid_batch_compute_what_they_compute_alone(self, engine: Engine,
                                                                       memorised: Memorised) -> None:
        first = GenerationRequest(engine.encode_prompt("A"), GenerationParams(max_new_tokens=30, temperature=0.8,
                                                                              seed=5))
        later = [GenerationRequest(engine.encode_prompt(memorised.completion_prompt),
                                   GenerationParams(max_new_tokens=40, temperature=0)),
                 GenerationRequest(engine.encode_prompt("Kubernetes schedules each pod on a node that runs it"),
                                   GenerationParams(max_new_tokens=9, temperature=1.0, top_p=0.9, seed=11)),
                 GenerationRequest(engine.encode_prompt("B"), GenerationParams(max_new_tokens=20, temperature=0))]
        expected = [_alone(engine, r.prompt_ids, r.params) for r in [first, *later]]
        handed: list[int] = []

        def more(room: int) -> list[GenerationRequest]:
            handed.append(room)
            if len(handed) == 3:  # after the running row made two tokens: two join, one longer than it
                return later[:2]
            if len(handed) == 6:
                return later[2:]
            return []

        engine.generate_batch([first], more, capacity=4)
        got = [(r.result().text, r.result().completion_tokens, r.result().finish_reason) for r in [first, *later]]
        assert got == expected
        assert handed[:3] == [3, 3, 3] and len(handed) >= 6, "asked between steps for what capacity leaves"
        assert handed[3] <= 1, "two joined: at most one slot left"


def _batches(server: ServerProcess) -> tuple[float, float]:
    """(decoding steps run, steps for one request alone) from the server's histogram."""
    text = server.get("/metrics")[1].decode()
    total = float(re.search(r"^kubetune_serve_batch_size_count (\S+)$", text, re.M).group(1))  # type: ignore[union-attr]
    single = float(re.search(r'^kubetune_serve_batch_size_bucket\{le="1.0"\} (\S+)$', text, re.M).group(1))  # type: ignore[union-attr]
    return total, single


@pytest.mark.parametrize("sampling", [{"temperature": 0}, {"temperature": 0.9, "top_p": 0.95}],
                         ids=["greedy", "seeded-sampling"])
def test_eight_concurrent_streams_equal_their_non_streaming_answers(
    served: ServerProcess, memorised: Memorised, sampling: dict[str, Any]
) -> None:
    client = openai.OpenAI(base_url=served.base_url + "/v1", api_key="unused", max_retries=0, timeout=120)

    def request(i: int) -> dict[str, Any]:
        return {"model": memorised.model_name, "messages": [{"role": "user", "content": QUESTIONS[i]}],
                "max_tokens": 24, "seed": 1000 + i, **sampling}

    expected = []
    for i in range(8):  # one at a time: nothing else in the batch
        answer = client.chat.completions.create(**request(i))
        expected.append((answer.choices[0].message.content, answer.choices[0].finish_reason))
    assert expected[0][0] == memorised.chat_answer or sampling["temperature"] > 0
    assert len({text for text, _ in expected}) > 1, "the questions get different answers"

    barrier = threading.Barrier(8)

    def stream(i: int) -> tuple[str, str | None]:
        barrier.wait()
        text, finish = "", None
        for chunk in client.chat.completions.create(**request(i), stream=True):
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
                finish = chunk.choices[0].finish_reason or finish
        return text, finish

    # Whether eight simultaneous clients' requests reach the engine while the others still decode is
    # up to the machine's scheduler, so one round may show no shared step by chance. A server that
    # never batches shares none in any round; a batching one shares steps in at least one of three.
    # Every round's answers must equal the ones computed alone.
    shared = []
    for _ in range(3):
        before = _batches(served)
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            streamed = list(pool.map(stream, range(8)))
        assert streamed == expected
        total, single = (after - earlier for after, earlier in zip(_batches(served), before, strict=True))
        shared.append((total, single))
        if total - single >= 1:
            break
    assert any(total - single >= 1 for total, single in shared), (
        f"no two of the eight streams shared a decoding step in {len(shared)} rounds (steps, alone): {shared}")


def test_thirty_two_concurrent_clients_all_get_answers(served: ServerProcess, memorised: Memorised) -> None:
    body = {"model": memorised.model_name, "prompt": memorised.completion_prompt, "max_tokens": 4, "temperature": 0}
    barrier = threading.Barrier(32)

    def call(_: int) -> int:
        barrier.wait()
        return served.post_json("/v1/completions", body)[0]

    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        statuses = list(pool.map(call, range(32)))
    assert statuses == [200] * 32, "no 429 below --max-concurrency (default 64)"


class TestGenerationThreads:
    """Torch threads for generation: on CPU the usable cores minus one, so the event loop keeps a core
    (torch's threads wait for each other at every operation; one that loses its core stalls them all)."""

    def test_auto_leaves_a_core_for_the_event_loop_and_an_explicit_count_wins(self) -> None:
        import os

        from kubetune.trainer.serve.engine import resolve_threads

        assert resolve_threads(0, "cpu") == max(1, len(os.sched_getaffinity(0)) - 1)
        assert resolve_threads(3, "cpu") == 3

    def test_the_engine_generates_on_its_thread_count(self, trained_model_dir: Path) -> None:
        import torch

        engine = load_engine(resolve_model_source(trained_model_dir), device="cpu", threads=1)
        assert engine.threads == 1
        seen: list[int] = []
        engine.generate([1, 2, 3], GenerationParams(max_new_tokens=2, temperature=0),
                        on_text=lambda _: seen.append(torch.get_num_threads()))
        assert seen and set(seen) == {1}
