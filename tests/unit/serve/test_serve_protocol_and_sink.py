"""Pure parts of the server, without a model: request validation and the token sink.

The sink is fed token ids with a fake one-character-per-token decoder, so
stop-sequence, end-of-sequence and streaming rules are checked exactly.
"""

from __future__ import annotations

import pytest

from kubetune.trainer.serve import protocol as protocol
from kubetune.trainer.serve.engine import GenerationParams, TokenSink, held_back_length
from kubetune.trainer.serve.protocol import ApiError

EOS = 0
ALPHABET = "\x00abcdefghijklmnopqrstuvwxyz .!"
"""Token id i decodes to ALPHABET[i]; id 0 is the end-of-sequence token (decodes to nothing)."""


def _decode(ids: list[int]) -> str:
    return "".join(ALPHABET[i] for i in ids if i != EOS)


def _ids(text: str) -> list[int]:
    return [ALPHABET.index(c) for c in text]


def _feed(text_or_ids: str | list[int], *, stop: tuple[str, ...] = (), max_new_tokens: int = 100) -> tuple[TokenSink, list[str]]:
    pieces: list[str] = []
    sink = TokenSink(_decode, frozenset({EOS}), GenerationParams(max_new_tokens=max_new_tokens, stop=stop), pieces.append)
    for token in _ids(text_or_ids) if isinstance(text_or_ids, str) else text_or_ids:
        sink.add(token)
    sink.end()
    return sink, pieces


class TestTokenSink:
    def test_running_out_of_tokens_is_finish_reason_length(self) -> None:
        sink, pieces = _feed("hello world", max_new_tokens=5)
        assert (sink.text, sink.tokens, sink.finish_reason) == ("hello", 5, "length")
        assert "".join(pieces) == "hello"

    def test_generate_ending_without_a_stop_condition_is_length(self) -> None:
        sink, _ = _feed("abc")
        assert sink.result().finish_reason == "length"

    def test_an_end_of_sequence_token_stops_and_is_counted_but_not_shown(self) -> None:
        sink, pieces = _feed([*_ids("hi"), EOS, *_ids("ignored")])
        assert (sink.text, sink.tokens, sink.finish_reason) == ("hi", 3, "stop")
        assert "".join(pieces) == "hi"

    def test_a_stop_sequence_truncates_before_it(self) -> None:
        sink, pieces = _feed("one. two. three", stop=(". t",))
        assert (sink.text, sink.finish_reason) == ("one", "stop")
        assert "".join(pieces) == "one"

    def test_the_earliest_of_several_stop_sequences_wins(self) -> None:
        sink, _ = _feed("abcdef", stop=("ef", "cd"))
        assert sink.text == "ab"

    def test_a_possible_stop_prefix_is_held_back_until_it_is_decided(self) -> None:
        sink, pieces = _feed("say stuff", stop=("stop",))
        # "st" looked like the start of "stop" and was held back, then released when "u" came.
        assert "".join(pieces) == "say stuff"
        assert not any(piece.endswith("st") for piece in pieces)

    def test_tokens_after_the_decision_are_ignored(self) -> None:
        sink, _ = _feed("ab", max_new_tokens=2)
        sink.add(_ids("c")[0])
        assert (sink.text, sink.tokens) == ("ab", 2)


class TestHeldBackLength:
    @pytest.mark.parametrize("text, stops, held", [
        ("hello wor", ("world",), 3),
        ("hello", ("world",), 0),
        ("hello w", ("xyz", "w!"), 1),
        ("caf\ufffd", (), 1),  # half of a multi-byte character
        ("", ("abc",), 0),
    ])  # fmt: skip
    def test_holds_back_stop_prefixes_and_incomplete_characters(self, text: str, stops: tuple[str, ...], held: int) -> None:
        assert held_back_length(text, stops) == held


class TestCompletionRequests:
    def test_a_minimal_request_gets_openai_defaults(self) -> None:
        request = protocol.parse_completion_request({"model": "m", "prompt": "hi"}, max_tokens_limit=10)
        assert request == protocol.CompletionRequest(
            model="m", prompt="hi", sampling=protocol.SamplingParams(max_tokens=None, temperature=1.0, top_p=1.0)
        )

    def test_every_supported_field_is_read(self) -> None:
        request = protocol.parse_completion_request(
            {"model": "m", "prompt": [[1, 2]], "max_tokens": 5, "temperature": 0, "top_p": 0.5, "stop": "\n",
             "seed": 7, "stream": True, "stream_options": {"include_usage": True}, "echo": True, "user": "u"},
            max_tokens_limit=10,
        )  # fmt: skip
        assert request.prompt == (1, 2)
        assert request.sampling == protocol.SamplingParams(max_tokens=5, temperature=0.0, top_p=0.5, stop=("\n",), seed=7)
        assert (request.stream, request.include_usage, request.echo) == (True, True, True)

    @pytest.mark.parametrize("body, param, fragment", [
        ({"model": "m", "prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, "stop", "at most 4"),
        ({"model": "m", "prompt": "x", "stop": [""]}, "stop", "empty"),
        ({"model": "m", "prompt": [-1]}, "prompt", ">= 0"),
        ({"model": "m", "prompt": "x", "n": True}, "n", "allowed values: null, 1"),
        ({"model": "m", "prompt": "x", "temperature": float("nan")}, "temperature", "must be a number"),
        ({"model": "", "prompt": "x"}, "model", "non-empty string"),
        ({"model": "m", "prompt": "x", "stream": True, "stream_options": {"usage": 1}}, "usage", "Unrecognized"),
    ])  # fmt: skip
    def test_bad_values_name_the_param_and_what_is_allowed(self, body: dict[str, object], param: str, fragment: str) -> None:
        with pytest.raises(ApiError) as caught:
            protocol.parse_completion_request(body, max_tokens_limit=10)
        assert caught.value.status == 400
        assert caught.value.param == param
        assert fragment in caught.value.message


class TestChatRequests:
    def test_developer_becomes_system_and_text_parts_are_joined(self) -> None:
        request = protocol.parse_chat_request(
            {"model": "m", "messages": [
                {"role": "developer", "content": "be brief"},
                {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}], "name": "x"},
            ]},
            max_tokens_limit=10,
        )  # fmt: skip
        assert request.messages == (protocol.ChatMessage("system", "be brief"), protocol.ChatMessage("user", "ab"))

    def test_max_tokens_and_max_completion_tokens_must_agree(self) -> None:
        with pytest.raises(ApiError, match="must equal max_tokens"):
            protocol.parse_chat_request(
                {"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": 2, "max_completion_tokens": 3},
                max_tokens_limit=10,
            )

    def test_image_parts_are_refused_with_the_part_named(self) -> None:
        with pytest.raises(ApiError) as caught:
            protocol.parse_chat_request(
                {"model": "m", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
                max_tokens_limit=10,
            )
        assert caught.value.param == "messages[0].content[0]"
        assert caught.value.code == "unsupported_value"
