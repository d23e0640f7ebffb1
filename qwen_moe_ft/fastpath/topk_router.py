"""The router's normalised top-k weights as a softmax over the chosen experts' logits alone.

Replaces: deepspeed/moe/ep_router.py TokenChoiceTopKRouter.forward (deepspeed 0.19.8), per instance, on routers
that score with softmax and renormalise the top-k weights (Qwen3-MoE: norm_topk_prob), without expert groups or
score-correction bias; a call with a load-balancing expert_bias runs DeepSpeed's own forward. Guarded by
tests/unit/fastpath/test_topk_router.py (choices, counts, weights and the gate's gradient against DeepSpeed's
forward).

With p = softmax(logits), DeepSpeed takes the top-k of p, gathers them and divides by their sum; p_i / sum_topk p_j
is exp(l_i) / sum_topk exp(l_j): the softmax of the k chosen logits, which softmax's order-preserving map lets be
chosen on the logits themselves. Three kernels (top-k, a k-wide softmax, a scale only if route_scale != 1) in place
of eight, on a forward whose host issues each kernel slower than the GPU runs it. The one difference: experts
whose probability underflows to 0 in fp32 (logits more than ~87 below the token's largest) tie there and not in
the logits, where neither would be among a real router's top k.
"""
from __future__ import annotations

import types

import torch
from deepspeed.module_inject.auto_ep_layer import AutoEPMoELayer
from deepspeed.moe.ep_count import count_tokens_per_expert
from deepspeed.moe.ep_router import TokenChoiceTopKRouter
from torch import nn

from .applied import Applied


def _topk_softmax_forward(self: TokenChoiceTopKRouter, x: torch.Tensor, expert_bias: torch.Tensor | None = None):
    """TokenChoiceTopKRouter.forward's (top_scores, selected_experts, num_tokens_per_expert)."""
    if expert_bias is not None:
        return TokenChoiceTopKRouter.forward(self, x, expert_bias)
    logits = self.gate(x).to(torch.float32)
    top_logits, selected = torch.topk(logits, k=self.top_k, dim=-1, sorted=False)
    top_scores = torch.softmax(top_logits, dim=-1)
    if self.route_scale != 1.0:
        top_scores = top_scores * self.route_scale
    return top_scores, selected, count_tokens_per_expert(selected, self.num_experts)


def refused_because(router: nn.Module) -> str:
    """Empty if the router computes what the softmax over the chosen logits computes, else why not."""
    if type(router) is not TokenChoiceTopKRouter:
        return f"the router is {type(router).__name__}, not DeepSpeed's TokenChoiceTopKRouter"
    if router.score_func != "softmax" or not router.route_norm:
        return f"score_func {router.score_func!r} with route_norm {router.route_norm}: only softmax renormalised"
    if router.num_expert_groups is not None or router.e_score_correction_bias is not None:
        return "group-limited routing or a score-correction bias"
    return ""


def topk_softmax_routers(model: nn.Module) -> Applied:
    """Every AutoEP block's router on the forward above, where it computes the same."""
    name, replaces = "topk_softmax_router", "TokenChoiceTopKRouter.forward (softmax, renormalised top-k)"
    routers = [layer.router for layer in model.modules() if isinstance(layer, AutoEPMoELayer)]
    if not routers:
        return Applied(name, replaces, "no AutoEP block")
    if why := refused_because(routers[0]):
        return Applied(name, replaces, why)
    for router in routers:
        if not refused_because(router):
            router.forward = types.MethodType(_topk_softmax_forward, router)
    return Applied(name, replaces)
