"""Causal-LM loss as a sum over label tokens, normalised once per optimizer step.

Every micro-batch returns the *sum* of its per-token losses; the step divides by the number of
label tokens of the whole global batch (all micro-batches, all data-parallel ranks), so packed
and unpacked runs optimise the same objective and accumulation does not reweight short examples.

The plain path computes the [tokens, vocab] logits in one go (on a GPU, its loss and gradient by Triton kernels:
logits_cross_entropy.py); the chunked path (ChunkedLinearCrossEntropy) a chunk
of tokens at a time, for long micro-batches whose logits would not fit, with the same value and gradients.
"""
from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F
from .config import ConfigError
from .data.rows import IGNORE
from .logits_cross_entropy import logits_cross_entropy_sum
from .model.loading import causal_lm_of


# Fused linear cross-entropy kernels (optional packages) and the plain logits path.
FUSED_LOSS_PACKAGES = {"cce": "cut_cross_entropy", "liger": "liger_kernel"}
# auto keeps the plain path up to this many tokens a micro-batch. Its logits grow with them (bf16, their fp32 copy
# and its gradient: 11.6 GiB at 8192 tokens of Qwen3's 151936-entry vocabulary, 46 GiB at 32768), the chunked
# path's stay at one chunk's.
PLAIN_LOSS_MAX_TOKENS = 8192
# Tokens a chunk of the chunked path: 0.87 GiB of bf16 logits and their fp32 copy at Qwen3's vocabulary, and
# products of 1024 x hidden x vocab, large enough to keep the GPU's matrix units busy.
CHUNK_TOKENS = 1024


def whole_logits_loss(device_type: str) -> str:
    """The loss on the whole [tokens, vocab] logits that auto takes: the Triton kernels where they run (a GPU), torch's
    cross-entropy elsewhere."""
    return "triton" if device_type == "cuda" and importlib.util.find_spec("triton") is not None else "torch"


def select_loss_impl(requested: str, device_type: str, *, tokens: int = 0, logits_fit: bool = True,
                     whole: str | None = None) -> tuple[str, str]:
    """The loss a run computes, and why where auto chose it. auto: the whole logits (`whole`, by default
    whole_logits_loss of this machine; the fastest measured, docs/benchmark-history.md), up to PLAIN_LOSS_MAX_TOKENS
    tokens a micro-batch where they fit (`logits_fit`: the memory estimate's say); the chunked path otherwise. Fused
    linear cross-entropy kernels on request."""
    if requested == "auto":
        if tokens > PLAIN_LOSS_MAX_TOKENS:
            return "chunked", f"auto: {tokens} tokens a micro-batch, more than {PLAIN_LOSS_MAX_TOKENS}"
        if not logits_fit:
            return "chunked", "auto: the estimated peak with the logits exceeds the GPU"
        return whole or whole_logits_loss(device_type), ""
    if requested in ("torch", "chunked"):
        return requested, ""
    if requested == "triton":
        if whole_logits_loss(device_type) != "triton":
            raise ConfigError("--loss-impl triton needs a GPU and triton; use --loss-impl torch (the same loss in "
                              "torch ops)")
        return requested, ""
    package = FUSED_LOSS_PACKAGES[requested]
    if device_type != "cuda" or importlib.util.find_spec(package) is None:
        raise ConfigError(f"--loss-impl {requested} needs a GPU and the {package.replace('_', '-')} package; "
                         "use --loss-impl chunked (no logits either) or torch")
    return requested, ""


def _fused_linear_ce_sum(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss

    # Chunked: the [tokens, vocab] logits are never materialised, in bf16 or fp32.
    loss = LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE, reduction="sum", accum_dtype=torch.float32)
    return loss(weight, hidden, labels).float()


def _cce_sum(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    from cut_cross_entropy import linear_cross_entropy

    # filter_eps=None: exact gradients (CCE's default drops small softmax entries from the backward).
    return linear_cross_entropy(hidden, weight, labels, ignore_index=IGNORE, reduction="sum", filter_eps=None).float()


def _chunk_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, with_grad: bool
                         ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Sum of the chunk's cross-entropies (fp32) and, with_grad, their gradient w.r.t. its logits (hidden's dtype),
    as the plain path computes them: the logits in the weights' dtype, then in fp32."""
    logits = F.linear(hidden, weight).float()
    valid = labels != IGNORE
    safe_labels = labels.masked_fill(~valid, 0)
    target = logits.gather(1, safe_labels[:, None]).squeeze(1)
    row_max = logits.amax(dim=1, keepdim=True)
    exp = logits.sub_(row_max).exp_()  # in place: one [chunk, vocab] fp32 tensor lives at a time
    sums = exp.sum(dim=1, keepdim=True)
    loss = torch.where(valid, (sums.log() + row_max).squeeze(1) - target, 0.0).sum()
    if not with_grad:
        return loss, None
    grad = exp.div_(sums)  # softmax, minus one at the label, zero on ignored tokens
    grad.scatter_add_(1, safe_labels[:, None], torch.full_like(target[:, None], -1.0))
    grad.mul_(valid[:, None])
    return loss, grad.to(hidden.dtype)


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Sum of the cross-entropies of `hidden @ weight.T` against `labels`, `chunk` tokens at a time. The forward also
    computes the gradients w.r.t. hidden and weight (the loss is the graph's last op: the backward only scales
    them), so [tokens, vocab] logits never exist and nothing of that size is kept for the backward; the weight's
    gradient is summed over the chunks in fp32."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk: int) -> torch.Tensor:
        grad_hidden = hidden.new_empty(hidden.shape) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if ctx.needs_input_grad[1] else None
        total = torch.zeros((), device=hidden.device, dtype=torch.float32)
        for start in range(0, hidden.shape[0], chunk):
            h = hidden[start:start + chunk]
            loss, grad_logits = _chunk_cross_entropy(h, weight, labels[start:start + chunk], with_grad=True)
            total += loss
            if grad_hidden is not None:
                torch.mm(grad_logits, weight, out=grad_hidden[start:start + chunk])
            if grad_weight is not None:
                grad_weight.add_(grad_logits.T @ h)
            del grad_logits  # before the next chunk's logits
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_total: torch.Tensor):
        grad_hidden, grad_weight = ctx.saved_tensors
        # scaled in fp32 (the plain path scales its fp32 logits' gradient), rounded once to the input's dtype
        if grad_hidden is not None:
            grad_hidden = (grad_hidden.float() * grad_total).to(grad_hidden.dtype)
        if grad_weight is not None:
            grad_weight = torch.mul(grad_weight, grad_total,
                                    out=torch.empty_like(grad_weight, dtype=ctx.weight_dtype))
        return grad_hidden, grad_weight, None, None


def chunked_linear_ce_sum(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                          chunk: int = CHUNK_TOKENS) -> torch.Tensor:
    """The plain path's loss and gradients (to float rounding) from [tokens, hidden] states, with the logits of
    `chunk` tokens at a time; without gradients (evaluation), the loss alone."""
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return ChunkedLinearCrossEntropy.apply(hidden, weight, labels, chunk)
    total = torch.zeros((), device=hidden.device, dtype=torch.float32)
    for start in range(0, hidden.shape[0], chunk):
        total += _chunk_cross_entropy(hidden[start:start + chunk], weight, labels[start:start + chunk], False)[0]
    return total


LINEAR_CROSS_ENTROPY = {"cce": _cce_sum, "liger": _fused_linear_ce_sum, "chunked": chunked_linear_ce_sum}


def token_loss_sum(model: torch.nn.Module, inputs: dict, shift_labels: torch.Tensor,
                   impl: str = "torch") -> torch.Tensor:
    """Sum of next-token cross-entropies over the label tokens of one micro-batch (fp32)."""
    lm = causal_lm_of(model)
    hidden = lm.model(**inputs, use_cache=False).last_hidden_state
    if impl in LINEAR_CROSS_ENTROPY:  # from the hidden states and the LM head's weight: no [tokens, vocab] logits
        return LINEAR_CROSS_ENTROPY[impl](hidden.flatten(0, 1), lm.lm_head.weight, shift_labels.flatten())
    logits, labels = lm.lm_head(hidden).flatten(0, 1), shift_labels.flatten()
    if impl == "triton":
        return logits_cross_entropy_sum(logits, labels, IGNORE)
    return F.cross_entropy(logits.float(), labels, ignore_index=IGNORE, reduction="sum")


def backward_scale(global_label_tokens: int, grad_accum: int) -> float:
    """Factor for a micro-batch's loss sum so the step's gradient is that of sum / N over the global batch.

    DeepSpeed divides the loss by the accumulation steps, and sums gradients over ranks
    (build_ds_config sets gradient_allreduce_op "sum"): dividing by the global label count here
    replaces its division of every gradient by the world size.
    """
    return grad_accum / max(global_label_tokens, 1)
