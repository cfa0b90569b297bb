"""Loading the base model and tokenizer, and preparing the model for the chosen method.

Any Hugging Face causal LM works: a local folder (a PVC mount in a pod), a hub
id (`org/name` or `hf://org/name`, where the hub is reachable; `HF_TOKEN` and
`HF_ENDPOINT` from the environment reach huggingface_hub), an `s3://` folder
(downloaded once per pod, `objectstore`), or a GGUF file inside a folder
(`model.ggufFile`; transformers dequantises it). LoRA uses peft
with per-architecture default target modules.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import torch

from kubetune.api.finetunejob import LoraSettings, ModelSpec
from kubetune.trainer import objectstore
from kubetune.trainer.errors import ModelError

log = logging.getLogger(__name__)

# Attention projections per architecture: the usual LoRA targets (QLoRA, peft defaults).
DEFAULT_LORA_TARGETS: dict[str, list[str]] = {
    "gpt2": ["c_attn", "c_proj"],
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "mistral": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "mixtral": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "qwen3": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "gemma": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "gemma2": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "phi3": ["qkv_proj", "o_proj"],
    "gpt_neox": ["query_key_value", "dense"],
    "gptj": ["q_proj", "k_proj", "v_proj", "out_proj"],
    "falcon": ["query_key_value", "dense"],
    "opt": ["q_proj", "k_proj", "v_proj", "out_proj"],
    "bloom": ["query_key_value", "dense"],
}
"""Architectures not listed get peft's "all-linear" (every linear layer except the output head)."""

CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
"""Used for chat data when the tokenizer brings no chat template of its own."""


@dataclasses.dataclass(frozen=True)
class ModelLocation:
    """Where from_pretrained looks, and with which arguments."""

    name_or_path: str
    kwargs: dict[str, Any]
    adapter: str | None = None
    """A peft LoRA adapter folder to load onto `name_or_path` and train on (the source was an
    earlier job's unmerged adapter, `spec.model.fromJob`); None for a plain model."""

    @property
    def is_local(self) -> bool:
        return Path(self.name_or_path).exists()


def locate(model: ModelSpec) -> ModelLocation:
    """Turn `model.source` into from_pretrained arguments; a missing local path is a permanent error."""
    source = model.source.strip()
    if objectstore.is_s3(source):
        # from_pretrained reads folders and hub ids only: the model is downloaded once per pod first.
        source = str(objectstore.download_folder(source, "model.source"))
    for prefix in ("hf://", "file://"):
        source = source.removeprefix(prefix)
    kwargs: dict[str, Any] = {"trust_remote_code": model.trust_remote_code}
    if model.revision:
        kwargs["revision"] = model.revision
    if model.gguf_file:
        kwargs["gguf_file"] = model.gguf_file
    looks_local = source.startswith(("/", "./", "../", "~")) or model.source.startswith("file://")
    path = Path(source).expanduser()
    if looks_local and not path.exists():
        raise ModelError(f"model.source: {model.source}: no such file or directory")
    if path.is_dir() and model.gguf_file and not (path / model.gguf_file).is_file():
        ggufs = sorted(p.name for p in path.glob("*.gguf")) or ["none"]
        raise ModelError(f"model.ggufFile: {model.gguf_file!r} not found in {source}; GGUF files there: {', '.join(ggufs)}")
    if path.is_dir() and (path / "adapter_config.json").is_file() and not (path / "config.json").is_file():
        return _adapter_location(model, path, kwargs)
    if path.is_dir() and not model.gguf_file and not (path / "config.json").is_file():
        raise ModelError(f"model.source: {source} has no config.json: not a Hugging Face model folder (set ggufFile for GGUF)")
    return ModelLocation(str(path) if path.exists() else source, kwargs)


def _adapter_location(model: ModelSpec, folder: Path, kwargs: dict[str, Any]) -> ModelLocation:
    """An adapter folder: its base model (as `adapter_config.json` names it) plus the adapter."""
    import json

    try:
        base = json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ModelError(f"model.source: {model.source}: adapter_config.json names no base model ({error})") from error
    if not isinstance(base, str) or not base:
        raise ModelError(f"model.source: {model.source}: adapter_config.json names no base model")
    if base.startswith(("/", "./")) and not Path(base).exists():
        raise ModelError(f"model.source: {model.source} is a LoRA adapter whose base model {base} is not mounted "
                         "here; the base model's claim must be the adapter's claim, or train from a merged model")
    return ModelLocation(base, kwargs, adapter=str(folder))


def _permanent_or_transient(error: OSError, location: ModelLocation) -> Exception:
    text = str(error)
    # A refused or missing token (401/403, gated repositories) is permanent too: HF_TOKEN comes from
    # spec.credentials.hub, and another attempt sends the same one.
    refused = any(mark in text for mark in ("401", "403", "Unauthorized", "gated", "Access to model"))
    if location.is_local or refused or "not a valid model identifier" in text or "Repository Not Found" in text:
        return ModelError(f"model.source: cannot load {location.name_or_path}: {text.splitlines()[0]}")
    return error  # network trouble: retryable


def load_tokenizer(model: ModelSpec) -> Any:
    """The model's tokenizer, with a pad token and a chat template guaranteed."""
    from transformers import AutoTokenizer

    location = locate(model)
    try:
        tokenizer = AutoTokenizer.from_pretrained(location.name_or_path, **location.kwargs)
    except OSError as error:
        raise _permanent_or_transient(error, location) from error
    except (ValueError, KeyError) as error:
        raise ModelError(f"model.source: cannot load the tokenizer of {location.name_or_path}: {error}") from error
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def select_attention_implementation(device_kind: str) -> str:
    """The attention kernel for training: flash-attention's variable-length kernel on GPUs that have it
    installed (packed examples go in as one flattened row, see `evaluate.collate`), else PyTorch's SDPA.

    SDPA with packed rows gets a dense block-diagonal mask built from the position ids, which is
    exact but keeps SDPA off its flash kernel: on a GPU without `flash_attn` packing still saves the
    padding's compute, not the attention's.
    """
    if device_kind == "cuda":
        from transformers.utils import is_flash_attn_2_available

        if is_flash_attn_2_available():
            return "flash_attention_2"
    return "sdpa"


def packed_causal_mask(position_ids: torch.Tensor) -> torch.Tensor:
    """The (batch, 1, T, T) boolean mask of packed rows: causal, within each example only.

    An example starts wherever the position does not follow the previous one (transformers'
    `find_packed_sequence_indices` rule, so the mask is the one transformers would build), computed
    on the device: transformers' own builder asks the host whether a row is packed, which waits for
    the GPU on every forward.
    """
    first = position_ids[:, :1] - 1
    segments = (torch.diff(position_ids, prepend=first, dim=-1) != 1).cumsum(-1)
    length = position_ids.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=position_ids.device).tril()
    return ((segments[:, :, None] == segments[:, None, :]) & causal)[:, None]


def model_inputs(model: Any, batch: dict[str, Any]) -> dict[str, Any]:
    """The keyword arguments to call `model` with on a batch from `evaluate.collate`.

    Chosen so that transformers never reads a device tensor on the host (each read makes the host wait
    for the GPU, and the GPU then idles while the host queues the next work):
    - flattened rows (flash attention) carry the examples' cumulative lengths;
    - rows that each hold one example from position 0, unpadded, need no positions and no mask: the
      model's own positions, plain causal attention (SDPA's flash kernel);
    - packed rows under SDPA get their block mask built here on the device (`packed_causal_mask`);
      under other kernels transformers builds it from the positions.
    """
    inputs: dict[str, Any] = {"input_ids": batch["input_ids"], "use_cache": False}
    if "attention_kwargs" in batch:
        return {**inputs, "position_ids": batch["position_ids"], **batch["attention_kwargs"]}
    if not batch.get("packed", True):
        return inputs
    inputs["position_ids"] = batch["position_ids"]
    if attention_implementation_of(model) == "sdpa":
        inputs["attention_mask"] = packed_causal_mask(batch["position_ids"])
    return inputs


def skip_padding_check(model: Any) -> None:
    """Turn off transformers' per-forward "padding without an attention mask" check on every submodel.

    It only warns (once), but it reads token ids on the host on every forward. kubetune's batches pad
    on purpose after the real tokens, where causal attention never lets a real token see them.
    """
    for module in model.modules():
        if hasattr(module, "warn_if_padding_and_no_attention_mask"):
            module.warn_if_padding_and_no_attention_mask = _no_padding_check


def _no_padding_check(*_: Any) -> None:
    return None


def base_model(model: Any) -> Any:
    """The transformers model under DDP, torch.compile and peft wrappers."""
    model = getattr(model, "module", model)
    model = getattr(model, "_orig_mod", model)
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def attention_implementation_of(model: Any) -> str:
    """The attention implementation a loaded (possibly wrapped) model runs with."""
    config = getattr(base_model(model), "config", None)
    return str(getattr(config, "_attn_implementation", None) or "eager")


def compile_blocks(model: Any) -> int:
    """torch.compile each transformer block in place (regional compilation); returns how many.

    The blocks share one code path, so one compilation serves them all (seconds, not the minutes a
    whole-model compile takes); parameter names, checkpoints and `unwrap_model` are unchanged, and
    the embedding, output head and loss stay eager (the fused loss's hook on the head keeps working).
    Dynamic shapes: packed batches vary in length, and each new length must not recompile.
    """
    blocks = max(
        (module for module in base_model(model).modules() if isinstance(module, torch.nn.ModuleList)),
        key=len,
        default=torch.nn.ModuleList(),
    )
    for block in blocks:
        block.compile(dynamic=True)
    return len(blocks)


def load_model(model: ModelSpec, dtype: torch.dtype = torch.float32, attn_implementation: str | None = None) -> Any:
    """The base causal LM in `dtype` (mixed precision keeps master weights in fp32), with the given attention
    kernel (None or "sdpa": transformers' default, SDPA, or eager for architectures without SDPA support)."""
    from transformers import AutoModelForCausalLM

    location = locate(model)
    extra = {"attn_implementation": attn_implementation} if attn_implementation not in (None, "sdpa") else {}
    try:
        loaded = AutoModelForCausalLM.from_pretrained(location.name_or_path, dtype=dtype, **location.kwargs, **extra)
    except OSError as error:
        raise _permanent_or_transient(error, location) from error
    except (ValueError, KeyError) as error:
        raise ModelError(f"model.source: cannot load {location.name_or_path} as a causal LM: {error}") from error
    if model.gguf_file:
        _forget_gguf_quantizer(loaded)
    if location.adapter:
        from peft import PeftModel

        # Trained on, not stacked: the same adapter learns the new data, so the result is still one
        # adapter on the original base (one file to serve, vLLM-compatible, the rank the first job chose).
        loaded = PeftModel.from_pretrained(loaded, location.adapter, is_trainable=True)
    skip_padding_check(loaded)
    return loaded


def _forget_gguf_quantizer(model: Any) -> None:
    """A GGUF checkpoint is dequantised into ordinary tensors while loading, but transformers keeps
    its quantizer on the model and then refuses `save_pretrained` ("quantized with gguf and is not
    serializable"). The weights are plain floats: drop the marker so the fine-tuned (or merged LoRA)
    model saves as safetensors like any other."""
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def override_dropout(model: Any, probability: float) -> int:
    """Set every dropout layer (and the config's dropout fields) to `probability`; returns layers changed."""
    changed = 0
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = probability
            changed += 1
    for name, value in vars(model.config).items():
        if isinstance(value, float) and ("dropout" in name or name.endswith("pdrop")):
            setattr(model.config, name, probability)
    return changed


def lora_target_modules(model: Any, settings: LoraSettings) -> list[str] | str:
    if settings.target_modules:
        return list(settings.target_modules)
    return DEFAULT_LORA_TARGETS.get(model.config.model_type, "all-linear")


def apply_lora(model: Any, settings: LoraSettings) -> Any:
    """Wrap the model with trainable LoRA adapters; the base weights are frozen."""
    from peft import LoraConfig, PeftModel, get_peft_model

    if isinstance(model, PeftModel):
        log.info("continuing the LoRA adapter the model was loaded with (rank %s); method.lora's rank, alpha "
                 "and targets apply to new adapters only", model.peft_config["default"].r)
        return model
    targets = lora_target_modules(model, settings)
    lora = LoraConfig(
        r=settings.rank,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=targets,
        task_type="CAUSAL_LM",
        fan_in_fan_out=model.config.model_type == "gpt2",  # GPT-2 uses Conv1D (transposed) layers
    )
    try:
        return get_peft_model(model, lora)
    except ValueError as error:
        raise ModelError(f"method.lora.targetModules: {targets} do not match this model: {error}") from error


def count_parameters(model: Any) -> tuple[int, int]:
    """(all parameters, trainable parameters)."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return total, trainable


def context_length(model_config: Any, tokenizer: Any) -> int | None:
    """The longest sequence the model accepts, as far as the config says."""
    for name in ("max_position_embeddings", "n_positions", "seq_length"):
        value = getattr(model_config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    limit = getattr(tokenizer, "model_max_length", None)
    return limit if isinstance(limit, int) and limit < 1_000_000 else None
