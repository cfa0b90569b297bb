"""The official `openai` Python client works against the server unchanged."""

from __future__ import annotations

from typing import TYPE_CHECKING

import openai
import pytest

from kubetune.trainer.serve.process import ServerProcess

if TYPE_CHECKING:
    from conftest import Memorised


@pytest.fixture
def client(served: ServerProcess) -> openai.OpenAI:
    """A stock client pointed at the session server (the key is required by the client, unused by the server)."""
    return openai.OpenAI(base_url=served.base_url + "/v1", api_key="unused", max_retries=0, timeout=60)


def test_models_lists_the_served_model(client: openai.OpenAI, memorised: Memorised) -> None:
    assert [model.id for model in client.models.list()] == [memorised.model_name]
    assert client.models.retrieve(memorised.model_name).id == memorised.model_name


def test_completions(client: openai.OpenAI, memorised: Memorised) -> None:
    completion = client.completions.create(
        model=memorised.model_name, prompt=memorised.completion_prompt, max_tokens=40, temperature=0
    )
    assert completion.choices[0].text == memorised.completion_answer
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage is not None and completion.usage.total_tokens > completion.usage.prompt_tokens


def test_chat_completions(client: openai.OpenAI, memorised: Memorised) -> None:
    chat = client.chat.completions.create(
        model=memorised.model_name,
        messages=[{"role": "user", "content": memorised.chat_question}],
        temperature=0,
        seed=1,
    )
    assert chat.choices[0].message.role == "assistant"
    assert chat.choices[0].message.content == memorised.chat_answer
    assert chat.choices[0].finish_reason == "stop"


def test_streamed_completions(client: openai.OpenAI, memorised: Memorised) -> None:
    stream = client.completions.create(
        model=memorised.model_name, prompt=memorised.completion_prompt, max_tokens=40, temperature=0, stream=True
    )
    chunks = list(stream)
    assert "".join(chunk.choices[0].text for chunk in chunks) == memorised.completion_answer
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_streamed_chat_with_usage(client: openai.OpenAI, memorised: Memorised) -> None:
    stream = client.chat.completions.create(
        model=memorised.model_name,
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": memorised.chat_question}],
        temperature=0,
        max_tokens=3,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    content = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert content and not content.endswith("<|im_end|>")
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 3


def test_errors_arrive_as_the_clients_typed_exceptions(client: openai.OpenAI, memorised: Memorised) -> None:
    with pytest.raises(openai.NotFoundError) as not_found:
        client.completions.create(model="no-such-model", prompt="hi")
    assert not_found.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as bad_request:
        client.completions.create(model=memorised.model_name, prompt="hi", max_tokens=10_000)
    assert bad_request.value.param == "max_tokens"
    assert "max_tokens" in bad_request.value.message
