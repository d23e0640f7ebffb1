"""Model FLOPs per token of a training step (forward + backward), from the model config alone."""
from __future__ import annotations

from collections.abc import Iterable

# bf16 dense tensor-core peak, TFLOP/s, matched against the CUDA device name (first match wins).
PEAK_BF16_TFLOPS = (("H200", 989.0), ("H100", 989.0), ("H800", 989.0), ("H20", 148.0), ("B200", 2250.0),
                    ("A100", 312.0), ("A800", 312.0), ("L40S", 362.0), ("A10G", 70.0), ("4090", 165.0))


def mean_causal_context(doc_lengths: Iterable[int]) -> float:
    """Token-weighted mean number of keys a query attends to, each document attending only to itself."""
    lengths = [int(n) for n in doc_lengths if n > 0]
    tokens = sum(lengths)
    if tokens == 0:
        return 0.0
    return sum(n * (n + 1) / 2 for n in lengths) / tokens


def flops_per_token(config, mean_context: float, frozen_weights: bool = False) -> float:
    """6 x active matmul params per layer + causal attention scores, times depth, plus the LM head.

    frozen_weights (LoRA): 4 x instead of 6 x, as frozen weights need no weight gradient (the input
    gradients still flow through them; the rank-r adapters are left out). Recomputation under activation
    checkpointing is not counted: this is model FLOPs. Norms, RoPE, the softmax and the embedding lookup are
    left out, as is usual for MFU.
    """
    weight_factor = 4 if frozen_weights else 6
    hidden = config.hidden_size
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    attn_params = hidden * head_dim * (2 * heads + 2 * config.num_key_value_heads)
    expert_params = config.num_experts_per_tok * 3 * hidden * config.moe_intermediate_size
    router_params = config.num_experts * hidden
    per_layer = weight_factor * (attn_params + expert_params + router_params) + 12 * heads * head_dim * mean_context
    return config.num_hidden_layers * per_layer + weight_factor * config.vocab_size * hidden


def peak_tflops(device_name: str | None) -> float | None:
    """bf16 dense peak for a GPU name, or None when unknown (and always on the CPU)."""
    if not device_name:
        return None
    for key, peak in PEAK_BF16_TFLOPS:
        if key in device_name:
            return peak
    return None
