"""Model FLOPs per token of a training step (forward + backward), from the model config alone."""
from __future__ import annotations

from collections.abc import Iterable

# bf16 dense tensor-core peak, TFLOP/s, by exact CUDA device name (torch.cuda.get_device_name): NVIDIA's
# figure without sparsity (half the 2:4-sparse one where a datasheet gives only that), rounded down. Names
# match whole: a substring would give every H100 the SXM's 989 (the PCIe card peaks at 756, the NVL at 835).
PEAK_BF16_TFLOPS = {
    "NVIDIA H100 80GB HBM3": 989.0, "NVIDIA H100 PCIe": 756.0, "NVIDIA H100 NVL": 835.0,
    "NVIDIA H200": 989.0, "NVIDIA H200 NVL": 835.0, "NVIDIA GH200 480GB": 989.0,
    "NVIDIA H800": 989.0, "NVIDIA H800 80GB HBM3": 989.0, "NVIDIA H800 PCIe": 756.0,
    "NVIDIA H20": 148.0, "NVIDIA B200": 2250.0,
    "NVIDIA A100-SXM4-80GB": 312.0, "NVIDIA A100-SXM4-40GB": 312.0, "NVIDIA A100-PCIE-40GB": 312.0,
    "NVIDIA A100 80GB PCIe": 312.0, "NVIDIA A800-SXM4-80GB": 312.0, "NVIDIA A800 80GB PCIe": 312.0,
    "NVIDIA L40S": 362.0, "NVIDIA L4": 121.0, "NVIDIA A10": 125.0, "NVIDIA GeForce RTX 4090": 165.0,
}


def mean_causal_context(doc_lengths: Iterable[int]) -> float:
    """Token-weighted mean number of keys a query attends to, each document attending only to itself."""
    lengths = [int(n) for n in doc_lengths if n > 0]
    tokens = sum(lengths)
    if tokens == 0:
        return 0.0
    return sum(n * (n + 1) / 2 for n in lengths) / tokens


def is_sparse_layer(config, layer: int) -> bool:
    """Whether decoder layer `layer` (0-based) is a mixture of experts, by transformers' Qwen3-MoE rule; the others
    are dense MLPs of `intermediate_size`."""
    return (layer not in (getattr(config, "mlp_only_layers", None) or ()) and config.num_experts > 0
            and (layer + 1) % getattr(config, "decoder_sparse_step", 1) == 0)


def flops_per_token(config, mean_context: float, frozen_weights: bool = False) -> float:
    """6 x active matmul params per layer + causal attention scores, times depth, plus the LM head.

    A layer's active MLP params are its top-k experts and router, or on a dense layer (`mlp_only_layers`,
    `decoder_sparse_step`) its MLP of `intermediate_size`.
    frozen_weights (LoRA): 4 x instead of 6 x, as frozen weights need no weight gradient (the input
    gradients still flow through them; the rank-r adapters are left out). Recomputation under activation
    checkpointing is not counted: this is model FLOPs. Norms, RoPE, the softmax and the embedding lookup are
    left out, as is usual for MFU.
    """
    weight_factor = 4 if frozen_weights else 6
    hidden = config.hidden_size
    heads = config.num_attention_heads
    layers = config.num_hidden_layers
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    attn_params = hidden * head_dim * (2 * heads + 2 * config.num_key_value_heads)
    sparse_mlp_params = config.num_experts_per_tok * 3 * hidden * config.moe_intermediate_size \
        + config.num_experts * hidden  # the router
    dense_mlp_params = 3 * hidden * config.intermediate_size
    sparse_layers = sum(is_sparse_layer(config, layer) for layer in range(layers))
    mlp_params = sparse_layers * sparse_mlp_params + (layers - sparse_layers) * dense_mlp_params
    attention_scores = 12 * heads * head_dim * mean_context
    return (weight_factor * (layers * attn_params + mlp_params) + layers * attention_scores
            + weight_factor * config.vocab_size * hidden)


def peak_tflops(device_name: str | None) -> float | None:
    """bf16 dense peak of a GPU by its exact name, or None when unknown (and always on the CPU)."""
    return PEAK_BF16_TFLOPS.get(device_name.strip()) if device_name else None
