"""DeepSpeed's top-k router in fewer kernels, with the same arithmetic.

Replaces: deepspeed/moe/ep_router.py TokenChoiceTopKRouter.forward (deepspeed 0.19.8), per instance, on routers
without expert groups or score-correction bias (Qwen3-MoE's: softmax, top-k weights renormalised); a call with a
load-balancing expert_bias runs DeepSpeed's own forward. Guarded by tests/unit/fastpath/test_topk_router.py
(choices, counts, weights and gradients bitwise equal to DeepSpeed's, CPU and GPU).

DeepSpeed gathers the chosen probabilities that top-k has just returned as its values, and multiplies them by a
route_scale of 1.0: two of the eight kernels between the gate and the counts, changing no bit, on a forward whose
host issues each kernel slower than the GPU runs it. Taking the softmax of the chosen logits alone would save three
more, but rounds differently, and Adam turns that rounding into visibly different weights where an expert's
gradient nearly cancels (the fast-path-against-stock test).
"""
from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from deepspeed.module_inject.auto_ep_layer import AutoEPMoELayer
from deepspeed.moe.ep_count import count_tokens_per_expert
from deepspeed.moe.ep_router import TokenChoiceTopKRouter
from torch import nn

from .applied import Applied


def _lean_forward(self: TokenChoiceTopKRouter, x: torch.Tensor, expert_bias: torch.Tensor | None = None):
    """TokenChoiceTopKRouter.forward's (top_scores, selected_experts, num_tokens_per_expert), bit for bit."""
    if expert_bias is not None or refused_because(self):  # also checked per call: attributes set after patching
        return TokenChoiceTopKRouter.forward(self, x, expert_bias)
    logits = self.gate(x).to(torch.float32)
    scores = torch.sigmoid(logits) if self.score_func == "sigmoid" else F.softmax(logits, dim=1)
    top_scores, selected = torch.topk(scores, k=self.top_k, dim=-1, sorted=False)
    if self.route_norm:
        top_scores = top_scores / (top_scores.sum(dim=-1, keepdim=True) + 1e-20)
    if self.route_scale != 1.0:
        top_scores = top_scores * self.route_scale
    return top_scores, selected, count_tokens_per_expert(selected, self.num_experts)


def refused_because(router: nn.Module) -> str:
    """Empty if the forward above computes what this router's computes, else why not."""
    if type(router) is not TokenChoiceTopKRouter:
        return f"the router is {type(router).__name__}, not DeepSpeed's TokenChoiceTopKRouter"
    if router.score_func not in ("softmax", "sigmoid"):
        return f"score_func {router.score_func!r}"
    if router.num_expert_groups is not None or router.e_score_correction_bias is not None:
        return "group-limited routing or a score-correction bias"
    return ""


def lean_topk_routers(model: nn.Module) -> Applied:
    """Every AutoEP block's router on the forward above, where it computes the same."""
    name, replaces = "lean_topk_router", "TokenChoiceTopKRouter.forward"
    routers = [layer.router for layer in model.modules() if isinstance(layer, AutoEPMoELayer)]
    if not routers:
        return Applied(name, replaces, "no AutoEP block")
    if why := refused_because(routers[0]):
        return Applied(name, replaces, why)
    for router in routers:
        if not refused_because(router):
            router.forward = types.MethodType(_lean_forward, router)
    return Applied(name, replaces)
