"""Varlen attention for packed batches, registered in transformers' AttentionInterface.

A packed micro-batch is one row of several documents; `cu_seq_lens_q/k` (cumulative document
lengths) and `max_length_q/k` arrive as keyword arguments of the model's forward and reach the
attention function unchanged, so the stock Qwen3-MoE modules run as they are.
"""
from __future__ import annotations

import functools
import importlib.util
import inspect
import torch
import torch.nn.functional as F
from transformers import AttentionInterface

from ..config import ConfigError

BACKENDS = ("flash_attn", "torch_varlen", "sdpa")


@functools.cache
def flash_attn_version() -> int | None:
    """2 for flash-attn 2 (`flash_attn`, CUDA extension), 4 for flash-attn 4 (`flash_attn.cute`, CuTe DSL kernels,
    a pure-Python wheel), None without either. Both take packed documents by cu_seqlens and GQA natively."""
    try:
        if importlib.util.find_spec("flash_attn") is None:
            return None
        if importlib.util.find_spec("flash_attn.flash_attn_interface") is not None:
            return 2
        if importlib.util.find_spec("flash_attn.cute") is not None:
            return 4
    except ImportError:  # a parent package that fails to import (e.g. a CUDA extension built for another torch)
        return None
    return None


def _flash_attn(q, k, v, cu, max_len, scale):
    if flash_attn_version() == 2:
        from flash_attn import flash_attn_varlen_func

        return flash_attn_varlen_func(q, k, v, cu, cu, max_len, max_len, softmax_scale=scale, causal=True)
    from flash_attn.cute import flash_attn_varlen_func

    out, _lse = flash_attn_varlen_func(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=max_len,
                                       max_seqlen_k=max_len, softmax_scale=scale, causal=True)
    return out


# torch versions whose aten flash-attention ops _FlashVarlen calls were checked against varlen_attn (test_attention.py)
LEAN_FLASH_TORCH = ((2, 11), (2, 13))


def _lean_flash_supported() -> bool:
    version = tuple(int(part) for part in torch.__version__.split("+")[0].split(".")[:2])
    return LEAN_FLASH_TORCH[0] <= version <= LEAN_FLASH_TORCH[1] and hasattr(torch.ops.aten, "_flash_attention_forward")


class _FlashVarlen(torch.autograd.Function):
    """Causal varlen attention on the kernels torch's varlen_attn runs (aten's flash attention), called directly.
    varlen_attn reaches them through a Python custom op (schema defaults, fake-tensor registration, its autograd
    wrapper), host time a host-bound step pays twice a layer (BENCHMARKS.md, the LoRA step), and torch 2.11's has no
    GQA: a copy of K and V for every query head, where the kernel takes the shared heads itself."""

    @staticmethod
    def forward(ctx, q, k, v, cu, max_len: int, scale: float | None):
        out, lse, rng_state, rng_unused, _ = torch.ops.aten._flash_attention_forward(
            q, k, v, cu, cu, max_len, max_len, 0.0, True, False, scale=scale)
        ctx.save_for_backward(q, k, v, out, lse, cu, rng_state, rng_unused)
        ctx.max_len, ctx.scale = max_len, scale
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        q, k, v, out, lse, cu, rng_state, rng_unused = ctx.saved_tensors
        dq, dk, dv = torch.ops.aten._flash_attention_backward(
            grad_out.contiguous(), q, k, v, out, lse, cu, cu, ctx.max_len, ctx.max_len, 0.0, True, rng_state,
            rng_unused, scale=ctx.scale)
        return dq, dk, dv, None, None, None


def _torch_varlen(q, k, v, cu, max_len, scale):
    if _lean_flash_supported():
        return _FlashVarlen.apply(q, k, v, cu, max_len, scale)
    return _torch_varlen_attn(q, k, v, cu, max_len, scale)


@functools.cache
def _varlen_attn_takes_gqa() -> bool:
    from torch.nn.attention.varlen import varlen_attn

    return "enable_gqa" in inspect.signature(varlen_attn).parameters


def _torch_varlen_attn(q, k, v, cu, max_len, scale):
    """torch's public varlen_attn: versions the direct call was not checked on, and its reference in the tests."""
    from torch.nn.attention.varlen import varlen_attn

    if _varlen_attn_takes_gqa():
        return varlen_attn(q, k, v, cu, cu, max_len, max_len, scale=scale, window_size=(-1, 0), enable_gqa=True)
    # torch 2.11's varlen_attn has no GQA: give every query head its own copy of the kv head.
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    return varlen_attn(q, k, v, cu, cu, max_len, max_len, scale=scale, window_size=(-1, 0))


def _per_document_sdpa(q, k, v, cu, max_len, scale):
    """Reference path: causal sdpa on each document alone (CPU and tests)."""
    out = torch.empty_like(q)
    bounds = cu.tolist()
    groups = q.shape[1] // k.shape[1]
    for start, end in zip(bounds[:-1], bounds[1:]):
        qd, kd, vd = (t[start:end].transpose(0, 1) for t in (q, k, v))
        if groups > 1:
            kd, vd = kd.repeat_interleave(groups, dim=0), vd.repeat_interleave(groups, dim=0)
        out[start:end] = F.scaled_dot_product_attention(qd, kd, vd, is_causal=True, scale=scale).transpose(0, 1)
    return out


def _equal_documents(q, k, v, n_docs, scale):
    """Documents of one length: a dense causal batch through sdpa, which picks cuDNN's kernel on Hopper,
    faster than the varlen kernels (BENCHMARKS.md)."""
    def batch(t):
        return t.unflatten(0, (n_docs, -1)).transpose(1, 2)  # [docs, heads, length, head_dim]

    out = F.scaled_dot_product_attention(batch(q), batch(k), batch(v), is_causal=True, scale=scale,
                                         enable_gqa=k.shape[1] != q.shape[1])
    return out.transpose(1, 2).flatten(0, 1)


_KERNELS = {"flash_attn": _flash_attn, "torch_varlen": _torch_varlen, "sdpa": _per_document_sdpa}


def attention_name(backend: str) -> str:
    # transformers takes any implementation name containing "flash" for one of its own flash-attention kernels
    return f"qwen_moe_ft_varlen_{backend.replace('flash_attn', 'fa')}"


def _make_forward(backend: str):
    kernel = _KERNELS[backend]

    def varlen_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        """query/key/value are [1, heads, tokens, head_dim]; returns [1, tokens, heads, head_dim]."""
        cu = kwargs.get("cu_seq_lens_q")
        if cu is None:
            raise ValueError(f"attention '{attention_name(backend)}' serves packed batches and needs "
                             "cu_seq_lens_q; unpacked batches use sdpa")
        if query.shape[0] != 1:
            raise ValueError(f"packed batches are one row of documents, got batch size {query.shape[0]}")
        max_len = int(kwargs.get("max_length_q") or (cu[1:] - cu[:-1]).max())
        # squeeze, not [0]: the backward of a select zero-fills and copies
        q, k, v = (t.squeeze(0).transpose(0, 1) for t in (query, key, value))  # [tokens, heads, head_dim]
        n_docs = cu.shape[0] - 1
        if n_docs * max_len == q.shape[0]:  # every document is max_len long (documents never exceed it)
            return _equal_documents(q, k, v, n_docs, scaling).unsqueeze(0), None
        return kernel(q, k, v, cu.to(torch.int32), max_len, scaling).unsqueeze(0), None

    return varlen_attention_forward


def available_backends(device_type: str) -> list[str]:
    """Backends usable on this machine, fastest first."""
    found = []
    if device_type == "cuda":
        if flash_attn_version() is not None:
            found.append("flash_attn")
        if importlib.util.find_spec("torch.nn.attention.varlen") is not None:
            found.append("torch_varlen")
    found.append("sdpa")
    return found


def select_backend(requested: str, device_type: str) -> str:
    """Resolve --attn (auto picks the fastest available); an unavailable explicit choice is an error."""
    available = available_backends(device_type)
    backend = available[0] if requested == "auto" else requested
    if backend not in available:
        raise ConfigError(f"--attn {requested}: not available on this machine ({device_type}); "
                         f"available: {', '.join(available)}. Install the `flash` extra for flash_attn.")
    return backend


def register_varlen_attention(backend: str) -> str:
    """Register the packed-attention function of `backend`; returns the name to give the model."""
    if backend not in _KERNELS:
        raise ValueError(f"unknown attention backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    name = attention_name(backend)
    AttentionInterface.register(name, _make_forward(backend))
    return name
