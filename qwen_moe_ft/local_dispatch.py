"""AutoEP with one expert-parallel rank, without its alignment permutation.

With EP=1, AutoEP's routed rows are already sorted by expert (an argsort of the router's choices) when
it permutes them once more, only to pad each expert's rows to a multiple of 8, and un-permutes the
expert output afterwards: two gathers forward and two backward over every routed row (0.75 ms per
Qwen3-30B-A3B layer at 8192 tokens on the H100, BENCHMARKS.md). torch._grouped_mm takes groups of
any size, so the one-rank case (per-expert counts without a source-rank dimension) passes the rows
through here. With several ranks, whose rows arrive grouped by source rank, AutoEP's permutation runs.
"""
from __future__ import annotations

from deepspeed.module_inject import auto_ep_layer
from deepspeed.moe.ep_experts import GroupedExperts
from torch import nn

_permute_by_local_expert = auto_ep_layer.permute_by_local_expert
_unpermute_by_local_expert = auto_ep_layer.unpermute_by_local_expert


def _permute_unless_sorted(tokens, local_counts):
    if local_counts.ndim == 1:  # one source rank: rows already in expert order
        return tokens, None, local_counts, tokens.shape[0]
    return _permute_by_local_expert(tokens, local_counts)


def _unpermute_unless_sorted(expert_output, permuted_indices, n_tokens):
    if permuted_indices is None:
        return expert_output
    return _unpermute_by_local_expert(expert_output, permuted_indices, n_tokens)


def skip_single_rank_permutation(model: nn.Module) -> bool:
    """Install the pass-through where every expert module runs torch._grouped_mm (or its loop), which take
    unpadded groups; AutoEP's Triton grouped GEMM (GPUs before sm90) keeps the padding. True if installed."""
    experts = [m for m in model.modules() if isinstance(m, GroupedExperts)]
    if not experts or any(m.use_triton_grouped_mm for m in experts):
        return False
    auto_ep_layer.permute_by_local_expert = _permute_unless_sorted
    auto_ep_layer.unpermute_by_local_expert = _unpermute_unless_sorted
    return True
