"""GPU efficiency: model FLOPs utilisation (MFU) of a GPT-2-124M-shaped model in bf16, and LoRA tokens/s on a ~1B model.

(a) MFU: a randomly initialised GPT-2-124M-shaped model (12 layers, 768
    wide, 12 heads, vocabulary 50257, 1024 positions), SDPA attention (flash
    kernels on the GPU), bf16 autocast over fp32 master weights, fused AdamW,
    `torch.compile` on the GPU (`--no-compile` to compare). Full training
    steps (forward, backward, optimizer) on random tokens; after warm-up,
    MFU = achieved FLOP/s / the GPU's dense bf16 peak, with FLOPs per token =
    6 x parameters (without position embeddings) + 12 x layers x width x sequence
    length (attention), the PaLM paper's accounting.
(b) LoRA: a Llama-3.2-1B-shaped model (16 layers, 2048 wide, 8192 MLP, 32
    heads / 8 KV heads, vocabulary 128256; ~1.2B parameters) in bf16 with peft
    LoRA r=16 on q/k/v/o, training tokens/s and peak GPU memory.

Without a GPU both still run, on the CPU, with the same code and smaller
shapes (say so in every line: "no GPU: CPU figures"); they then show that the
path works, not what a GPU does.

    python bench/gpu_mfu.py                  # on a GPU machine: ~2-3 minutes
    python bench/gpu_mfu.py --quick          # smoke test (tiny shapes, CPU or GPU)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import workload

PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10": 125.0,
                    "RTX 4090": 165.0, "B200": 2250.0}
"""Dense bf16 tensor-core peaks (TFLOP/s) by GPU name; `--peak-tflops` overrides."""


def gpt2_config(quick: bool, cpu: bool) -> Any:
    from transformers import GPT2Config

    if quick:
        return GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=512, n_positions=128)
    if cpu:  # the real width and vocabulary, fewer layers: a CPU cannot run 124M x 1024 tokens quickly
        return GPT2Config(n_layer=2, n_embd=768, n_head=12, vocab_size=50257, n_positions=256)
    return GPT2Config(n_layer=12, n_embd=768, n_head=12, vocab_size=50257, n_positions=1024)


def llama_config(quick: bool, cpu: bool) -> Any:
    from transformers import LlamaConfig

    if quick:
        return LlamaConfig(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=2,
                           num_key_value_heads=2, vocab_size=512, max_position_embeddings=256)
    return LlamaConfig(num_hidden_layers=2 if cpu else 16, hidden_size=2048, intermediate_size=8192,
                       num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                       max_position_embeddings=2048, tie_word_embeddings=True, rope_theta=500000.0)


def timed_steps(step: Any, warmup: int, steps: int, device: str) -> float:
    """Seconds per step after `warmup` steps."""
    import torch

    for _ in range(warmup):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - started) / steps


def mfu_bench(args: argparse.Namespace, device: str) -> dict[str, Any]:
    import torch
    from transformers import GPT2LMHeadModel

    config = gpt2_config(args.quick, device == "cpu")
    config._attn_implementation = "sdpa"
    model = GPT2LMHeadModel(config).to(device)
    model.train()
    parameters = sum(p.numel() for p in model.parameters()) - model.transformer.wpe.weight.numel()
    sequence = config.n_positions
    batch = 1 if device == "cpu" else args.batch
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device == "cuda")
    forward = torch.compile(model) if device == "cuda" and not args.no_compile else model
    ids = torch.randint(0, config.vocab_size, (batch, sequence), device=device)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32

    def step() -> None:
        with torch.autocast(device_type=device, dtype=dtype, enabled=device == "cuda"):
            loss = forward(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    seconds = timed_steps(step, warmup=1 if device == "cpu" else 5, steps=2 if device == "cpu" else 20,
                          device=device)
    tokens = batch * sequence
    flops_per_token = 6 * parameters + 12 * config.n_layer * config.n_embd * sequence
    achieved = flops_per_token * tokens / seconds
    peak = args.peak_tflops or next((v for k, v in PEAK_BF16_TFLOPS.items()
                                     if device == "cuda" and k in torch.cuda.get_device_name(0)), None)
    return {"parameters": parameters, "layers": config.n_layer, "sequence": sequence, "batch": batch,
            "tokensPerSecond": round(tokens / seconds, 1), "achievedTflops": round(achieved / 1e12, 3),
            "mfu": round(achieved / (peak * 1e12), 4) if peak else None, "peakTflops": peak,
            "compiled": device == "cuda" and not args.no_compile}


def lora_bench(args: argparse.Namespace, device: str) -> dict[str, Any]:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    config = llama_config(args.quick, device == "cpu")
    config._attn_implementation = "sdpa"
    dtype = torch.bfloat16
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype)
    parameters = sum(p.numel() for p in model.parameters())
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0,
                                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    trainable = [p for p in model.parameters() if p.requires_grad]
    for p in trainable:
        p.data = p.data.float()  # adapters in fp32, the frozen base in bf16 (as the trainer does)
    optimizer = torch.optim.AdamW(trainable, lr=2e-4)
    sequence = 128 if device == "cpu" else 2048
    batch = 1 if device == "cpu" else args.lora_batch
    ids = torch.randint(0, config.vocab_size, (batch, sequence), device=device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()

    def step() -> None:
        with torch.autocast(device_type=device, dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    seconds = timed_steps(step, warmup=1 if device == "cpu" else 3, steps=1 if device == "cpu" else 10,
                          device=device)
    peak_gib = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else workload.peak_rss_mib() / 1024
    return {"parameters": parameters, "layers": config.num_hidden_layers,
            "trainable": sum(p.numel() for p in trainable), "sequence": sequence, "batch": batch,
            "tokensPerSecond": round(batch * sequence / seconds, 1), "peakMemoryGiB": round(peak_gib, 2)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes: a smoke test")
    parser.add_argument("--batch", type=int, default=16, help="GPT-2 sequences of 1024 tokens per step (GPU)")
    parser.add_argument("--lora-batch", type=int, default=4, help="LoRA sequences of 2048 tokens per step (GPU)")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile (to compare)")
    parser.add_argument("--peak-tflops", type=float, help="the GPU's dense bf16 peak, if not in the table")
    args = parser.parse_args()
    device = workload.device_kind()
    where = "GPU" if device == "cuda" else "no GPU: CPU figures"
    print(f"hardware          {workload.hardware_line()}")

    mfu = mfu_bench(args, device)
    shape = f"{mfu['layers']} layers x 768" if not args.quick else "tiny"
    print(f"GPT-2-124M MFU    [{where}] {shape}, {mfu['parameters'] / 1e6:.1f}M parameters, batch {mfu['batch']} x "
          f"{mfu['sequence']}: {mfu['tokensPerSecond']:.0f} tokens/s, {mfu['achievedTflops']:.3f} TFLOP/s achieved, "
          + (f"MFU {mfu['mfu']:.1%} of {mfu['peakTflops']:.0f} TFLOP/s (target >= 35%)" if mfu["mfu"] is not None
             else "MFU n/a (no GPU peak to compare with)"))
    lora = lora_bench(args, device)
    print(f"LoRA ~1B          [{where}] Llama-3.2-1B-shaped, {lora['layers']} layers, "
          f"{lora['parameters'] / 1e9:.2f}B parameters ({lora['trainable'] / 1e6:.1f}M trainable), batch "
          f"{lora['batch']} x {lora['sequence']}: {lora['tokensPerSecond']:.0f} tokens/s, peak memory "
          f"{lora['peakMemoryGiB']:.2f} GiB")
    print("RESULT " + json.dumps({"bench": "gpu_mfu", "device": device, "quick": args.quick, "mfu": mfu,
                                  "lora": lora}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
