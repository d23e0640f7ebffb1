"""Causal-LM loss as a sum over label tokens, normalised once per optimizer step.

Every micro-batch returns the *sum* of its per-token losses; the step divides by the number of
label tokens of the whole global batch (all micro-batches, all data-parallel ranks), so packed
and unpacked runs optimise the same objective and accumulation does not reweight short examples.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

from .data import IGNORE


def causal_lm_of(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers *ForCausalLM inside a DeepSpeed engine and/or PEFT wrapper."""
    # DeepSpeedEngine forwards unknown attributes to its module, so test the type, not hasattr.
    while not (isinstance(model, PreTrainedModel) and hasattr(model, "lm_head")):
        inner = getattr(model, "module", None) or getattr(model, "base_model", None) or getattr(model, "model", None)
        if inner is None or inner is model:
            raise TypeError(f"{type(model).__name__} holds no causal LM with an lm_head")
        model = inner
    return model


def token_loss_sum(model: torch.nn.Module, inputs: dict, shift_labels: torch.Tensor) -> torch.Tensor:
    """Sum of next-token cross-entropies over the label tokens of one micro-batch (fp32)."""
    lm = causal_lm_of(model)
    hidden = lm.model(**inputs, use_cache=False).last_hidden_state
    logits = lm.lm_head(hidden).float()
    return F.cross_entropy(logits.view(-1, logits.shape[-1]), shift_labels.view(-1), ignore_index=IGNORE,
                           reduction="sum")


def backward_scale(global_label_tokens: int, world_size: int, grad_accum: int) -> float:
    """Factor for a micro-batch's loss sum so DeepSpeed's mean over ranks and micro-steps yields sum / N."""
    return world_size * grad_accum / max(global_label_tokens, 1)
