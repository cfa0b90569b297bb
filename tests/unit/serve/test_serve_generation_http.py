"""The server generates: completions and chat completions over real HTTP, plain and streamed.

The session server runs the tiny model trained to memorise two texts, so
greedy answers are known exactly (see conftest.py).
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from kubetune.trainer.serve.process import ServerProcess

if TYPE_CHECKING:
    from conftest import Memorised


def _post(served: ServerProcess, path: str, body: dict[str, Any]) -> dict[str, Any]:
    status, answer = served.post_json(path, body)
    assert status == 200, answer
    return answer  # type: ignore[no-any-return]


def _events(served: ServerProcess, path: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    """The JSON chunks of a stream, checking the SSE framing and the final [DONE]."""
    status, content_type, events = served.post_stream(path, {**body, "stream": True})
    assert status == 200
    assert content_type.startswith("text/event-stream")
    assert events[-1] == "[DONE]"
    return [json.loads(event) for event in events[:-1]]


class TestCompletions:
    def test_greedy_completion_returns_the_text_usage_and_stop_reason(self, served: ServerProcess, memorised: Memorised) -> None:
        answer = _post(served, "/v1/completions", {
            "model": memorised.model_name, "prompt": memorised.completion_prompt, "max_tokens": 40, "temperature": 0,
        })  # fmt: skip
        assert answer["object"] == "text_completion"
        assert answer["id"].startswith("cmpl-")
        assert answer["model"] == memorised.model_name
        [choice] = answer["choices"]
        assert choice["text"] == memorised.completion_answer
        assert choice["finish_reason"] == "stop"  # the model chose its end-of-text token
        usage = answer["usage"]
        assert usage["prompt_tokens"] == 2  # "The" + " operator" in the tiny BPE vocabulary
        # The answer's tokens plus the end-of-text token the model generated.
        assert usage["completion_tokens"] >= 2
        assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]

    def test_max_tokens_cuts_the_text_with_finish_reason_length(self, served: ServerProcess, memorised: Memorised) -> None:
        answer = _post(served, "/v1/completions", {
            "model": memorised.model_name, "prompt": memorised.completion_prompt, "max_tokens": 3, "temperature": 0,
        })  # fmt: skip
        [choice] = answer["choices"]
        assert choice["finish_reason"] == "length"
        assert answer["usage"]["completion_tokens"] == 3
        assert memorised.completion_answer.startswith(choice["text"])
        assert 0 < len(choice["text"]) < len(memorised.completion_answer)

    def test_a_stop_sequence_ends_the_text_before_it(self, served: ServerProcess, memorised: Memorised) -> None:
        answer = _post(served, "/v1/completions", {
            "model": memorised.model_name, "prompt": memorised.completion_prompt, "max_tokens": 40,
            "temperature": 0, "stop": ["nothing like this", " status"],
        })  # fmt: skip
        [choice] = answer["choices"]
        assert choice["text"] == " watches the job"
        assert choice["finish_reason"] == "stop"

    def test_the_default_max_tokens_is_openais_16(self, served: ServerProcess, memorised: Memorised) -> None:
        answer = _post(served, "/v1/completions", {"model": memorised.model_name, "prompt": "", "temperature": 1.5, "seed": 3})
        assert answer["usage"]["completion_tokens"] <= 16

    def test_echo_prepends_the_prompt(self, served: ServerProcess, memorised: Memorised) -> None:
        answer = _post(served, "/v1/completions", {
            "model": memorised.model_name, "prompt": memorised.completion_prompt, "max_tokens": 40,
            "temperature": 0, "echo": True,
        })  # fmt: skip
        assert answer["choices"][0]["text"] == memorised.completion_prompt + memorised.completion_answer

    def test_a_prompt_of_token_ids_is_accepted(self, served: ServerProcess, memorised: Memorised) -> None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(served_model_dir(served))
        ids = tokenizer(memorised.completion_prompt)["input_ids"]
        answer = _post(served, "/v1/completions", {"model": memorised.model_name, "prompt": ids, "max_tokens": 40, "temperature": 0})
        assert answer["choices"][0]["text"] == memorised.completion_answer
        assert answer["usage"]["prompt_tokens"] == len(ids)

    def test_the_same_seed_samples_the_same_text(self, served: ServerProcess, memorised: Memorised) -> None:
        body = {"model": memorised.model_name, "prompt": "A", "max_tokens": 20, "temperature": 2, "top_p": 0.99, "seed": 1234}
        first = _post(served, "/v1/completions", body)["choices"][0]["text"]
        second = _post(served, "/v1/completions", body)["choices"][0]["text"]
        assert first == second
        others = {_post(served, "/v1/completions", {**body, "seed": seed})["choices"][0]["text"] for seed in range(5)}
        assert len(others) > 1, "different seeds at temperature 2 should not all give the same text"


class TestChatCompletions:
    def test_the_conversation_is_rendered_with_the_chat_template(self, served: ServerProcess, memorised: Memorised) -> None:
        answer = _post(served, "/v1/chat/completions", {
            "model": memorised.model_name, "temperature": 0,
            "messages": [{"role": "user", "content": memorised.chat_question}],
        })  # fmt: skip
        assert answer["object"] == "chat.completion"
        assert answer["id"].startswith("chatcmpl-")
        [choice] = answer["choices"]
        assert choice["message"] == {"role": "assistant", "content": memorised.chat_answer}
        assert choice["finish_reason"] == "stop"  # <|im_end|> ends the turn
        usage = answer["usage"]
        # "<|im_start|>user\n" ... "<|im_end|>\n<|im_start|>assistant\n": more than the question's words.
        assert usage["prompt_tokens"] > len(memorised.chat_question.split()) + 4
        assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]

    def test_text_parts_and_max_completion_tokens_are_understood(self, served: ServerProcess, memorised: Memorised) -> None:
        answer = _post(served, "/v1/chat/completions", {
            "model": memorised.model_name, "temperature": 0, "max_completion_tokens": 2,
            "messages": [{"role": "user", "content": [{"type": "text", "text": memorised.chat_question}]}],
        })  # fmt: skip
        [choice] = answer["choices"]
        assert choice["finish_reason"] == "length"
        assert answer["usage"]["completion_tokens"] == 2
        assert memorised.chat_answer.startswith(choice["message"]["content"])


class TestStreaming:
    def test_completion_chunks_add_up_to_the_plain_answer(self, served: ServerProcess, memorised: Memorised) -> None:
        body = {"model": memorised.model_name, "prompt": memorised.completion_prompt, "max_tokens": 40, "temperature": 0}
        chunks = _events(served, "/v1/completions", body)
        assert len(chunks) > 2, "the text should arrive in several pieces"
        assert {chunk["object"] for chunk in chunks} == {"text_completion"}
        assert len({chunk["id"] for chunk in chunks}) == 1
        text = "".join(chunk["choices"][0]["text"] for chunk in chunks)
        assert text == memorised.completion_answer
        assert [chunk["choices"][0]["finish_reason"] for chunk in chunks][-1] == "stop"
        assert all(chunk["choices"][0]["finish_reason"] is None for chunk in chunks[:-1])
        assert "usage" not in chunks[-1]

    def test_chat_chunks_start_with_the_role_and_end_with_the_reason(self, served: ServerProcess, memorised: Memorised) -> None:
        body = {"model": memorised.model_name, "temperature": 0, "messages": [{"role": "user", "content": memorised.chat_question}]}
        chunks = _events(served, "/v1/chat/completions", body)
        assert {chunk["object"] for chunk in chunks} == {"chat.completion.chunk"}
        assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
        assert chunks[-1]["choices"][0] == {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}
        content = "".join(chunk["choices"][0]["delta"].get("content", "") for chunk in chunks)
        assert content == memorised.chat_answer

    def test_include_usage_adds_a_last_chunk_with_the_counts(self, served: ServerProcess, memorised: Memorised) -> None:
        body = {
            "model": memorised.model_name, "temperature": 0, "max_tokens": 4,
            "messages": [{"role": "user", "content": memorised.chat_question}],
            "stream_options": {"include_usage": True},
        }  # fmt: skip
        chunks = _events(served, "/v1/chat/completions", body)
        assert chunks[-1]["choices"] == []
        assert chunks[-1]["usage"]["completion_tokens"] == 4
        assert chunks[-2]["choices"][0]["finish_reason"] == "length"
        plain = _post(served, "/v1/chat/completions", {k: v for k, v in body.items() if k != "stream_options"})
        assert chunks[-1]["usage"] == plain["usage"]

    def test_a_stop_sequence_split_across_tokens_never_leaks_into_the_stream(self, served: ServerProcess, memorised: Memorised) -> None:
        body = {
            "model": memorised.model_name, "prompt": memorised.completion_prompt, "max_tokens": 40,
            "temperature": 0, "stop": ["job stat"],
        }  # fmt: skip
        text = "".join(chunk["choices"][0]["text"] for chunk in _events(served, "/v1/completions", body))
        assert text == " watches the "


def served_model_dir(served: ServerProcess) -> str:
    """The --model folder the session server was started with."""
    args = served.process.args
    assert isinstance(args, list)
    return str(args[args.index("--model") + 1])
