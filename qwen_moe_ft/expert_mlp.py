"""AutoEP's expert MLP with `gate_up_impl: fused`, its weight gradients written in the parameters' layout.

DeepSpeed runs the gate and up projections as one grouped GEMM over cat([w1, w3]); autograd then
computes one [E, H, 2I] weight gradient and hands w1 and w3 transposed slices of it, which each
parameter's gradient accumulation copies into its own [E, I, H] layout (1.0 ms per Qwen3-30B-A3B layer
on the H100, BENCHMARKS.md). Here the backward computes the two weight gradients as two grouped GEMMs
that produce that layout directly; the forward and the input gradient are the same single GEMMs.

The input gradient needs the concatenated weights again. Keeping them from the forward costs their
size for every layer until its backward (0.75 GiB per layer of 128 local experts, 4.5 GiB in
Qwen3-30B-A3B's 48 layers at EP=8); rebuilding them in the backward costs one more concatenation
(0.58 ms per layer of 128 local experts on the H100, 1/EP of that under expert parallelism).
`--gate-up-recompute` picks the second.
"""
from __future__ import annotations

import functools
import types

import torch
from deepspeed.moe.ep_experts import GroupedExperts, apply_packed_expert_activation
from torch import nn


class _GateUpGroupedMm(torch.autograd.Function):
    """x_e @ [w1_e; w3_e]^T for each expert's rows of x (offsets: cumulative row counts)."""

    @staticmethod
    def forward(ctx, x, w1, w3, offsets, recompute: bool):
        w13 = torch.cat([w1, w3], dim=1)
        ctx.recompute = recompute
        ctx.save_for_backward(x, offsets, *((w1, w3) if recompute else (w13,)))
        return torch._grouped_mm(x, w13.transpose(-2, -1), offs=offsets)

    @staticmethod
    def backward(ctx, grad):
        x, offsets, *weights = ctx.saved_tensors
        w13 = torch.cat(weights, dim=1) if ctx.recompute else weights[0]
        inter = w13.shape[1] // 2
        grad_x = torch._grouped_mm(grad, w13, offs=offsets) if ctx.needs_input_grad[0] else None
        grad_w1 = torch._grouped_mm(grad[:, :inter].t(), x, offs=offsets) if ctx.needs_input_grad[1] else None
        grad_w3 = torch._grouped_mm(grad[:, inter:].t(), x, offs=offsets) if ctx.needs_input_grad[2] else None
        return grad_x, grad_w1, grad_w3, None, None


def _forward(self: GroupedExperts, x: torch.Tensor, num_tokens_per_expert: torch.Tensor, *,
             recompute: bool) -> torch.Tensor:
    offsets = torch.cumsum(num_tokens_per_expert, dim=0, dtype=torch.int32)
    gate_up = _GateUpGroupedMm.apply(x, self.w1.to(x.dtype), self.w3.to(x.dtype), offsets, recompute)
    h = apply_packed_expert_activation(gate_up, self.activation, self.activation_alpha, self.activation_limit)
    return torch._grouped_mm(h, self.w2.to(x.dtype).transpose(-2, -1), offs=offsets).type_as(x)


def use_layout_preserving_gate_up(model: nn.Module, recompute: bool = False) -> int:
    """Switch every AutoEP expert module that runs the fused gate/up GEMM to this backward; returns how many.
    recompute: rebuild the concatenated weights in the backward instead of keeping them."""
    count = 0
    for module in model.modules():
        if (isinstance(module, GroupedExperts) and module.gate_up_impl == "fused" and module.use_grouped_mm
                and not module.use_triton_grouped_mm):
            module.forward = types.MethodType(functools.partial(_forward, recompute=recompute), module)
            count += 1
    return count
