"""Several LoRA adapters over one base model, routed by the request's `model` name.

`--adapter NAME=PATH` (repeatable) loads more adapters beside the main model,
unmerged over one copy of the base; `GET /v1/models` lists every name, and a
batch may mix rows for different adapters (peft's mixed-adapter batches):
each answer equals what its adapter generates alone.
"""

from __future__ import annotations

import concurrent.futures
import threading
from pathlib import Path
from typing import TYPE_CHECKING

import openai
import pytest

from kubetune.trainer.serve_engine import (
    AdapterSource,
    GenerationParams,
    ModelSourceError,
    load_engine,
    resolve_adapter,
    resolve_model_source,
)
from kubetune.trainer.serve_process import ServerProcess

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
    from kubetune.trainer.serve_engine import GenerationRequest

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
