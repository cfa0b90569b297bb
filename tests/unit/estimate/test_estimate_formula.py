"""The memory, token and time estimate against hand-computed cases (docs/sizing.md)."""

from __future__ import annotations

import dataclasses

import pytest

from kubetune.api.finetunejob import FineTuneJobSpec
from kubetune.operator.platform import estimate
from kubetune.operator.platform.estimate import GIB, GpuType, MIB, ModelFacts, Request, TrainingShape

GPT2_SMALL = {"model_type": "gpt2", "n_embd": 768, "n_layer": 12, "n_head": 12, "vocab_size": 50257,
              "n_positions": 1024}
LLAMA3_8B = {"model_type": "llama", "hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32,
             "num_key_value_heads": 8, "intermediate_size": 14336, "vocab_size": 128256,
             "max_position_embeddings": 131072, "tie_word_embeddings": False}
SMALL = ModelFacts(parameters=1_000_000, layers=2, hidden_size=64, vocab_size=1000, attention_heads=2,
                   kv_heads=2, intermediate_size=256, model_type="gpt2")
"""Round numbers that are easy to check by hand."""


class TestModelFactsFromConfig:
    def test_gpt2_small_parameter_count_is_exact(self) -> None:
        # 12 × (12h² + 13h) + V·h + P·h + 2h with h = 768
        assert ModelFacts.from_config(GPT2_SMALL).parameters == 124_439_808

    def test_llama3_8b_parameter_count_is_exact(self) -> None:
        facts = ModelFacts.from_config(LLAMA3_8B)
        assert facts.parameters == 8_030_261_248
        assert (facts.kv_heads, facts.head_size, facts.gated_mlp) == (8, 128, True)

    def test_a_config_without_a_width_names_the_keys_it_looked_for(self) -> None:
        with pytest.raises(estimate.EstimateError, match="no hidden size .*hidden_size, n_embd"):
            ModelFacts.from_config({"model_type": "x", "num_hidden_layers": 2})

    def test_facts_round_trip_through_the_validation_report(self) -> None:
        facts = ModelFacts.from_config(LLAMA3_8B)
        assert ModelFacts.from_report(facts.to_report()) == facts

    def test_a_bad_report_field_is_named(self) -> None:
        report = SMALL.to_report() | {"layers": "two"}
        with pytest.raises(estimate.EstimateError, match=r"model\.layers: must be int"):
            ModelFacts.from_report(report)


class TestLoraTrainableParameters:
    def test_gpt2_adapts_c_attn_and_both_c_proj(self) -> None:
        # per layer: c_attn 64+192, attn c_proj 64+64, mlp c_proj 256+64 = 704; × 2 layers × rank 8
        assert SMALL.lora_trainable(8) == 8 * 2 * 704

    def test_llama_adapts_q_k_v_o(self) -> None:
        facts = ModelFacts.from_config(LLAMA3_8B)
        # q 4096+4096, k and v 4096+1024 each, o 4096+4096 → 26624 per layer
        assert facts.lora_trainable(16) == 16 * 32 * 26624

    def test_measured_inputs_outputs_win_over_the_architecture_default(self) -> None:
        assert dataclasses.replace(SMALL, lora_inputs_outputs=100).lora_trainable(4) == 400


class TestTrainingMemory:
    def test_full_fp32_on_cpu_term_by_term(self) -> None:
        shape = TrainingShape(method="full", precision="fp32", seq_length=128, micro_batch=4, device="cpu")
        m = estimate.training_memory(SMALL, shape)
        assert m.weights == 4_000_000
        assert m.gradients == 4_000_000
        assert m.optimizer == 8_000_000
        assert m.autocast_cache == 0
        # 2 layers × 512 tokens × 4 bytes × (10·64 + 2·256)
        assert m.activations == 2 * 512 * 4 * (640 + 512)
        # 512 tokens × 1000 vocab × (4 + 8)
        assert m.logits == 512 * 1000 * 12
        assert m.overhead == estimate.CPU_OVERHEAD_BYTES
        assert m.total == 16_000_000 + 4_718_592 + 6_144_000 + 64 * MIB

    def test_lora_bf16_holds_base_weights_in_two_bytes_and_optimizer_state_only_for_adapters(self) -> None:
        shape = TrainingShape(method="lora", lora_rank=8, precision="bf16", seq_length=128, micro_batch=4)
        m = estimate.training_memory(SMALL, shape)
        trainable = 8 * 2 * 704
        assert (m.weights, m.gradients, m.optimizer) == (2_000_000, 4 * trainable, 8 * trainable)
        assert m.activations == 2 * 512 * 2 * (640 + 512)
        modelled = m.total - m.overhead
        assert m.overhead == GIB + int(0.10 * modelled)

    def test_full_mixed_precision_adds_the_autocast_copy(self) -> None:
        shape = TrainingShape(method="full", precision="bf16", seq_length=128, micro_batch=1)
        assert estimate.training_memory(SMALL, shape).autocast_cache == 2_000_000

    def test_gradient_checkpointing_keeps_one_hidden_state_per_layer_plus_one_layer(self) -> None:
        shape = TrainingShape(method="full", precision="fp32", seq_length=128, micro_batch=4, device="cpu",
                              gradient_checkpointing=True)
        per_layer = 512 * 4 * (640 + 512)
        assert estimate.training_memory(SMALL, shape).activations == 2 * 512 * 64 * 4 + per_layer

    def test_eager_attention_adds_the_seq_squared_term(self) -> None:
        sdpa = TrainingShape(method="full", precision="fp32", seq_length=128, micro_batch=4)
        eager = dataclasses.replace(sdpa, attention="eager")
        extra = estimate.activation_bytes_per_layer(SMALL, eager) - estimate.activation_bytes_per_layer(SMALL, sdpa)
        assert extra == 2 * 4 * 4 * 2 * 128 * 128  # factor × bytes × batch × heads × seq²

    def test_memory_grows_linearly_with_the_micro_batch_beyond_the_fixed_terms(self) -> None:
        def total(batch: int) -> int:
            return estimate.training_memory(SMALL, TrainingShape(method="full", precision="fp32", seq_length=64,
                                                                 micro_batch=batch, device="cpu")).total
        assert total(4) - total(2) == 2 * (total(2) - total(1)) > 0

    def test_a_zero_batch_is_refused(self) -> None:
        with pytest.raises(estimate.EstimateError, match="micro_batch: must be > 0"):
            estimate.training_memory(SMALL, TrainingShape(micro_batch=0))


class TestServingTokensAndTime:
    def test_serving_is_bf16_weights_plus_the_kv_cache(self) -> None:
        facts = ModelFacts.from_config(LLAMA3_8B)
        kv = 2 * 32 * 8 * 128 * 2 * 4096 * 8  # k and v × layers × kv heads × head size × bf16 × tokens × seqs
        assert estimate.serving_memory(facts, tokens=4096, concurrency=8) == 2 * 8_030_261_248 + kv + GIB

    def test_tokens_to_process_are_dataset_tokens_times_epochs(self) -> None:
        assert estimate.tokens_to_process(1_000_000, 2.5) == 2_500_000

    def test_eta_uses_six_flops_per_parameter_and_token_for_full_fine_tuning(self) -> None:
        shape = TrainingShape(method="full")
        seconds = estimate.eta_seconds(SMALL, shape, 1_000_000, gpus=2, tflops=100)
        assert seconds == pytest.approx(6 * 1e6 * 1e6 / (2 * 100e12 * estimate.MODEL_FLOPS_UTILISATION))

    def test_lora_skips_weight_gradients_and_checkpointing_recomputes_the_forward(self) -> None:
        assert estimate.flops_per_token(SMALL, TrainingShape(method="lora")) == 4e6
        assert estimate.flops_per_token(SMALL, TrainingShape(method="lora", gradient_checkpointing=True)) == 6e6


class TestQuantities:
    @pytest.mark.parametrize(("text", "expected"), [("16Gi", 16 * GIB), ("500M", 500_000_000), (1024, 1024),
                                                    ("1.5Gi", int(1.5 * GIB))])
    def test_memory_quantities(self, text: str | int, expected: int) -> None:
        assert estimate.quantity_bytes(text) == expected

    def test_a_bad_quantity_says_what_is_expected(self) -> None:
        with pytest.raises(estimate.EstimateError, match="use e.g. 16Gi"):
            estimate.quantity_bytes("lots")


TYPES = (GpuType("T4", 16, 4, {"gpu": "t4"}, tflops=65), GpuType("A100-40GB", 40, 8, {"gpu": "a100"}, tflops=312),
         GpuType("H100-80GB", 80, 8, {"gpu": "h100"}, tflops=989))


class TestRecommendation:
    def test_auto_without_gpu_types_trains_on_cpu(self) -> None:
        chosen = estimate.recommend(Request("auto"), gpu_bytes=GIB, cpu_bytes=GIB, gpu_types=())
        assert (chosen.fits, chosen.gpus, chosen.gpu_type) == (True, 0, None)

    @pytest.mark.parametrize(("need_gib", "expected"), [(10, "T4"), (30, "A100-40GB"), (70, "H100-80GB")])
    def test_auto_picks_the_type_with_the_least_memory_that_fits(self, need_gib: int, expected: str) -> None:
        chosen = estimate.recommend(Request("auto"), gpu_bytes=need_gib * GIB, cpu_bytes=0, gpu_types=TYPES)
        assert chosen.fits and chosen.gpus == 1 and chosen.gpu_type is not None
        assert chosen.gpu_type.name == expected
        assert chosen.node_selector == dict(chosen.gpu_type.node_selector)

    def test_auto_adds_gpus_to_meet_the_target_time_up_to_a_node(self) -> None:
        chosen = estimate.recommend(Request("auto"), gpu_bytes=GIB, cpu_bytes=0, gpu_types=TYPES,
                                    eta_for=lambda n, tflops: 1000 / n, target_seconds=300)
        assert chosen.gpus == 4  # 1000/4 = 250 s ≤ 300 s; 1000/3 > 300

    def test_too_big_for_every_type_is_refused_with_the_estimate(self) -> None:
        chosen = estimate.recommend(Request("auto"), gpu_bytes=100 * GIB, cpu_bytes=0, gpu_types=TYPES)
        assert not chosen.fits
        assert "needs about 100.0 GiB per GPU" in chosen.message and "H100-80GB (80 GiB)" in chosen.message

    def test_a_fixed_count_pinned_to_a_small_type_names_the_type_that_would_fit(self) -> None:
        request = Request(2, node_selector={"gpu": "t4"})
        chosen = estimate.recommend(request, gpu_bytes=30 * GIB, cpu_bytes=0, gpu_types=TYPES)
        assert not chosen.fits
        assert "would fit: A100-40GB (40 GiB)" in chosen.message

    def test_a_fixed_count_that_fits_somewhere_is_pinned_only_when_a_smaller_type_would_not(self) -> None:
        fits_all = estimate.recommend(Request(1), gpu_bytes=GIB, cpu_bytes=0, gpu_types=TYPES)
        assert fits_all.fits and fits_all.node_selector == {}
        fits_big = estimate.recommend(Request(1), gpu_bytes=50 * GIB, cpu_bytes=0, gpu_types=TYPES)
        assert fits_big.fits and fits_big.node_selector == {"gpu": "h100"}

    def test_more_gpus_than_any_node_has_is_refused(self) -> None:
        chosen = estimate.recommend(Request(16), gpu_bytes=GIB, cpu_bytes=0, gpu_types=TYPES)
        assert not chosen.fits and "no GPU type offers 16 GPUs on one node" in chosen.message

    def test_cpu_jobs_are_checked_against_their_memory_limit(self) -> None:
        chosen = estimate.recommend(Request(0, memory_bytes=GIB), gpu_bytes=0, cpu_bytes=3 * GIB, gpu_types=TYPES)
        assert not chosen.fits and "resources.memory of at least 4Gi" in chosen.message


class TestPlan:
    def test_an_impossible_full_fine_tune_suggests_settings_that_would_fit(self) -> None:
        facts = ModelFacts.from_config(LLAMA3_8B)
        shape = TrainingShape(method="full", precision="bf16", seq_length=2048, micro_batch=4)
        result = estimate.plan(facts, shape, dataset_tokens=10**7, epochs=3, request=Request("auto"), gpu_types=TYPES)
        assert not result.fits
        assert "with the same resources it would fit with method.type: lora" in result.recommendation.message
        assert result.tokens == 3 * 10**7

    def test_status_fields(self) -> None:
        shape = TrainingShape(method="lora", seq_length=256, micro_batch=8)
        result = estimate.plan(SMALL, shape, dataset_tokens=1000, epochs=2, request=Request("auto"), gpu_types=TYPES)
        status = result.to_status()
        assert status["gpus"] == 1 and status["gpuType"] == "T4" and status["tokensToProcess"] == 2000
        assert status["trainMemoryBytesPerDevice"] == result.breakdown.total
        assert status["etaSeconds"] >= 0 and status["serveMemoryBytes"] > SMALL.parameters * 2


class TestDataParallelMemory:
    """Per-device memory under the strategy and world size (docs/sizing.md, "Several devices")."""

    def test_ddp_keeps_a_replica_on_every_device_plus_its_gradient_buckets(self) -> None:
        facts = ModelFacts.from_config(GPT2_SMALL)
        one = estimate.training_memory(facts, TrainingShape(method="full", seq_length=512, micro_batch=4))
        eight = estimate.training_memory(facts, TrainingShape(method="full", seq_length=512, micro_batch=4,
                                                              world_size=8))
        assert (eight.weights, eight.optimizer, eight.activations) == (one.weights, one.optimizer, one.activations)
        assert eight.gradients == 2 * one.gradients

    def test_fsdp_divides_weights_gradients_and_optimizer_state_by_the_world(self) -> None:
        facts = ModelFacts.from_config(LLAMA3_8B)
        shape = TrainingShape(method="full", seq_length=2048, micro_batch=1, gradient_checkpointing=True)
        one = estimate.training_memory(facts, shape)
        sharded = estimate.training_memory(facts, dataclasses.replace(shape, strategy="fsdp", world_size=8))
        gathered = 2 / facts.layers  # two whole blocks at a time
        assert sharded.optimizer == pytest.approx(one.optimizer / 8, abs=1)
        assert sharded.weights == pytest.approx(one.weights * (1 / 8 + gathered), rel=1e-6)
        assert sharded.gradients == pytest.approx(one.gradients * (1 / 8 + gathered), rel=1e-6)
        assert sharded.activations == one.activations  # each device still runs its own micro-batch
        # 8B full fine-tuning needs ~130 GB on one device; sharded over 8 it fits an 80 GB H100.
        assert one.total > 80 * GIB > sharded.total

    def test_the_spec_decides_strategy_and_world_size(self) -> None:
        spec = FineTuneJobSpec.from_dict({
            "model": {"source": "hf://org/model"}, "dataset": {"train": {"source": "/data/train.jsonl"}},
            "output": {"storage": "/out"}, "resources": {"gpus": 8, "nodes": 2}, "training": {"strategy": "fsdp"}})
        shape = estimate.shape_for(spec, {}, "gpu")
        assert (shape.strategy, shape.world_size) == ("fsdp", 16)
        assert estimate.shape_for(spec, {}, "cpu").world_size == 1

    def test_auto_never_picks_more_gpus_than_there_are_micro_batches_to_share(self) -> None:
        chosen = estimate.recommend(Request("auto"), gpu_bytes=GIB, cpu_bytes=0, gpu_types=TYPES,
                                    eta_for=lambda n, tflops: 1000 / n, target_seconds=300, max_useful_gpus=2)
        assert chosen.gpus == 2  # 4 would meet the target, but two of them would have nothing to train on
        shape = TrainingShape(seq_length=512, micro_batch=4)
        assert estimate.micro_batches_per_epoch(4096, shape) == 2
        assert estimate.micro_batches_per_epoch(0, shape) == 0
