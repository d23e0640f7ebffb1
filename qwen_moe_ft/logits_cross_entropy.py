"""Cross-entropy summed over the label tokens of bf16 [tokens, vocab] logits, with their gradient written over them.

The plain path (`F.cross_entropy(logits.float())`) moves ~40 bytes of memory per logit: the fp32 copy, log-softmax's
output, its backward's fp32 gradient and the cast back to bf16 (at 8192 tokens of Qwen3's 151936-entry vocabulary,
~17 ms of an H100's time beside the LM head's GEMMs), and holds 12 bytes per logit at its peak. Here one Triton kernel
reads each row of logits once (online softmax: max and sum together) and keeps its log-sum-exp; the backward's kernel
reads the row again and writes softmax - one-hot, scaled by the incoming gradient in fp32 and rounded once, over the
logits: 6 bytes of traffic and the logits' own 2 bytes of memory per entry. The arithmetic is the plain path's (fp32
from the bf16 logits), so the per-token losses are fp32 and the gradients round once, as there. liger-kernel's
cross-entropy works the same way but stores each token's loss in the logits' dtype (bf16: 2^-9 of a ~12-nat loss,
biased where the losses cluster, as at the start of training), hence this kernel.

CPU (and anywhere Triton is missing): the plain path.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs
    triton = None

BLOCK, WARPS = 8192, 16  # logits a program reads per iteration (a row is 151936 at Qwen3's vocabulary), warps a row

if triton is not None:
    @triton.jit
    def _lse_loss_kernel(logits_ptr, labels_ptr, lse_ptr, loss_ptr, stride, vocab, ignore_index,
                         BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        logits_ptr += row * stride
        running_max = float("-inf")
        running_sum = 0.0
        for start in range(0, vocab, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            x = tl.load(logits_ptr + cols, mask=cols < vocab, other=float("-inf")).to(tl.float32)
            new_max = tl.maximum(running_max, tl.max(x, axis=0))
            running_sum = running_sum * tl.exp(running_max - new_max) + tl.sum(tl.exp(x - new_max), axis=0)
            running_max = new_max
        lse = running_max + tl.log(running_sum)
        tl.store(lse_ptr + row, lse)
        label = tl.load(labels_ptr + row)
        loss = 0.0
        if label != ignore_index:
            loss = lse - tl.load(logits_ptr + label).to(tl.float32)
        tl.store(loss_ptr + row, loss)

    @triton.jit
    def _grad_kernel(logits_ptr, labels_ptr, lse_ptr, grad_out_ptr, stride, vocab, ignore_index,
                     BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        logits_ptr += row * stride
        label = tl.load(labels_ptr + row)
        scale = tl.load(grad_out_ptr).to(tl.float32)
        if label == ignore_index:
            scale = 0.0
        lse = tl.load(lse_ptr + row)
        for start in range(0, vocab, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            inside = cols < vocab
            x = tl.load(logits_ptr + cols, mask=inside, other=0.0).to(tl.float32)
            grad = (tl.exp(x - lse) - tl.where(cols == label, 1.0, 0.0)) * scale
            tl.store(logits_ptr + cols, grad.to(logits_ptr.dtype.element_ty), mask=inside)


class _LogitsCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
        tokens, vocab = logits.shape
        lse = torch.empty(tokens, device=logits.device, dtype=torch.float32)
        losses = torch.empty_like(lse)
        if tokens:
            _lse_loss_kernel[(tokens,)](logits, labels, lse, losses, logits.stride(0), vocab, ignore_index,
                                        BLOCK=BLOCK, num_warps=WARPS)
        ctx.save_for_backward(logits, labels, lse)
        ctx.ignore_index = ignore_index
        return losses.sum()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_total: torch.Tensor):
        logits, labels, lse = ctx.saved_tensors
        tokens, vocab = logits.shape
        # The logits are needed by nothing else once the loss is taken (the LM head's backward keeps its input and
        # weight): their gradient takes their place.
        if tokens:
            _grad_kernel[(tokens,)](logits, labels, lse, grad_total.float().contiguous(), logits.stride(0), vocab,
                                    ctx.ignore_index, BLOCK=BLOCK, num_warps=WARPS)
        return logits, None, None


def runs_here(logits: torch.Tensor) -> bool:
    return triton is not None and logits.is_cuda


def logits_cross_entropy_sum(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Sum of the cross-entropies of [tokens, vocab] `logits` (any float dtype) against `labels` (fp32). On a GPU
    with Triton, the gradient of the logits is written over them: they must not be used after the loss. Labels are
    `ignore_index` or below the vocabulary size, unchecked here (a check would wait for the GPU): the trainer's are
    the ids of the model's tokenizer."""
    if not runs_here(logits):
        return F.cross_entropy(logits.float(), labels, ignore_index=ignore_index, reduction="sum")
    return _LogitsCrossEntropy.apply(logits.contiguous(), labels.contiguous(), ignore_index)
