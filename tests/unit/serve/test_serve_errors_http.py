"""Bad requests get a 4xx with an OpenAI-style error body, and the server keeps serving.

Every case goes over real HTTP to the session server; after each one a
normal request must still succeed.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import pytest

from kubetune.trainer.serve.process import ServerProcess

if TYPE_CHECKING:
    from conftest import Memorised

MODEL = "tiny-operator"
"""The session server's model name (conftest.MODEL_NAME)."""
CHAT = [{"role": "user", "content": "hi"}]


def _error(status: int, raw: bytes) -> dict[str, Any]:
    """The `error` object of an answer, checking its OpenAI shape."""
    body = json.loads(raw)
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"]
    assert "Traceback" not in error["message"]
    return error  # type: ignore[no-any-return]


@pytest.fixture(autouse=True)
def still_serving_after(served: ServerProcess, memorised: Memorised) -> Any:
    """After each bad request, a good one still works."""
    yield
    status, answer = served.post_json("/v1/completions", {"model": MODEL, "prompt": "The", "max_tokens": 2})
    assert status == 200, answer
    assert answer["usage"]["completion_tokens"] >= 1


class TestModelAndBody:
    @pytest.mark.parametrize("path, body", [
        ("/v1/completions", {"model": "gpt-4", "prompt": "hi"}),
        ("/v1/chat/completions", {"model": "gpt-4", "messages": CHAT}),
    ])  # fmt: skip
    def test_an_unknown_model_is_404_model_not_found(self, served: ServerProcess, path: str, body: dict[str, Any]) -> None:
        status, raw = served.request("POST", path, json.dumps(body).encode())
        error = _error(status, raw)
        assert status == 404
        assert error["code"] == "model_not_found"
        assert error["param"] == "model"
        assert error["type"] == "invalid_request_error"
        assert "gpt-4" in error["message"] and MODEL in error["message"]

    def test_an_unknown_model_id_under_v1_models_is_404(self, served: ServerProcess) -> None:
        status, raw = served.get("/v1/models/gpt-4")
        assert status == 404
        assert _error(status, raw)["code"] == "model_not_found"

    @pytest.mark.parametrize("raw_body", [b"{", b"not json", b"\xff\xfe", b""])
    def test_a_body_that_is_not_json_is_400(self, served: ServerProcess, raw_body: bytes) -> None:
        status, raw = served.request("POST", "/v1/completions", raw_body)
        assert status == 400
        error = _error(status, raw)
        assert error["code"] == "invalid_json"
        assert error["type"] == "invalid_request_error"

    @pytest.mark.parametrize("body", [[1, 2], "text", 3, None])
    def test_a_body_that_is_not_an_object_is_400(self, served: ServerProcess, body: Any) -> None:
        status, raw = served.request("POST", "/v1/chat/completions", json.dumps(body).encode())
        assert status == 400
        assert "JSON object" in _error(status, raw)["message"]

    def test_a_body_over_4_mib_is_413(self, served: ServerProcess) -> None:
        body = json.dumps({"model": MODEL, "prompt": "x" * (5 * 1024 * 1024)}).encode()
        status, raw = served.request("POST", "/v1/completions", body)
        assert status == 413
        assert _error(status, raw)["type"] == "invalid_request_error"

    def test_an_unknown_path_is_404_and_a_wrong_method_is_405_in_the_same_shape(self, served: ServerProcess) -> None:
        status, raw = served.get("/v1/engines")
        assert status == 404 and _error(status, raw)["code"] == "not_found"
        status, raw = served.get("/v1/completions")
        assert status == 405
        assert "POST" in _error(status, raw)["message"]


class TestParameters:
    @pytest.mark.parametrize("path, body, param", [
        ("/v1/completions", {"model": MODEL}, "prompt"),
        ("/v1/completions", {"prompt": "hi"}, "model"),
        ("/v1/chat/completions", {"model": MODEL}, "messages"),
        ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user"}]}, "messages[0].content"),
    ])  # fmt: skip
    def test_a_missing_field_is_400_naming_it(self, served: ServerProcess, path: str, body: dict[str, Any], param: str) -> None:
        status, raw = served.request("POST", path, json.dumps(body).encode())
        error = _error(status, raw)
        assert status == 400
        assert error["param"] == param
        assert error["code"] == "missing_required_parameter"
        assert param in error["message"]

    @pytest.mark.parametrize("path, field, value", [
        ("/v1/completions", "prompt", 42),
        ("/v1/completions", "prompt", [1, "two"]),
        ("/v1/completions", "max_tokens", "10"),
        ("/v1/completions", "max_tokens", 2.5),
        ("/v1/completions", "max_tokens", True),
        ("/v1/completions", "temperature", "hot"),
        ("/v1/completions", "top_p", [0.5]),
        ("/v1/completions", "stream", "yes"),
        ("/v1/completions", "stop", 7),
        ("/v1/completions", "seed", 1.5),
        ("/v1/completions", "model", 7),
        ("/v1/chat/completions", "messages", "hello"),
        ("/v1/chat/completions", "messages", []),
        ("/v1/chat/completions", "user", 5),
    ])  # fmt: skip
    def test_a_wrong_type_is_400_naming_the_param(self, served: ServerProcess, path: str, field: str, value: Any) -> None:
        base: dict[str, Any] = {"model": MODEL, "prompt": "hi"} if path == "/v1/completions" else {"model": MODEL, "messages": CHAT}
        status, raw = served.request("POST", path, json.dumps({**base, field: value}).encode())
        error = _error(status, raw)
        assert status == 400
        assert error["param"] == field
        assert error["message"].startswith(f"{field}: ")

    @pytest.mark.parametrize("max_tokens", [0, -1, 65, 100000])
    def test_max_tokens_outside_1_to_the_limit_is_400(self, served: ServerProcess, max_tokens: int) -> None:
        status, raw = served.request(
            "POST", "/v1/completions", json.dumps({"model": MODEL, "prompt": "hi", "max_tokens": max_tokens}).encode()
        )
        error = _error(status, raw)
        assert status == 400
        assert error["param"] == "max_tokens"
        assert "from 1 to 64" in error["message"]  # the session server runs with --max-tokens-limit 64
        assert str(max_tokens) in error["message"]

    @pytest.mark.parametrize("field, value", [("temperature", 2.5), ("temperature", -0.1), ("top_p", 0), ("top_p", 1.5)])
    def test_sampling_values_out_of_range_are_400(self, served: ServerProcess, field: str, value: float) -> None:
        status, raw = served.request("POST", "/v1/completions", json.dumps({"model": MODEL, "prompt": "hi", field: value}).encode())
        assert status == 400
        assert _error(status, raw)["param"] == field

    @pytest.mark.parametrize("path, field, value", [
        ("/v1/completions", "n", 2),
        ("/v1/completions", "best_of", 3),
        ("/v1/completions", "logprobs", 5),
        ("/v1/completions", "presence_penalty", 0.5),
        ("/v1/chat/completions", "n", 2),
        ("/v1/chat/completions", "tools", [{"type": "function", "function": {"name": "f"}}]),
        ("/v1/chat/completions", "response_format", {"type": "json_object"}),
        ("/v1/chat/completions", "logprobs", True),
    ])  # fmt: skip
    def test_unsupported_values_are_400_not_silently_ignored(self, served: ServerProcess, path: str, field: str, value: Any) -> None:
        base: dict[str, Any] = {"model": MODEL, "prompt": "hi"} if path == "/v1/completions" else {"model": MODEL, "messages": CHAT}
        status, raw = served.request("POST", path, json.dumps({**base, field: value}).encode())
        error = _error(status, raw)
        assert status == 400
        assert error["param"] == field
        assert error["code"] == "unsupported_value"

    def test_neutral_values_of_unsupported_params_are_accepted(self, served: ServerProcess) -> None:
        body = {"model": MODEL, "prompt": "hi", "max_tokens": 1, "n": 1, "best_of": 1, "presence_penalty": 0, "logprobs": None}
        status, answer = served.post_json("/v1/completions", body)
        assert status == 200, answer

    def test_an_unknown_param_is_400_listing_the_supported_ones(self, served: ServerProcess) -> None:
        status, raw = served.request("POST", "/v1/completions", json.dumps({"model": MODEL, "prompt": "hi", "temprature": 1}).encode())
        error = _error(status, raw)
        assert status == 400
        assert error["param"] == "temprature"
        assert error["code"] == "unknown_parameter"
        assert "temperature" in error["message"]

    def test_an_unknown_role_is_400_listing_the_allowed_ones(self, served: ServerProcess) -> None:
        body = {"model": MODEL, "messages": [{"role": "wizard", "content": "hi"}]}
        status, raw = served.request("POST", "/v1/chat/completions", json.dumps(body).encode())
        error = _error(status, raw)
        assert status == 400
        assert error["param"] == "messages[0].role"
        assert "system, developer, user, assistant" in error["message"]

    def test_more_than_one_prompt_is_400(self, served: ServerProcess) -> None:
        status, raw = served.request("POST", "/v1/completions", json.dumps({"model": MODEL, "prompt": ["a", "b"]}).encode())
        assert status == 400
        assert "one prompt" in _error(status, raw)["message"]

    def test_token_ids_outside_the_vocabulary_are_400(self, served: ServerProcess) -> None:
        status, raw = served.request("POST", "/v1/completions", json.dumps({"model": MODEL, "prompt": [1, 999999]}).encode())
        error = _error(status, raw)
        assert status == 400
        assert error["param"] == "prompt" and "999999" in error["message"]

    def test_a_prompt_that_fills_the_context_is_400_context_length_exceeded(self, served: ServerProcess) -> None:
        # The tiny model's context is 512 tokens; each "ab " is at least one token.
        status, raw = served.request("POST", "/v1/completions", json.dumps({"model": MODEL, "prompt": "zq " * 600}).encode())
        error = _error(status, raw)
        assert status == 400
        assert error["code"] == "context_length_exceeded"
        assert "512" in error["message"]

    def test_stream_options_without_stream_is_400(self, served: ServerProcess) -> None:
        body = {"model": MODEL, "prompt": "hi", "stream_options": {"include_usage": True}}
        status, raw = served.request("POST", "/v1/completions", json.dumps(body).encode())
        assert status == 400
        assert _error(status, raw)["param"] == "stream_options"
