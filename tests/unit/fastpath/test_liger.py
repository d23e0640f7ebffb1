"""liger's fused RMSNorm and RoPE compute what the stock Qwen3-MoE modules compute."""
import copy

import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen3MoeConfig

from helpers import max_rel_err
from qwen_moe_ft.model.attention import register_varlen_attention
from qwen_moe_ft.config import ConfigError
from qwen_moe_ft.data.rows import IGNORE
from qwen_moe_ft.fastpath.liger import apply_liger, select_fused_kernels, liger_rope
from qwen_moe_ft.loss import token_loss_sum
from qwen_moe_ft.data.packing import collate_packed


def test_selection_degrades_on_the_cpu():
    assert select_fused_kernels("auto", "cpu") == "none"
    assert select_fused_kernels("none", "cuda") == "none"
    with pytest.raises(ConfigError, match="--fused-kernels liger"):
        select_fused_kernels("liger", "cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or select_fused_kernels("auto", "cuda") != "liger",
                    reason="liger's Triton kernels need a GPU and liger-kernel")
def test_liger_norm_and_rope_match_the_stock_modules_on_packed_documents():
    from transformers.models.qwen3_moe import modeling_qwen3_moe

    stock = {name: getattr(modeling_qwen3_moe, name) for name in ("apply_rotary_pos_emb", "Qwen3MoeRMSNorm")}
    config = Qwen3MoeConfig(hidden_size=512, moe_intermediate_size=256, num_experts=16, num_experts_per_tok=4,
                            num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2, head_dim=128,
                            vocab_size=1024, norm_topk_prob=True)
    torch.manual_seed(0)
    reference = AutoModelForCausalLM.from_config(config, attn_implementation=register_varlen_attention("sdpa"))
    reference = reference.to("cuda", torch.float32)
    plain = copy.deepcopy(reference).to(torch.bfloat16)
    fused = copy.deepcopy(plain)
    g = torch.Generator().manual_seed(1)
    docs = [{"input_ids": ids, "labels": ids} for ids in
            (torch.randint(0, 1024, (n,), generator=g).tolist() for n in (700, 33, 1200))]
    batch = collate_packed(docs).to("cuda")
    losses, grads = {}, {}
    for name, model in (("fp32", reference), ("bf16", plain), ("bf16 liger", fused)):
        if model is fused:  # patched only now: the rotary patch is global to the modeling module
            applied, restore = apply_liger(fused, "liger")
            assert applied and modeling_qwen3_moe.apply_rotary_pos_emb is liger_rope
            assert fused.model.layers[0].self_attn.q_norm._get_name() == "LigerRMSNorm"
        loss = token_loss_sum(model, batch.inputs, batch.shift_labels) / (batch.shift_labels != IGNORE).sum()
        loss.backward()
        losses[name] = loss.item()
        grads[name] = {n: p.grad.float() for n, p in model.named_parameters()}
    print(f"loss: fp32 {losses['fp32']:.6f}, bf16 {losses['bf16']:.6f}, bf16 liger {losses['bf16 liger']:.6f}")
    assert losses["bf16 liger"] == pytest.approx(losses["fp32"], rel=1e-3)

    def err(name, param):  # max abs error against fp32, relative to the fp32 gradient's max abs
        return max_rel_err(grads[name][param], grads["fp32"][param])

    worst = max(grads["fp32"], key=lambda n: err("bf16 liger", n) / max(err("bf16", n), 1e-3))
    print(f"gradients against fp32, worst parameter {worst}: bf16 liger {err('bf16 liger', worst):.2e}, "
          f"bf16 stock {err('bf16', worst):.2e}")
    for param in grads["fp32"]:  # the fused kernels are no less accurate than the stock bf16 modules
        assert err("bf16 liger", param) <= max(1.5 * err("bf16", param), 1e-2), param
    restore()  # liger set module-level names for the whole process: the fast path puts them back
    assert all(getattr(modeling_qwen3_moe, name) is value for name, value in stock.items())
