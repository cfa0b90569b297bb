"""One real training step on CPU, reporting its peak memory: `python peak_memory_step.py '<json>'`.

Run as a subprocess so that the measurement is the process's own: the baseline
is the resident set after torch and transformers are imported, the peak is the
kernel's high-water mark (VmHWM) after model creation, two forward and backward
passes and AdamW steps (the steady state) — what `kubetune.operator.platform.estimate.training_memory`
models. Prints one JSON line: {"parameters", "trainable", "baselineBytes", "peakBytes", "deltaBytes"}.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _status_bytes(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def main(spec: dict) -> dict:
    import torch
    import transformers
    from peft import LoraConfig, get_peft_model

    torch.set_num_threads(1)
    torch.manual_seed(0)
    baseline = _status_bytes("VmRSS")
    config = getattr(transformers, spec["configClass"])(**spec["config"])
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation=spec.get("attention", "sdpa"))
    if spec["method"] == "lora":
        model = get_peft_model(model, LoraConfig(r=spec["rank"], target_modules=spec["targets"], task_type="CAUSAL_LM",
                                                 fan_in_fan_out=config.model_type == "gpt2", lora_dropout=0.0))
    if spec.get("gradientCheckpointing"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if spec["method"] == "lora":
            model.enable_input_require_grads()
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    batch = torch.randint(0, config.vocab_size, (spec["batch"], spec["seq"]))
    for _ in range(spec.get("steps", 2)):  # from the second step on, AdamW's moments are held throughout
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    peak = _status_bytes("VmHWM")
    return {"parameters": sum(p.numel() for p in model.parameters()), "trainable": sum(p.numel() for p in trainable),
            "baselineBytes": baseline, "peakBytes": peak, "deltaBytes": peak - baseline}


if __name__ == "__main__":
    print(json.dumps(main(json.loads(sys.argv[1]))))
