"""The routing score folded into the experts' SwiGLU, so the combine is an unweighted sum of each token's rows.

Replaces, on the EP=1 block (local_dispatch.py) with trainable SwiGLU experts (expert_mlp.py), the score-weighted
combine of AutoEP's score_apply "post" (deepspeed 0.19.8: deepspeed/module_inject/auto_ep_layer.py
combine_from_routed; deepspeed/ops/triton_ops/autoep_fused_token_ops.py fused_weighted_restore). Guarded by
tests/unit/fastpath/test_scored_swiglu.py (the block's output and every gradient against AutoEP's own forward; the
kernels against the fp32 formula).

A routed row's expert output is s * (h @ W2^T) with h = silu(gate) * up; here it is (s * h) @ W2^T, the same
product with the score applied before the down GEMM's rounding instead of after. The weighted combine's backward
reads every expert output row (top_k rows a token, each hidden wide) only to take each score's gradient
sum(grad_out * y); scored, that gradient is sum(grad_hs * h) over the intermediate width, from the gate/up rows the
SwiGLU's backward reads anyway. One kernel each way: forward hs = bf16(s * silu(gate) * up) computed in fp32 and
rounded once; backward grad_gate_up and the score's fp32 gradient from gate_up, s and grad_hs, h recomputed in
fp32. CPU tensors take the same formula in torch, in fp32.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the torch formula
    triton = None

FORWARD_ROWS = 8  # rows a program of the forward kernel writes
BACKWARD_ROWS = 4  # rows a program of the backward kernel reduces (each row's whole intermediate width)
MAX_BLOCK = 256  # intermediate columns a program handles at once

if triton is not None:
    @triton.jit
    def _scored_swiglu_forward_kernel(gate_up_ptr, scores_ptr, out_ptr, n_rows, inter, ROWS: tl.constexpr,
                                      BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        present = row < n_rows
        inside = present[:, None] & (cols < inter)[None, :]
        gate_at = gate_up_ptr + row[:, None] * (2 * inter) + cols[None, :]
        gate = tl.load(gate_at, mask=inside, other=0.0).to(tl.float32)
        up = tl.load(gate_at + inter, mask=inside, other=0.0).to(tl.float32)
        score = tl.load(scores_ptr + row, mask=present, other=0.0)
        out = score[:, None] * (gate * tl.sigmoid(gate)) * up
        tl.store(out_ptr + row[:, None] * inter + cols[None, :], out.to(out_ptr.dtype.element_ty), mask=inside)

    @triton.jit
    def _scored_swiglu_backward_kernel(grad_ptr, gate_up_ptr, scores_ptr, grad_gate_up_ptr, grad_scores_ptr, n_rows,
                                       inter, ROWS: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
        present = row < n_rows
        score = tl.load(scores_ptr + row, mask=present, other=0.0)
        partial = tl.zeros([ROWS, BLOCK], dtype=tl.float32)
        for start in range(0, inter, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            inside = present[:, None] & (cols < inter)[None, :]
            gate_at = row[:, None] * (2 * inter) + cols[None, :]
            grad = tl.load(grad_ptr + row[:, None] * inter + cols[None, :], mask=inside, other=0.0).to(tl.float32)
            gate = tl.load(gate_up_ptr + gate_at, mask=inside, other=0.0).to(tl.float32)
            up = tl.load(gate_up_ptr + gate_at + inter, mask=inside, other=0.0).to(tl.float32)
            sig = tl.sigmoid(gate)
            silu = gate * sig
            partial += grad * (silu * up)
            grad_h = grad * score[:, None]
            # d/dgate silu(gate) = sigmoid(gate) * (1 + gate * (1 - sigmoid(gate))), as DeepSpeed's SwiGLU takes it
            grad_gate = grad_h * up * (sig * (1.0 + gate * (1.0 - sig)))
            grad_up = grad_h * silu
            dtype = grad_gate_up_ptr.dtype.element_ty
            tl.store(grad_gate_up_ptr + gate_at, grad_gate.to(dtype), mask=inside)
            tl.store(grad_gate_up_ptr + gate_at + inter, grad_up.to(dtype), mask=inside)
        tl.store(grad_scores_ptr + row, tl.sum(partial, axis=1), mask=present)


def _on_device(t: torch.Tensor):
    # Triton launches on the current device, which need not be the tensors'
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _block(inter: int) -> int:
    return min(MAX_BLOCK, triton.next_power_of_2(inter))


def scored_swiglu_forward_triton(gate_up: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """hs = bf16(s * silu(gate) * up) on Triton: gate_up [rows, 2I] contiguous, scores [rows] fp32 contiguous."""
    n_rows, inter = gate_up.shape[0], gate_up.shape[1] // 2
    out = gate_up.new_empty(n_rows, inter)
    if out.numel():
        block = _block(inter)
        grid = (triton.cdiv(n_rows, FORWARD_ROWS), triton.cdiv(inter, block))
        with _on_device(gate_up):
            _scored_swiglu_forward_kernel[grid](gate_up, scores, out, n_rows, inter, ROWS=FORWARD_ROWS, BLOCK=block,
                                                num_warps=4)
    return out


def scored_swiglu_backward_triton(grad: torch.Tensor, gate_up: torch.Tensor, scores: torch.Tensor):
    """(grad_gate_up, grad_scores fp32) on Triton; all three contiguous."""
    n_rows, inter = gate_up.shape[0], gate_up.shape[1] // 2
    grad_gate_up = torch.empty_like(gate_up)
    grad_scores = torch.zeros(n_rows, dtype=torch.float32, device=gate_up.device)
    if grad.numel():
        with _on_device(gate_up):
            _scored_swiglu_backward_kernel[(triton.cdiv(n_rows, BACKWARD_ROWS),)](
                grad, gate_up, scores, grad_gate_up, grad_scores, n_rows, inter, ROWS=BACKWARD_ROWS,
                BLOCK=_block(inter), num_warps=4)
    return grad_gate_up, grad_scores


def scored_swiglu_forward_torch(gate_up: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.float().chunk(2, dim=-1)
    return (scores[:, None] * F.silu(gate) * up).to(gate_up.dtype)


def scored_swiglu_backward_torch(grad: torch.Tensor, gate_up: torch.Tensor, scores: torch.Tensor):
    gate, up = gate_up.float().chunk(2, dim=-1)
    grad = grad.float()
    sig = torch.sigmoid(gate)
    silu = gate * sig
    grad_scores = (grad * (silu * up)).sum(dim=-1)
    grad_h = grad * scores[:, None]
    grad_gate_up = torch.cat([grad_h * up * (sig * (1.0 + gate * (1.0 - sig))), grad_h * silu], dim=-1)
    return grad_gate_up.to(gate_up.dtype), grad_scores


def _uses_triton(t: torch.Tensor) -> bool:
    return triton is not None and t.is_cuda


class _ScoredSwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate_up, scores):
        gate_up, scores = gate_up.contiguous(), scores.contiguous()
        ctx.save_for_backward(gate_up, scores)
        if _uses_triton(gate_up):
            return scored_swiglu_forward_triton(gate_up, scores)
        return scored_swiglu_forward_torch(gate_up, scores)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        gate_up, scores = ctx.saved_tensors
        grad = grad.contiguous()
        if _uses_triton(gate_up):
            return scored_swiglu_backward_triton(grad, gate_up, scores)
        return scored_swiglu_backward_torch(grad, gate_up, scores)


def scored_swiglu(gate_up: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """scores[:, None] * silu(gate_up[:, :I]) * gate_up[:, I:], computed in fp32 and rounded once to gate_up's dtype;
    the scores' gradient comes back in their dtype."""
    if gate_up.dim() != 2 or gate_up.shape[1] % 2 or scores.shape != gate_up.shape[:1]:
        raise ValueError(f"scored_swiglu: gate_up [rows, 2I] and scores [rows], got {tuple(gate_up.shape)} and "
                         f"{tuple(scores.shape)}")
    return _ScoredSwiGLU.apply(gate_up, scores.float())
