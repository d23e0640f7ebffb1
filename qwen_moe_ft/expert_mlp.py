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

Without recompute, the concatenated weights can also outlive the step (GateUpCache): built once, then kept
current by the optimizer step, which writes each updated gate/up weight into it as it writes the bf16
weight (zero_step.mirror_gate_up_weights), so no layer concatenates at all (0.56 ms per layer of 128 local
experts on the H100). Its memory is the copies the forward would have kept for the backward anyway.
"""
from __future__ import annotations

import functools
import types

import torch
from deepspeed.moe.ep_experts import GroupedExperts, apply_packed_expert_activation
from torch import nn


class GateUpCache:
    """An expert module's gate and up weights concatenated ([E, 2I, H]), kept between steps.

    Valid while the weights are what it was built from: anything that writes them through torch (a
    checkpoint's load_state_dict) moves their version counters and makes the next forward rebuild it; an
    optimizer step that writes the weights outside torch must either write the cache too (mark_written)
    or invalidate it."""

    def __init__(self):
        self.weights: torch.Tensor | None = None
        self.builds = 0
        self._key = None

    @staticmethod
    def _key_of(w1: torch.Tensor, w3: torch.Tensor):
        return w1._version, w3._version, w1.data_ptr(), w3.data_ptr()

    def get(self, w1: torch.Tensor, w3: torch.Tensor) -> torch.Tensor:
        key = self._key_of(w1, w3)
        if self._key != key:
            shape = (w1.shape[0], w1.shape[1] + w3.shape[1], w1.shape[2])
            if self.weights is None or self.weights.shape != shape or self.weights.dtype != w1.dtype:
                self.weights = w1.new_empty(shape)
            with torch.no_grad():
                torch.cat([w1, w3], dim=1, out=self.weights)
            self._key = key
            self.builds += 1
        return self.weights

    def mark_written(self, w1: torch.Tensor, w3: torch.Tensor) -> None:
        """The optimizer wrote the new w1 and w3 into `weights` as well."""
        self._key = self._key_of(w1, w3)

    def invalidate(self) -> None:
        self._key = None


class _GateUpGroupedMm(torch.autograd.Function):
    """x_e @ [w1_e; w3_e]^T for each expert's rows of x (offsets: cumulative row counts); `cached`: the
    concatenation, if a GateUpCache holds it."""

    @staticmethod
    def forward(ctx, x, w1, w3, offsets, recompute: bool, cached: torch.Tensor | None = None):
        w13 = cached if cached is not None else torch.cat([w1, w3], dim=1)
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
        return grad_x, grad_w1, grad_w3, None, None, None


def _forward(self: GroupedExperts, x: torch.Tensor, num_tokens_per_expert: torch.Tensor, *,
             recompute: bool) -> torch.Tensor:
    offsets = torch.cumsum(num_tokens_per_expert, dim=0, dtype=torch.int32)
    cache: GateUpCache | None = getattr(self, "gate_up_cache", None)
    cached = cache.get(self.w1, self.w3) if cache is not None and self.w1.dtype == x.dtype else None
    gate_up = _GateUpGroupedMm.apply(x, self.w1.to(x.dtype), self.w3.to(x.dtype), offsets, recompute, cached)
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
            module.layout_preserving_recompute = recompute
            count += 1
    return count


def cache_gate_up_weights(module: GroupedExperts) -> GateUpCache:
    """Give an expert module on the layout-preserving path (without recompute) a GateUpCache. Only for
    weights that change through torch or through a step that keeps the cache current (see GateUpCache)."""
    if getattr(module, "layout_preserving_recompute", True):
        raise ValueError("cache_gate_up_weights: the module is not on the layout-preserving path without recompute")
    module.gate_up_cache = GateUpCache()
    return module.gate_up_cache
