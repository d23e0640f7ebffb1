"""The fused gate/up expert projection with a backward that keeps each weight gradient's layout.

Replaces: deepspeed/moe/ep_experts.py GroupedExperts.forward (deepspeed 0.19.8) on modules with
gate_up_impl "fused" running torch._grouped_mm. Guarded by tests/unit/fastpath/test_expert_mlp.py (output and
gradients equal to GroupedExperts' own forward).

AutoEP runs the gate and up projections as one grouped GEMM over cat([w1, w3]); autograd then computes
one [E, H, 2I] weight gradient and hands w1 and w3 transposed slices of it, which each parameter's
gradient accumulation copies into its own [E, I, H] layout. Here the backward computes the two weight
gradients as two grouped GEMMs that produce that layout directly; the forward and the input gradient are
the same single GEMMs.

The input gradient needs the concatenated weights again: kept from the forward (their size for every layer
until its backward), or rebuilt in the backward (one more concatenation, 1/EP of a layer's experts) with
`--gate-up-recompute`. Without recompute the concatenation can outlive the step (gate_up_cache.py).
"""
from __future__ import annotations

import torch
from deepspeed.moe.ep_experts import GroupedExperts, apply_packed_expert_activation
from torch import nn

from .gate_up_cache import GateUpCache
from .scored_swiglu import scored_swiglu


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


class LayoutPreservingGateUp:
    """The forward given to one AutoEP expert module (GroupedExperts); `cache`, once set by keep_cache, holds
    the gate/up concatenation between steps."""

    def __init__(self, module: GroupedExperts, recompute: bool):
        self.module = module
        self.recompute = recompute
        self.cache: GateUpCache | None = None

    def keep_cache(self) -> GateUpCache:
        """Keep the concatenation between steps. Only for weights that change through torch or through a step
        that keeps the cache current (see GateUpCache)."""
        if self.recompute:
            raise ValueError("keep_cache: the module rebuilds the concatenation in its backward (recompute); "
                             "a cache needs the path without recompute")
        self.cache = GateUpCache()
        return self.cache

    @property
    def takes_scores(self) -> bool:
        """Whether __call__ can fold the routing scores into the activation: plain SwiGLU only (DeepSpeed's
        "swiglu" reads neither alpha nor limit; the clamped forms do, and are not scored here)."""
        return self.module.activation == "swiglu"

    def __call__(self, x: torch.Tensor, num_tokens_per_expert: torch.Tensor,
                 scores: torch.Tensor | None = None) -> torch.Tensor:
        """The experts' output rows; with `scores` (one per row of x), each row scaled by its score, the score
        applied inside the SwiGLU, before the down projection (scored_swiglu.py)."""
        m = self.module
        if scores is not None and not self.takes_scores:
            raise ValueError(f"scores are folded into plain SwiGLU experts only, not {m.activation!r}")
        offsets = torch.cumsum(num_tokens_per_expert, dim=0, dtype=torch.int32)
        cached = self.cache.get(m.w1, m.w3) if self.cache is not None and m.w1.dtype == x.dtype else None
        gate_up = _GateUpGroupedMm.apply(x, m.w1.to(x.dtype), m.w3.to(x.dtype), offsets, self.recompute, cached)
        if scores is not None:
            h = scored_swiglu(gate_up, scores)
        else:
            # fused (DeepSpeed's Triton kernel) by the tensors' device: DeepSpeed picks it wherever a GPU exists
            h = apply_packed_expert_activation(gate_up, m.activation, m.activation_alpha, m.activation_limit,
                                               fused=gate_up.is_cuda)
        return torch._grouped_mm(h, m.w2.to(x.dtype).transpose(-2, -1), offs=offsets).type_as(x)


def use_layout_preserving_gate_up(model: nn.Module, recompute: bool = False) -> list[LayoutPreservingGateUp]:
    """Give every trainable AutoEP expert module that runs the fused gate/up GEMM through torch._grouped_mm this
    forward (its point is the weight gradients' layout: frozen experts, as under LoRA, have none); returns the
    forwards installed. recompute: rebuild the concatenated weights in the backward instead of keeping them."""
    installed = []
    for module in model.modules():
        if (isinstance(module, GroupedExperts) and module.gate_up_impl == "fused" and module.use_grouped_mm
                and not module.use_triton_grouped_mm and module.w1.requires_grad):
            module.forward = LayoutPreservingGateUp(module, recompute)
            installed.append(module.forward)
    return installed
