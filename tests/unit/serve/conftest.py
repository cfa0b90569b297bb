"""Fixtures for the built-in server's tests: a tiny trained model and real server processes.

`trained_model_dir` is a tiny GPT-2-style model (from `kubetune.dev.tinymodel`)
trained for a few dozen steps until it has memorised two texts, so greedy
generation is predictable and readable:

- completion of "The operator" -> " watches the job status every few seconds." + EOS
- chat answer to "What does the operator do?" -> "The operator watches the job status." + <|im_end|>

`served` is one server process on that model for the whole session
(`python -m kubetune.trainer.serve`, port picked by the server, ready when the
fixture returns). Tests that need their own server (other flags, other model
layouts, shutdown) use `start_server`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from kubetune.dev.tinymodel import create_tiny_model
from kubetune.trainer.serve.process import ServerProcess

MODEL_NAME = "tiny-operator"
"""The served model name the session server uses."""
COMPLETION_PROMPT = "The operator"
COMPLETION_ANSWER = " watches the job status every few seconds."
CHAT_QUESTION = "What does the operator do?"
CHAT_ANSWER = "The operator watches the job status."


@dataclasses.dataclass(frozen=True)
class Memorised:
    """What the trained tiny model answers under greedy decoding."""

    model_name: str = MODEL_NAME
    """The name the session server serves the model as."""
    completion_prompt: str = COMPLETION_PROMPT
    completion_answer: str = COMPLETION_ANSWER
    """Greedy completion of `completion_prompt` (then EOS)."""
    chat_question: str = CHAT_QUESTION
    chat_answer: str = CHAT_ANSWER
    """Greedy chat answer to `chat_question` (then <|im_end|>)."""


@pytest.fixture(scope="session")
def memorised() -> Memorised:
    """The texts the trained tiny model reproduces."""
    return Memorised()


def _memorise(path: Path) -> None:
    """Train the tiny model in `path` until it reproduces the two texts above, and save it back."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    texts = [
        COMPLETION_PROMPT + COMPLETION_ANSWER + tokenizer.eos_token,
        tokenizer.apply_chat_template(
            [{"role": "user", "content": CHAT_QUESTION}, {"role": "assistant", "content": CHAT_ANSWER}], tokenize=False
        ),
    ]
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    labels = batch.input_ids.masked_fill(batch.attention_mask == 0, -100)
    torch.manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(60):
        loss = model(**batch, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert loss.item() < 0.2, f"the tiny model did not memorise its texts (loss {loss.item():.3f})"
    model.save_pretrained(path)


@pytest.fixture(scope="session")
def trained_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny GPT-2-style model folder that has memorised the texts above."""
    path = create_tiny_model(tmp_path_factory.mktemp("models") / MODEL_NAME, arch="gpt2")
    _memorise(path)
    return path


@pytest.fixture(scope="session")
def endless_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained tiny model that never ends a greedy generation by itself.

    The output embeddings of its end-of-sequence tokens are zero, so their
    logits are exactly 0 while some other token's is always above 0: greedy
    decoding runs to max_tokens. Used to hold the model busy for a known time.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = create_tiny_model(tmp_path_factory.mktemp("models") / "endless", arch="gpt2")
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    eos_ids = tokenizer.convert_tokens_to_ids([tokenizer.eos_token, "<|im_end|>"])
    with torch.no_grad():
        model.get_output_embeddings().weight[eos_ids] = 0.0
    model.save_pretrained(path)
    return path


StartServer = Callable[..., ServerProcess]


@pytest.fixture
def start_server(tmp_path: Path) -> Iterator[StartServer]:
    """Start servers with given arguments (`start_server("--model", dir, ...)`); all stopped at the end."""
    servers: list[ServerProcess] = []

    def start(*args: str | Path, wait: str = "ready") -> ServerProcess:
        server = ServerProcess([str(a) for a in args], tmp_path / f"server-{len(servers)}.log")
        servers.append(server)
        if wait in ("listening", "ready"):
            server.wait_listening()
        if wait == "ready":
            server.wait_ready()
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture(scope="session")
def served(trained_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """The session's server on the trained tiny model, ready."""
    log_path = tmp_path_factory.mktemp("server") / "server.log"
    server = ServerProcess(
        ["--model", str(trained_model_dir), "--served-model-name", MODEL_NAME, "--max-tokens-limit", "64"], log_path
    )
    try:
        server.wait_listening()
        server.wait_ready()
        yield server
    finally:
        code = server.stop()
        assert code == 0, f"the session server exited with {code}:\n{server.log()}"
