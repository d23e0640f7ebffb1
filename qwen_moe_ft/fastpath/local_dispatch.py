"""AutoEP with one expert-parallel rank, without its alignment permutation and its scatter-add.

Replaces: deepspeed/module_inject/auto_ep_layer.py AutoEPMoELayer._forward (deepspeed 0.19.8) on layers with
ep_size 1, per instance. Guarded by tests/unit/fastpath/test_local_dispatch.py (the block's output and all
gradients equal to AutoEP's own forward, which is made to fail if it runs).

With EP=1, AutoEP's routed rows are already sorted by expert (an argsort of the router's choices) when
it permutes them once more, only to pad each expert's rows to a multiple of 8, and un-permutes the
expert output afterwards: two gathers forward and two backward over every routed row. torch._grouped_mm
takes groups of any size, so the rows go to the experts as they are (AutoEP's Triton grouped GEMM, on GPUs
before sm90, keeps the padding).

The routed rows are gathered from the tokens (`x[rows // top_k]`), whose backward is a sort-based
scatter-add of every row into its token. Each token has exactly top_k rows, so the backward here gathers
them back instead and sums them (token_rows.py).

Where the experts run expert_mlp.py's forward with plain SwiGLU (and score_apply is "post", rows unpadded, not on
quack's kernels), each row's routing score is applied inside that SwiGLU (scored_swiglu.py), and the combine is the
unweighted sum of each token's rows: AutoEP's weighted combine (fused_weighted_restore, combine_from_routed) does not
run, and its backward, which reads every expert output row for the scores' gradient, with it. Guarded by
tests/unit/fastpath/test_scored_swiglu.py (output and all gradients against AutoEP's own forward).
"""
from __future__ import annotations

import functools
import types

import torch
from deepspeed.module_inject import auto_ep_layer
from deepspeed.module_inject.auto_ep_layer import AutoEPMoELayer, RouterOutput
from deepspeed.moe.ep_experts import GroupedExperts
from deepspeed.ops.triton_ops import autoep_fused_token_ops
from torch import nn

from .applied import Applied
from .expert_mlp import LayoutPreservingGateUp
from .token_rows import gather_token_rows, row_positions, sum_token_rows


def expert_order(selected_experts: torch.Tensor, num_experts: int) -> torch.Tensor:
    """The routed rows (token * top_k + slot) sorted by expert, stable, as argsort of the router's choices gives them.
    The keys are narrowed to the fewest bytes that hold an expert id first: the GPU's radix sort runs one pass per
    key byte, and every pass is launched from the host."""
    keys = selected_experts.view(-1)
    for narrow in (torch.uint8, torch.int16):
        if num_experts - 1 <= torch.iinfo(narrow).max:
            keys = keys.to(narrow)
            break
    return torch.argsort(keys, stable=True)


class _GatherTokenRows(torch.autograd.Function):
    """x[rows // top_k] for `rows`, a permutation of all T * top_k (token, slot) pairs."""

    @staticmethod
    def forward(ctx, x, rows, top_k):
        ctx.save_for_backward(rows)
        ctx.top_k = top_k
        return gather_token_rows(x, rows, top_k)

    @staticmethod
    def backward(ctx, grad_rows):
        (rows,) = ctx.saved_tensors
        return sum_token_rows(grad_rows, row_positions(rows), ctx.top_k), None, None


class _SumTokenRows(torch.autograd.Function):
    """The sum of each token's top_k rows of `expert_output`, rows in the order of `rows` (see _GatherTokenRows)."""

    @staticmethod
    def forward(ctx, expert_output, rows, top_k):
        ctx.save_for_backward(rows)
        ctx.top_k = top_k
        return sum_token_rows(expert_output, row_positions(rows), top_k)

    @staticmethod
    def backward(ctx, grad_tokens):
        (rows,) = ctx.saved_tensors
        return gather_token_rows(grad_tokens.contiguous(), rows, ctx.top_k), None, None


def scores_in_experts(layer: AutoEPMoELayer, pad_rows: bool) -> bool:
    """Whether the block's routing scores go into its experts' SwiGLU, so the combine is a plain sum: scores
    applied after the experts ("post"), rows unpadded, and experts running LayoutPreservingGateUp on plain SwiGLU."""
    forward = vars(layer.experts).get("forward")
    return (layer.score_apply == "post" and not pad_rows and isinstance(forward, LayoutPreservingGateUp)
            and forward.takes_scores)


def _quack_experts(layer: AutoEPMoELayer, x: torch.Tensor, rows: torch.Tensor, counts: torch.Tensor,
                   top_scores: torch.Tensor | None = None) -> torch.Tensor:
    """The expert output of each row; with `top_scores`, each token's output, the rows weighted and summed."""
    from .quack_experts import gathered_swiglu_experts, scored_gathered_swiglu_experts

    experts = layer.experts
    cache = experts.forward.cache if isinstance(experts.forward, LayoutPreservingGateUp) else None
    w13 = cache.get(experts.w1, experts.w3) if cache is not None else None
    if top_scores is not None:
        return scored_gathered_swiglu_experts(x, experts.w1, experts.w2, experts.w3, rows, counts, layer.top_k,
                                              top_scores, w13)
    return gathered_swiglu_experts(x, experts.w1, experts.w2, experts.w3, rows, counts, layer.top_k, w13)


def _one_rank_forward(layer: AutoEPMoELayer, hidden_states: torch.Tensor, *, pad_rows: bool, quack: bool = False,
                      scored: bool = True, quack_combine: bool = False):
    """AutoEPMoELayer._forward's EP=1 path (router, expert-ordered rows, experts, combine), with the rows
    gathered by _GatherTokenRows and, unless `pad_rows`, passed to the experts without AutoEP's permutation;
    `quack`: gather and experts on quack's kernels (quack_experts.py), with `quack_combine` the weighted combine
    inside them too; where `scored` and scores_in_experts, the scores applied in the experts and the rows summed
    unweighted."""
    bsz, seqlen, hdim = hidden_states.shape
    x = hidden_states.reshape(-1, hdim)
    if layer.combine_impl == "fused_weighted_sum" and not layer._fused_combine_checked:
        autoep_fused_token_ops.assert_supported(x, score_apply=layer.score_apply)
        layer._fused_combine_checked = True
    routing = RouterOutput(*layer.router(x, layer.expert_bias))
    with torch.no_grad():
        layer.tokens_per_expert.add_(routing.num_tokens_per_expert)
    rows = expert_order(routing.selected_experts, layer.num_experts)
    if quack and quack_combine:
        output = _quack_experts(layer, x, rows, routing.num_tokens_per_expert, routing.top_scores)
        return layer._finalize_output(output.reshape(bsz, seqlen, hdim), x, hidden_states, hdim)
    if quack:
        expert_output = _quack_experts(layer, x, rows, routing.num_tokens_per_expert)
        return _combine(layer, expert_output, routing, rows, x, hidden_states)
    if getattr(layer.experts, "takes_token_rows", False) and layer.score_apply != "pre" and not pad_rows:
        # the experts gather the rows themselves, and again in their backward instead of keeping them (LoRA)
        expert_output = layer.experts(x, routing.num_tokens_per_expert, rows, layer.top_k)
        return _combine(layer, expert_output, routing, rows, x, hidden_states)
    routed = _GatherTokenRows.apply(x, rows, layer.top_k)
    if scored and scores_in_experts(layer, pad_rows):
        # index_select, not indexing: its backward adds each row's score gradient in place, where indexing's sorts
        # the indices first (42 us a layer at 65536 rows on an H100)
        scores = routing.top_scores.view(-1).index_select(0, rows)
        expert_output = layer.experts(routed, routing.num_tokens_per_expert, scores=scores)
        output = _SumTokenRows.apply(expert_output, rows, layer.top_k).reshape(bsz, seqlen, hdim)
        return layer._finalize_output(output, x, hidden_states, hdim)
    if layer.score_apply == "pre":
        routed = auto_ep_layer.apply_scores_before_experts_if_enabled(routed, routing.top_scores.view(-1)[rows],
                                                                      score_apply="pre")
    if pad_rows:
        routed, permutation, counts, n_rows = auto_ep_layer.permute_by_local_expert(routed,
                                                                                    routing.num_tokens_per_expert)
        expert_output = auto_ep_layer.unpermute_by_local_expert(layer.experts(routed, counts), permutation, n_rows)
    else:
        expert_output = layer.experts(routed, routing.num_tokens_per_expert)
    return _combine(layer, expert_output, routing, rows, x, hidden_states)


def _combine(layer: AutoEPMoELayer, expert_output, routing: RouterOutput, rows, x, hidden_states):
    bsz, seqlen, hdim = hidden_states.shape
    combine = dict(top_scores=routing.top_scores, token_indices_sorted=rows, top_k=layer.top_k,
                   shape=(bsz, seqlen, hdim))
    if layer.combine_impl == "fused_weighted_sum":
        output = autoep_fused_token_ops.fused_weighted_restore(expert_output, **combine)
    else:
        output = auto_ep_layer.combine_from_routed(expert_output, score_apply=layer.score_apply,
                                                   combine_impl=layer.combine_impl, **combine)
    return layer._finalize_output(output, x, hidden_states, hdim)


def one_rank_dispatch(model: nn.Module, scored: bool = True) -> Applied:
    """Give every one-rank AutoEP block (no expert parallelism, no tensor-parallel folding, AutoEP's eager row
    weighting) the forward above; `scored`: with the scores in the experts where scores_in_experts."""
    changed = 0
    for layer in _one_rank_layers(model):
        pad_rows = any(m.use_triton_grouped_mm for m in layer.modules() if isinstance(m, GroupedExperts))
        layer._forward = types.MethodType(functools.partial(_one_rank_forward, pad_rows=pad_rows, scored=scored),
                                          layer)
        changed += 1
    return Applied("one_rank_dispatch", "AutoEPMoELayer._forward at EP=1",
                   "" if changed else "no AutoEP layer with one expert-parallel rank")


def dispatch_options(layer: nn.Module) -> dict:
    """The options one_rank_dispatch or quack_expert_kernels gave the block's forward; {} where it is AutoEP's."""
    func = getattr(getattr(layer, "_forward", None), "__func__", None)
    return dict(func.keywords) if isinstance(func, functools.partial) and func.func is _one_rank_forward else {}


def scored_swiglu_blocks(model: nn.Module) -> Applied:
    """After one_rank_dispatch and quack_expert_kernels: whether any block runs with its scores in the experts."""
    scored = [layer for layer in _one_rank_layers(model)
              if (options := dispatch_options(layer)).get("scored") and not options.get("quack")
              and scores_in_experts(layer, options["pad_rows"])]
    return Applied("scored_swiglu", "AutoEP's weighted combine at EP=1 (fused_weighted_restore, combine_from_routed)",
                   "" if scored else "no one-rank block with SwiGLU experts on layout_preserving_gate_up's forward")


def _one_rank_layers(model: nn.Module) -> list[AutoEPMoELayer]:
    return [layer for layer in model.modules()
            if isinstance(layer, AutoEPMoELayer) and layer.ep_size == 1 and layer.folding_group_handles is None
            and layer.row_weighting_impl != "fused"]


def quack_expert_kernels(model: nn.Module) -> Applied:
    """After one_rank_dispatch: its blocks with trainable SwiGLU experts on quack's kernels (quack_experts.py), where
    they run here: quack's version and the GPU suit, and one small call of the chain (quack_experts.probe) runs."""
    from .quack_experts import probe, unavailable_because

    name, replaces = "quack_experts", "token gather + GroupedExperts.forward at EP=1"
    # LoRA wraps the experts (model/lora.py) and freezes their weights: such blocks keep the torch path
    layers = [layer for layer in _one_rank_layers(model)
              if layer.score_apply != "pre" and isinstance(layer.experts, GroupedExperts)
              and layer.experts.w1.requires_grad and not layer.experts.use_triton_grouped_mm]
    if not layers:
        return Applied(name, replaces, "no one-rank AutoEP block with trainable experts on torch._grouped_mm")
    w1 = layers[0].experts.w1
    if why := unavailable_because(w1.device, layers[0].experts.activation):
        return Applied(name, replaces, why)
    if why := probe(w1.device, hidden=w1.shape[2], inter=w1.shape[1], dtype=w1.dtype):
        return Applied(name, replaces, f"a small call of quack's expert kernels failed: {why}")
    for layer in layers:
        layer._forward = types.MethodType(functools.partial(_one_rank_forward, pad_rows=False, quack=True), layer)
    return Applied(name, replaces)


def quack_scored_combine(model: nn.Module) -> Applied:
    """After quack_expert_kernels: its blocks' weighted combine inside quack's chain
    (quack_experts.scored_gathered_swiglu_experts), where the scores weight the experts' outputs (score_apply
    "post", not the legacy bmm combine) and one small call of that chain runs."""
    from .quack_experts import probe

    name, replaces = "quack_scored_combine", "AutoEP's weighted combine after quack's experts (fused_weighted_restore)"
    layers = [layer for layer in _one_rank_layers(model) if dispatch_options(layer).get("quack")
              and layer.score_apply == "post" and layer.combine_impl != "legacy_bmm"]
    if not layers:
        return Applied(name, replaces, "no block on quack's experts weights their outputs by the scores")
    w1 = layers[0].experts.w1
    if why := probe(w1.device, hidden=w1.shape[2], inter=w1.shape[1], dtype=w1.dtype, scored=True):
        return Applied(name, replaces, f"a small call of quack's expert kernels with the combine failed: {why}")
    for layer in layers:
        layer._forward = types.MethodType(functools.partial(_one_rank_forward, pad_rows=False, quack=True,
                                                            quack_combine=True), layer)
    return Applied(name, replaces)
