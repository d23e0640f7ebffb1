"""Each token's top_k routed rows, wherever the experts' order put them: where they went, and their sum.

The backward of gathering routed rows from the tokens (`x[rows // top_k]`) is, in torch, a sort-based scatter-add
of every row into its token. Each token has exactly top_k rows, so sum_token_rows gathers them back instead and
sums them: one Triton kernel on GPU, embedding_bag elsewhere. gather_token_rows is the gather itself (aten's
index_select: a Triton copy of whole rows was measured no faster, docs/benchmark-history.md). Used by both expert
paths of the EP=1 block (local_dispatch.py, quack_experts.py) and by the expert LoRA (model/lora_expert_mlp.py).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: embedding_bag
    triton = None

if triton is not None:
    @triton.jit
    def _sum_token_rows_kernel(rows_ptr, position_ptr, out_ptr, hidden, TOP_K: tl.constexpr, BLOCK: tl.constexpr):
        token = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        inside = cols < hidden
        rows = tl.load(position_ptr + token * TOP_K + tl.arange(0, TOP_K))
        values = tl.load(rows_ptr + rows[:, None] * hidden + cols[None, :], mask=inside[None, :], other=0.0)
        total = tl.sum(values.to(tl.float32), axis=0)
        tl.store(out_ptr + token * hidden + cols, total.to(out_ptr.dtype.element_ty), mask=inside)


def gather_token_rows(x: torch.Tensor, rows: torch.Tensor, top_k: int) -> torch.Tensor:
    """x[rows // top_k]: each routed row's token, in the order of `rows`."""
    return x.index_select(0, rows // top_k)


def row_positions(rows: torch.Tensor) -> torch.Tensor:
    """The inverse permutation of `rows`: [t * top_k + k] is where token t's k-th row went."""
    position = torch.empty_like(rows)
    position[rows] = torch.arange(rows.numel(), device=rows.device)
    return position


def sum_token_rows(grad_rows: torch.Tensor, position: torch.Tensor, top_k: int) -> torch.Tensor:
    """out[t] = sum over k of grad_rows[position[t * top_k + k]]."""
    grad_rows = grad_rows.contiguous()
    if triton is not None and grad_rows.is_cuda and top_k & (top_k - 1) == 0:
        tokens, hidden = position.numel() // top_k, grad_rows.shape[1]
        out = grad_rows.new_empty(tokens, hidden)
        block = min(1024, triton.next_power_of_2(hidden))
        _sum_token_rows_kernel[(tokens, triton.cdiv(hidden, block))](grad_rows, position, out, hidden, TOP_K=top_k,
                                                                     BLOCK=block, num_warps=4)
        return out
    return F.embedding_bag(position.view(-1, top_k), grad_rows, mode="sum")
