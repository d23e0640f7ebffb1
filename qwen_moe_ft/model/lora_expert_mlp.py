"""The SwiGLU expert MLP with unmerged LoRA, as one autograd function that keeps less for its backward.

For each expert e and its rows x_e (all grouped GEMMs over the experts' row blocks, `offsets`):

    gate = x W1^T + s ((x A_gu^T) B_gu^T)[:, :I]     up = x W3^T + s ((x A_gu^T) B_gu^T)[:, I:]
    h = act(gate, up)                               out = h W2^T + s (h A_d^T) B_d^T

Composed from autograd's ops, the backward keeps the routed input rows x (top_k rows a token, each of the hidden
size) and h as well as gate and up: 44 of the ~136 KiB a token and layer that a LoRA step keeps. Here the backward
keeps gate, up and the rank-r products only, plus, where the rows were gathered from the tokens
(`rows`: the routed (token, slot) pairs in the experts' order), the tokens and `rows` instead of x: it gathers x
again and recomputes h (one elementwise kernel) when it runs. Frozen base weights get no gradient.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from deepspeed.moe.ep_experts import apply_expert_activation


def _gmm(a: torch.Tensor, b: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    return torch._grouped_mm(a, b, offs=offsets)


def _padded(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """A [E, r, in] and B [E, out, r] in `dtype`, the rank padded with zeros to a 16-byte row stride (what
    torch._grouped_mm needs); the padding adds nothing to the products."""
    a, b = a.to(dtype), b.to(dtype)
    pad = -a.shape[1] % (16 // a.element_size())
    return (F.pad(a, (0, 0, 0, pad)), F.pad(b, (0, pad))) if pad else (a, b)


class ExpertLoRAMlp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, rows, top_k, offsets, experts, scaling, a_gu, b_gu, a_d, b_d):
        """x: the routed rows in the experts' order, or, with `rows`, the tokens they come from (row i is token
        rows[i] // top_k). `experts`: the frozen base module (w1, w3: [E, I, H]; w2: [E, H, I]; its activation)."""
        routed = _routed(x, rows, top_k)
        dtype, inter = routed.dtype, experts.w1.shape[1]
        a_gu_, b_gu_ = _padded(a_gu, b_gu, dtype)
        a_d_, b_d_ = _padded(a_d, b_d, dtype)
        # Gate and up as two GEMMs (AutoEP's "separate" path): the fused one would concatenate w1 and w3 anew each
        # call, a copy of the weights' size
        gate = _gmm(routed, experts.w1.to(dtype).transpose(-2, -1), offsets)
        up = _gmm(routed, experts.w3.to(dtype).transpose(-2, -1), offsets)
        xa = _gmm(routed, a_gu_.transpose(-2, -1), offsets)
        low = _gmm(xa, b_gu_.transpose(-2, -1), offsets)
        gate.add_(low[:, :inter], alpha=scaling)
        up.add_(low[:, inter:], alpha=scaling)
        h = _activation(experts, gate, up)
        ha = _gmm(h, a_d_.transpose(-2, -1), offsets)
        out = _gmm(h, experts.w2.to(dtype).transpose(-2, -1), offsets)
        out.add_(_gmm(ha, b_d_.transpose(-2, -1), offsets), alpha=scaling)
        ctx.save_for_backward(x, rows, offsets, gate, up, xa, ha, a_gu, b_gu, a_d, b_d)
        ctx.top_k, ctx.experts, ctx.scaling = top_k, experts, scaling
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, rows, offsets, gate, up, xa, ha, a_gu, b_gu, a_d, b_d = ctx.saved_tensors
        experts, s, rank = ctx.experts, ctx.scaling, a_gu.shape[1]
        grad_out = grad_out.contiguous()
        dtype = grad_out.dtype
        a_gu_, b_gu_ = _padded(a_gu, b_gu, dtype)
        a_d_, b_d_ = _padded(a_d, b_d, dtype)
        with torch.enable_grad():
            gate_, up_ = gate.detach().requires_grad_(), up.detach().requires_grad_()
            h = _activation(experts, gate_, up_)
        # down: out = h W2^T + s (h A_d^T) B_d^T
        grad_b_d = _gmm(grad_out.t(), ha, offsets).mul_(s)
        grad_ha = _gmm(grad_out, b_d_, offsets).mul_(s)
        grad_a_d = _gmm(grad_ha.t(), h.detach(), offsets)
        grad_h = _gmm(grad_out, experts.w2.to(dtype), offsets).add_(_gmm(grad_ha, a_d_, offsets))
        grad_gate, grad_up = torch.autograd.grad(h, (gate_, up_), grad_h)
        del h, grad_h
        # gate/up: [gate | up] = x [W1 | W3]^T + s (x A_gu^T) B_gu^T
        grad_low = torch.cat([grad_gate, grad_up], dim=1).mul_(s)
        grad_b_gu = _gmm(grad_low.t(), xa, offsets)
        grad_xa = _gmm(grad_low, b_gu_, offsets)
        del grad_low
        routed = _routed(x, rows, ctx.top_k)
        grad_a_gu = _gmm(grad_xa.t(), routed, offsets)
        del routed  # each row-sized tensor is freed once used: they set the backward's peak
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = _gmm(grad_gate, experts.w1.to(dtype), offsets)
            del grad_gate
            grad_x.add_(_gmm(grad_up, experts.w3.to(dtype), offsets))
            del grad_up
            grad_x.add_(_gmm(grad_xa, a_gu_, offsets))
            if rows is not None:
                from ..fastpath.token_rows import row_positions, sum_token_rows  # see _routed

                grad_x = sum_token_rows(grad_x, row_positions(rows), ctx.top_k)
        factors = [(grad_a_gu, a_gu), (grad_b_gu, b_gu), (grad_a_d, a_d), (grad_b_d, b_d)]
        # unpad the rank: A's rows, B's columns
        grad_a_gu, grad_b_gu, grad_a_d, grad_b_d = (
            (g[:, :rank] if i % 2 == 0 else g[:, :, :rank]).to(p.dtype) for i, (g, p) in enumerate(factors))
        return grad_x, None, None, None, None, None, grad_a_gu, grad_b_gu, grad_a_d, grad_b_d


def _routed(x: torch.Tensor, rows: torch.Tensor | None, top_k: int) -> torch.Tensor:
    """The experts' input rows: x itself, or, with `rows`, x[rows // top_k]."""
    if rows is None:
        return x
    # only the fast path's one_rank_dispatch passes rows, so its modules are loaded by then (importing them with
    # the trainer would bypass their version guard)
    from ..fastpath.token_rows import gather_token_rows

    return gather_token_rows(x, rows, top_k)


def _activation(experts, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    # fused (DeepSpeed's Triton kernel) by the tensors' device: DeepSpeed picks it wherever a GPU exists
    return apply_expert_activation(gate, up, experts.activation, experts.activation_alpha, experts.activation_limit,
                                   fused=gate.is_cuda)
