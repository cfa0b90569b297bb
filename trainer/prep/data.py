"""Data preparation: read, clean, split, rebalance, tokenise and pack.

The path a dataset takes, each step a small function:

    iter_records (local path, http(s)://, s3:// via fsspec; jsonl/json/csv/parquet/txt; streamed)
    -> to_examples (one `Example` per record, by format and field names)
    -> clean (whitespace, empty/short/long, exact duplicates; counts per reason)
    -> split_examples (train/validation/test by ratios and seed, stratified by label)
    -> check_labels (classification)
    -> augment (optional, training split only: edited copies, synthetic examples; see augment.py)
    -> rebalance (classification: oversample/undersample/class weights)
    -> tokenize_examples (loss only on completions for prompt_completion, chat, classification)
    -> pack (examples into full sequences; position ids restart at each example)

Everything the user can get wrong raises `DataError` with a message naming the
file, the record and the field; the trainer exits with the permanent-error code.

Packing and attention: packed sequences carry `position_ids` that restart at 0
for every example and no attention mask (nor a KV cache: `use_cache=False`,
else transformers skips the detection). With sdpa and eager attention,
transformers (>= 4.54) builds a dense block-diagonal causal mask (batch x 1 x
length x length) from the position ids, so tokens never attend across
examples. Flash-attention detects packed examples only in a batch of one row:
with flash_attention_2 the trainer flattens each micro-batch into one row and
passes the examples' cumulative lengths (`evaluate.collate(flatten=True)`), so
the variable-length kernel runs with no mask at all. The first token of each
example carries no loss, so no example is asked to predict its neighbour.
"""

from __future__ import annotations

import bisect
import contextlib
import csv
import dataclasses
import json
import random
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from pathlib import PurePosixPath
from typing import Any, BinaryIO
from urllib.parse import urlparse

from kubetune.api.finetunejob import Cleaning, Curriculum, DataSource, DatasetSpec, FieldNames, ModelSpec, Split
from kubetune.trainer.errors import DataError
from kubetune.trainer.prep import augment
from kubetune.trainer.prep.examples import Example, Splits, normalize_whitespace

__all__ = ["Example", "Splits", "normalize_whitespace"]  # from examples.py; callers may import them from here

IGNORE_INDEX = -100
"""Label value the loss skips (the PyTorch cross-entropy convention)."""

_EXTENSIONS = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "json",
    ".csv": "csv",
    ".parquet": "parquet",
    ".pq": "parquet",
    ".txt": "txt",
    ".text": "txt",
    ".md": "txt",
}


# --- Records ---------------------------------------------------------------------


def detect_file_format(source: DataSource) -> str:
    if source.file_format != "auto":
        return source.file_format
    path = urlparse(source.source).path if "://" in source.source else source.source
    suffix = PurePosixPath(path).suffix.lower()
    if suffix not in _EXTENSIONS:
        raise DataError(
            f"{source.source}: cannot tell the file format from the extension {suffix or '(none)'!r}; "
            f"set fileFormat to one of jsonl, json, csv, parquet, txt"
        )
    return _EXTENSIONS[suffix]


@contextlib.contextmanager
def _open(location: str, field: str = "dataset source") -> Iterator[BinaryIO]:
    """The data file as a binary stream (local path, `file://`, `http(s)://`, `s3://`); DataError when absent."""
    import fsspec

    if location.startswith("s3://"):
        with _open_s3(location, field) as handle:
            yield handle
        return
    try:
        with fsspec.open(location, "rb") as handle:
            yield handle
    except FileNotFoundError as error:
        raise DataError(f"{location}: data file not found") from error
    except IsADirectoryError as error:
        raise DataError(f"{location}: is a directory, expected a data file") from error
    except ImportError as error:  # e.g. s3:// without s3fs
        raise DataError(f"{location}: no filesystem support installed for this URL: {error}") from error


@contextlib.contextmanager
def _open_s3(location: str, field: str) -> Iterator[BinaryIO]:
    """An `s3://` data file through the pod's credentials; errors name the bucket, key or credentials."""
    from kubetune.trainer import objectstore

    fs = objectstore.filesystem()
    objectstore.check_bucket(fs, location, field)
    try:
        handle = fs.open(location, "rb")
    except Exception as error:  # noqa: BLE001 - named by objectstore.explain
        raise objectstore.explain(error, location, field) from error
    with handle:
        yield handle


def _not_utf8(location: str, offset: int, what: str = "undecodable byte") -> DataError:
    return DataError(
        f"{location}: not UTF-8 text ({what} at offset {offset}); is fileFormat right and the file uncompressed?"
    )


MAX_RECORD_CHARS = 4 * 1024 * 1024
"""Longest JSONL line or text line (characters). One record this long is not a training example but a broken
export, and tokenising it would take the validation pod's memory and minutes before failing anyway."""
_MAX_LINE_BYTES = 4 * MAX_RECORD_CHARS
"""A line is read at most this far (UTF-8 takes at most 4 bytes a character), so memory stays bounded
even when a file has no newline at all."""
_READ_BLOCK_BYTES = 1024 * 1024
"""Bytes read from a data file at a time."""
MAX_JSON_DOCUMENT_BYTES = 256 * 1024 * 1024
"""Largest `json` file (one document must be parsed whole); larger datasets belong in JSON Lines, which is
read a line at a time."""
MAX_PARQUET_ROW_GROUP_BYTES = 512 * 1024 * 1024
"""Largest uncompressed row group of a Parquet file (bytes, as its footer declares). A row group is the
unit Parquet decompresses at once; a small file that declares a huge one is a decompression bomb, and a
real one this large needs more memory than a validation pod has."""
_PARQUET_BATCH_ROWS = 1024
"""Rows converted to Python objects at a time, so a row group is never held twice."""


def _raw_lines(handle: BinaryIO, limit: int) -> Iterator[bytes]:
    """Lines of a binary stream with their b"\\n", read in blocks (fsspec's remote files have no
    bounded readline); a line longer than `limit` is cut at `limit + 1` bytes so the caller can refuse it."""
    pending = b""
    start = 0  # lines are sliced off `pending` by index: re-slicing the rest per line would be quadratic
    while True:
        end = pending.find(b"\n", start)
        if end >= 0:
            yield pending[start : end + 1]
            start = end + 1
            continue
        if len(pending) - start > limit:
            yield pending[start : start + limit + 1]
            return
        block = handle.read(_READ_BLOCK_BYTES)
        if not block:
            if start < len(pending):
                yield pending[start:]
            return
        pending = pending[start:] + block
        start = 0


def _lines(handle: BinaryIO, location: str) -> Iterator[tuple[int, str]]:
    """(line number, text with its line end) for each line, split on \\n only (U+2028, U+0085 and \\r
    are text, as JSON Lines and RFC 8259 say), read one at a time and bounded by `MAX_RECORD_CHARS`."""
    offset = 0
    number = 0
    for raw in _raw_lines(handle, _MAX_LINE_BYTES):
        number += 1
        if len(raw) > _MAX_LINE_BYTES and not raw.endswith(b"\n"):
            raise DataError(
                f"{location}: line {number} is over {_MAX_LINE_BYTES} bytes long; a record may have at most "
                f"{MAX_RECORD_CHARS} characters (is the file one JSON document rather than JSON Lines, or without line ends?)"
            )
        nul = raw.find(b"\0")
        if nul >= 0:  # valid text never holds NUL; binary and UTF-16 files do
            raise _not_utf8(location, offset + nul, "NUL byte")
        try:
            text = raw.decode("utf-8-sig" if number == 1 else "utf-8")
        except UnicodeDecodeError as error:
            raise _not_utf8(location, offset + error.start) from error
        offset += len(raw)
        length = len(text) - text.endswith("\n")
        if length > MAX_RECORD_CHARS:
            raise DataError(
                f"{location}: line {number} is {length} characters long; a record may have at most "
                f"{MAX_RECORD_CHARS} (is the file one JSON document rather than JSON Lines, or without line ends?)"
            )
        yield number, text


def _json_value(text: str, what: str, *, document: bool = False) -> Any:
    """json.loads, with every way it can fail (syntax, nesting past the recursion limit, integers past
    Python's 4300-digit conversion limit) turned into a DataError naming `what`."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        where = f" (line {error.lineno})" if document else ""
        raise DataError(f"{what} is not valid JSON: {error.msg}{where}") from None
    except RecursionError:
        raise DataError(f"{what} is not usable JSON: nested too deeply") from None
    except ValueError as error:  # e.g. "Exceeds the limit (4300 digits) for integer string conversion"
        raise DataError(f"{what} is not usable JSON: {error}") from None


def _parse_jsonl(handle: BinaryIO, location: str) -> Iterator[dict[str, Any]]:
    for number, line in _lines(handle, location):
        if not line.strip():
            continue
        record = _json_value(line, f"{location}: line {number}")
        if not isinstance(record, dict):
            raise DataError(f"{location}: line {number} must be a JSON object, got {type(record).__name__}")
        yield record


def _parse_json(handle: BinaryIO, location: str) -> list[dict[str, Any]]:
    data = handle.read(MAX_JSON_DOCUMENT_BYTES + 1)
    if len(data) > MAX_JSON_DOCUMENT_BYTES:
        raise DataError(f"{location}: a JSON file may be at most {MAX_JSON_DOCUMENT_BYTES} bytes; "
                        f"use JSON Lines (one record a line, fileFormat jsonl) for larger datasets")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise _not_utf8(location, error.start) from error
    del data
    parsed = _json_value(text, location, document=True)
    if isinstance(parsed, dict):
        lists = [value for value in parsed.values() if isinstance(value, list)]
        if len(lists) != 1:
            raise DataError(f"{location}: a JSON file must hold a list of records (or an object with one list)")
        parsed = lists[0]
    if not isinstance(parsed, list) or not all(isinstance(item, dict) for item in parsed):
        raise DataError(f"{location}: a JSON file must hold a list of objects")
    return parsed


def _parse_csv(handle: BinaryIO, location: str) -> Iterator[dict[str, Any]]:
    # csv reads any iterable of lines and carries quoted fields across them; lines keep their \r\n, as
    # with open(newline=""), and come bounded and checked from _lines
    try:
        for row in csv.DictReader(text for _, text in _lines(handle, location)):
            yield dict(row)
    except csv.Error as error:
        raise DataError(f"{location}: not valid CSV: {error}") from error


def _parse_parquet(handle: BinaryIO, location: str, columns: Sequence[str] | None) -> Iterator[dict[str, Any]]:
    import pyarrow
    import pyarrow.parquet

    try:
        parquet = pyarrow.parquet.ParquetFile(handle)
        metadata = parquet.metadata
        for index in range(metadata.num_row_groups):
            size = metadata.row_group(index).total_byte_size
            if size > MAX_PARQUET_ROW_GROUP_BYTES:
                raise DataError(
                    f"{location}: row group {index} is {size} bytes uncompressed; at most "
                    f"{MAX_PARQUET_ROW_GROUP_BYTES} allowed (write the file with smaller row groups)"
                )
        present = set(parquet.schema_arrow.names)
        # Only the columns the dataset uses are decompressed; when one is missing, all are read, so the
        # error can list what the file holds.
        wanted = list(columns) if columns is not None and present.issuperset(columns) else None
        for batch in parquet.iter_batches(batch_size=_PARQUET_BATCH_ROWS, columns=wanted):
            yield from batch.to_pylist()
    except (pyarrow.ArrowException, OSError) as error:
        raise DataError(f"{location}: not a readable Parquet file: {error}") from error


def _parse_txt(handle: BinaryIO, location: str, field: str) -> Iterator[dict[str, Any]]:
    """One record per paragraph (blocks of lines separated by blank lines), read a line at a time."""
    block: list[str] = []
    for _, line in _lines(handle, location):
        if line.endswith("\n") and not line.strip():
            if block:  # a blank line ends the paragraph; its own line end is not part of it
                yield {field: "".join(block)[:-1]}
                block = []
            continue
        block.append(line)
    if block:
        yield {field: "".join(block)}


def iter_records(source: DataSource, fields: FieldNames,
                 columns: Sequence[str] | None = None, field: str = "dataset source") -> Iterator[dict[str, Any]]:
    """The records of one data file as dictionaries, read as they are needed: a line at a time (JSON
    Lines, CSV, text) or a batch of rows at a time (Parquet); only a `json` document is read whole.
    `columns`: the fields the caller uses (Parquet then reads no other column); None = all."""
    file_format = detect_file_format(source)
    with _open(source.source, field) as handle:
        if file_format == "parquet":
            yield from _parse_parquet(handle, source.source, columns)
        elif file_format == "jsonl":
            yield from _parse_jsonl(handle, source.source)
        elif file_format == "json":
            yield from _parse_json(handle, source.source)
        elif file_format == "csv":
            yield from _parse_csv(handle, source.source)
        else:
            yield from _parse_txt(handle, source.source, fields.text)


def read_records(source: DataSource, fields: FieldNames) -> list[dict[str, Any]]:
    """All records of one data file as dictionaries."""
    return list(iter_records(source, fields))


# --- Examples --------------------------------------------------------------------


def _text_field(record: dict[str, Any], name: str, setting: str, where: str) -> str:
    if name not in record or record[name] is None:
        present = ", ".join(sorted(map(str, record))) or "none"
        raise DataError(f"{where}: missing field {name!r} (dataset.fields.{setting}); fields present: {present}")
    value = record[name]
    if isinstance(value, (dict, list)):
        raise DataError(f"{where}: field {name!r} must be text, got {type(value).__name__}")
    return str(value)


def _messages_field(record: dict[str, Any], name: str, where: str) -> list[dict[str, str]]:
    raw = record.get(name)
    if raw is None:
        present = ", ".join(sorted(map(str, record))) or "none"
        raise DataError(f"{where}: missing field {name!r} (dataset.fields.messages); fields present: {present}")
    if isinstance(raw, str):  # CSV cells hold JSON text
        try:
            raw = json.loads(raw)
        except (ValueError, RecursionError) as error:  # also too deep or too large a number
            raise DataError(f"{where}: field {name!r} is text but not a JSON list of messages") from error
    if not isinstance(raw, list) or not raw:
        raise DataError(f"{where}: field {name!r} must be a non-empty list of {{role, content}} messages")
    messages = []
    for index, message in enumerate(raw):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str) or "content" not in message:
            raise DataError(f"{where}: message {index} must be an object with 'role' and 'content'")
        messages.append({"role": message["role"], "content": str(message["content"] or "")})
    return messages


def to_examples(records: Iterable[dict[str, Any]], config: DatasetSpec, origin: str) -> list[Example]:
    """One Example per record; DataError names the first record that lacks a needed field."""
    fields = config.fields
    examples = []
    for number, record in enumerate(records, start=1):
        where = f"{origin}: record {number}"
        if config.format == "text":
            examples.append(Example(completion=_text_field(record, fields.text, "text", where)))
        elif config.format == "prompt_completion":
            examples.append(
                Example(
                    prompt=_text_field(record, fields.prompt, "prompt", where),
                    completion=_text_field(record, fields.completion, "completion", where),
                )
            )
        elif config.format == "chat":
            examples.append(Example(messages=_messages_field(record, fields.messages, where)))
        else:
            label = _text_field(record, fields.label, "label", where).strip()
            text = _text_field(record, fields.text, "text", where)
            examples.append(Example(prompt=text, completion=classification_completion(label), label=label))
    return examples


def classification_prompt(text: str) -> str:
    """What the model reads before it names a label, in training and in evaluation."""
    return f"{text}\nLabel:"


def classification_completion(label: str) -> str:
    return f" {label}"


# --- Cleaning --------------------------------------------------------------------

@dataclasses.dataclass
class CleaningReport:
    """What cleaning did to one data file, by reason."""

    read: int = 0
    kept: int = 0
    empty: int = 0
    too_short: int = 0
    too_long: int = 0
    duplicate: int = 0

    def to_report(self) -> dict[str, int]:
        return {
            "read": self.read,
            "kept": self.kept,
            "droppedEmpty": self.empty,
            "droppedTooShort": self.too_short,
            "droppedTooLong": self.too_long,
            "droppedDuplicate": self.duplicate,
        }


def _normalized(example: Example) -> Example:
    if example.messages is not None:
        messages = [{"role": m["role"], "content": normalize_whitespace(m["content"])} for m in example.messages]
        return dataclasses.replace(example, messages=messages)
    prompt = normalize_whitespace(example.prompt)
    if example.label is not None:  # keep the " label" completion exactly
        return dataclasses.replace(example, prompt=prompt)
    return dataclasses.replace(example, prompt=prompt, completion=normalize_whitespace(example.completion))


def clean(examples: Iterable[Example], cleaning: Cleaning) -> tuple[list[Example], CleaningReport]:
    """Drop empty, too short, too long and duplicate examples, counting each reason."""
    report = CleaningReport()
    seen: set[tuple[Any, ...]] = set()
    kept = []
    for example in examples:
        report.read += 1
        if cleaning.normalize_whitespace:
            example = _normalized(example)
        length = example.char_length()
        if cleaning.drop_empty and not example.has_content():
            report.empty += 1
        elif length < cleaning.min_chars:
            report.too_short += 1
        elif cleaning.max_chars and length > cleaning.max_chars:
            report.too_long += 1
        elif cleaning.dedupe and example.dedupe_key() in seen:
            report.duplicate += 1
        else:
            seen.add(example.dedupe_key())
            kept.append(example)
    report.kept = len(kept)
    return kept, report


# --- Splitting, labels, imbalance ---------------------------------------------------


def _held_out_count(total: int, ratio: float) -> int:
    count = round(total * ratio)
    return 1 if ratio > 0 and count == 0 and total >= 3 else count


def split_examples(
    examples: Sequence[Example], split: Split, *, take_validation: bool, take_test: bool, stratify: bool
) -> Splits:
    """Shuffle with `split.seed` and hold out validation/test fractions (per label when stratified)."""
    rng = random.Random(split.seed)
    groups: dict[str | None, list[Example]] = {}
    for example in examples:
        groups.setdefault(example.label if stratify else None, []).append(example)
    train, validation, test = [], [], []
    for key in sorted(groups, key=str):
        group = list(groups[key])
        rng.shuffle(group)
        n_val = _held_out_count(len(group), split.validation) if take_validation else 0
        n_test = _held_out_count(len(group), split.test) if take_test else 0
        excess = n_val + n_test - (len(group) - 1)  # keep at least one training example per group
        if excess > 0:
            n_test -= min(n_test, excess)
            n_val = min(n_val, len(group) - 1 - n_test)
        validation += group[:n_val]
        test += group[n_val : n_val + n_test]
        train += group[n_val + n_test :]
    for part in (train, validation, test):
        rng.shuffle(part)
    return Splits(train=train, validation=validation, test=test)


def check_labels(splits: Splits, configured: list[str] | None) -> list[str]:
    """The label set; DataError for any example whose label is outside it."""
    labels = list(configured) if configured else sorted({e.label for e in splits.train if e.label is not None})
    allowed = set(labels)
    for name, part in (("train", splits.train), ("validation", splits.validation), ("test", splits.test)):
        unknown = Counter(e.label for e in part if e.label not in allowed)
        if unknown:
            label, count = unknown.most_common(1)[0]
            origin = "dataset.labels" if configured else "the labels seen in the training data"
            raise DataError(
                f"dataset {name} split: unknown label {label!r} in {count} record(s); "
                f"allowed by {origin}: {', '.join(map(repr, labels))}"
            )
    if len(labels) < 2:
        raise DataError(f"dataset: classification needs at least 2 labels in the training data, found {labels}")
    return labels


@dataclasses.dataclass
class ImbalanceReport:
    strategy: str
    before: dict[str, int]
    after: dict[str, int]
    class_weights: dict[str, float] = dataclasses.field(default_factory=dict)

    def to_report(self) -> dict[str, Any]:
        report: dict[str, Any] = {"strategy": self.strategy, "before": self.before, "after": self.after}
        if self.class_weights:
            report["classWeights"] = self.class_weights
        return report


def class_counts(examples: Iterable[Example], labels: Sequence[str]) -> dict[str, int]:
    counts = Counter(e.label for e in examples)
    return {label: counts.get(label, 0) for label in labels}


def rebalance(
    train: Sequence[Example], labels: Sequence[str], strategy: str, seed: int
) -> tuple[list[Example], ImbalanceReport]:
    """Oversample minority classes, undersample majority ones, or set inverse-frequency weights."""
    rng = random.Random(seed)
    before = class_counts(train, labels)
    by_label = {label: [e for e in train if e.label == label] for label in labels}
    present = {label: group for label, group in by_label.items() if group}
    weights: dict[str, float] = {}
    if strategy == "oversample":
        target = max(len(g) for g in present.values())
        result = []
        for group in present.values():
            repeats, remainder = divmod(target, len(group))
            result += group * repeats + rng.sample(group, remainder)
    elif strategy == "undersample":
        target = min(len(g) for g in present.values())
        result = [e for group in present.values() for e in rng.sample(group, target)]
    elif strategy == "classWeights":
        total, classes = len(train), len(present)
        weights = {label: total / (classes * len(group)) for label, group in present.items()}
        result = [dataclasses.replace(e, weight=weights[e.label or ""]) for e in train]
    else:
        return list(train), ImbalanceReport(strategy, before, before)
    rng.shuffle(result)
    return result, ImbalanceReport(strategy, before, class_counts(result, labels), weights)


def curriculum_fraction(epoch: int, curriculum: Curriculum) -> float:
    """Fraction of the (shortest-first) training set used in `epoch` (0-based)."""
    if not curriculum.enabled:
        return 1.0
    grown = curriculum.start_fraction + (1 - curriculum.start_fraction) * epoch / curriculum.epochs_to_full
    return min(1.0, grown)


# --- The whole preparation before tokenisation ----------------------------------------


@dataclasses.dataclass
class PreparedData:
    """Clean, split examples and what happened on the way (for metrics.json and --validate-only)."""

    splits: Splits
    labels: list[str] | None
    cleaning: dict[str, CleaningReport]
    imbalance: ImbalanceReport | None
    augmentation: dict[str, Any] | None = None
    """What augmentation added to the training split (`augment.AugmentationReport.to_report`)."""

    def statistics(self) -> dict[str, Any]:
        stats: dict[str, Any] = {
            "cleaning": {name: report.to_report() for name, report in self.cleaning.items()},
            "splits": {
                "train": len(self.splits.train),
                "validation": len(self.splits.validation),
                "test": len(self.splits.test),
            },
        }
        if self.labels is not None:
            stats["labels"] = self.labels
            stats["labelCounts"] = {
                name: class_counts(part, self.labels)
                for name, part in (("train", self.splits.train), ("validation", self.splits.validation),
                                   ("test", self.splits.test))
            }
        if self.imbalance is not None:
            stats["imbalance"] = self.imbalance.to_report()
        if self.augmentation is not None:
            stats["augmentation"] = self.augmentation
        return stats


def _used_fields(config: DatasetSpec) -> list[str]:
    fields = config.fields
    return {"text": [fields.text], "prompt_completion": [fields.prompt, fields.completion],
            "chat": [fields.messages], "classification": [fields.text, fields.label]}[config.format]


def _load_clean(source: DataSource, config: DatasetSpec, name: str) -> tuple[list[Example], CleaningReport]:
    records = iter_records(source, config.fields, _used_fields(config), f"dataset.{name}.source")  # streamed: only the examples are held, not the file
    examples, report = clean(to_examples(records, config, source.source), config.cleaning)
    if not examples:
        raise DataError(
            f"dataset.{name} ({source.source}): no records left after cleaning: {report.read} read, "
            f"{report.empty} empty, {report.too_short} shorter than minChars, "
            f"{report.too_long} longer than maxChars, {report.duplicate} duplicates"
        )
    return examples, report


def _augment_train(splits: Splits, config: DatasetSpec, base_model: ModelSpec | None) -> dict[str, Any]:
    """Replace `splits.train` by itself plus its augmented examples; the report for metrics.json."""
    generator = None
    generator_name = ""
    if config.augmentation.synthetic.enabled and base_model is not None:
        model = augment.generator_model(config, base_model)
        generator_name = model.source
        generator = augment.ModelGenerator.load(model, config.augmentation.synthetic, config.augmentation.seed)
    try:
        splits.train, report = augment.augment_training_split(splits, config, generator, generator_name)
    finally:
        if generator is not None:
            generator.close()
    return report.to_report()


def prepare(config: DatasetSpec, synthetic_model: ModelSpec | None = None) -> PreparedData:
    """Read, clean and split the dataset; check labels, augment the training split, rebalance.

    `synthetic_model` is the base model: it writes synthetic examples when
    `augmentation.synthetic` is enabled (unless that names another model); None skips them
    (--validate-only loads no weights)."""
    train, train_report = _load_clean(config.train, config, "train")
    reports = {"train": train_report}
    validation = test = None
    if config.validation is not None:
        validation, reports["validation"] = _load_clean(config.validation, config, "validation")
    if config.test is not None:
        test, reports["test"] = _load_clean(config.test, config, "test")
    classification = config.format == "classification"
    splits = split_examples(
        train,
        config.split,
        take_validation=validation is None,
        take_test=test is None,
        stratify=classification and config.split.stratify,
    )
    splits.validation = validation if validation is not None else splits.validation
    splits.test = test if test is not None else splits.test
    labels = imbalance = augmentation = None
    if classification:
        labels = check_labels(splits, config.labels)
    if config.augmentation.enabled or config.augmentation.synthetic.enabled:
        augmentation = _augment_train(splits, config, synthetic_model)
    if classification and labels is not None:
        splits.train, imbalance = rebalance(splits.train, labels, config.imbalance.strategy, config.split.seed)
    return PreparedData(splits=splits, labels=labels, cleaning=reports, imbalance=imbalance, augmentation=augmentation)


# --- Tokenisation ---------------------------------------------------------------------


@dataclasses.dataclass
class TokenizedExample:
    input_ids: list[int]
    loss_mask: list[bool]
    """True where the token is a training target."""
    weight: float = 1.0


def _chat_segments(messages: list[dict[str, str]], tokenizer: Any) -> list[tuple[str, bool]]:
    """The rendered conversation as (text, is_target) pieces: assistant turns are targets.

    Renders growing prefixes of the conversation with the model's own chat
    template, so it works with any template: the text an assistant turn adds
    after the generation prompt is exactly what the model must learn to write.
    """
    segments: list[tuple[str, bool]] = []
    done = ""
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = tokenizer.apply_chat_template(messages[:index], tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(messages[: index + 1], tokenize=False)
        if not prompt.startswith(done) or not full.startswith(prompt):
            raise DataError("dataset: the model's chat template does not render conversations incrementally")
        segments += [(prompt[len(done) :], False), (full[len(prompt) :], True)]
        done = full
    whole = tokenizer.apply_chat_template(messages, tokenize=False)
    if whole.startswith(done) and len(whole) > len(done):
        segments.append((whole[len(done) :], False))
    return [(text, target) for text, target in segments if text]


def example_segments(example: Example, tokenizer: Any) -> list[tuple[str, bool]]:
    if example.messages is not None:
        return _chat_segments(example.messages, tokenizer)
    if example.label is not None:
        return [(classification_prompt(example.prompt), False), (example.completion, True)]
    if example.prompt:
        return [(example.prompt, False), (example.completion, True)]
    return [(example.completion, True)]


def tokenize_example(example: Example, tokenizer: Any, append_eos: bool) -> TokenizedExample:
    ids: list[int] = []
    mask: list[bool] = []
    for index, (text, target) in enumerate(example_segments(example, tokenizer)):
        # Special tokens (e.g. a BOS) only at the very start; chat templates write their own.
        piece = tokenizer(text, add_special_tokens=index == 0 and example.messages is None)["input_ids"]
        ids += piece
        mask += [target] * len(piece)
    eos = tokenizer.eos_token_id
    if append_eos and eos is not None and (not ids or ids[-1] != eos):
        ids.append(eos)
        mask.append(True)
    return TokenizedExample(input_ids=ids, loss_mask=mask, weight=example.weight)


def tokenize_examples(examples: Iterable[Example], tokenizer: Any) -> list[TokenizedExample]:
    """Tokenise; plain text, completions and labels end with EOS so the model learns to stop."""
    return [tokenize_example(e, tokenizer, append_eos=e.messages is None) for e in examples]


# --- Packing ---------------------------------------------------------------------------


@dataclasses.dataclass
class PackedSequence:
    """One training row: several whole examples back to back, at most max_seq_length tokens."""

    input_ids: list[int]
    labels: list[int]
    """Target token ids, IGNORE_INDEX where no loss (prompt tokens, first token of each example)."""
    position_ids: list[int]
    """Restart at 0 for every example: the model attends only within an example."""
    weights: list[float]
    num_examples: int = 1


@dataclasses.dataclass
class PackingReport:
    sequences: int = 0
    examples: int = 0
    tokens: int = 0
    capacity: int = 0
    truncated: int = 0
    """Supervised examples cut to max_seq_length (their tail is lost)."""
    dropped_no_target: int = 0
    """Examples with no target token left after truncation."""
    chunked: int = 0
    """Plain-text examples split into several sequences."""

    def to_report(self) -> dict[str, Any]:
        return {
            "sequences": self.sequences,
            "examples": self.examples,
            "tokens": self.tokens,
            "fill": round(self.tokens / self.capacity, 4) if self.capacity else 0.0,
            "truncated": self.truncated,
            "droppedNoTarget": self.dropped_no_target,
            "chunked": self.chunked,
        }


def _fit(examples: Iterable[TokenizedExample], max_len: int, chunk: bool, report: PackingReport) -> list[TokenizedExample]:
    """Cut every example to at most max_len tokens: chunk plain text, truncate supervised examples."""
    fitted = []
    for example in examples:
        if len(example.input_ids) <= max_len:
            pieces = [example]
        elif chunk:
            report.chunked += 1
            pieces = [
                TokenizedExample(example.input_ids[i : i + max_len], example.loss_mask[i : i + max_len], example.weight)
                for i in range(0, len(example.input_ids), max_len)
            ]
        else:
            report.truncated += 1
            pieces = [TokenizedExample(example.input_ids[:max_len], example.loss_mask[:max_len], example.weight)]
        for piece in pieces:
            if any(piece.loss_mask[1:]):
                fitted.append(piece)
            else:
                report.dropped_no_target += 1
    return fitted


def as_sequence(parts: Sequence[TokenizedExample]) -> PackedSequence:
    ids: list[int] = []
    labels: list[int] = []
    positions: list[int] = []
    weights: list[float] = []
    for part in parts:
        ids += part.input_ids
        labels += [IGNORE_INDEX] + [t if m else IGNORE_INDEX for t, m in zip(part.input_ids[1:], part.loss_mask[1:])]
        positions += list(range(len(part.input_ids)))
        weights += [part.weight] * len(part.input_ids)
    return PackedSequence(ids, labels, positions, weights, num_examples=len(parts))


def _best_fit_decreasing(examples: Sequence[TokenizedExample], max_len: int) -> list[list[TokenizedExample]]:
    """Bins of total length <= max_len, few and full: each example goes to the fullest bin it fits."""
    order = sorted(range(len(examples)), key=lambda i: (-len(examples[i].input_ids), i))
    bins: list[list[TokenizedExample]] = []
    free: list[tuple[int, int]] = []  # sorted (space left, bin index)
    for i in order:
        size = len(examples[i].input_ids)
        slot = bisect.bisect_left(free, (size, -1))
        if slot < len(free):
            space, index = free.pop(slot)
        else:
            space, index = max_len, len(bins)
            bins.append([])
        bins[index].append(examples[i])
        if space - size > 0:
            bisect.insort(free, (space - size, index))
    return bins


def pack(
    examples: Sequence[TokenizedExample], max_len: int, *, packing: bool, chunk_long: bool
) -> tuple[list[PackedSequence], PackingReport]:
    """Sequences for training or evaluation: packed when `packing`, one example per row otherwise."""
    report = PackingReport()
    fitted = _fit(examples, max_len, chunk_long, report)
    groups = _best_fit_decreasing(fitted, max_len) if packing else [[e] for e in fitted]
    sequences = [as_sequence(group) for group in groups]
    report.sequences = len(sequences)
    report.examples = len(fitted)
    report.tokens = sum(len(s.input_ids) for s in sequences)
    report.capacity = max_len * len(sequences)
    return sequences, report
