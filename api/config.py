"""The trainer's configuration: the FineTuneJob's own spec sections, plus what the operator resolves.

The operator renders a FineTuneJob into one config file (JSON, camelCase keys) and the trainer reads
it with `config_from_dict` (after reading JSON or YAML). The sections that define the run (`model`, `dataset`, `method`,
`hyperparameters`, `training`, `evaluation`) are the spec's own typed models
(`kubetune.api.finetunejob`): one definition, so a value the API server accepts is one the trainer
accepts, with the same defaults and the same rules across fields. The operator adds `output` (folders
inside the pod), `job` (identity and lineage) and `tracking` (MLflow, defaults filled in), and turns
storage URIs into paths (`pvc://claim/x` becomes `/mnt/pvc/claim/x`); `model.source` is always set (a
`fromJob` is resolved to the earlier job's model before the config is written).

Every problem is collected and reported at once, by field path, in one `ConfigError`::

    hyperparameters.learningRate: must be > 0 and <= 1, got -1
    dataset.format: must be one of "text", "prompt_completion", "chat", "classification", got "qa"

Standard library only, like the rest of `kubetune.api`: the operator imports it to check what it
renders, the trainer to read it.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Final

from kubetune.api import layout, schema
from kubetune.api.finetunejob import (
    DatasetSpec,
    EvaluationSpec,
    Hyperparameters,
    MethodSpec,
    ModelSpec,
    RUN_RULES,
    TrackingSpec,
    TrainingSpec,
)
from kubetune.api.schema import AUTO, MinLength, rules

SYNTHETIC_TEMPLATE_PLACEHOLDERS: Final = ("text", "prompt", "label")
"""`{text}`/`{prompt}`: the seed example's input side; `{label}`: its label (classification only)."""
SAMPLE_MAX_NEW_TOKENS: Final = 64
"""Longest sample answer, in tokens: enough to see what a model says, bounded so it costs seconds."""

__all__ = ["AUTO", "ConfigError", "TrainerConfig", "config_from_dict", "config_to_dict"]


class ConfigError(ValueError):
    """The config cannot be used; `problems` lists each one as "field.path: what is wrong"."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        noun = "problem" if len(problems) == 1 else "problems"
        super().__init__(f"invalid trainer config ({len(problems)} {noun}):\n  " + "\n  ".join(problems))


NonBlank = Annotated[str, MinLength(1)]


@dataclasses.dataclass(frozen=True)
class OutputConfig:
    """Where the run writes, as folders inside the pod."""

    dir: NonBlank
    """Folder the trainer writes the model, metrics, model card and loss curve to."""
    checkpoint_dir: NonBlank | None = None
    """Where checkpoints go; default `<dir>/checkpoints`."""
    uri: NonBlank | None = None
    """An `s3://` location the run's outputs are mirrored to (`output.storage` in object storage):
    `dir` is then local scratch space, checkpoints are uploaded as they are saved and read back on
    resume, and everything else is uploaded at the end."""

    @property
    def checkpoint_path(self) -> Path:
        return Path(self.checkpoint_dir or layout.checkpoints_location(self.dir))


@dataclasses.dataclass(frozen=True)
class LineageEntry:
    """One model in the chain the base model came from."""

    job: str = ""
    """The FineTuneJob that produced the model; empty for the original base model."""
    uri: str = ""
    """Where the model is (a storage URI or hub id)."""
    digest: str = ""
    """Its content digest, when known."""


@dataclasses.dataclass(frozen=True)
class JobIdentity:
    """The FineTuneJob a run belongs to, echoed in its progress reports."""

    namespace: str = ""
    """Namespace of the FineTuneJob this run belongs to."""
    name: str = ""
    """Name of the FineTuneJob."""
    uid: str = ""
    """UID of the FineTuneJob (reports for a recreated job with the same name are told apart)."""
    lineage: list[LineageEntry] = dataclasses.field(default_factory=list)
    """Where the base model came from, oldest first (`job`, `uri`, `digest` each): the original base
    model, then each FineTuneJob trained on from it; written into the model card."""


def template_placeholders(template: str) -> list[str]:
    """The `{name}` placeholders in a synthetic prompt template, in order (other braces are literal)."""
    return re.findall(r"\{([A-Za-z_][A-Za-z0-9_]*)\}", template)


@rules(*RUN_RULES)
@dataclasses.dataclass(frozen=True)
class TrainerConfig:
    """The trainer config file: the spec's run-defining sections and what the operator resolves."""

    model: ModelSpec
    """The base model (`source` a path inside the pod, a hub id or an `s3://` folder)."""
    dataset: DatasetSpec
    """The data and how to prepare it (sources are paths inside the pod, URLs or `s3://` keys)."""
    output: OutputConfig
    """Where results go."""
    method: MethodSpec = dataclasses.field(default_factory=MethodSpec)
    """Full fine-tuning or LoRA."""
    hyperparameters: Hyperparameters = dataclasses.field(default_factory=Hyperparameters)
    """Optimisation settings; any may be automatic."""
    training: TrainingSpec = dataclasses.field(default_factory=TrainingSpec)
    """Precision, evaluation cadence, early stopping and checkpoints."""
    evaluation: EvaluationSpec = dataclasses.field(default_factory=EvaluationSpec)
    """Test-split evaluation."""
    job: JobIdentity = dataclasses.field(default_factory=JobIdentity)
    """Identity of the job, echoed in progress reports."""
    tracking: TrackingSpec = dataclasses.field(default_factory=TrackingSpec)
    """Experiment tracking (MLflow), the spec's section with the experiment and run name filled in;
    best effort, it never fails training. Credentials come from the environment (`MLFLOW_TRACKING_TOKEN`,
    or `MLFLOW_TRACKING_USERNAME` and `MLFLOW_TRACKING_PASSWORD`), never from the config."""


def _trainer_problems(config: TrainerConfig) -> list[str]:
    """What the trainer needs beyond the spec's rules: a resolved model source and prompt-template
    placeholders it can fill (CEL cannot list a string's placeholders, so the API
    server only checks `{label}`; the validation Job reports the others before any GPU is asked for)."""
    problems = []
    if config.model.source is None:
        problems.append("model.source: required: where the base model is (the operator resolves "
                        "spec.model.fromJob into it)")
    template = config.dataset.augmentation.synthetic.prompt_template or ""
    problems.extend(f"dataset.augmentation.synthetic.promptTemplate: unknown placeholder {{{name}}}; "
                    "allowed: {text}, {prompt}, {label}"
                    for name in template_placeholders(template) if name not in SYNTHETIC_TEMPLATE_PLACEHOLDERS)
    return problems


def config_from_dict(data: Any) -> TrainerConfig:
    """Validate a config mapping (camelCase keys) and return it typed; ConfigError lists every problem."""
    if not isinstance(data, Mapping):
        raise ConfigError([f"(top level): must be a mapping of sections, got {json.dumps(data, default=repr)}"])
    try:
        config = schema.parse(TrainerConfig, data, "")
    except schema.ValidationError as error:
        raise ConfigError([problem.removeprefix(".") for problem in error.problems]) from None
    problems = _trainer_problems(config)
    if problems:
        raise ConfigError(problems)
    return config


def config_to_dict(section: Any) -> Any:
    """A config (or section) as plain data with camelCase keys: what `config_from_dict` reads back."""
    return schema.to_dict(section)
