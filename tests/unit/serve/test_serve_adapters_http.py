"""Several LoRA adapters over one base model, routed by the request's `model` name.

`--adapter NAME=PATH` (repeatable) loads more adapters beside the main model,
unmerged over one copy of the base; `GET /v1/models` lists every name, and a
batch may mix rows for different adapters (peft's mixed-adapter batches):
each answer equals what its adapter generates alone.

Adapters added and removed while the server runs (`--adapter-config FILE`), without
a restart: the file lists `{"adapters": [{"name", "path"}]}` and is re-read every
`--adapter-config-interval` seconds. A new entry is loaded and routed by its name
(and listed in `GET /v1/models`), a removed one is no longer served, an entry that
cannot be served (another base model) is logged and skipped while the others keep
working; the same process answers throughout. A shared serving Deployment
(`spec.serving.shareWith`) relies on this: the operator writes the file as a
ConfigMap mounted into the pods.
"""

from __future__ import annotations

import concurrent.futures
import json
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

import openai
import pytest

from kubetune.trainer.serve.adapters import AdapterConfigError, parse_adapter_config
from kubetune.trainer.serve.engine import (
    AdapterSource,
    GenerationParams,
    ModelSourceError,
    load_engine,
    resolve_adapter,
    resolve_model_source,
)
from kubetune.trainer.serve.process import ServerProcess

if TYPE_CHECKING:
    from conftest import Memorised, StartServer

PROMPT = "The operator"


def _make_adapter(base: Path, path: Path, seed: int) -> Path:
    """A LoRA adapter with random (non-zero) weights, so it changes what the base generates."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base)
    config = LoraConfig(r=4, lora_alpha=256, target_modules=["c_attn", "c_proj"], init_lora_weights=False, fan_in_fan_out=True)
    peft_model = get_peft_model(model, config)
    peft_model.peft_config["default"].base_model_name_or_path = str(base)
    peft_model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def adapters(trained_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    return {"tuned-a": _make_adapter(trained_model_dir, root / "a", 1),
            "tuned-b": _make_adapter(trained_model_dir, root / "b", 2)}


@pytest.fixture(scope="module")
def alone(trained_model_dir: Path, adapters: dict[str, Path]) -> dict[str | None, str]:
    """What each model name generates by itself (greedy), in process: the expected answers."""
    source = resolve_model_source(trained_model_dir)
    engine = load_engine(source, device="cpu",
                         adapters=[AdapterSource(name, path) for name, path in adapters.items()])
    from kubetune.trainer.serve.engine import GenerationRequest

    answers: dict[str | None, str] = {}
    for adapter in (None, *adapters):
        request = GenerationRequest(engine.encode_prompt(PROMPT), GenerationParams(max_new_tokens=12, temperature=0),
                                    adapter=adapter)
        engine.generate_batch([request])
        answers[adapter] = request.result().text
    return answers


def test_each_model_name_routes_to_its_adapter_even_in_one_batch(
    start_server: StartServer, trained_model_dir: Path, adapters: dict[str, Path], alone: dict[str | None, str],
    memorised: Memorised,
) -> None:
    assert alone[None] == memorised.completion_answer[: len(alone[None])]
    assert len({alone[None], alone["tuned-a"], alone["tuned-b"]}) == 3, "the adapters change the answers"
    server = start_server("--model", trained_model_dir, "--served-model-name", "base",
                          *[f"--adapter={name}={path}" for name, path in adapters.items()])
    client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0, timeout=120)
    assert [m.id for m in client.models.list()] == ["base", "tuned-a", "tuned-b"]
    assert client.models.retrieve("tuned-b").id == "tuned-b"

    names = ["base", "tuned-a", "tuned-b"] * 2
    barrier = threading.Barrier(len(names))

    def ask(model: str) -> tuple[str, str]:
        barrier.wait()
        answer = client.completions.create(model=model, prompt=PROMPT, max_tokens=12, temperature=0)
        return answer.model, answer.choices[0].text

    with concurrent.futures.ThreadPoolExecutor(len(names)) as pool:
        answers = list(pool.map(ask, names))
    expected = {"base": alone[None], "tuned-a": alone["tuned-a"], "tuned-b": alone["tuned-b"]}
    assert answers == [(name, expected[name]) for name in names]

    with pytest.raises(openai.NotFoundError) as unknown:
        client.completions.create(model="tuned-c", prompt=PROMPT, max_tokens=2)
    assert "'base', 'tuned-a', 'tuned-b'" in str(unknown.value)


def test_an_adapter_for_another_base_is_refused_at_startup_naming_the_flag(
    trained_model_dir: Path, endless_model_dir: Path, tmp_path: Path
) -> None:
    other = _make_adapter(endless_model_dir, tmp_path / "other", 3)
    with pytest.raises(ModelSourceError) as refused:
        resolve_adapter(f"x={other}", resolve_model_source(trained_model_dir))
    assert str(refused.value).startswith(f"--adapter x={other}: its base model is")
    for bad, wanted in [("no-equals", "expected NAME=PATH"), (f"main={other}", "reserved"),
                        (f"y={tmp_path}", "no adapter_config.json")]:
        with pytest.raises(ModelSourceError, match=wanted):
            resolve_adapter(bad, resolve_model_source(trained_model_dir))


# --- adapters loaded while serving (--adapter-config) ---------------------------------------


def _write(config: Path, entries: dict[str, Path]) -> None:
    # Written aside and renamed, as the kubelet swaps a ConfigMap volume's files: never half a file.
    staged = config.with_suffix(".tmp")
    staged.write_text(json.dumps({"adapters": [{"name": n, "path": str(p)} for n, p in entries.items()]}))
    staged.replace(config)


def _client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0, timeout=120)


def _wait_models(client: openai.OpenAI, expected: list[str], timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while (served := [m.id for m in client.models.list()]) != expected:
        assert time.monotonic() < deadline, f"served models stayed {served}, expected {expected}"
        time.sleep(0.2)


def _answer(client: openai.OpenAI, model: str) -> str:
    return client.completions.create(model=model, prompt=PROMPT, max_tokens=12, temperature=0).choices[0].text


def test_adapters_listed_in_the_file_are_loaded_and_unloaded_while_serving_without_a_restart(
    start_server: StartServer, adapters: dict[str, Path], alone: dict[str | None, str],
    endless_model_dir: Path, tmp_path: Path,
) -> None:
    # The host serves an unmerged adapter itself (a LoRA job with merge: false), as in shareWith.
    config = tmp_path / "adapters.json"
    server = start_server("--model", adapters["tuned-a"], "--served-model-name", "job-a",
                          "--adapter-config", config, "--adapter-config-interval", "0.2")
    client = _client(server)
    pid = server.process.pid
    assert [m.id for m in client.models.list()] == ["job-a"], "a missing file lists no adapters"
    assert _answer(client, "job-a") == alone["tuned-a"], "the host's own adapter, unmerged, answers as merged"

    _write(config, {"job-b": adapters["tuned-b"]})
    _wait_models(client, ["job-a", "job-b"])
    assert _answer(client, "job-b") == alone["tuned-b"]
    assert _answer(client, "job-a") == alone["tuned-a"]

    # An adapter of another base model is refused (logged, not served); the others stay.
    foreign = _make_adapter(endless_model_dir, tmp_path / "foreign", 3)
    _write(config, {"job-b": adapters["tuned-b"], "job-c": foreign})
    deadline = time.monotonic() + 60
    while "'job-c'" not in server.log():
        assert time.monotonic() < deadline, server.log()
        time.sleep(0.2)
    assert "--adapter-config entry 'job-c'" in server.log() and "its base model is" in server.log()
    assert [m.id for m in client.models.list()] == ["job-a", "job-b"]

    _write(config, {})
    _wait_models(client, ["job-a"])
    with pytest.raises(openai.NotFoundError):
        _answer(client, "job-b")
    assert _answer(client, "job-a") == alone["tuned-a"]
    assert server.process.poll() is None and server.process.pid == pid, "the same process served throughout"


def test_a_plain_model_starts_with_the_listed_adapters_loaded_before_it_reports_ready(
    start_server: StartServer, trained_model_dir: Path, adapters: dict[str, Path],
    alone: dict[str | None, str], tmp_path: Path,
) -> None:
    config = tmp_path / "adapters.json"
    _write(config, {"tuned-b": adapters["tuned-b"]})
    server = start_server("--model", trained_model_dir, "--served-model-name", "base", "--adapter-config", config)
    client = _client(server)
    assert [m.id for m in client.models.list()] == ["base", "tuned-b"], "ready means its adapters are loaded"
    assert _answer(client, "tuned-b") == alone["tuned-b"]
    assert _answer(client, "base") == alone[None], "the plain model, wrapped for adapters, answers as before"


@pytest.mark.parametrize(("text", "problem"), [
    ("[1]", "expected an object with an 'adapters' list"),
    ('{"adapters": {}}', "'adapters' must be a list"),
    ('{"adapters": [{"name": "a"}]}', "adapters[0] needs a non-empty 'name' and 'path'"),
    ('{"adapters": [{"name": "a", "path": "/x"}, {"name": "a", "path": "/y"}]}', "the name 'a' appears twice"),
    ("{", "not valid JSON"),
])
def test_a_malformed_adapter_config_names_what_is_wrong(text: str, problem: str) -> None:
    with pytest.raises(AdapterConfigError) as refused:
        parse_adapter_config(text, "f")
    assert str(refused.value).startswith("f: ") and problem in str(refused.value)
    assert parse_adapter_config("", "f") == {}
