"""Activation checkpointing of some or all decoder layers, with transformers' own non-reentrant checkpointing."""
from __future__ import annotations

import torch
from transformers.modeling_layers import GradientCheckpointingLayer


def enable_activation_checkpointing(model: torch.nn.Module, layers: int = 0) -> str:
    """Recompute the first `layers` decoder layers of `model` in the backward (0: every one); the others keep
    their activations. The first rather than the last: the backward reaches them after the kept layers have
    freed their activations, so a recompute never adds to all of those at once. Returns what the startup
    line says."""
    # non-reentrant: frozen inputs (LoRA) need no requires_grad trick
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    decoder_layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    if layers > len(decoder_layers):
        raise ValueError(f"--checkpoint-layers {layers}: the model has {len(decoder_layers)} decoder layers")
    for layer in decoder_layers[layers or len(decoder_layers):]:
        layer.gradient_checkpointing = False
    return f"{layers or len(decoder_layers)} of {len(decoder_layers)} layers recomputed"
