"""Sizing facts for the operator's resource estimate, gathered by `--validate-only` without loading weights.

The operator cannot read a model on a PVC, and cannot import torch; the
dataset-validation pod can. It reports, in its termination message under
`sizing`, what `kubetune.operator.platform.estimate` needs:

- `model`: the shape keys of the model's config (as config.json names them), the exact parameter
  count and the exact Σ(in + out) of the LoRA target modules, both counted on a weightless
  (`meta` device) instance of the architecture;
- `data`: training examples and tokens, the longest example;
- `hyperparameters`: epochs, micro-batch and sequence length as the trainer will resolve them, for a
  CPU and for a GPU run (the operator has not chosen yet).
"""

from __future__ import annotations

from typing import Any

from kubetune.api import messages
from kubetune.api.config import TrainerConfig
from kubetune.trainer.training import hyperparameters

CONFIG_KEYS = (
    "model_type", "hidden_size", "n_embd", "d_model", "num_hidden_layers", "n_layer", "num_layers",
    "num_attention_heads", "n_head", "num_key_value_heads", "intermediate_size", "n_inner", "ffn_dim",
    "vocab_size", "max_position_embeddings", "n_positions", "head_dim", "hidden_act", "tie_word_embeddings",
    "attention_bias", "mlp_bias", "activation_function", "attn_pdrop", "attention_dropout",
)
"""The config keys the estimate reads (the report must stay under the 4 KiB termination-message limit)."""


def _module_in_out(module: Any) -> tuple[int, int] | None:
    """(in, out) features of a linear layer (torch Linear, or GPT-2's transposed Conv1D)."""
    if hasattr(module, "in_features") and hasattr(module, "out_features"):
        return int(module.in_features), int(module.out_features)
    if type(module).__name__ == "Conv1D" and getattr(module, "weight", None) is not None:
        nx, nf = module.weight.shape
        return int(nx), int(nf)
    return None


def lora_inputs_outputs(model: Any, targets: list[str] | str) -> int:
    """Σ(in + out) over the modules peft would adapt (name equal to, or ending in `.<target>`)."""
    total = 0
    for name, module in model.named_modules():
        shape = _module_in_out(module)
        if shape is None:
            continue
        if targets == "all-linear":
            wanted = not name.endswith("lm_head")
        else:
            wanted = any(name == t or name.endswith(f".{t}") for t in targets)
        if wanted:
            total += shape[0] + shape[1]
    return total


def model_facts(config: TrainerConfig) -> messages.SizingModel:
    """The model's shape and exact counts, from its configuration only (no weights read)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from kubetune.trainer.training import modeling

    location = modeling.locate(config.model)
    model_config = AutoConfig.from_pretrained(location.name_or_path, **location.kwargs)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config, trust_remote_code=config.model.trust_remote_code)
    raw = model_config.to_dict()
    text = model_config.get_text_config().to_dict() if hasattr(model_config, "get_text_config") else raw
    shape = {k: v for k, v in {**raw, **text}.items()
             if k in CONFIG_KEYS and isinstance(v, (int, float, str, bool)) and not (isinstance(v, str) and len(v) > 64)}
    targets = modeling.lora_target_modules(model, config.method.lora_settings())
    return {
        "config": shape,
        "parameters": sum(p.numel() for p in model.parameters()),
        "loraInputsOutputs": lora_inputs_outputs(model, targets),
    }


def fsdp_wrap_problem(config: TrainerConfig) -> str | None:
    """Why `training.strategy: fsdp` cannot shard this model, or None when it can.

    FSDP wraps each transformer block as one shard unit; the model class must name its block classes
    (`_no_split_modules`, as transformers' own architectures do). Checked on a weightless instance, in the
    validation pod, so a model FSDP cannot wrap fails before any GPU is held."""
    if config.training.strategy != "fsdp":
        return None
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from kubetune.trainer.training import modeling

    location = modeling.locate(config.model)
    model_config = AutoConfig.from_pretrained(location.name_or_path, **location.kwargs)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config, trust_remote_code=config.model.trust_remote_code)
    blocks = list(getattr(model, "_no_split_modules", None) or [])
    if blocks:
        return None
    return (f"training.strategy: fsdp cannot wrap {type(model).__name__} (model_type "
            f"{model_config.model_type!r}): the class names no transformer block to shard by "
            f"(_no_split_modules is empty); use strategy ddp, or a model class that names its blocks")


def resolved_shape(config: TrainerConfig, *, parameters: int, train_examples: int, longest_example: int,
                   context: int | None) -> messages.SizingHyperparameters:
    """Epochs, micro-batch and sequence length the trainer will use, on CPU and on a GPU."""
    max_len = hyperparameters.resolve_max_seq_length(config.hyperparameters, longest_example, context)
    def shape(device: hyperparameters.DeviceKind) -> messages.SizingShape:
        hp = hyperparameters.resolve(config.hyperparameters, method=config.method.type, num_parameters=parameters,
                                     num_train_examples=train_examples, num_train_sequences=train_examples,
                                     max_seq_length=max_len, device=device)
        return {"epochs": hp.epochs, "batchSize": hp.batch_size, "maxSeqLength": hp.max_seq_length}

    return {"cpu": shape("cpu"), "gpu": shape("cuda")}


def sizing_facts(config: TrainerConfig, *, train_examples: int, train_tokens: int,
                 longest_example: int) -> messages.SizingFacts:
    """Everything the operator's estimate needs, JSON-ready (see the module docstring)."""
    model = model_facts(config)
    shape = model["config"]
    context = next((shape[k] for k in ("max_position_embeddings", "n_positions") if isinstance(shape.get(k), int)), None)
    return {
        "model": model,
        "data": {"trainExamples": train_examples, "trainTokens": train_tokens, "longestExample": longest_example},
        "hyperparameters": resolved_shape(config, parameters=model["parameters"], train_examples=train_examples,
                                          longest_example=longest_example, context=context),
    }
