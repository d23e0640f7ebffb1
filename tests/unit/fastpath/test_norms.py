"""The RMSNorms on torch's and quack's kernels compute what the stock Qwen3-MoE modules compute."""
import copy

import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen3MoeConfig

from helpers import TINY, max_rel_err
from qwen_moe_ft.data.packing import collate_packed
from qwen_moe_ft.data.rows import IGNORE
from qwen_moe_ft.fastpath.liger import apply_liger, select_fused_kernels
from qwen_moe_ft.fastpath.norms import quack_head_norms, torch_hidden_norms
from qwen_moe_ft.fastpath.quack_experts import quack_unavailable_because
from qwen_moe_ft.loss import token_loss_sum
from qwen_moe_ft.model.attention import register_varlen_attention


def _packed_batch(vocab: int, device: str):
    g = torch.Generator().manual_seed(1)
    docs = [{"input_ids": ids, "labels": ids} for ids in
            (torch.randint(0, vocab, (n,), generator=g).tolist() for n in (70, 9, 120))]
    return collate_packed(docs).to(device)


def _loss_and_grads(model, batch):
    loss = token_loss_sum(model, batch.inputs, batch.shift_labels) / (batch.shift_labels != IGNORE).sum()
    loss.backward()
    return loss.item(), {name: p.grad.float() for name, p in model.named_parameters()}


def test_torch_hidden_norms_match_the_stock_modules():
    torch.manual_seed(0)
    stock = AutoModelForCausalLM.from_pretrained(TINY, dtype=torch.float32,
                                                 attn_implementation=register_varlen_attention("sdpa"))
    for p in stock.parameters():  # norm weights away from 1, so that a weight applied wrongly shows
        if p.dim() == 1:
            p.data.uniform_(0.5, 1.5)
    patched = copy.deepcopy(stock)
    assert torch_hidden_norms(patched)
    layers = patched.config.num_hidden_layers
    rebound = [name for name, m in patched.named_modules() if "forward" in vars(m)]
    assert len(rebound) == 2 * layers + 1 and not any(name.endswith(("q_norm", "k_norm")) for name in rebound)
    batch = _packed_batch(patched.config.vocab_size, "cpu")
    want_loss, want = _loss_and_grads(stock, batch)
    got_loss, got = _loss_and_grads(patched, batch)
    # fp32 throughout: the two orders of the same products differ by a few fp32 roundings (2^-24 each)
    assert got_loss == pytest.approx(want_loss, rel=1e-5)
    for name in want:
        assert max_rel_err(got[name], want[name]) < 1e-4, name


def test_nothing_to_bind_is_refused():
    assert not torch_hidden_norms(torch.nn.Linear(2, 2))
    assert quack_head_norms(torch.nn.Linear(2, 2), torch.device("cpu")).refused


def test_quack_norms_failing_their_probe_are_refused_with_the_reason(monkeypatch):
    from qwen_moe_ft.fastpath import norms, quack_experts

    def fails(module, device):
        raise TypeError("epilogue fn depends on <ContextVar name='_LOC_TRANSFORMS'>\n  more")

    monkeypatch.setattr(quack_experts, "quack_unavailable_because", lambda device: "")
    monkeypatch.setattr(norms, "_probe_rms_norm", fails)
    model = AutoModelForCausalLM.from_pretrained(TINY, dtype=torch.float32)
    applied = quack_head_norms(model, torch.device("cpu"))
    assert applied.refused == ("a small call of quack's RMSNorm failed: TypeError: epilogue fn depends on "
                               "<ContextVar name='_LOC_TRANSFORMS'>")
    assert not any("forward" in vars(m) for m in model.modules())  # nothing rebound


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or select_fused_kernels("auto", "cuda") != "liger"
                    or quack_unavailable_because(torch.device("cuda")) != "",
                    reason="quack's RMSNorm needs a Hopper GPU and quack-kernels; liger patches first")
def test_torch_and_quack_norms_are_as_accurate_as_the_stock_bf16_modules():
    config = Qwen3MoeConfig(hidden_size=512, moe_intermediate_size=256, num_experts=16, num_experts_per_tok=4,
                            num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2, head_dim=128,
                            vocab_size=1024, norm_topk_prob=True)
    torch.manual_seed(0)
    reference = AutoModelForCausalLM.from_config(config, attn_implementation=register_varlen_attention("sdpa"))
    for p in reference.parameters():
        if p.dim() == 1:
            p.data.uniform_(0.5, 1.5)
    reference = reference.to("cuda", torch.float32)
    plain = copy.deepcopy(reference).to(torch.bfloat16)
    patched = copy.deepcopy(plain)
    batch = _packed_batch(config.vocab_size, "cuda")
    losses, grads = {}, {}
    for name, model in (("fp32", reference), ("bf16", plain)):
        losses[name], grads[name] = _loss_and_grads(model, batch)
    _, restore = apply_liger(patched, "liger")
    try:
        assert torch_hidden_norms(patched) and quack_head_norms(patched, torch.device("cuda"))
        losses["patched"], grads["patched"] = _loss_and_grads(patched, batch)
    finally:
        restore()
    assert losses["patched"] == pytest.approx(losses["fp32"], rel=1e-3)
    for param in grads["fp32"]:  # no less accurate than the stock bf16 modules (bf16: 2^-8 a rounding)
        stock_err = max_rel_err(grads["bf16"][param], grads["fp32"][param])
        assert max_rel_err(grads["patched"][param], grads["fp32"][param]) <= max(1.5 * stock_err, 1e-2), param
