"""Qwen3's attention with the fused inputs (one q/k/v GEMM, norm and RoPE in one pass) against the stock module."""
import copy
import types

import pytest
import torch
from torch import nn
from transformers import Qwen3MoeConfig
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeAttention, Qwen3MoeRotaryEmbedding

from helpers import max_rel_err
from qwen_moe_ft.fastpath.attention_inputs import _fused_forward, fused_attention_inputs, refused_because
from qwen_moe_ft.model.attention import register_varlen_attention


def _attention(hidden, heads, kv_heads, head_dim, dtype, device):
    config = Qwen3MoeConfig(hidden_size=hidden, num_attention_heads=heads, num_key_value_heads=kv_heads,
                            head_dim=head_dim, num_hidden_layers=1, vocab_size=64)
    config._attn_implementation = register_varlen_attention("sdpa" if device == "cpu" else "torch_varlen")
    torch.manual_seed(0)
    module = Qwen3MoeAttention(config, layer_idx=0).to(device=device, dtype=dtype)
    with torch.no_grad():
        module.q_norm.weight.uniform_(0.5, 1.5)  # away from 1, so that a weight applied wrongly shows
        module.k_norm.weight.uniform_(0.5, 1.5)
    return module, Qwen3MoeRotaryEmbedding(config).to(device)


def _run(module, rotary, x, lengths, grad_out):
    """Output and gradients (x and every parameter) of a packed row of documents of `lengths`."""
    positions = torch.cat([torch.arange(n) for n in lengths]).to(x.device)[None]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], device=x.device, dtype=torch.int32)
    x = x.detach().clone().requires_grad_()
    module.zero_grad()
    out, _ = module(x, rotary(x, positions), None, cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=max(lengths),
                    max_length_k=max(lengths))
    out.backward(grad_out)
    return out.detach(), {"x": x.grad, **{n: p.grad for n, p in module.named_parameters()}}


def _fused(module):
    fused = copy.deepcopy(module)
    fused.forward = types.MethodType(_fused_forward, fused)
    return fused


def test_fp32_on_the_cpu_equals_the_stock_module():
    """The torch formulas the kernels follow: in fp32 the same products in other orders, a few roundings of 2^-24."""
    module, rotary = _attention(64, 4, 2, 16, torch.float32, "cpu")
    g = torch.Generator().manual_seed(1)
    lengths = [5, 11, 3]
    x = torch.randn(1, sum(lengths), 64, generator=g)
    grad_out = torch.randn(1, sum(lengths), 64, generator=g)
    want_out, want = _run(module, rotary, x, lengths, grad_out)
    got_out, got = _run(_fused(module), rotary, x, lengths, grad_out)
    assert max_rel_err(got_out, want_out) < 1e-5
    assert want.keys() == got.keys()
    for name in want:
        assert max_rel_err(got[name], want[name]) < 1e-5, name


def test_a_wrong_rotation_fails_the_comparison(monkeypatch):
    """The comparison above can fail: RoPE's sine sign flipped in the formulas."""
    from qwen_moe_ft.fastpath import attention_inputs

    module, rotary = _attention(64, 4, 2, 16, torch.float32, "cpu")
    x = torch.randn(1, 9, 64, generator=torch.Generator().manual_seed(1))
    want_out, _ = _run(module, rotary, x, [9], torch.ones(1, 9, 64))
    monkeypatch.setattr(attention_inputs, "_rotate", lambda a, cos, sin: a * cos - torch.cat(
        [-a[..., a.shape[-1] // 2:], a[..., :a.shape[-1] // 2]], dim=-1) * sin)
    got_out, _ = _run(_fused(module), rotary, x, [9], torch.ones(1, 9, 64))
    assert max_rel_err(got_out, want_out) > 1e-2


def test_refusals_name_what_is_missing():
    module, _ = _attention(64, 4, 2, 16, torch.float32, "cpu")
    assert refused_because(module) == ""
    assert fused_attention_inputs(nn.Sequential(module), torch.device("cpu")).refused == "needs a GPU and triton"
    lora_like = copy.deepcopy(module)
    lora_like.q_proj = nn.Sequential(lora_like.q_proj)
    assert refused_because(lora_like) == "q/k/v projections are not plain nn.Linear without bias (LoRA wraps them)"
    frozen = copy.deepcopy(module)
    frozen.k_proj.weight.requires_grad_(False)
    assert refused_because(frozen) == "frozen q/k/v projections"


def test_a_lora_wrapped_projection_keeps_the_stock_forward_at_call_time():
    """Bound before LoRA wraps the projections, the fused forward must not skip the adapters: it checks every call."""
    module, rotary = _attention(64, 4, 2, 16, torch.float32, "cpu")
    fused = _fused(module)
    fused.q_proj = nn.Sequential(fused.q_proj)  # stands for a PEFT wrapper: anything but a plain nn.Linear
    stock = copy.deepcopy(module)
    stock.q_proj = copy.deepcopy(fused.q_proj)
    x = torch.randn(1, 7, 64, generator=torch.Generator().manual_seed(2))
    got, _ = _run(fused, rotary, x, [7], torch.ones(1, 7, 64))
    want, _ = _run(stock, rotary, x, [7], torch.ones(1, 7, 64))
    assert torch.equal(got, want)


@pytest.mark.gpu
@pytest.mark.parametrize("lengths", [[4096, 4096], [1500, 37, 2000, 555]])
def test_bf16_kernels_are_as_accurate_as_the_stock_module(lengths):
    """Qwen3-30B-A3B's widths in bf16 on the GPU: ours and the stock module's each against the stock module in fp32 on
    the same inputs. Ours rounds fewer times (RoPE once, where the stock rounds two products and their sum); each may
    be off by roundings of bf16 (2^-8 relative) through the attention: ours no further off than the stock plus one."""
    module, rotary = _attention(2048, 32, 4, 128, torch.bfloat16, "cuda")
    reference = copy.deepcopy(module).float()
    reference.config._attn_implementation = register_varlen_attention("sdpa")  # flash attention has no fp32
    tokens = sum(lengths)
    g = torch.Generator(device="cuda").manual_seed(1)
    x = torch.randn(1, tokens, 2048, device="cuda", generator=g)
    grad_out = torch.randn(1, tokens, 2048, device="cuda", generator=g)
    ref_out, ref = _run(reference, rotary, x, lengths, grad_out)
    stock_out, stock = _run(module, rotary, x.bfloat16(), lengths, grad_out.bfloat16())
    assert fused_attention_inputs(nn.Sequential(module), torch.device("cuda"))
    got_out, got = _run(module, rotary, x.bfloat16(), lengths, grad_out.bfloat16())
    assert max_rel_err(got_out, ref_out) <= max_rel_err(stock_out, ref_out) + 2**-8
    for name in ref:
        assert max_rel_err(got[name], ref[name]) <= max_rel_err(stock[name], ref[name]) + 2**-8, name
        assert max_rel_err(got[name], ref[name]) < 2**-5, name
