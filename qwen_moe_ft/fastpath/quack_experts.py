"""The experts of a one-rank MoE block on quack-kernels' grouped GEMMs: the token gather folded into the gate/up
GEMM's operand load, SwiGLU into its epilogue, and SwiGLU's backward into the down projection's input-gradient GEMM.

Replaces, with `--expert-kernels auto` (where it runs) or `quack`: the token-row gather
(local_dispatch._GatherTokenRows) and the expert module's forward (expert_mlp.LayoutPreservingGateUp, i.e.
GroupedExperts.forward of deepspeed 0.19.8) inside local_dispatch's EP=1 forward. Guarded by
tests/unit/fastpath/test_quack_experts.py (the experts' output and the gradients of the tokens and of the three
weights against the torch chain's, GPU; the refusals, CPU) and measured by `python -m
qwen_moe_ft.tools.expert_kernels`.

These are the kernels sonic-moe builds on (quack.gemm_interface: gemm_gated, gemm_dgated, varlen grouped GEMMs
with a gathered operand). Their gated epilogue works on gate/up columns interleaved ([g0, u0, g1, u1, ...]): the
concatenated weights are read as such (concat_layout), and the pre-activation gradient is de-interleaved once so
that each weight gradient comes out as one grouped GEMM in its parameter's own [E, out, in] layout.
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from importlib.metadata import version

import torch

from .local_dispatch import _sum_token_rows, row_positions

# gemm_gated / gemm_dgated's interleaved gate/up contract and concat_layout, and rmsnorm, as read here
QUACK_VERSION = "0.6.5"


def quack_unavailable_because(device: torch.device) -> str:
    """Empty if quack's kernels (this version, a Hopper or newer GPU) run here, else why not."""
    if importlib.util.find_spec("quack") is None:
        return "quack-kernels is not installed (pip install 'qwen-moe-ft[flash4]')"
    if (installed := version("quack-kernels")) != QUACK_VERSION:
        return f"written for quack-kernels {QUACK_VERSION}, found {installed}"
    if device.type != "cuda" or torch.cuda.get_device_capability(device)[0] < 9:
        return "quack's kernels need a Hopper or newer GPU"
    return ""


def unavailable_because(device: torch.device, activation: str) -> str:
    """Empty if this path can run here, else why not."""
    if why := quack_unavailable_because(device):
        return why
    if activation != "swiglu":
        return f"the experts' activation is {activation!r}; the fused epilogue here is SwiGLU"
    return ""


@dataclass(frozen=True)
class GemmOptions:
    """How quack picks its GEMM kernels: tuned=True autotunes each new problem shape (seconds to minutes, once a
    shape; packed batches change the row count from step to step), dynamic_scheduler hands tiles to CTAs at run
    time instead of in a fixed order (uneven experts); None leaves each GEMM quack's own default (on for
    gemm_dgated, off for the others)."""
    tuned: bool = False
    dynamic_scheduler: bool | None = None

    def kwargs(self) -> dict:
        scheduler = {} if self.dynamic_scheduler is None else dict(dynamic_scheduler=self.dynamic_scheduler)
        return dict(tuned=self.tuned, **scheduler)


DEFAULT_GEMMS = GemmOptions()


class _GatheredSwigluExperts(torch.autograd.Function):
    """down(SwiGLU(x[token_of_row] @ [w1; w3]^T)) per expert's rows (cu_seqlens: cumulative row counts from 0);
    w13: cat([w1, w3], dim=1), built or cached by the caller."""

    @staticmethod
    def forward(ctx, x, w1, w2, w3, w13, token_of_row, rows, cu_seqlens, top_k, gemms):
        from quack.gemm_interface import gemm, gemm_gated

        opts = gemms.kwargs()
        preact, h = gemm_gated(x, w13.transpose(-2, -1), activation="swiglu", cu_seqlens_m=cu_seqlens,
                               A_idx=token_of_row, concat_layout=("B",), **opts)
        ctx.save_for_backward(x, w13, w2, token_of_row, rows, cu_seqlens, preact)
        ctx.top_k, ctx.gemms = top_k, gemms
        return gemm(h, w2.transpose(-2, -1), cu_seqlens_m=cu_seqlens, **opts)

    @staticmethod
    def backward(ctx, dy):
        from quack.gemm_interface import gemm, gemm_dgated

        x, w13, w2, token_of_row, rows, cu_seqlens, preact = ctx.saved_tensors
        experts, hidden, inter = w2.shape
        opts = ctx.gemms.kwargs()
        dy = dy.contiguous()
        # dpreact: interleaved like preact; h: SwiGLU's output again, for w2's gradient
        dpreact, h = gemm_dgated(dy, w2, PreAct=preact, activation="swiglu", cu_seqlens_m=cu_seqlens, **opts)
        dw2 = torch.empty_like(w2)
        gemm(dy.t(), h, out=dw2, cu_seqlens_k=cu_seqlens, **opts)
        dgate_up = dpreact.view(-1, inter, 2).transpose(1, 2).reshape(-1, 2 * inter)  # [g..., u...] per row
        dw1, dw3 = (w2.new_empty(experts, inter, hidden) for _ in range(2))
        for dw, half in ((dw1, dgate_up[:, :inter]), (dw3, dgate_up[:, inter:])):
            gemm(x.t(), half, out=dw.transpose(-2, -1), cu_seqlens_k=cu_seqlens, A_idx=token_of_row, **opts)
        drows = gemm(dgate_up, w13, cu_seqlens_m=cu_seqlens, **opts)
        # the rows' inverse permutation is built here, not in the forward, whose host time the GPU waits for
        dx = _sum_token_rows(drows, row_positions(rows), ctx.top_k)
        return dx, dw1, dw2, dw3, None, None, None, None, None, None


def gathered_swiglu_experts(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor, rows: torch.Tensor,
                            num_tokens_per_expert: torch.Tensor, top_k: int,
                            w13: torch.Tensor | None = None, gemms: GemmOptions = DEFAULT_GEMMS) -> torch.Tensor:
    """The experts' output for each routed row, in expert order. x: [tokens, H]; rows: the (token, slot) pairs
    sorted by expert (token = row // top_k); w1/w3: [E, I, H], w2: [E, H, I]."""
    cu_seqlens = torch.zeros(num_tokens_per_expert.numel() + 1, dtype=torch.int32, device=x.device)
    torch.cumsum(num_tokens_per_expert, 0, out=cu_seqlens[1:])
    w13 = torch.cat([w1, w3], dim=1) if w13 is None else w13
    return _GatheredSwigluExperts.apply(x, w1, w2, w3, w13, (rows // top_k).to(torch.int32), rows, cu_seqlens, top_k,
                                        gemms)
