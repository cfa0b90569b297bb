"""The trainer's configuration: typed sections, validation, and the contract constants.

The operator renders a FineTuneJob's spec into one config file (JSON or YAML,
camelCase keys, the same vocabulary as the spec) and the trainer reads it with
`load_config(path)`. Every problem is collected and reported at once, by field
path, in one `ConfigError`::

    hyperparameters.learningRate: must be a number > 0 or "auto", got -1
    dataset.format: must be one of "text", "prompt_completion", "chat", "classification", got "qa"

This module imports no torch (nor anything heavy): the operator imports it to
render and pre-validate configs, and `test_trainer_config` checks that.

Python attributes are snake_case; file keys are their camelCase spelling
(`gradient_accumulation_steps` <-> `gradientAccumulationSteps`), see `camel_case`.
"""

from __future__ import annotations

import dataclasses
import json
import re
import types
import typing
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Final, Literal, Union

from kubetune.api import layout, process

# --- Contract constants ---------------------------------------------------------

# Exit codes and env names are defined once, in kubetune.api.process, for the operator and the trainer.
EXIT_OK = process.EXIT_OK
EXIT_PERMANENT = process.EXIT_PERMANENT
EXIT_PREEMPTED = process.EXIT_PREEMPTED
ENV_PROGRESS_URL = process.ENV_PROGRESS_URL
ENV_PROGRESS_TOKEN = process.ENV_PROGRESS_TOKEN
ENV_PROGRESS_CA = process.ENV_PROGRESS_CA
ENV_ATTEMPT = process.ENV_ATTEMPT
ENV_MLFLOW_TOKEN = process.ENV_MLFLOW_TOKEN
ENV_MLFLOW_USERNAME = process.ENV_MLFLOW_USERNAME
ENV_MLFLOW_PASSWORD = process.ENV_MLFLOW_PASSWORD
ENV_TERMINATION_LOG = process.ENV_TERMINATION_LOG
DEFAULT_TERMINATION_LOG = process.DEFAULT_TERMINATION_LOG
ENV_NUM_PROCESSES = process.ENV_NUM_PROCESSES
ENV_NUM_NODES = process.ENV_NUM_NODES
ENV_DEVICE = process.ENV_DEVICE
ENV_NODE_RANK = process.ENV_NODE_RANK
ENV_MASTER_ADDR = process.ENV_MASTER_ADDR
ENV_MASTER_PORT = process.ENV_MASTER_PORT
DEFAULT_MASTER_PORT = process.DEFAULT_MASTER_PORT

AUTO: Final = "auto"
Auto = Literal["auto"]

DataFormat = Literal["text", "prompt_completion", "chat", "classification"]
FileFormat = Literal["auto", "jsonl", "json", "csv", "parquet", "txt"]
ImbalanceStrategy = Literal["none", "oversample", "undersample", "classWeights"]
MethodType = Literal["full", "lora"]
Scheduler = Literal["auto", "linear", "cosine", "constant", "constantWithWarmup"]
Precision = Literal["auto", "bf16", "fp16", "fp32"]
Strategy = Literal["ddp", "fsdp"]
EarlyStoppingMetric = Literal["valLoss", "valPerplexity", "valAccuracy", "valF1"]
EvaluationMetric = Literal["perplexity", "tokenAccuracy", "accuracy", "precision", "recall", "f1"]
AugmentationOperation = Literal["wordDeletion", "wordSwap", "wordInsertion", "charNoise"]
AUGMENTATION_OPERATIONS: Final[tuple[AugmentationOperation, ...]] = (
    "wordDeletion", "wordSwap", "wordInsertion", "charNoise"
)
EDIT_AUGMENTATION_FORMATS: Final = ("text", "classification")
"""Formats whose text the edit operations change (the label is copied). Prompt/completion and chat
data get synthetic examples only: an edited prompt could ask a different question than the
completion answers."""
SYNTHETIC_TEMPLATE_PLACEHOLDERS: Final = ("text", "prompt", "label")
"""`{text}`/`{prompt}`: the seed example's input side; `{label}`: its label (classification only)."""
MAX_SAMPLES: Final = 20
"""Most sample answers (`evaluation.samples`) a run writes: each costs two greedy generations."""
SAMPLE_MAX_NEW_TOKENS: Final = 64
"""Longest sample answer, in tokens: enough to see what a model says, bounded so it costs seconds."""


class ConfigError(ValueError):
    """The config cannot be used; `problems` lists each one as "field.path: what is wrong"."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        noun = "problem" if len(problems) == 1 else "problems"
        super().__init__(f"invalid trainer config ({len(problems)} {noun}):\n  " + "\n  ".join(problems))


# --- Field checks ---------------------------------------------------------------

Check = Callable[[Any], "str | None"]
"""A value check: returns None when fine, else what the value must be."""


def _positive(value: Any) -> str | None:
    return None if value > 0 else "must be > 0"


def _epochs(value: Any) -> str | None:
    # The bounds of the FineTuneJob's spec.hyperparameters.epochs: a config the trainer accepts
    # is one the API server accepts too.
    return None if 1 <= value <= 1000 else "must be from 1 to 1000"


def _non_negative(value: Any) -> str | None:
    return None if value >= 0 else "must be >= 0"


def _fraction(value: Any) -> str | None:
    return None if 0 <= value < 1 else "must be in [0, 1)"


def _open_fraction(value: Any) -> str | None:
    return None if 0 < value <= 1 else "must be in (0, 1]"


def _not_blank(value: Any) -> str | None:
    return None if value.strip() else "must not be empty"


def _edit_rate(value: Any) -> str | None:
    return None if 0 < value <= 0.5 else "must be in (0, 0.5]"


def _multiplier(value: Any) -> str | None:
    return None if 1 <= value <= 10 else "must be from 1 to 10"


def _not_empty_list(value: Any) -> str | None:
    return None if value else "must name at least one operation"


def _sample_count(value: Any) -> str | None:
    return None if 0 <= value <= MAX_SAMPLES else f"must be from 0 to {MAX_SAMPLES}"


def _field(default: Any = dataclasses.MISSING, *, check: Check | None = None, factory: Any = None) -> Any:
    metadata = {"check": check} if check else {}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


# --- Sections --------------------------------------------------------------------


@dataclasses.dataclass
class ModelConfig:
    source: str = _field(check=_not_blank)
    """Base model: a local folder (a PVC mount in a pod), a hub id `org/name` (or `hf://org/name`), or a GGUF folder."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) when `source` is a hub id."""
    gguf_file: str | None = None
    """File name of a GGUF checkpoint inside `source`; transformers dequantises it on load."""
    trust_remote_code: bool = False
    """Allow model code shipped with the checkpoint to run. Off: it runs arbitrary Python."""
    from_job: str | None = None
    """The earlier FineTuneJob whose model `source` is (the operator resolves `spec.model.fromJob` into
    `source`); named in the model card."""


@dataclasses.dataclass
class DataSource:
    source: str = _field(check=_not_blank)
    """Local path (or PVC mount), `http(s)://` URL or `s3://bucket/key`."""
    file_format: FileFormat = "auto"
    """How to parse the file; `auto` picks from the extension (.jsonl/.json/.csv/.parquet/.txt)."""


@dataclasses.dataclass
class FieldNames:
    text: str = "text"
    """Column holding the text (formats `text` and `classification`)."""
    prompt: str = "prompt"
    """Column holding the prompt (format `prompt_completion`)."""
    completion: str = "completion"
    """Column holding the completion: the only tokens the loss is computed on."""
    messages: str = "messages"
    """Column holding a list of {role, content} messages (format `chat`)."""
    label: str = "label"
    """Column holding the class label (format `classification`)."""


@dataclasses.dataclass
class Cleaning:
    normalize_whitespace: bool = True
    """Collapse runs of spaces/tabs, strip each line and the ends; keeps paragraph breaks."""
    drop_empty: bool = True
    """Drop records whose text is empty after normalisation."""
    min_chars: int = _field(1, check=_non_negative)
    """Drop records shorter than this many characters (after normalisation)."""
    max_chars: int = _field(0, check=_non_negative)
    """Drop records longer than this many characters; 0 means no limit."""
    dedupe: bool = True
    """Drop exact duplicates (same fields after normalisation), keeping the first."""


@dataclasses.dataclass
class Split:
    validation: float = _field(0.1, check=_fraction)
    """Fraction of train data held out for validation when no validation source is given."""
    test: float = _field(0.1, check=_fraction)
    """Fraction held out for the final test evaluation when no test source is given."""
    seed: int = 42
    """Shuffle seed: the same seed gives the same split."""
    stratify: bool = True
    """Keep label proportions equal across splits (classification only)."""


@dataclasses.dataclass
class Imbalance:
    strategy: ImbalanceStrategy = "none"
    """Classification only: repeat minority examples (`oversample`), drop majority ones
    (`undersample`), or weight each example's loss by its inverse class frequency (`classWeights`)."""


@dataclasses.dataclass
class Curriculum:
    enabled: bool = False
    """Train on a growing, easiest-first (shortest-first) fraction of the data."""
    start_fraction: float = _field(0.25, check=_open_fraction)
    """Fraction of the training set used in the first epoch."""
    epochs_to_full: int = _field(1, check=_positive)
    """Epochs over which the fraction grows linearly to 1."""


@dataclasses.dataclass
class SyntheticAugmentation:
    enabled: bool = False
    """Add examples written by a language model from `promptTemplate`, one per sampled training
    example; the seed example's target side (label, completion, assistant turns) is copied."""
    model: str | None = None
    """Generator model folder or hub id. Absent: the base model (`model` section, GGUF included)."""
    prompt_template: str | None = None
    """What the generator is asked, with placeholders `{text}` (or `{prompt}`: the seed example's
    input side) and `{label}` (classification). Required when enabled."""
    count: int = _field(100, check=_positive)
    """Examples to generate; those the filters drop are not replaced."""
    max_new_tokens: int = _field(64, check=_positive)
    """Longest generation, in tokens."""
    min_chars: int = _field(8, check=_non_negative)
    """Drop generations shorter than this (after whitespace normalisation)."""
    max_chars: int = _field(0, check=_non_negative)
    """Drop generations longer than this; 0 means no limit."""
    temperature: float = _field(0.8, check=_non_negative)
    """Sampling temperature; 0 means greedy decoding."""
    chat_template: bool = False
    """Send the filled template as one user message through the generator's chat template
    (instruct models); false sends it as plain text."""


@dataclasses.dataclass
class Augmentation:
    enabled: bool = False
    """Add edited copies of the training examples (formats text and classification)."""
    operations: list[AugmentationOperation] = _field(
        factory=lambda: list(AUGMENTATION_OPERATIONS), check=_not_empty_list
    )
    """Edits to draw from, one per copy: `wordDeletion`, `wordSwap`, `wordInsertion` (words from
    the training split's own vocabulary), `charNoise` (typos)."""
    rate: float = _field(0.1, check=_edit_rate)
    """Fraction of the words (characters for charNoise) edited in a copy; at least one edit."""
    multiplier: int = _field(1, check=_multiplier)
    """Edited copies added per real training example (1 doubles the training split)."""
    seed: int = 42
    """Seed of every random choice; the same seed and data give the same examples."""
    synthetic: SyntheticAugmentation = _field(factory=SyntheticAugmentation)
    """Model-generated examples (any format)."""


@dataclasses.dataclass
class DatasetConfig:
    train: DataSource = _field()
    """Training data (required)."""
    format: DataFormat = "text"
    """Record shape: `text`, `prompt_completion`, `chat` (messages rendered with the
    model's chat template) or `classification` (text + label)."""
    validation: DataSource | None = None
    """Validation data; when absent, `split.validation` of the train data is held out."""
    test: DataSource | None = None
    """Test data; when absent, `split.test` of the train data is held out."""
    fields: FieldNames = _field(factory=FieldNames)
    """Column names in the data files."""
    labels: list[str] | None = None
    """Classification label set; records with other labels are an error. Absent: the
    labels found in the training data."""
    cleaning: Cleaning = _field(factory=Cleaning)
    """Record cleaning before splitting."""
    split: Split = _field(factory=Split)
    """Train/validation/test split of the train data."""
    imbalance: Imbalance = _field(factory=Imbalance)
    """Class imbalance handling (classification only)."""
    curriculum: Curriculum = _field(factory=Curriculum)
    """Optional curriculum over epochs."""
    augmentation: Augmentation = _field(factory=Augmentation)
    """Optional augmentation of the training split only (validation and test stay untouched)."""


@dataclasses.dataclass
class LoraSettings:
    rank: int = _field(8, check=_positive)
    """LoRA rank r: adapter capacity. 8 suits most instruction tuning."""
    alpha: float = _field(16, check=_positive)
    """LoRA scaling alpha; the update is scaled by alpha / rank."""
    dropout: float = _field(0.05, check=_fraction)
    """Dropout on the adapter input."""
    target_modules: list[str] = _field(factory=list)
    """Module names to adapt; empty means the default for the architecture (attention projections)."""
    merge: bool = True
    """Merge adapters into the saved model (true) or save them separately in `adapter/` (false)."""


@dataclasses.dataclass
class MethodConfig:
    type: MethodType = "lora"
    """`full` updates every weight; `lora` trains small low-rank adapters (far less memory)."""
    lora: LoraSettings = _field(factory=LoraSettings)
    """LoRA settings (used when type is `lora`)."""


@dataclasses.dataclass
class Hyperparameters:
    epochs: int | Auto = _field(AUTO, check=_epochs)
    """Passes over the training data: a whole number from 1 to 1000, as the FineTuneJob spec allows.
    auto: from dataset size, see docs/trainer.md (it may resolve to a fraction on large datasets)."""
    batch_size: int | Auto = _field(AUTO, check=_positive)
    """Per-device micro-batch, in sequences. auto: from model size and sequence length."""
    learning_rate: float | Auto = _field(AUTO, check=_positive)
    """Peak learning rate. auto: 2e-4 for LoRA, 2e-5 (smaller for bigger models) for full."""
    scheduler: Scheduler = AUTO
    """Learning-rate schedule after warmup. auto: cosine."""
    warmup_ratio: float | Auto = _field(AUTO, check=_fraction)
    """Fraction of the steps spent warming up linearly from 0. auto: 0.03 (at least 1 step)."""
    weight_decay: float | Auto = _field(AUTO, check=_non_negative)
    """AdamW weight decay (not applied to biases and norms). auto: 0.0 for LoRA, 0.01 for full."""
    dropout: float | Auto = _field(AUTO, check=_fraction)
    """Override the model's dropout probabilities. auto: keep the model's own."""
    max_seq_length: int | Auto = _field(AUTO, check=_positive)
    """Tokens per training sequence. auto: min(model context, 1024, longest record rounded up)."""
    gradient_accumulation_steps: int | Auto = _field(AUTO, check=_positive)
    """Micro-batches per optimizer step. auto: enough to reach ~16 sequences per step."""
    seed: int | Auto = AUTO
    """Seed for weights init of adapters, data order and dropout. auto: 42."""


@dataclasses.dataclass
class EarlyStopping:
    enabled: bool = False
    """Stop when the metric has not improved for `patience` evaluations."""
    metric: EarlyStoppingMetric = "valLoss"
    """What to watch; loss and perplexity are minimised, accuracy and macro-F1 (classification) maximised."""
    patience: int = _field(3, check=_positive)
    """Evaluations without improvement before stopping."""
    min_delta: float = _field(0.0, check=_non_negative)
    """Smallest change that counts as an improvement."""


@dataclasses.dataclass
class TrainingConfig:
    precision: Precision = AUTO
    """Mixed precision. auto: bf16 on GPUs that support it, else fp16 on GPUs, fp32 on CPU."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass: less memory, ~30% slower."""
    eval_interval: int = _field(0, check=_non_negative)
    """Validate every this many optimizer steps; 0 means once per epoch."""
    early_stopping: EarlyStopping = _field(factory=EarlyStopping)
    """Early stopping on a validation metric."""
    checkpoint_interval: int = _field(0, check=_non_negative)
    """Save a checkpoint every this many steps; 0 means at every evaluation."""
    keep_checkpoints: int = _field(2, check=_positive)
    """Most recent periodic checkpoints kept on disk."""
    keep_best: bool = True
    """Also keep the best checkpoint by the early-stopping metric, and save that model at the end."""
    packing: bool = True
    """Pack short examples into full sequences (no padding); attention does not cross examples."""
    compile: bool = False
    """Compile the model with torch.compile (dynamic shapes): faster steps on GPUs after a compilation
    of a minute or more at start; off by default, where the compilation costs more than it saves."""
    strategy: Strategy = "ddp"
    """Data parallelism across the run's processes: `ddp` keeps a full model copy on every device and
    averages gradients; `fsdp` shards parameters, gradients and optimizer state over the devices (full
    fine-tuning of models that do not fit one device). One process: no difference. This release refuses
    fsdp on more than one process (exit 78 naming this field): sharded checkpoints are not built yet."""


@dataclasses.dataclass
class EvaluationConfig:
    metrics: list[EvaluationMetric] = _field(factory=list)
    """Extra test metrics; perplexity and token accuracy are always computed, and
    accuracy/precision/recall/f1 always for classification."""
    max_test_examples: int = _field(0, check=_non_negative)
    """Cap on test examples evaluated; 0 means all."""
    baseline: bool = True
    """Also evaluate the base model on the same test split before training (same tokenisation,
    prompt formatting and metrics), so the results say whether fine-tuning helped. Costs one
    evaluation pass; false skips it."""
    samples: int = _field(0, check=_sample_count)
    """Test prompts answered by the base model (before training) and the tuned model (after),
    greedy and at most `SAMPLE_MAX_NEW_TOKENS` tokens each, written to `samples.json`; 0 means none."""


@dataclasses.dataclass
class OutputConfig:
    dir: str = _field(check=_not_blank)
    """Folder the trainer writes the model, metrics, model card and loss curve to."""
    checkpoint_dir: str | None = None
    """Where checkpoints go; default `<dir>/checkpoints`."""
    uri: str | None = None
    """An `s3://` location the run's outputs are mirrored to (`output.storage` in object storage):
    `dir` is then local scratch space, checkpoints are uploaded as they are saved and read back on
    resume, and everything else is uploaded at the end."""

    @property
    def checkpoint_path(self) -> Path:
        return Path(self.checkpoint_dir or layout.checkpoints_location(self.dir))


def _http_url(value: Any) -> str | None:
    if not isinstance(value, str) or not value.startswith(("http://", "https://")) or len(value) <= len("https://"):
        return "must be an http:// or https:// URL"
    if "@" in value.split("://", 1)[1].split("/", 1)[0]:
        return "must not carry credentials (user:password@): they come from spec.credentials.mlflow"
    return None


@dataclasses.dataclass
class MlflowConfig:
    tracking_uri: str = _field(check=_http_url)
    """Base URL of the MLflow tracking server (REST API and `mlflow-artifacts` proxy), e.g.
    `http://mlflow.mlflow:5000`. Credentials come from the environment (`MLFLOW_TRACKING_TOKEN`, or
    `MLFLOW_TRACKING_USERNAME` and `MLFLOW_TRACKING_PASSWORD`), never from the config."""
    experiment: str = ""
    """Experiment name; empty: the job's namespace (created when missing)."""
    run_name: str = ""
    """Run name; empty: the job's name."""


@dataclasses.dataclass
class TrackingConfig:
    mlflow: MlflowConfig | None = None
    """Log the run to this MLflow server; None: no experiment tracking."""


@dataclasses.dataclass
class LineageEntry:
    job: str = ""
    """The FineTuneJob that produced the model; empty for the original base model."""
    uri: str = ""
    """Where the model is (a storage URI or hub id)."""
    digest: str = ""
    """Its content digest, when known."""


@dataclasses.dataclass
class JobIdentity:
    namespace: str = ""
    """Namespace of the FineTuneJob this run belongs to."""
    name: str = ""
    """Name of the FineTuneJob."""
    uid: str = ""
    """UID of the FineTuneJob (reports for a recreated job with the same name are told apart)."""
    lineage: list[LineageEntry] = dataclasses.field(default_factory=list)
    """Where the base model came from, oldest first (`job`, `uri`, `digest` each): the original base
    model, then each FineTuneJob trained on from it; written into the model card."""


@dataclasses.dataclass
class TrainerConfig:
    model: ModelConfig = _field()
    """The base model."""
    dataset: DatasetConfig = _field()
    """The data and how to prepare it."""
    output: OutputConfig = _field()
    """Where results go."""
    method: MethodConfig = _field(factory=MethodConfig)
    """Full fine-tuning or LoRA."""
    hyperparameters: Hyperparameters = _field(factory=Hyperparameters)
    """Optimisation settings; any may be `auto`."""
    training: TrainingConfig = _field(factory=TrainingConfig)
    """Precision, evaluation cadence, early stopping and checkpoints."""
    evaluation: EvaluationConfig = _field(factory=EvaluationConfig)
    """Test-split evaluation."""
    job: JobIdentity = _field(factory=JobIdentity)
    """Identity of the job, echoed in progress reports."""
    tracking: TrackingConfig = _field(factory=TrackingConfig)
    """Experiment tracking (MLflow); best effort, it never fails training."""


# --- Parsing ---------------------------------------------------------------------

_SCALAR_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def _describe(value: Any) -> str:
    return json.dumps(value) if isinstance(value, (str, int, float, bool, type(None))) else repr(value)


def _type_name(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    if origin is Literal:
        options = typing.get_args(annotation)
        return json.dumps(options[0]) if len(options) == 1 else "one of " + ", ".join(json.dumps(a) for a in options)
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(annotation) if a is not type(None))
    if origin is list:
        return f"a list of {_type_name(typing.get_args(annotation)[0]).removeprefix('a ').removeprefix('an ')}s"
    if dataclasses.is_dataclass(annotation):
        return "a mapping"
    return _SCALAR_NAMES.get(annotation, str(annotation))


_NO_MATCH = object()


def _convert(annotation: Any, value: Any, path: str, problems: list[str]) -> Any:
    """Convert `value` to `annotation`, or append a problem and return _NO_MATCH."""
    origin = typing.get_origin(annotation)
    if origin in (Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        for option in options:
            if option is type(None):
                continue
            attempt: list[str] = []
            result = _convert(option, value, path, attempt)
            if not attempt:
                return result
            if dataclasses.is_dataclass(option) and isinstance(value, Mapping):
                problems.extend(attempt)  # right shape, wrong contents: report the inner problems
                return _NO_MATCH
    elif origin is Literal:
        if value in typing.get_args(annotation) and isinstance(value, str):
            return value
    elif origin is list:
        if isinstance(value, list):
            (item_type,) = typing.get_args(annotation)
            items = [_convert(item_type, item, f"{path}[{i}]", problems) for i, item in enumerate(value)]
            return items if _NO_MATCH not in items else _NO_MATCH
    elif dataclasses.is_dataclass(annotation):
        if isinstance(value, Mapping):
            return _parse_section(annotation, value, path, problems)
    elif annotation is bool:
        if isinstance(value, bool):
            return value
    elif annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif annotation is str:
        if isinstance(value, str):
            return value
    problems.append(f"{path}: must be {_type_name(annotation)}, got {_describe(value)}")
    return _NO_MATCH


def camel_case(name: str) -> str:
    """The config-file key for a Python attribute: `max_seq_length` -> `maxSeqLength`."""
    head, *rest = name.split("_")
    return head + "".join(part.capitalize() for part in rest)


def _parse_section(cls: Any, data: Mapping[str, Any], path: str, problems: list[str]) -> Any:
    """Build dataclass `cls` from `data`, appending every problem found under `path`."""
    hints = typing.get_type_hints(cls)
    keys = {camel_case(f.name): f for f in dataclasses.fields(cls)}
    prefix = f"{path}." if path else ""
    for key in data:
        if key not in keys:
            problems.append(f"{prefix}{key}: unknown field; allowed: {', '.join(sorted(keys))}")
    values: dict[str, Any] = {}
    for key, field in keys.items():
        field_path = f"{prefix}{key}"
        annotation = hints[field.name]
        optional = type(None) in typing.get_args(annotation)
        if key not in data or (data[key] is None and not optional):
            required = field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING
            if required:
                problems.append(f"{field_path}: required")
            continue
        before = len(problems)
        value = _convert(annotation, data[key], field_path, problems)
        if value is _NO_MATCH or len(problems) > before:
            continue
        check = field.metadata.get("check")
        if check is not None and value is not None and value != AUTO:
            complaint = check(value)
            if complaint:
                suffix = ' or "auto"' if Auto in typing.get_args(annotation) else ""
                problems.append(f"{field_path}: {complaint}{suffix}, got {_describe(data[key])}")
                continue
        values[field.name] = value
    try:
        return cls(**values)
    except TypeError:  # a required field was missing: already reported
        return None


def _cross_field_problems(config: TrainerConfig) -> list[str]:
    """Rules that involve more than one field."""
    problems = []
    dataset = config.dataset
    held_out = (0.0 if dataset.validation else dataset.split.validation) + (0.0 if dataset.test else dataset.split.test)
    if held_out >= 1:
        problems.append(
            f"dataset.split: validation + test must leave some training data (< 1), got {held_out:g}"
        )
    if dataset.format != "classification":
        if dataset.imbalance.strategy != "none":
            problems.append(
                f"dataset.imbalance.strategy: only applies to format classification, "
                f"got {dataset.imbalance.strategy!r} with format {dataset.format!r}"
            )
        if dataset.labels is not None:
            problems.append(f"dataset.labels: only applies to format classification, got format {dataset.format!r}")
    if dataset.labels is not None:
        if len(dataset.labels) < 2:
            problems.append(f"dataset.labels: a classification needs at least 2 labels, got {len(dataset.labels)}")
        if len(set(dataset.labels)) != len(dataset.labels):
            problems.append("dataset.labels: labels must be unique")
    cleaning = dataset.cleaning
    if cleaning.max_chars and cleaning.max_chars < cleaning.min_chars:
        problems.append(
            f"dataset.cleaning.maxChars: must be 0 (no limit) or >= minChars ({cleaning.min_chars}), got {cleaning.max_chars}"
        )
    problems.extend(_augmentation_problems(dataset))
    stopping = config.training.early_stopping
    if stopping.metric in ("valAccuracy", "valF1") and stopping.enabled:
        if dataset.format != "classification":
            problems.append(f"training.earlyStopping.metric: {stopping.metric} needs format classification")
    return problems


def template_placeholders(template: str) -> list[str]:
    """The `{name}` placeholders in a synthetic prompt template, in order (other braces are literal)."""
    return re.findall(r"\{([A-Za-z_][A-Za-z0-9_]*)\}", template)


def _augmentation_problems(dataset: DatasetConfig) -> list[str]:
    problems = []
    augmentation = dataset.augmentation
    if augmentation.enabled and dataset.format not in EDIT_AUGMENTATION_FORMATS:
        problems.append(
            f"dataset.augmentation.enabled: edit operations apply only to formats text and classification, "
            f"got format {dataset.format!r}; use dataset.augmentation.synthetic for {dataset.format} data"
        )
    synthetic = augmentation.synthetic
    template = synthetic.prompt_template
    if synthetic.enabled and (template is None or not template.strip()):
        problems.append("dataset.augmentation.synthetic.promptTemplate: required when synthetic.enabled is true")
    if template is not None:
        for name in template_placeholders(template):
            if name not in SYNTHETIC_TEMPLATE_PLACEHOLDERS:
                problems.append(
                    f"dataset.augmentation.synthetic.promptTemplate: unknown placeholder {{{name}}}; "
                    f"allowed: {{text}}, {{prompt}}, {{label}}"
                )
            elif name == "label" and dataset.format != "classification":
                problems.append(
                    f"dataset.augmentation.synthetic.promptTemplate: {{label}} needs format classification, "
                    f"got format {dataset.format!r}"
                )
    if synthetic.max_chars and synthetic.max_chars < synthetic.min_chars:
        problems.append(
            f"dataset.augmentation.synthetic.maxChars: must be 0 (no limit) or >= minChars "
            f"({synthetic.min_chars}), got {synthetic.max_chars}"
        )
    return problems


def config_from_dict(data: Mapping[str, Any]) -> TrainerConfig:
    """Validate a config mapping (camelCase keys) and return it typed; raise ConfigError listing every problem."""
    problems: list[str] = []
    if not isinstance(data, Mapping):
        raise ConfigError([f"(top level): must be a mapping of sections, got {_describe(data)}"])
    config = _parse_section(TrainerConfig, data, "", problems)
    if config is not None and not problems:
        problems.extend(_cross_field_problems(config))
    if problems:
        raise ConfigError(problems)
    return typing.cast(TrainerConfig, config)


def load_config(path: str | Path) -> TrainerConfig:
    """Read a JSON or YAML config file and validate it."""
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as error:
        raise ConfigError([f"(file) {file}: cannot read: {error.strerror or error}"]) from error
    try:
        if file.suffix == ".json":
            data = json.loads(text)
        else:
            import yaml  # YAML is a superset of JSON: it reads both

            data = yaml.safe_load(text)
    except ValueError as error:  # json.JSONDecodeError and yaml.YAMLError are ValueErrors / have str()
        raise ConfigError([f"(file) {file}: not valid JSON/YAML: {error}"]) from error
    except Exception as error:  # yaml.YAMLError is not a ValueError
        raise ConfigError([f"(file) {file}: not valid JSON/YAML: {error}"]) from error
    return config_from_dict(data)


def config_to_dict(section: Any) -> Any:
    """A config (or section) as plain data with camelCase keys: what `config_from_dict` reads back."""
    if dataclasses.is_dataclass(section) and not isinstance(section, type):
        return {camel_case(f.name): config_to_dict(getattr(section, f.name)) for f in dataclasses.fields(section)}
    if isinstance(section, list):
        return [config_to_dict(item) for item in section]
    return section
