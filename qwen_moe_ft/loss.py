"""Causal-LM loss as a sum over label tokens, normalised once per optimizer step.

Every micro-batch returns the *sum* of its per-token losses; the step divides by the number of
label tokens of the whole global batch (all micro-batches, all data-parallel ranks), so packed
and unpacked runs optimise the same objective and accumulation does not reweight short examples.
"""
from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F
from .config import ConfigError
from .data.rows import IGNORE
from .model.loading import causal_lm_of


# Fused linear cross-entropy kernels (optional packages) and the plain logits path.
FUSED_LOSS_PACKAGES = {"cce": "cut_cross_entropy", "liger": "liger_kernel"}


def select_loss_impl(requested: str, device_type: str) -> str:
    """auto: logits + torch CE, the fastest measured (docs/benchmark-history.md, commits 9f78d54 and c471a06);
    fused kernels on request."""
    if requested in ("auto", "torch"):
        return "torch"
    package = FUSED_LOSS_PACKAGES[requested]
    if device_type != "cuda" or importlib.util.find_spec(package) is None:
        raise ConfigError(f"--loss-impl {requested} needs a GPU and the {package.replace('_', '-')} package; "
                         "use --loss-impl torch")
    return requested


def _fused_linear_ce_sum(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss

    # Chunked: the [tokens, vocab] logits are never materialised, in bf16 or fp32.
    loss = LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE, reduction="sum", accum_dtype=torch.float32)
    return loss(weight, hidden, labels).float()


def _cce_sum(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    from cut_cross_entropy import linear_cross_entropy

    # filter_eps=None: exact gradients (CCE's default drops small softmax entries from the backward).
    return linear_cross_entropy(hidden, weight, labels, ignore_index=IGNORE, reduction="sum", filter_eps=None).float()


def token_loss_sum(model: torch.nn.Module, inputs: dict, shift_labels: torch.Tensor,
                   impl: str = "torch") -> torch.Tensor:
    """Sum of next-token cross-entropies over the label tokens of one micro-batch (fp32)."""
    lm = causal_lm_of(model)
    hidden = lm.model(**inputs, use_cache=False).last_hidden_state
    if impl in FUSED_LOSS_PACKAGES:
        fused = _cce_sum if impl == "cce" else _fused_linear_ce_sum
        return fused(hidden.flatten(0, 1), lm.lm_head.weight, shift_labels.flatten())
    logits = lm.lm_head(hidden).float()
    return F.cross_entropy(logits.view(-1, logits.shape[-1]), shift_labels.view(-1), ignore_index=IGNORE,
                           reduction="sum")


def backward_scale(global_label_tokens: int, grad_accum: int) -> float:
    """Factor for a micro-batch's loss sum so the step's gradient is that of sum / N over the global batch.

    DeepSpeed divides the loss by the accumulation steps, and sums gradients over ranks
    (build_ds_config sets gradient_allreduce_op "sum"): dividing by the global label count here
    replaces its division of every gradient by the world size.
    """
    return grad_accum / max(global_label_tokens, 1)
