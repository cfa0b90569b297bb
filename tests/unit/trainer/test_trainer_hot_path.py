"""The training step's hot path: exact packed attention for every kernel the trainer selects, a loss that never
builds vocabulary-sized logits, no host syncs per micro-batch, fused AdamW on CUDA, optional torch.compile.

Runs on the CPU with the tiny GPT-2 and Llama models; the flash-attention case
runs where CUDA and `flash_attn` are present (bench/gpu_suite.sh runs this file
on the GPU machine).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from kubetune.api.finetunejob import ModelSpec as ModelConfig
from kubetune.trainer.evaluation import evaluate
from kubetune.trainer.prep import data
from kubetune.trainer.training import loss, modeling, train

TEXTS = [
    "The operator watches the job.",
    "A node.",
    "Training starts when the validation pod has read every file and found nothing wrong with it.",
    "Checkpoints resume.",
]


def _has_flash_attention() -> bool:
    from transformers.utils import is_flash_attn_2_available

    return torch.cuda.is_available() and is_flash_attn_2_available()


def selectable_implementations() -> list[Any]:
    """Every attention implementation `modeling.select_attention_implementation` can return, plus eager
    (transformers' fallback for architectures without SDPA); each with the batch layout the trainer uses,
    on the CPU and, where there is one, on the GPU (bench/gpu_suite.sh runs this file there)."""
    flash = pytest.param(
        "flash_attention_2", "cuda",
        marks=pytest.mark.skipif(not _has_flash_attention(), reason="needs CUDA and flash_attn (run by bench/gpu_suite.sh)"),
    )
    sdpa_gpu = pytest.param(
        "sdpa", "cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (run by bench/gpu_suite.sh)")
    )
    return [("eager", "cpu"), ("sdpa", "cpu"), sdpa_gpu, flash]


@pytest.fixture(params=["gpt2", "llama"])
def tiny_model_folder(request: pytest.FixtureRequest, tiny_gpt2: Path, tiny_llama: Path) -> Path:
    return tiny_gpt2 if request.param == "gpt2" else tiny_llama


def _load(folder: Path, implementation: str, device: str = "cpu") -> Any:
    dtype = torch.bfloat16 if implementation.startswith("flash") else torch.float32
    model = modeling.load_model(ModelConfig(source=str(folder)), dtype=dtype, attn_implementation=implementation)
    return model.to(device).eval()


def _examples(tokenizer: Any) -> list[data.TokenizedExample]:
    return [data.tokenize_example(data.Example(completion=t), tokenizer, append_eos=True) for t in TEXTS]


def _packed_and_alone(model: Any, folder: Path, device: str) -> tuple[dict[str, Any], Any, dict[tuple[int, ...], Any]]:
    """A packed micro-batch of the texts (two rows of different lengths, so one is padded), its logits, and
    each example's logits run alone."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    examples = _examples(tokenizer)
    sequences, _ = data.pack(examples, 48, packing=True, chunk_long=False)
    assert len(sequences) >= 2 and any(s.num_examples > 1 for s in sequences)
    batch = evaluate.collate(sequences, tokenizer.pad_token_id, torch.device(device), flatten=evaluate.flat_batches(model))
    with torch.no_grad():
        packed = model(**modeling.model_inputs(model, batch)).logits
        alone = {tuple(e.input_ids): model(torch.tensor([e.input_ids], device=device), use_cache=False).logits[0]
                 for e in examples}
    return batch, packed, alone


def _assert_each_example_equal(batch: dict[str, Any], packed: Any, alone: dict[tuple[int, ...], Any],
                               tolerance: float) -> None:
    found = 0
    for row, ids in enumerate(batch["input_ids"].tolist()):
        positions = batch["position_ids"][row].tolist()
        starts = [i for i, p in enumerate(positions) if p == 0]
        for start, end in zip(starts, [*starts[1:], len(positions)], strict=True):
            key = tuple(ids[start:end])
            if key in alone:  # skip the padding tail
                torch.testing.assert_close(packed[row, start:end].float(), alone[key].float(),
                                           atol=tolerance, rtol=tolerance)
                found += 1
    assert found == len(alone)


class TestPackedAttentionIsExact:
    @pytest.mark.parametrize(("implementation", "device"), selectable_implementations())
    def test_packed_logits_equal_each_example_run_alone(self, tiny_model_folder: Path, implementation: str,
                                                        device: str) -> None:
        model = _load(tiny_model_folder, implementation, device)
        assert evaluate.flat_batches(model) == implementation.startswith("flash")
        batch, packed, alone = _packed_and_alone(model, tiny_model_folder, device)
        # bf16 for flash; fp32 elsewhere, where a GPU's kernels sum in another order than the CPU's.
        tolerance = 2e-2 if implementation.startswith("flash") else 1e-4 if device == "cuda" else 1e-5
        _assert_each_example_equal(batch, packed, alone, tolerance)

    @pytest.mark.slow
    def test_flex_attention_packed_rows_are_exact(self, tiny_llama: Path) -> None:
        """transformers builds flex attention's block mask from the packed position ids (Llama-style models;
        GPT-2 has no flex attention). Measured on the GPU as a packed kernel without flash_attn
        (bench/gpu_mfu.py); on the CPU its compilation takes ~30 s."""
        device = "cuda" if torch.cuda.is_available() else "cpu"
        model = _load(tiny_llama, "flex_attention", device)
        assert modeling.attention_implementation_of(model) == "flex_attention"
        batch, packed, alone = _packed_and_alone(model, tiny_llama, device)
        _assert_each_example_equal(batch, packed, alone, 1e-4)

    @pytest.mark.parametrize("implementation", ["eager", "sdpa"])
    def test_a_flattened_batch_gives_the_same_losses_as_padded_rows(self, tiny_model_folder: Path,
                                                                    implementation: str) -> None:
        """The flash layout (one row, cumulative lengths) checked with the CPU kernels: same targets, same loss."""
        from transformers import AutoTokenizer

        model = _load(tiny_model_folder, implementation)
        tokenizer = AutoTokenizer.from_pretrained(tiny_model_folder)
        sequences, _ = data.pack(_examples(tokenizer), 48, packing=True, chunk_long=False)
        padded = evaluate.collate(sequences, tokenizer.pad_token_id, torch.device("cpu"))
        flat = evaluate.collate(sequences, tokenizer.pad_token_id, torch.device("cpu"), flatten=True)

        assert flat["input_ids"].shape[0] == 1 and flat["input_ids"].numel() == sum(len(s.input_ids) for s in sequences)
        assert flat["attention_kwargs"]["cu_seq_lens_q"].tolist()[-1] == flat["input_ids"].numel()
        assert flat["target_index"].numel() == padded["target_index"].numel()
        with torch.no_grad():
            losses_padded, mask_padded, _ = evaluate.token_losses(model, padded)
            losses_flat, mask_flat, _ = evaluate.token_losses(model, flat)
            fused_padded, _ = evaluate.training_loss(model, padded)
            fused_flat, _ = evaluate.training_loss(model, flat)
        assert int(mask_padded.sum()) == int(mask_flat.sum())
        torch.testing.assert_close(losses_padded.sum(), losses_flat.sum(), atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(fused_padded, fused_flat, atol=1e-5, rtol=1e-5)


def _plain_collate(sequences: list[data.PackedSequence], pad_id: int) -> dict[str, list[Any]]:
    """The batch layout written out element by element: the definition `evaluate.collate` must meet."""
    width = max(len(s.input_ids) for s in sequences)
    out: dict[str, list[Any]] = {"input_ids": [], "labels": [], "position_ids": [], "weights": [], "target_index": []}
    for row, s in enumerate(sequences):
        pad = width - len(s.input_ids)
        out["input_ids"].append(s.input_ids + [pad_id] * pad)
        out["labels"].append(s.labels + [data.IGNORE_INDEX] * pad)
        out["position_ids"].append(s.position_ids + list(range(pad)))
        out["weights"].append(s.weights + [0.0] * pad)
        out["target_index"] += [row * width + t - 1 for t in range(1, len(s.labels)) if s.labels[t] != data.IGNORE_INDEX]
    return out


class TestCollate:
    def _sequences(self, seed: int) -> list[data.PackedSequence]:
        import random

        generator = random.Random(seed)
        sequences = []
        for _ in range(generator.randint(1, 6)):
            ids: list[int] = []
            labels: list[int] = []
            positions: list[int] = []
            weights: list[float] = []
            for _ in range(generator.randint(1, 4)):
                length = generator.randint(1, 9)
                ids += [generator.randint(1, 99) for _ in range(length)]
                # Prompt tokens and each example's first token carry no target.
                labels += [data.IGNORE_INDEX] + [generator.choice([data.IGNORE_INDEX, generator.randint(1, 99)])
                                                 for _ in range(length - 1)]
                positions += list(range(length))
                weights += [generator.choice([1.0, 0.5, 3.0])] * length
            sequences.append(data.PackedSequence(ids, labels, positions, weights, 1))
        return sequences

    @pytest.mark.parametrize("seed", range(20))
    def test_a_batch_equals_the_plain_definition(self, seed: int) -> None:
        sequences = self._sequences(seed)
        batch = evaluate.collate(sequences, 7, torch.device("cpu"))
        expected = _plain_collate(sequences, 7)
        for name, values in expected.items():
            assert batch[name].tolist() == values, name
        assert batch["input_ids"].dtype == batch["target_index"].dtype == torch.long
        assert batch["weights"].dtype == torch.float32

    def test_a_flattened_batch_is_one_row_with_cumulative_lengths(self) -> None:
        sequences = self._sequences(3)
        flat = evaluate.collate(sequences, 7, torch.device("cpu"), flatten=True)
        merged = data.PackedSequence([t for s in sequences for t in s.input_ids], [t for s in sequences for t in s.labels],
                                     [p for s in sequences for p in s.position_ids],
                                     [w for s in sequences for w in s.weights])
        assert flat["input_ids"].tolist() == [merged.input_ids]
        assert flat["target_index"].tolist() == _plain_collate([merged], 7)["target_index"]
        starts = [i for i, p in enumerate(merged.position_ids) if p == 0] + [len(merged.position_ids)]
        assert flat["attention_kwargs"]["cu_seq_lens_q"].tolist() == [0, *starts[1:]]
        assert flat["attention_kwargs"]["cu_seq_lens_q"].dtype == torch.int32
        assert flat["attention_kwargs"]["max_length_q"] == max(b - a for a, b in zip(starts, starts[1:]))


class TestModelInputs:
    """`modeling.model_inputs`: what the model is called with, chosen without reading the device."""

    def test_packed_rows_get_the_mask_transformers_would_build(self, tiny_model_folder: Path) -> None:
        from transformers import AutoTokenizer

        model = _load(tiny_model_folder, "sdpa").eval()
        tokenizer = AutoTokenizer.from_pretrained(tiny_model_folder)
        sequences, _ = data.pack(_examples(tokenizer), 48, packing=True, chunk_long=False)
        batch = evaluate.collate(sequences, tokenizer.pad_token_id, torch.device("cpu"))
        assert batch["packed"]

        inputs = modeling.model_inputs(model, batch)

        assert inputs["attention_mask"].shape == (len(sequences), 1, batch["input_ids"].shape[1], batch["input_ids"].shape[1])
        with torch.no_grad():
            ours = model(**inputs).logits
            theirs = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        torch.testing.assert_close(ours, theirs)  # transformers built its own mask from the positions here

    def test_full_single_example_rows_use_the_models_own_positions_and_plain_causal_attention(
        self, tiny_gpt2: Path
    ) -> None:
        model = _load(tiny_gpt2, "sdpa").eval()
        rows = [data.PackedSequence(ids, ids, list(range(8)), [1.0] * 8, 1) for ids in ([*range(5, 13)], [*range(20, 28)])]
        batch = evaluate.collate(rows, 0, torch.device("cpu"))
        assert not batch["packed"]

        inputs = modeling.model_inputs(model, batch)

        assert set(inputs) == {"input_ids", "use_cache"}
        with torch.no_grad():
            torch.testing.assert_close(model(**inputs).logits, model(input_ids=batch["input_ids"],
                                                                     position_ids=batch["position_ids"]).logits)

    def test_a_row_starting_past_position_zero_or_padded_counts_as_packed(self, tiny_gpt2: Path) -> None:
        shifted = [data.PackedSequence([5, 6, 7], [5, 6, 7], [4, 5, 6], [1.0] * 3, 1)]
        padded = [data.PackedSequence([5, 6, 7], [5, 6, 7], [0, 1, 2], [1.0] * 3, 1),
                  data.PackedSequence([5, 6], [5, 6], [0, 1], [1.0] * 2, 1)]
        assert evaluate.collate(shifted, 0, torch.device("cpu"))["packed"]
        assert evaluate.collate(padded, 0, torch.device("cpu"))["packed"]

    def test_loaded_models_skip_the_host_read_padding_check(self, tiny_gpt2: Path) -> None:
        model = modeling.load_model(ModelConfig(source=str(tiny_gpt2)))
        checks = [m for m in model.modules() if hasattr(m, "warn_if_padding_and_no_attention_mask")]
        assert checks and all(m.warn_if_padding_and_no_attention_mask(torch.tensor([[0]]), None) is None
                              for m in checks)
        assert all(m.warn_if_padding_and_no_attention_mask is modeling._no_padding_check for m in checks)


class TestFusedLinearCrossEntropy:
    def _batch(self, folder: Path) -> tuple[Any, dict[str, Any]]:
        from transformers import AutoTokenizer

        model = _load(folder, "sdpa").train()
        model.config.attn_pdrop = model.config.resid_pdrop = model.config.embd_pdrop = 0.0
        modeling.override_dropout(model, 0.0)
        tokenizer = AutoTokenizer.from_pretrained(folder)
        # Prompts without loss and per-example weights, as classification with class weights produces.
        examples = [
            data.tokenize_example(data.Example(prompt=t, completion=" yes", weight=w), tokenizer, append_eos=True)
            for t, w in zip(TEXTS, (1.0, 3.0, 0.5, 2.0), strict=True)
        ]
        sequences, _ = data.pack(examples, 48, packing=True, chunk_long=False)
        return model, evaluate.collate(sequences, tokenizer.pad_token_id, torch.device("cpu"))

    @staticmethod
    def _plain_loss_and_grads(model: Any, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The plain cross-entropy over full logits and its gradients (the model's own left at zero)."""
        expected = loss.reference_token_loss(
            model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits,
            batch["labels"], batch["weights"])
        expected.backward()
        expected_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        model.zero_grad(set_to_none=True)
        return expected, expected_grads

    def test_loss_and_gradients_equal_the_plain_cross_entropy_over_full_logits(
        self, tiny_model_folder: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        model, batch = self._batch(tiny_model_folder)
        assert loss.fused_head(model) is not None
        monkeypatch.setattr(loss, "CHUNK_ELEMENTS", 3 * model.config.vocab_size)  # several chunks of 3 rows

        expected, expected_grads = self._plain_loss_and_grads(model, batch)

        fused, targets = evaluate.training_loss(model, batch)
        fused.backward()

        assert int(targets) == int((batch["labels"][:, 1:] != data.IGNORE_INDEX).sum())
        torch.testing.assert_close(fused, expected, atol=1e-5, rtol=1e-5)
        for name, parameter in model.named_parameters():
            torch.testing.assert_close(parameter.grad, expected_grads[name], atol=1e-5, rtol=1e-4, msg=name)

    def test_the_gpu_padding_of_rows_and_vocabulary_changes_nothing(
        self, tiny_gpt2: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """On a GPU the chunks' rows and the vocabulary are padded to multiples of `ALIGN` (aligned matmuls);
        padded vocabulary columns count as -inf. Forced here on the CPU, with an alignment that pads both."""
        model, batch = self._batch(tiny_gpt2)
        vocabulary = model.config.vocab_size
        monkeypatch.setattr(loss, "_alignment", lambda device: 6)
        assert vocabulary % 6  # the tiny vocabulary is padded
        monkeypatch.setattr(loss, "CHUNK_ELEMENTS", 6 * vocabulary)  # chunks of 6 rows: several, the last one short
        assert int(batch["target_index"].numel()) % 6

        expected, expected_grads = self._plain_loss_and_grads(model, batch)

        fused, _ = evaluate.training_loss(model, batch)
        fused.backward()

        torch.testing.assert_close(fused, expected, atol=1e-5, rtol=1e-5)
        for name, parameter in model.named_parameters():
            torch.testing.assert_close(parameter.grad, expected_grads[name], atol=1e-5, rtol=1e-4, msg=name)

    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
    def test_the_fusible_chunk_computes_what_the_eager_one_does(self, dtype: torch.dtype) -> None:
        """The chunk function torch.compile fuses (`training.compile: true`) against the eager one, with
        padded vocabulary columns: the same per-row losses and logit gradients."""
        generator = torch.Generator().manual_seed(0)
        logits = (torch.randn(37, 64, generator=generator) * 4).to(dtype)
        targets = torch.randint(0, 50, (37,), generator=generator)

        eager_loss, eager_grad = loss._chunk_loss_and_grad(logits.clone(), targets, 50)
        fusible_loss, fusible_grad = loss._chunk_loss_and_grad_fusible(logits.clone(), targets, 50)

        reference = torch.nn.functional.cross_entropy(logits[:, :50].float(), targets, reduction="none")
        torch.testing.assert_close(eager_loss, reference)
        torch.testing.assert_close(fusible_loss, reference)
        torch.testing.assert_close(fusible_grad, eager_grad)
        assert eager_grad.dtype == dtype and not eager_grad[:, 50:].any()  # padding columns get no gradient
        softmax = torch.softmax(logits[:, :50].float(), dim=-1)
        softmax[torch.arange(37), targets] -= 1
        torch.testing.assert_close(eager_grad[:, :50].float(), softmax, atol=1e-2 if dtype == torch.bfloat16 else 1e-6,
                                   rtol=1e-2 if dtype == torch.bfloat16 else 1e-5)

    def test_the_training_loss_never_computes_vocabulary_sized_logits(self, tiny_model_folder: Path) -> None:
        model, batch = self._batch(tiny_model_folder)
        shapes: list[tuple[int, ...]] = []
        model.get_output_embeddings().register_forward_hook(lambda _m, _a, out: shapes.append(tuple(out.shape)))

        evaluate.training_loss(model, batch)[0].backward()

        assert shapes and all(shape[1] == 0 for shape in shapes)  # the head ran on an empty slice
        assert model.get_output_embeddings().weight.grad is not None

    def test_heads_that_post_process_logits_use_the_plain_path(self, tiny_gpt2: Path) -> None:
        model = _load(tiny_gpt2, "sdpa")
        model.config.final_logit_softcapping = 30.0
        assert loss.fused_head(model) is None


class TestTrainingStep:
    def test_the_micro_batch_loss_and_target_count_stay_on_the_device(self, tiny_gpt2: Path) -> None:
        """Reading a loss (`float`, `int`, `.item()`) waits for the GPU; the step returns tensors and
        `fit` reads them once per report."""
        from transformers import AutoTokenizer

        model = _load(tiny_gpt2, "sdpa").train()
        tokenizer = AutoTokenizer.from_pretrained(tiny_gpt2)
        sequences, _ = data.pack(_examples(tokenizer), 48, packing=True, chunk_long=False)
        value, targets = evaluate.training_loss(model, evaluate.collate(sequences, 0, torch.device("cpu")))
        assert isinstance(value, torch.Tensor) and isinstance(targets, torch.Tensor)

    @pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (run by bench/gpu_suite.sh)")
    @pytest.mark.parametrize("arch", ["gpt2", "llama"])
    def test_gpu_micro_batch_and_backward_wait_for_nothing(self, arch: str, tiny_gpt2: Path, tiny_llama: Path) -> None:
        """Building the batch, the forward with the fused loss and the backward never make the host wait for
        the GPU (torch's sync debug mode turns any synchronising call into an error): the host can queue the
        next micro-batch while the GPU computes this one."""
        from transformers import AutoTokenizer

        folder = tiny_gpt2 if arch == "gpt2" else tiny_llama
        model = _load(folder, "sdpa", "cuda").train()
        tokenizer = AutoTokenizer.from_pretrained(folder)
        sequences, _ = data.pack(_examples(tokenizer), 48, packing=True, chunk_long=False)
        for _ in range(2):  # the second pass: nothing left to initialise lazily
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
            try:
                batch = evaluate.collate(sequences, 0, torch.device("cuda"))
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    value, _ = evaluate.training_loss(model, batch)
                value.backward()
            finally:
                torch.cuda.set_sync_debug_mode("default")

    @pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (run by bench/gpu_suite.sh)")
    @pytest.mark.parametrize("compiled", [False, True])
    def test_gpu_optimizer_steps_wait_for_nothing(self, compiled: bool, tiny_gpt2: Path, tmp_path: Path) -> None:
        """A whole optimizer step of the trainer (micro-batches, clipping, fused AdamW, scheduler) never makes
        the host wait for the GPU, compiled or not: the profile of the H200 run showed three waits per step."""
        from transformers import AutoTokenizer

        from kubetune.api import config as cfg
        from kubetune.trainer.prep import data as prep

        from .trainer_runs import config, text_records, write_jsonl

        content = config(tiny_gpt2, write_jsonl(tmp_path / "train.jsonl", text_records(300)), tmp_path / "out",
                         hyperparameters={"epochs": 1, "batchSize": 2, "gradientAccumulationSteps": 2},
                         training={"precision": "bf16", "compile": compiled})
        trainer_config = cfg.config_from_dict(content)
        run = train.setup(trainer_config, prep.prepare(trainer_config.dataset), AutoTokenizer.from_pretrained(tiny_gpt2))
        sequences = train.epoch_sequences(run, 0)
        plan = train._plan_for(run, 0)
        assert len(plan) >= 4 and all(len(micro_batches) == 2 for micro_batches in plan[:4])
        for step, micro_batches in enumerate(plan[:4]):
            torch.cuda.synchronize()
            if step >= 2:  # the first steps compile and initialise the optimizer's state
                torch.cuda.set_sync_debug_mode("error")
            try:
                train._optimizer_step(run, sequences, micro_batches)
            finally:
                torch.cuda.set_sync_debug_mode("default")

    def test_adamw_is_fused_on_cuda_only(self, tiny_gpt2: Path) -> None:
        model = _load(tiny_gpt2, "sdpa")
        assert train._optimizer(model, 1e-3, 0.01, "cuda").defaults["fused"] is True
        assert not train._optimizer(model, 1e-3, 0.01, "cpu").defaults["fused"]

    def test_attention_selection(self) -> None:
        assert modeling.select_attention_implementation("cpu") == "sdpa"
        expected = "flash_attention_2" if _has_flash_attention() else "sdpa"
        assert modeling.select_attention_implementation("cuda") == expected


class TestCompile:
    @pytest.mark.slow
    def test_compiled_blocks_give_the_same_loss_and_gradients(self, tiny_gpt2: Path) -> None:
        """`training.compile: true` compiles each transformer block in place (torch.compile, dynamic shapes):
        same numbers, same parameter names, and a new batch length does not break it."""
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(tiny_gpt2)
        sequences, _ = data.pack(_examples(tokenizer), 48, packing=True, chunk_long=False)
        results = []
        for compiled in (False, True):
            model = _load(tiny_gpt2, "sdpa").train()
            modeling.override_dropout(model, 0.0)
            names = [name for name, _ in model.named_parameters()]
            if compiled:
                assert modeling.compile_blocks(model) == model.config.n_layer
                assert [name for name, _ in model.named_parameters()] == names
            losses = []
            for batch_sequences in (sequences, sequences[:1]):  # two different lengths
                value, _ = evaluate.training_loss(model, evaluate.collate(batch_sequences, 0, torch.device("cpu")))
                value.backward()
                losses.append(value.detach())
            results.append((losses, {n: p.grad.clone() for n, p in model.named_parameters()}))
        (eager_losses, eager_grads), (compiled_losses, compiled_grads) = results
        torch.testing.assert_close(compiled_losses, eager_losses, atol=1e-5, rtol=1e-5)
        for name, grad in eager_grads.items():
            torch.testing.assert_close(compiled_grads[name], grad, atol=1e-4, rtol=1e-4, msg=name)

    @pytest.mark.slow
    def test_compiled_loss_chunks_give_the_same_loss_and_gradients(self, tiny_gpt2: Path) -> None:
        """With `training.compile: true` the fused loss's per-chunk softmax and gradient run compiled: the same
        numbers as eager, over two batch sizes (dynamic shapes)."""
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(tiny_gpt2)
        sequences, _ = data.pack(_examples(tokenizer), 48, packing=True, chunk_long=False)
        results = []
        try:
            for compiled in (False, True):
                loss.compile_chunks(compiled)
                assert (loss._compiled_chunk is not None) == compiled
                model = _load(tiny_gpt2, "sdpa").train()
                modeling.override_dropout(model, 0.0)
                losses = []
                for batch_sequences in (sequences, sequences[:1]):
                    value, _ = evaluate.training_loss(model, evaluate.collate(batch_sequences, 0, torch.device("cpu")))
                    value.backward()
                    losses.append(value.detach())
                results.append((losses, {n: p.grad.clone() for n, p in model.named_parameters()}))
        finally:
            loss.compile_chunks(False)
        (eager_losses, eager_grads), (compiled_losses, compiled_grads) = results
        torch.testing.assert_close(compiled_losses, eager_losses, atol=1e-5, rtol=1e-5)
        for name, grad in eager_grads.items():
            torch.testing.assert_close(compiled_grads[name], grad, atol=1e-4, rtol=1e-4, msg=name)
