"""Evaluation maths and the auto hyperparameter rules."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from kubetune.api import finetunejob as ftj
from kubetune.trainer.evaluation import evaluate
from kubetune.trainer.prep import data
from kubetune.trainer.training import hyperparameters


class TestClassificationMetrics:
    def test_known_confusion_matrix(self) -> None:
        # true \ predicted:  cat dog bird
        #   cat               3   1   0
        #   dog               1   2   1
        #   bird              0   0   2
        truth = ["cat"] * 4 + ["dog"] * 4 + ["bird"] * 2
        predicted = ["cat", "cat", "cat", "dog", "cat", "dog", "dog", "bird", "bird", "bird"]

        metrics = evaluate.classification_metrics(truth, predicted, ["cat", "dog", "bird"])

        assert metrics["confusionMatrix"]["matrix"] == [[3, 1, 0], [1, 2, 1], [0, 0, 2]]
        assert metrics["accuracy"] == pytest.approx(0.7)
        per_class = metrics["perClass"]
        assert (per_class["cat"]["precision"], per_class["cat"]["recall"]) == (pytest.approx(0.75), pytest.approx(0.75))
        assert (per_class["dog"]["precision"], per_class["dog"]["recall"]) == (pytest.approx(2 / 3), pytest.approx(0.5))
        assert (per_class["bird"]["precision"], per_class["bird"]["recall"]) == (pytest.approx(2 / 3), pytest.approx(1.0))
        assert per_class["dog"]["f1"] == pytest.approx(2 * (2 / 3) * 0.5 / (2 / 3 + 0.5))
        assert metrics["precision"] == pytest.approx((0.75 + 2 / 3 + 2 / 3) / 3)
        assert metrics["recall"] == pytest.approx((0.75 + 0.5 + 1.0) / 3)
        assert metrics["f1"] == pytest.approx(sum(c["f1"] for c in per_class.values()) / 3)

    def test_a_class_never_predicted_has_zero_precision_not_an_error(self) -> None:
        metrics = evaluate.classification_metrics(["a", "b"], ["a", "a"], ["a", "b"])
        assert metrics["perClass"]["b"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}

    def test_labels_are_predicted_by_their_likelihood(self, tiny_gpt2: Path, tiny_tokenizer) -> None:  # type: ignore[no-untyped-def]
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(tiny_gpt2).eval()
        labels = ["alpha", "beta", "gamma"]
        expected = {}
        for label in labels:  # the label's completion tokens (and EOS), scored by a plain forward pass
            tokens = data.tokenize_example(data.Example(prompt="some text", completion=data.classification_completion(label),
                                                        label=label), tiny_tokenizer, append_eos=True)
            expected[label] = sum(reference_log_probs(model, tokens.input_ids, tokens.loss_mask))

        scores = evaluate.label_log_likelihoods(model, tiny_tokenizer, "some text", labels, torch.device("cpu"))
        predicted = evaluate.predict_labels(model, tiny_tokenizer, ["some text"], labels, torch.device("cpu"))

        assert scores == pytest.approx([expected[label] for label in labels], rel=1e-4)
        assert len(set(expected.values())) == len(labels)  # no tie: the most likely label is well defined
        assert predicted == [max(expected, key=lambda label: expected[label])]


def _sequence(ids: list[int], labels: list[int], weight: float) -> data.PackedSequence:
    return data.PackedSequence(ids, labels, list(range(len(ids))), [weight] * len(ids))


def reference_log_probs(model, ids: list[int], is_target: list[bool]) -> list[float]:  # type: ignore[no-untyped-def]
    """log p(token t | tokens before t) of each target token t > 0: one forward pass of the unpadded
    sequence, the log-softmax written out (an independent cross-entropy, not evaluate's)."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].double()  # (T, V)
    log_probs = logits - torch.logsumexp(logits, dim=-1, keepdim=True)
    return [float(log_probs[t - 1, ids[t]]) for t in range(1, len(ids)) if is_target[t]]


def reference_token_losses(model, sequence: data.PackedSequence) -> list[float]:  # type: ignore[no-untyped-def]
    return [-lp for lp in reference_log_probs(model, sequence.input_ids, [label != -100 for label in sequence.labels])]


class TestLosses:
    def test_class_weighted_loss_is_the_weighted_mean_of_token_losses(self, tiny_gpt2: Path) -> None:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(tiny_gpt2).eval()
        light = _sequence([5, 6, 7, 8], [-100, -100, 7, 8], 1.0)
        heavy = _sequence([9, 10, 11], [-100, 10, 11], 3.0)
        batch = evaluate.collate([light, heavy], pad_id=0, device=torch.device("cpu"))

        with torch.no_grad():
            loss, targets = evaluate.training_loss(model, batch)

        light_tokens, heavy_tokens = reference_token_losses(model, light), reference_token_losses(model, heavy)
        expected = (sum(light_tokens) * 1.0 + sum(heavy_tokens) * 3.0) / (2 * 1.0 + 2 * 3.0)
        assert len(light_tokens) == len(heavy_tokens) == 2 and targets == 4
        assert float(loss) == pytest.approx(expected, rel=1e-5)
        assert float(loss) != pytest.approx(sum(light_tokens + heavy_tokens) / 4, rel=1e-3)

    def test_perplexity_is_exp_of_the_token_mean_loss(self, tiny_gpt2: Path) -> None:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(tiny_gpt2).eval()
        sequences = [_sequence([5, 6, 7, 8], [-100, 6, 7, 8], 1.0), _sequence([9, 10], [-100, 10], 1.0)]
        token_losses = [value for s in sequences for value in reference_token_losses(model, s)]
        model.train()

        metrics = evaluate.language_model_metrics(model, sequences, batch_size=1, pad_id=0, device=torch.device("cpu"))
        together = evaluate.language_model_metrics(model, sequences, batch_size=2, pad_id=0, device=torch.device("cpu"))

        assert len(token_losses) == 4  # every target token counts once, whatever its sequence
        assert metrics["loss"] == pytest.approx(sum(token_losses) / 4, rel=1e-5)
        assert metrics["perplexity"] == pytest.approx(math.exp(sum(token_losses) / 4), rel=1e-5)
        assert metrics["loss"] == pytest.approx(together["loss"], rel=1e-5)  # padding changes nothing
        assert model.training  # evaluation restores the training mode


class TestAutoHyperparameters:
    @pytest.mark.parametrize(("examples", "epochs"), [(10, 10.0), (50, 3.0), (1000, 3.0), (20_000, 1.0), (5_000, 5.0 - 2.0)])
    def test_epochs_follow_dataset_size(self, examples: int, epochs: float) -> None:
        assert hyperparameters.auto_epochs(examples) == epochs

    def test_learning_rate_by_method_and_model_size(self) -> None:
        assert hyperparameters.auto_learning_rate("lora", 7_000_000_000) == 2e-4
        assert hyperparameters.auto_learning_rate("full", 1_000_000_000) == pytest.approx(2e-5)
        assert hyperparameters.auto_learning_rate("full", 135_000_000) > hyperparameters.auto_learning_rate("full", 7_000_000_000)
        assert hyperparameters.auto_learning_rate("full", 1000) == 1e-3

    def test_sequence_length_fits_the_longest_example_within_the_model_context(self) -> None:
        assert hyperparameters.auto_max_seq_length(20, 2048) == 64
        assert hyperparameters.auto_max_seq_length(300, 2048) == 512
        assert hyperparameters.auto_max_seq_length(5000, 2048) == 1024
        assert hyperparameters.auto_max_seq_length(5000, 256) == 256

    def test_explicit_values_win_and_auto_ones_are_recorded(self) -> None:
        hp = ftj.Hyperparameters(learning_rate=1e-3, batch_size=4)

        resolved = hyperparameters.resolve(
            hp, method="lora", num_parameters=10**8, num_train_examples=1000, num_train_sequences=400,
            max_seq_length=512, device="cuda",
        )

        assert (resolved.learning_rate, resolved.batch_size) == (1e-3, 4)
        assert resolved.gradient_accumulation_steps == 4  # 16 sequences per step
        assert resolved.epochs == 3.0 and resolved.scheduler == "cosine" and resolved.weight_decay == 0.0
        assert "learningRate" not in resolved.automatic and "epochs" in resolved.automatic
        assert hyperparameters.ResolvedHyperparameters.from_report(resolved.to_report()) == resolved

    def test_accumulation_keeps_enough_steps_per_epoch_on_small_data(self) -> None:
        assert hyperparameters.auto_gradient_accumulation(batch_size=2, num_sequences=40) == 2
        assert hyperparameters.auto_gradient_accumulation(batch_size=8, num_sequences=20) == 1
