"""Qwen3's attention inputs as one autograd function: q, k and v from one GEMM, q/k RMSNorm and RoPE in one pass.

Replaces (transformers 5.17.0, models/qwen3_moe/modeling_qwen3_moe.py): Qwen3MoeAttention.forward, per instance, on
modules whose q/k/v projections are plain trainable nn.Linear without bias (full fine-tuning; LoRA's wrapped
projections keep the stock forward, checked on every call) on a GPU with triton. Guarded by
tests/unit/fastpath/test_attention_inputs.py (outputs and every gradient against the stock module: the kernels on a
GPU, the same formulas in torch on the CPU).

The stock forward runs three projections, whose input gradients autograd then sums in two more passes over the hidden
states, and q_norm, k_norm and RoPE, each one more pass over q and k forward and backward. Here the projections are
one GEMM against the three weights concatenated (and one GEMM for their input gradient), and one kernel normalises
each head's row and rotates it, writing q and k where attention reads them; its backward rotates the gradient back
and takes the norm's backward in the same pass, writing into the concatenated gradient that GEMM reads.

Arithmetic: the norm as Qwen3MoeRMSNorm (fp32 statistics, the normalised row rounded, times the weight, rounded:
rms_norm.py); RoPE in fp32 on that rounded output, rounded once (the stock rounds each product and their sum).
"""
from __future__ import annotations

import types

import torch
from torch import nn

from .applied import Applied

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the torch formulas below
    triton = None

REPLACES = "Qwen3MoeAttention.forward"
ROWS = 16  # head rows a program takes at once
BACKWARD_PROGRAMS_PER_SM = 4

if triton is not None:
    @triton.jit
    def _norm_rope_forward_kernel(src_ptr, src_stride, col0, w_ptr, cos_ptr, sin_ptr, out_ptr, rstd_ptr, n_rows,
                                  heads, eps, ROWS: tl.constexpr, HALF: tl.constexpr):
        rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
        present = rows < n_rows
        token, head = rows // heads, rows % heads
        cols = tl.arange(0, HALF)
        mask = present[:, None]
        src = src_ptr + (token * src_stride + col0 + head * (2 * HALF))[:, None] + cols[None, :]
        x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(src + HALF, mask=mask, other=0.0).to(tl.float32)
        rstd = 1.0 / tl.sqrt((tl.sum(x1 * x1, axis=1) + tl.sum(x2 * x2, axis=1)) / (2 * HALF) + eps)
        dtype = out_ptr.dtype.element_ty
        w1 = tl.load(w_ptr + cols).to(tl.float32)
        w2 = tl.load(w_ptr + HALF + cols).to(tl.float32)
        a1 = ((x1 * rstd[:, None]).to(dtype).to(tl.float32) * w1[None, :]).to(dtype).to(tl.float32)
        a2 = ((x2 * rstd[:, None]).to(dtype).to(tl.float32) * w2[None, :]).to(dtype).to(tl.float32)
        angle = (token * (2 * HALF))[:, None] + cols[None, :]
        c1 = tl.load(cos_ptr + angle, mask=mask, other=0.0).to(tl.float32)
        c2 = tl.load(cos_ptr + angle + HALF, mask=mask, other=0.0).to(tl.float32)
        s1 = tl.load(sin_ptr + angle, mask=mask, other=0.0).to(tl.float32)
        s2 = tl.load(sin_ptr + angle + HALF, mask=mask, other=0.0).to(tl.float32)
        out = out_ptr + (rows * (2 * HALF))[:, None] + cols[None, :]
        tl.store(out, (a1 * c1 - a2 * s1).to(dtype), mask=mask)
        tl.store(out + HALF, (a2 * c2 + a1 * s2).to(dtype), mask=mask)
        tl.store(rstd_ptr + rows, rstd, mask=present)

    @triton.jit
    def _norm_rope_backward_kernel(dy_ptr, src_ptr, src_stride, col0, w_ptr, cos_ptr, sin_ptr, rstd_ptr, dx_ptr,
                                   dw_partial_ptr, n_rows, heads, programs, blocks_per_program, ROWS: tl.constexpr,
                                   HALF: tl.constexpr):
        program = tl.program_id(0)
        cols = tl.arange(0, HALF)
        w1 = tl.load(w_ptr + cols).to(tl.float32)
        w2 = tl.load(w_ptr + HALF + cols).to(tl.float32)
        dw1 = tl.zeros((HALF,), tl.float32)
        dw2 = tl.zeros((HALF,), tl.float32)
        dtype = dx_ptr.dtype.element_ty
        for i in range(0, blocks_per_program):  # row blocks program, program + programs, ...; past the end masked
            rows = (program + i * programs).to(tl.int64) * ROWS + tl.arange(0, ROWS)
            present = rows < n_rows
            mask = present[:, None]
            token, head = rows // heads, rows % heads
            dy = dy_ptr + (rows * (2 * HALF))[:, None] + cols[None, :]
            dy1 = tl.load(dy, mask=mask, other=0.0).to(tl.float32)
            dy2 = tl.load(dy + HALF, mask=mask, other=0.0).to(tl.float32)
            angle = (token * (2 * HALF))[:, None] + cols[None, :]
            c1 = tl.load(cos_ptr + angle, mask=mask, other=0.0).to(tl.float32)
            c2 = tl.load(cos_ptr + angle + HALF, mask=mask, other=0.0).to(tl.float32)
            s1 = tl.load(sin_ptr + angle, mask=mask, other=0.0).to(tl.float32)
            s2 = tl.load(sin_ptr + angle + HALF, mask=mask, other=0.0).to(tl.float32)
            da1 = dy1 * c1 + dy2 * s2  # RoPE's transpose: y1 = a1 c1 - a2 s1, y2 = a2 c2 + a1 s2
            da2 = dy2 * c2 - dy1 * s1
            offset = (token * src_stride + col0 + head * (2 * HALF))[:, None] + cols[None, :]
            x1 = tl.load(src_ptr + offset, mask=mask, other=0.0).to(tl.float32)
            x2 = tl.load(src_ptr + offset + HALF, mask=mask, other=0.0).to(tl.float32)
            rstd = tl.load(rstd_ptr + rows, mask=present, other=0.0)[:, None]
            h1, h2 = x1 * rstd, x2 * rstd
            dw1 += tl.sum(da1 * h1.to(dtype).to(tl.float32), axis=0)
            dw2 += tl.sum(da2 * h2.to(dtype).to(tl.float32), axis=0)
            dh1, dh2 = da1 * w1[None, :], da2 * w2[None, :]
            mean = ((tl.sum(dh1 * h1, axis=1) + tl.sum(dh2 * h2, axis=1)) / (2 * HALF))[:, None]
            tl.store(dx_ptr + offset, (rstd * (dh1 - h1 * mean)).to(dtype), mask=mask)
            tl.store(dx_ptr + offset + HALF, (rstd * (dh2 - h2 * mean)).to(dtype), mask=mask)
        tl.store(dw_partial_ptr + program.to(tl.int64) * (2 * HALF) + cols, dw1)
        tl.store(dw_partial_ptr + program.to(tl.int64) * (2 * HALF) + HALF + cols, dw2)


def _rotate(a: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = a.shape[-1] // 2
    return a * cos + torch.cat([-a[..., half:], a[..., :half]], dim=-1) * sin


def _heads(qkv: torch.Tensor, col0: int, heads: int, head_dim: int) -> torch.Tensor:
    """Columns col0 .. col0 + heads * head_dim of the projections' output [T, q + k + v] as a [T, heads, D] view."""
    return qkv[:, col0:col0 + heads * head_dim].unflatten(1, (heads, head_dim))


def _norm_rope(qkv: torch.Tensor, col0: int, weight, cos, sin, eps: float, out: torch.Tensor) -> torch.Tensor:
    """out [T, heads, D] = RoPE(RMSNorm(the heads of qkv from column col0)); returns each row's reciprocal RMS
    [T * heads]."""
    tokens, heads, dim = out.shape
    rstd = torch.empty(tokens * heads, dtype=torch.float32, device=qkv.device)
    if qkv.is_cuda:
        _norm_rope_forward_kernel[(triton.cdiv(tokens * heads, ROWS),)](
            qkv, qkv.stride(0), col0, weight, cos, sin, out, rstd, tokens * heads, heads, eps, ROWS=ROWS,
            HALF=dim // 2, num_warps=4)
        return rstd
    x = _heads(qkv, col0, heads, dim).float()
    rstd.copy_(torch.rsqrt(x.pow(2).mean(-1) + eps).view(-1))
    normed = (weight.float() * (x * rstd.view(tokens, heads, 1)).to(qkv.dtype).float()).to(qkv.dtype).float()
    out.copy_(_rotate(normed, cos.float()[:, None], sin.float()[:, None]))
    return rstd


def _norm_rope_backward(dy: torch.Tensor, qkv: torch.Tensor, col0: int, weight, cos, sin, rstd,
                        grad_qkv: torch.Tensor) -> torch.Tensor:
    """Writes the gradient of _norm_rope's input (the same columns of grad_qkv) for the gradient dy [T, heads, D] of
    its output; returns the norm weight's gradient (fp32)."""
    tokens, heads, dim = dy.shape
    if qkv.is_cuda:
        rows = tokens * heads
        blocks = triton.cdiv(rows, ROWS)
        sms = torch.cuda.get_device_properties(qkv.device).multi_processor_count
        programs = max(1, min(blocks, sms * BACKWARD_PROGRAMS_PER_SM))
        partial = torch.empty(programs, dim, dtype=torch.float32, device=qkv.device)
        _norm_rope_backward_kernel[(programs,)](
            dy.contiguous(), qkv, qkv.stride(0), col0, weight, cos, sin, rstd, grad_qkv, partial, rows, heads,
            programs, triton.cdiv(blocks, programs), ROWS=ROWS, HALF=dim // 2, num_warps=4)
        return partial.sum(0)
    half = dim // 2
    c, s = cos.float()[:, None], sin.float()[:, None]
    g = dy.float()
    da = torch.cat([g[..., :half] * c[..., :half] + g[..., half:] * s[..., half:],
                    g[..., half:] * c[..., half:] - g[..., :half] * s[..., :half]], dim=-1)
    h = _heads(qkv, col0, heads, dim).float() * rstd.view(tokens, heads, 1)
    grad_weight = (da * h.to(qkv.dtype).float()).sum((0, 1))
    dh = da * weight.float()
    mean = (dh * h).mean(-1, keepdim=True)
    _heads(grad_qkv, col0, heads, dim).copy_(rstd.view(tokens, heads, 1) * (dh - h * mean))
    return grad_weight


class _AttentionInputs(torch.autograd.Function):
    """(q, k, v) [T, heads, D] from x [T, hidden]: q and k normalised and rotated, v as projected."""

    @staticmethod
    def forward(ctx, x, wq, wk, wv, q_norm_weight, k_norm_weight, cos, sin, eps: float, head_dim: int):
        tokens = x.shape[0]
        q_width, k_width = wq.shape[0], wk.shape[0]
        qkv = torch.mm(x, torch.cat([wq, wk, wv]).t())
        q = x.new_empty(tokens, q_width // head_dim, head_dim)
        k = x.new_empty(tokens, k_width // head_dim, head_dim)
        rstd_q = _norm_rope(qkv, 0, q_norm_weight, cos, sin, eps, q)
        rstd_k = _norm_rope(qkv, q_width, k_norm_weight, cos, sin, eps, k)
        v = _heads(qkv, q_width + k_width, (qkv.shape[1] - q_width - k_width) // head_dim, head_dim).contiguous()
        ctx.save_for_backward(x, wq, wk, wv, qkv, q_norm_weight, k_norm_weight, cos, sin, rstd_q, rstd_k)
        ctx.widths = (q_width, k_width, head_dim)
        return q, k, v

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dq, dk, dv):
        x, wq, wk, wv, qkv, q_norm_weight, k_norm_weight, cos, sin, rstd_q, rstd_k = ctx.saved_tensors
        q_width, k_width, head_dim = ctx.widths
        grad_qkv = torch.empty_like(qkv)
        grad_q_norm = _norm_rope_backward(dq, qkv, 0, q_norm_weight, cos, sin, rstd_q, grad_qkv)
        grad_k_norm = _norm_rope_backward(dk, qkv, q_width, k_norm_weight, cos, sin, rstd_k, grad_qkv)
        grad_qkv[:, q_width + k_width:].copy_(dv.flatten(1))
        # the weights concatenated again rather than kept: a layer's 21 MB for every layer until its backward
        grad_x = torch.mm(grad_qkv, torch.cat([wq, wk, wv])) if ctx.needs_input_grad[0] else None
        splits = (0, q_width, q_width + k_width, qkv.shape[1])
        grad_w = [torch.mm(grad_qkv[:, a:b].t(), x) for a, b in zip(splits[:-1], splits[1:])]
        return (grad_x, *grad_w, grad_q_norm.to(q_norm_weight.dtype), grad_k_norm.to(k_norm_weight.dtype),
                None, None, None, None)


def attention_inputs(module: nn.Module, hidden_states: torch.Tensor, position_embeddings) -> tuple[torch.Tensor, ...]:
    """Qwen3MoeAttention's query, key and value states ([B, heads, S, D] views) for hidden_states [B, S, hidden]."""
    cos, sin = position_embeddings
    head_dim = module.head_dim
    q, k, v = _AttentionInputs.apply(
        hidden_states.reshape(-1, hidden_states.shape[-1]), module.q_proj.weight, module.k_proj.weight,
        module.v_proj.weight, module.q_norm.weight, module.k_norm.weight,
        cos.reshape(-1, head_dim).contiguous(), sin.reshape(-1, head_dim).contiguous(), module.q_norm.variance_epsilon,
        head_dim)
    shape = (*hidden_states.shape[:-1], -1, head_dim)
    return tuple(t.view(shape).transpose(1, 2) for t in (q, k, v))


def refused_because(module: nn.Module) -> str:
    """Empty where the fused forward computes what this attention module's stock forward computes, else why not."""
    projections = (module.q_proj, module.k_proj, module.v_proj)
    if any(type(p) is not nn.Linear or p.bias is not None for p in projections):
        return "q/k/v projections are not plain nn.Linear without bias (LoRA wraps them)"
    if not all(p.weight.requires_grad for p in projections):
        return "frozen q/k/v projections"
    if module.head_dim & (module.head_dim - 1) or module.head_dim < 16:  # the kernels' blocks are half a head
        return f"head_dim {module.head_dim} is not a power of two of at least 16"
    if any(getattr(norm, "weight", None) is None or norm.weight.shape != (module.head_dim,)
           for norm in (module.q_norm, module.k_norm)):
        return "q/k norms over other than one head"
    return ""


def _fused_forward(self, hidden_states, position_embeddings, attention_mask, past_key_values=None, **kwargs):
    """Qwen3MoeAttention.forward with attention_inputs in place of its projections, norms and RoPE."""
    from transformers.models.qwen3_moe import modeling_qwen3_moe as qwen3

    if past_key_values is not None or refused_because(self):
        return qwen3.Qwen3MoeAttention.forward(self, hidden_states, position_embeddings, attention_mask,
                                               past_key_values, **kwargs)
    input_shape = hidden_states.shape[:-1]
    query_states, key_states, value_states = attention_inputs(self, hidden_states, position_embeddings)
    attention_interface = qwen3.ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation,
                                                                      qwen3.eager_attention_forward)
    attn_output, attn_weights = attention_interface(
        self, query_states, key_states, value_states, attention_mask,
        dropout=0.0 if not self.training else self.attention_dropout, scaling=self.scaling,
        sliding_window=self.sliding_window, **kwargs)
    attn_output = attn_output.reshape(*input_shape, -1).contiguous()
    return self.o_proj(attn_output), attn_weights


def fused_attention_inputs(model: nn.Module, device: torch.device) -> Applied:
    """Every Qwen3-MoE attention module whose forward the fused one computes, on a GPU with triton."""
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeAttention

    name = "fused_attention_inputs"
    if triton is None or device.type != "cuda":
        return Applied(name, REPLACES, "needs a GPU and triton")
    modules = [m for m in model.modules() if isinstance(m, Qwen3MoeAttention)]
    if not modules:
        return Applied(name, REPLACES, "no Qwen3MoeAttention in the model")
    if why := refused_because(modules[0]):
        return Applied(name, REPLACES, why)
    for module in modules:
        module.forward = types.MethodType(_fused_forward, module)
    return Applied(name, REPLACES)
