"""The training-memory estimate against the measured peak of real CPU training steps (within 25%).

Each case runs `peak_memory_step.py` in a fresh process: two forward/backward
passes and AdamW steps of a few-million-parameter model (seq 256, batch 8, fp32),
measuring the resident-set high-water mark above the baseline after imports.
The models are big enough that the terms the estimate models dominate the
measurement. docs/sizing.md records the figures.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from kubetune.operator.platform import estimate

STEP = Path(__file__).with_name("peak_memory_step.py")
TOLERANCE = 0.25

GPT2 = {"model_type": "gpt2", "n_embd": 256, "n_layer": 4, "n_head": 4, "vocab_size": 8000, "n_positions": 256}
"""GPT-2 shape with its defaults: dropout 0.1 everywhere, the Python `gelu_new` activation."""
LLAMA = {"model_type": "llama", "hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4,
         "num_key_value_heads": 2, "intermediate_size": 688, "vocab_size": 8000, "max_position_embeddings": 256,
         "tie_word_embeddings": False}
"""Llama shape: grouped-query attention, SwiGLU MLP, RMSNorm, untied head, no dropout."""


def measure(config_class: str, config: dict[str, Any], **run: Any) -> dict[str, int]:
    spec = {"configClass": config_class, "config": {k: v for k, v in config.items() if k != "model_type"}, **run}
    proc = subprocess.run([sys.executable, str(STEP), json.dumps(spec)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result: dict[str, int] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


CASES = [
    pytest.param("GPT2Config", GPT2, {"method": "full", "batch": 8, "seq": 256}, id="gpt2-5M-full"),
    pytest.param("LlamaConfig", LLAMA, {"method": "full", "batch": 8, "seq": 256}, id="llama-7M-full"),
    pytest.param("LlamaConfig", LLAMA, {"method": "lora", "rank": 8, "targets": ["q_proj", "k_proj", "v_proj", "o_proj"],
                                        "batch": 8, "seq": 256}, id="llama-7M-lora"),
]


@pytest.mark.slow
@pytest.mark.parametrize(("config_class", "config", "run"), CASES)
def test_estimate_is_within_25_percent_of_the_measured_peak(config_class: str, config: dict[str, Any],
                                                            run: dict[str, Any]) -> None:
    measured = measure(config_class, config, **run)
    facts = estimate.ModelFacts.from_config(config)
    shape = estimate.TrainingShape(method=run["method"], lora_rank=run.get("rank", 8), precision="fp32",
                                   seq_length=run["seq"], micro_batch=run["batch"], device="cpu")
    adapters = estimate.trainable_parameters(facts, shape) if run["method"] == "lora" else 0
    assert facts.parameters + adapters == measured["parameters"], "the config-derived parameter count is exact"
    assert estimate.trainable_parameters(facts, shape) == measured["trainable"]
    predicted = estimate.training_memory(facts, shape).total
    error = predicted / measured["deltaBytes"] - 1
    print(f"{config_class} {run['method']}: estimated {predicted / 2**20:.0f} MiB, "
          f"measured {measured['deltaBytes'] / 2**20:.0f} MiB ({error:+.0%})")
    assert abs(error) <= TOLERANCE, (predicted, measured)
