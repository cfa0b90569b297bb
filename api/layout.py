"""What a run leaves in its output folder, and where: the one answer to "where is the model".

    <output>/model/         save_pretrained folder (safetensors + tokenizer); with LoRA + merge, the merged model
    <output>/adapter/       peft adapter + tokenizer, when LoRA adapters are saved unmerged (merge: false)
    <output>/checkpoints/   resumable checkpoints, step-<N>/ each
    <output>/metrics.json   final metrics, resolved hyperparameters, data statistics, digest

The operator calls these functions on storage URIs (`pvc://claim/path`) and on the folders a pod
mounts; the trainer on its local folder. Paths are joined with `/` (POSIX; pods and URIs both).
"""

from __future__ import annotations

from typing import Final

MODEL_FOLDER: Final = "model"
"""The finished model (merged, for LoRA with merge: true), with its tokenizer."""
ADAPTER_FOLDER: Final = "adapter"
"""An unmerged LoRA adapter, with the tokenizer; served on top of its base model."""
CHECKPOINTS_FOLDER: Final = "checkpoints"
"""Resumable checkpoints, one `step-<N>` folder each."""
METRICS_FILE: Final = "metrics.json"
"""Final metrics, resolved hyperparameters, data statistics and the model digest."""


def saves_adapter(method_type: str, merge: bool) -> bool:
    """Whether a run with this method saves a LoRA adapter rather than a whole model."""
    return method_type == "lora" and not merge


def artefact_folder(method_type: str, merge: bool) -> str:
    """The sub-folder of the output the trainer saves the finished model or adapter to."""
    return ADAPTER_FOLDER if saves_adapter(method_type, merge) else MODEL_FOLDER


def model_location(output: str, method_type: str, merge: bool) -> str:
    """Where the finished model (or adapter) of a run writing to `output` is: `<output>/model` or
    `<output>/adapter`. `output` is a folder or a storage URI; the answer is of the same kind."""
    return f"{output.rstrip('/')}/{artefact_folder(method_type, merge)}"


def is_adapter(location: str) -> bool:
    """Whether a model location (a folder or storage URI `model_location` answered) is an unmerged adapter."""
    return location.rstrip("/").endswith("/" + ADAPTER_FOLDER)


def checkpoints_location(output: str) -> str:
    """Where a run writing to `output` keeps its checkpoints by default: `<output>/checkpoints`."""
    return f"{output.rstrip('/')}/{CHECKPOINTS_FOLDER}"
