"""Data preparation: every file format and source, cleaning, splits, imbalance, tokenisation, packing."""

from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path

import pyarrow
import pyarrow.parquet
import pytest
import torch

from kubetune.api import config as cfg, finetunejob as ftj
from kubetune.trainer.errors import DataError
from kubetune.trainer.prep import data


def _dataset(format: str, source: str, **extra: object) -> ftj.DatasetSpec:  # noqa: A002
    raw = {"model": {"source": "/m"}, "output": {"dir": "/o"}, "dataset": {"format": format, "train": {"source": source}, **extra}}
    return cfg.config_from_dict(raw).dataset


def _load(dataset: ftj.DatasetSpec) -> list[data.Example]:
    return data.to_examples(data.read_records(dataset.train, dataset.fields), dataset, dataset.train.source)


def _write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


class TestFormatsAndSources:
    def test_text_from_jsonl_with_a_custom_field(self, tmp_path: Path) -> None:
        path = _write_jsonl(tmp_path / "t.jsonl", [{"body": "first"}, {"body": "second"}])

        examples = _load(_dataset("text", str(path), fields={"text": "body"}))

        assert [e.completion for e in examples] == ["first", "second"]
        assert all(e.prompt == "" for e in examples)

    def test_text_from_txt_is_one_record_per_paragraph(self, tmp_path: Path) -> None:
        (tmp_path / "t.txt").write_text("Para one\nstill one.\n\n\nPara two.\n")

        examples = _load(_dataset("text", str(tmp_path / "t.txt")))

        assert [e.completion for e in examples] == ["Para one\nstill one.", "Para two.\n"]

    def test_prompt_completion_from_csv(self, tmp_path: Path) -> None:
        (tmp_path / "pc.csv").write_text('prompt,completion\n"Q: 2+2?","4"\n"Q: capital of France?",Paris\n')

        examples = _load(_dataset("prompt_completion", str(tmp_path / "pc.csv")))

        assert [(e.prompt, e.completion) for e in examples] == [("Q: 2+2?", "4"), ("Q: capital of France?", "Paris")]

    def test_chat_from_json_list_and_from_csv_cells(self, tmp_path: Path) -> None:
        messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
        (tmp_path / "c.json").write_text(json.dumps({"data": [{"messages": messages}]}))
        with (tmp_path / "c.csv").open("w", newline="") as handle:
            csv.writer(handle).writerows([["messages"], [json.dumps(messages)]])

        from_json = _load(_dataset("chat", str(tmp_path / "c.json")))
        from_csv = _load(_dataset("chat", str(tmp_path / "c.csv")))

        assert from_json[0].messages == messages
        assert from_csv[0].messages == messages

    def test_classification_from_parquet_with_integer_labels(self, tmp_path: Path) -> None:
        table = pyarrow.table({"text": ["good", "bad"], "label": [1, 0]})
        pyarrow.parquet.write_table(table, tmp_path / "c.parquet")

        examples = _load(_dataset("classification", str(tmp_path / "c.parquet")))

        assert [(e.prompt, e.label, e.completion) for e in examples] == [("good", "1", " 1"), ("bad", "0", " 0")]

    def test_file_format_can_be_forced_when_the_extension_says_nothing(self, tmp_path: Path) -> None:
        _write_jsonl(tmp_path / "data.bin", [{"text": "x"}])

        with pytest.raises(DataError, match="cannot tell the file format"):
            _load(_dataset("text", str(tmp_path / "data.bin")))
        assert len(_load(_dataset("text", str(tmp_path / "data.bin"), train={"source": str(tmp_path / "data.bin"), "fileFormat": "jsonl"}))) == 1

    @pytest.mark.parametrize("name", ["t.jsonl", "t.csv", "t.parquet"])
    def test_http_sources_read_like_local_files(self, http_files: tuple[Path, str], name: str) -> None:
        folder, base = http_files
        rows = [{"text": "served over http"}, {"text": "second row"}]
        if name.endswith(".jsonl"):
            _write_jsonl(folder / name, rows)
        elif name.endswith(".csv"):
            (folder / name).write_text("text\nserved over http\nsecond row\n")
        else:
            pyarrow.parquet.write_table(pyarrow.Table.from_pylist(rows), folder / name)

        examples = _load(_dataset("text", f"{base}/{name}?version=1"))

        assert [e.completion for e in examples] == ["served over http", "second row"]

    def test_a_missing_http_file_is_a_data_error(self, http_files: tuple[Path, str]) -> None:
        _, base = http_files
        with pytest.raises(DataError, match="data file not found"):
            _load(_dataset("text", f"{base}/absent.jsonl"))

    def test_file_url_scheme(self, tmp_path: Path) -> None:
        path = _write_jsonl(tmp_path / "t.jsonl", [{"text": "a"}])
        assert len(_load(_dataset("text", f"file://{path}"))) == 1


class TestBadData:
    def test_missing_field_names_the_field_the_record_and_what_is_there(self, tmp_path: Path) -> None:
        path = _write_jsonl(tmp_path / "pc.jsonl", [{"prompt": "a", "completion": "b"}, {"prompt": "c", "answer": "d"}])

        with pytest.raises(DataError) as caught:
            _load(_dataset("prompt_completion", str(path)))

        assert str(caught.value) == (
            f"{path}: record 2: missing field 'completion' (dataset.fields.completion); fields present: answer, prompt"
        )

    def test_undecodable_file(self, tmp_path: Path) -> None:
        (tmp_path / "t.jsonl").write_bytes(b'{"text": "caf\xe9"}\n')
        with pytest.raises(DataError, match=r"not UTF-8 text \(undecodable byte at offset 13\)"):
            _load(_dataset("text", str(tmp_path / "t.jsonl")))

    def test_invalid_json_line_names_the_line(self, tmp_path: Path) -> None:
        (tmp_path / "t.jsonl").write_text('{"text": "ok"}\n{"text": broken}\n')
        with pytest.raises(DataError, match="line 2 is not valid JSON"):
            _load(_dataset("text", str(tmp_path / "t.jsonl")))

    def test_not_a_parquet_file(self, tmp_path: Path) -> None:
        (tmp_path / "t.parquet").write_text("plain text")
        with pytest.raises(DataError, match="not a readable Parquet file"):
            _load(_dataset("text", str(tmp_path / "t.parquet")))

    def test_nothing_left_after_cleaning_says_why(self, tmp_path: Path) -> None:
        path = _write_jsonl(tmp_path / "t.jsonl", [{"text": "  "}, {"text": "ab"}, {"text": "ab"}])

        with pytest.raises(DataError) as caught:
            data.prepare(_dataset("text", str(path), cleaning={"minChars": 5}))

        assert "dataset.train" in str(caught.value)
        assert "no records left after cleaning: 3 read, 1 empty, 2 shorter than minChars" in str(caught.value)

    def test_unknown_label_in_the_data_names_the_label_and_the_allowed_set(self, tmp_path: Path) -> None:
        rows = [{"text": f"t{i}", "label": "pos" if i % 2 else "neg"} for i in range(10)] + [{"text": "x", "label": "meh"}]
        path = _write_jsonl(tmp_path / "c.jsonl", rows)

        with pytest.raises(DataError, match=r"unknown label 'meh' in 1 record\(s\); allowed by dataset.labels: 'neg', 'pos'"):
            data.prepare(_dataset("classification", str(path), labels=["neg", "pos"]))


class TestCleaning:
    def test_whitespace_normalisation_keeps_paragraphs(self) -> None:
        assert data.normalize_whitespace("  a \t b  \r\n\n\n\n  c\u00a0 d ") == "a b\n\nc d"

    def test_counts_each_reason_and_keeps_the_first_duplicate(self) -> None:
        examples = [data.Example(completion=t) for t in ["ok text", "", "  ", "no", "x" * 50, "ok  text", "fine one"]]

        kept, report = data.clean(examples, ftj.Cleaning(min_chars=3, max_chars=20))

        assert [e.completion for e in kept] == ["ok text", "fine one"]
        assert report.to_report() == {
            "read": 7, "kept": 2, "droppedEmpty": 2, "droppedTooShort": 1, "droppedTooLong": 1, "droppedDuplicate": 1,
        }

    def test_prompt_completion_with_an_empty_completion_is_empty(self) -> None:
        kept, report = data.clean([data.Example(prompt="question", completion=" ")], ftj.Cleaning())
        assert (kept, report.empty) == ([], 1)


class TestSplitting:
    def test_stratified_split_keeps_label_proportions(self) -> None:
        examples = [data.Example(prompt=f"t{i}", completion=" a", label="a") for i in range(80)]
        examples += [data.Example(prompt=f"u{i}", completion=" b", label="b") for i in range(20)]

        splits = data.split_examples(examples, ftj.Split(validation=0.1, test=0.2, seed=1), take_validation=True, take_test=True, stratify=True)

        assert Counter(e.label for e in splits.validation) == {"a": 8, "b": 2}
        assert Counter(e.label for e in splits.test) == {"a": 16, "b": 4}
        assert Counter(e.label for e in splits.train) == {"a": 56, "b": 14}

    def test_same_seed_same_split_and_no_example_in_two_splits(self) -> None:
        examples = [data.Example(completion=f"text {i}") for i in range(50)]
        split = ftj.Split(validation=0.2, test=0.2, seed=7)

        first = data.split_examples(examples, split, take_validation=True, take_test=True, stratify=False)
        second = data.split_examples(examples, split, take_validation=True, take_test=True, stratify=False)

        assert first == second
        texts = [e.completion for part in (first.train, first.validation, first.test) for e in part]
        assert sorted(texts) == sorted(e.completion for e in examples)
        assert (len(first.train), len(first.validation), len(first.test)) == (30, 10, 10)

    def test_given_validation_and_test_files_are_not_carved_from_train(self, tmp_path: Path) -> None:
        for name in ("train", "val", "test"):
            _write_jsonl(tmp_path / f"{name}.jsonl", [{"text": f"{name} {i}"} for i in range(5)])
        dataset = _dataset(
            "text", str(tmp_path / "train.jsonl"),
            validation={"source": str(tmp_path / "val.jsonl")}, test={"source": str(tmp_path / "test.jsonl")},
        )

        prepared = data.prepare(dataset)

        assert [len(prepared.splits.train), len(prepared.splits.validation), len(prepared.splits.test)] == [5, 5, 5]
        assert all(e.completion.startswith("val") for e in prepared.splits.validation)


class TestImbalance:
    examples = [data.Example(prompt=f"a{i}", completion=" a", label="a") for i in range(9)] + [
        data.Example(prompt=f"b{i}", completion=" b", label="b") for i in range(3)
    ]

    def test_oversample_repeats_the_minority_to_the_majority_count(self) -> None:
        result, report = data.rebalance(self.examples, ["a", "b"], "oversample", seed=0)
        assert (report.before, report.after) == ({"a": 9, "b": 3}, {"a": 9, "b": 9})
        assert len(result) == 18

    def test_undersample_cuts_the_majority_to_the_minority_count(self) -> None:
        result, report = data.rebalance(self.examples, ["a", "b"], "undersample", seed=0)
        assert report.after == {"a": 3, "b": 3}
        assert len({e.prompt for e in result}) == 6

    def test_class_weights_are_inverse_frequency(self) -> None:
        result, report = data.rebalance(self.examples, ["a", "b"], "classWeights", seed=0)
        assert report.class_weights == pytest.approx({"a": 12 / (2 * 9), "b": 12 / (2 * 3)})
        assert {e.label: e.weight for e in result} == pytest.approx(report.class_weights)

    def test_curriculum_fraction_grows_to_one(self) -> None:
        curriculum = ftj.Curriculum(enabled=True, start_fraction=0.25, epochs_to_full=3)
        assert [data.curriculum_fraction(e, curriculum) for e in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]


class TestTokenisationAndPacking:
    def test_prompt_tokens_carry_no_loss_and_completion_ends_with_eos(self, tiny_tokenizer) -> None:  # type: ignore[no-untyped-def]
        example = data.Example(prompt="Question: what runs pods?", completion=" The node.")

        tokens = data.tokenize_example(example, tiny_tokenizer, append_eos=True)

        targets = [t for t, m in zip(tokens.input_ids, tokens.loss_mask) if m]
        assert tiny_tokenizer.decode(targets) == " The node.<|endoftext|>"
        assert tokens.input_ids[-1] == tiny_tokenizer.eos_token_id

    def test_chat_loss_covers_only_the_assistant_turns(self, tiny_tokenizer) -> None:  # type: ignore[no-untyped-def]
        messages = [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "What is a pod?"},
            {"role": "assistant", "content": "A group of containers."},
            {"role": "user", "content": "And a node?"},
            {"role": "assistant", "content": "A machine."},
        ]

        tokens = data.tokenize_example(data.Example(messages=messages), tiny_tokenizer, append_eos=False)

        targets = tiny_tokenizer.decode([t for t, m in zip(tokens.input_ids, tokens.loss_mask) if m])
        assert targets == "A group of containers.<|im_end|>\nA machine.<|im_end|>\n"
        assert tiny_tokenizer.decode(tokens.input_ids) == tiny_tokenizer.apply_chat_template(messages, tokenize=False)

    def test_packing_fills_sequences_without_losing_tokens(self) -> None:
        examples = [data.TokenizedExample(list(range(1, n + 1)), [True] * n) for n in (5, 3, 7, 2, 6, 2, 7)]

        sequences, report = data.pack(examples, 10, packing=True, chunk_long=True)

        assert all(len(s.input_ids) <= 10 for s in sequences)
        assert sum(len(s.input_ids) for s in sequences) == 32
        assert len(sequences) == 4  # ceil(32 / 10): no wasted sequence
        assert report.to_report()["fill"] == 0.8

    def test_positions_restart_and_first_tokens_are_not_targets(self) -> None:
        examples = [data.TokenizedExample([11, 12, 13], [False, True, True]), data.TokenizedExample([21, 22], [True, True])]

        (sequence,), _ = data.pack(examples, 8, packing=True, chunk_long=False)

        assert sequence.input_ids == [11, 12, 13, 21, 22]
        assert sequence.position_ids == [0, 1, 2, 0, 1]
        assert sequence.labels == [-100, 12, 13, -100, 22]

    def test_long_text_is_chunked_and_long_supervised_examples_truncated(self) -> None:
        long = data.TokenizedExample(list(range(25)), [True] * 25)

        chunks, chunk_report = data.pack([long], 10, packing=True, chunk_long=True)
        cut, cut_report = data.pack([long], 10, packing=True, chunk_long=False)

        assert sorted(len(s.input_ids) for s in chunks) == [5, 10, 10]
        assert chunk_report.chunked == 1
        assert [len(s.input_ids) for s in cut] == [10]
        assert cut_report.truncated == 1

    def test_packed_examples_do_not_attend_to_each_other(self, tiny_gpt2: Path, tiny_tokenizer) -> None:  # type: ignore[no-untyped-def]
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(tiny_gpt2).eval()
        first = data.tokenize_example(data.Example(completion="The operator watches the job."), tiny_tokenizer, True)
        second = data.tokenize_example(data.Example(completion="A node."), tiny_tokenizer, True)
        (packed,), _ = data.pack([first, second], 64, packing=True, chunk_long=False)
        ids = torch.tensor([packed.input_ids])

        with torch.no_grad():
            together = model(ids, position_ids=torch.tensor([packed.position_ids]), use_cache=False).logits[0]
            alone = [model(torch.tensor([e.input_ids])).logits[0] for e in (first, second)]

        longer = max(first, second, key=lambda e: len(e.input_ids))
        offset = 0 if packed.input_ids[: len(longer.input_ids)] == longer.input_ids else len(packed.input_ids) - len(longer.input_ids)
        expected = alone[0] if longer is first else alone[1]
        assert torch.allclose(together[offset : offset + len(longer.input_ids)], expected, atol=1e-5)
        other = alone[1] if longer is first else alone[0]
        rest = together[len(longer.input_ids):] if offset == 0 else together[: offset]
        assert torch.allclose(rest, other, atol=1e-5)


class TestHostileFiles:
    """Whatever a data file holds, reading it ends in examples or a DataError naming the place (never a
    crash that the trainer would retry), and memory does not grow with the file."""

    @pytest.mark.parametrize(("line", "problem"), [
        ('{"text": ' + "[" * 100_000 + "]" * 100_000 + "}", "nested too deeply"),
        ('{"text": ' + "9" * 5000 + "}", "4300"),
    ])
    def test_deep_nesting_and_huge_integers_name_the_jsonl_line(self, tmp_path: Path, line: str, problem: str) -> None:
        (tmp_path / "t.jsonl").write_text('{"text": "fine"}\n\n' + line + "\n")

        with pytest.raises(DataError, match=f"t.jsonl: line 3 is not usable JSON: .*{problem}"):
            _load(_dataset("text", str(tmp_path / "t.jsonl")))

    @pytest.mark.parametrize("document", ["[" * 100_000 + "]" * 100_000, '[{"text": ' + "1" * 5000 + "}]"])
    def test_deep_nesting_and_huge_integers_in_a_json_document(self, tmp_path: Path, document: str) -> None:
        (tmp_path / "t.json").write_text(document)

        with pytest.raises(DataError, match="t.json is not usable JSON"):
            _load(_dataset("text", str(tmp_path / "t.json")))

    def test_a_deeply_nested_chat_cell_in_csv_names_the_record(self, tmp_path: Path) -> None:
        with (tmp_path / "c.csv").open("w", newline="") as handle:
            csv.writer(handle).writerows([["messages"], ["[" * 100_000]])

        with pytest.raises(DataError, match="record 1: field 'messages' is text but not a JSON list"):
            _load(_dataset("chat", str(tmp_path / "c.csv")))

    @pytest.mark.parametrize("separator", ["\u2028", "\u2029", "\u0085"])
    def test_jsonl_lines_end_only_at_newline(self, tmp_path: Path, separator: str) -> None:
        # JSON allows these unescaped inside strings; str.splitlines() would cut the record in two.
        records = [{"text": f"before{separator}after"}, {"text": "second"}]
        (tmp_path / "t.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records),
                                          encoding="utf-8")

        assert [e.completion for e in _load(_dataset("text", str(tmp_path / "t.jsonl")))] == [
            f"before{separator}after", "second"]

    def test_text_paragraphs_split_only_at_blank_lines(self, tmp_path: Path) -> None:
        (tmp_path / "t.txt").write_text("one\u2028still one\r\n\r\ntwo\n  \n\n three\n", encoding="utf-8")

        assert [e.completion for e in _load(_dataset("text", str(tmp_path / "t.txt")))] == [
            "one\u2028still one\r", "two", " three\n"]

    def test_a_binary_file_with_newlines_is_not_utf8_text(self, tmp_path: Path) -> None:
        (tmp_path / "t.jsonl").write_bytes(bytes(range(256)) * 4)

        with pytest.raises(DataError, match=r"not UTF-8 text \(NUL byte at offset 0\)"):
            _load(_dataset("text", str(tmp_path / "t.jsonl")))

    def test_an_undecodable_byte_late_in_the_file_names_its_offset(self, tmp_path: Path) -> None:
        (tmp_path / "t.jsonl").write_bytes(b'{"text": "a"}\n' * 3 + b'{"text": "caf\xe9"}\n')

        with pytest.raises(DataError, match=r"undecodable byte at offset 55\)"):
            _load(_dataset("text", str(tmp_path / "t.jsonl")))

    @pytest.mark.parametrize("suffix", ["jsonl", "csv", "parquet"])
    def test_files_are_streamed_not_read_whole(self, tmp_path: Path, suffix: str) -> None:
        # 2,000 records with a 10 KB column the dataset does not use: 20 MB of file, ~0.1 MB of examples.
        import tracemalloc

        rows = [{"text": f"example {i}", "metadata": f"{i}" * 10_000} for i in range(2000)]
        path = tmp_path / f"big.{suffix}"
        if suffix == "jsonl":
            _write_jsonl(path, rows)
        elif suffix == "csv":
            with path.open("w", newline="") as handle:
                writer = csv.DictWriter(handle, fieldnames=["text", "metadata"])
                writer.writeheader()
                writer.writerows(rows)
        else:
            pyarrow.parquet.write_table(pyarrow.Table.from_pylist(rows), path, row_group_size=200,
                                        compression="none")
        size = path.stat().st_size
        dataset = _dataset("text", str(path))

        tracemalloc.start()
        try:
            prepared = data.prepare(dataset)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()

        assert len(prepared.splits.train) + len(prepared.splits.validation) + len(prepared.splits.test) == 2000
        assert size > 20_000_000
        assert peak < size / 3, f"reading a {size}-byte file peaked at {peak} bytes of Python memory"

    def test_a_parquet_row_group_over_the_bound_is_refused_before_decompression(
            self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setattr(data, "MAX_PARQUET_ROW_GROUP_BYTES", 1024 * 1024)
        bomb = pyarrow.table({"text": ["a" * 1_000_000 for _ in range(8)]})  # 8 MB that compress to ~1 KB
        pyarrow.parquet.write_table(bomb, tmp_path / "bomb.parquet", compression="zstd", use_dictionary=False)
        assert (tmp_path / "bomb.parquet").stat().st_size < 100_000

        with pytest.raises(DataError, match=r"bomb.parquet: row group 0 is \d+ bytes uncompressed; at most 1048576"):
            _load(_dataset("text", str(tmp_path / "bomb.parquet")))

    def test_parquet_with_row_groups_under_the_bound_reads_every_row(
            self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setattr(data, "MAX_PARQUET_ROW_GROUP_BYTES", 1024 * 1024)
        rows = [{"text": f"row {i} " + "a" * 10_000} for i in range(300)]
        pyarrow.parquet.write_table(pyarrow.Table.from_pylist(rows), tmp_path / "ok.parquet", row_group_size=50)

        assert len(_load(_dataset("text", str(tmp_path / "ok.parquet")))) == 300


def test_csv_quoted_fields_keep_their_line_breaks_and_a_bom_is_dropped(tmp_path: Path) -> None:
    (tmp_path / "pc.csv").write_bytes('\ufeffprompt,completion\r\n"line one\r\nline two",done\r\nsecond,row\r\n'
                                      .encode("utf-8"))

    examples = _load(_dataset("prompt_completion", str(tmp_path / "pc.csv")))

    assert [(e.prompt, e.completion) for e in examples] == [("line one\r\nline two", "done"), ("second", "row")]
