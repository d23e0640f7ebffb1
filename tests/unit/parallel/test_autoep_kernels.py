"""The fast path of ds_configs/zero2_ep.json: AutoEP's fused gate_up and combine kernels against the plain paths."""
import copy

import pytest
import torch
from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

from helpers import max_rel_err
from qwen_moe_ft.parallel.expert_parallel import apply_autoep
from qwen_moe_ft.parallel.process import ensure_process_env

pytestmark = pytest.mark.gpu

PLAIN = {"gate_up_impl": "separate", "combine_impl": "weighted_sum"}
FUSED = {"gate_up_impl": "fused", "combine_impl": "fused_weighted_sum"}


def _autoep_block(model, options: dict):
    model = copy.deepcopy(model)
    apply_autoep(model, {"expert_parallel": {"enabled": True, "preset_model": "qwen3_moe", "autoep_size": 1,
                                             **options}}, rank=0)
    return model.model.layers[0].mlp


def _run(block, x, grad_out):
    x = x.clone().requires_grad_(True)
    out = block(x)
    out = out[0] if isinstance(out, tuple) else out
    out.backward(grad_out)
    return out.float(), x.grad.float(), {n: p.grad.float() for n, p in block.named_parameters()}


def test_fused_gate_up_and_combine_match_the_plain_paths():
    import torch.distributed as dist

    ensure_process_env()
    if not dist.is_initialized():
        dist.init_process_group("nccl")
    config = Qwen3MoeConfig(hidden_size=512, moe_intermediate_size=256, num_experts=32, num_experts_per_tok=8,
                            num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                            vocab_size=256, norm_topk_prob=True)
    torch.manual_seed(0)
    model = Qwen3MoeForCausalLM(config).to("cuda", torch.bfloat16)
    x = torch.randn(1, 3000, config.hidden_size, device="cuda", dtype=torch.bfloat16)
    grad_out = torch.randn_like(x)

    hf_out, hf_dx, _ = _run(copy.deepcopy(model.model.layers[0].mlp), x, grad_out)
    plain_out, plain_dx, plain_grads = _run(_autoep_block(model, PLAIN), x, grad_out)
    fused_out, fused_dx, fused_grads = _run(_autoep_block(model, FUSED), x, grad_out)

    errors = {"out vs plain": max_rel_err(fused_out, plain_out), "dx vs plain": max_rel_err(fused_dx, plain_dx),
              "plain out vs transformers": max_rel_err(plain_out, hf_out), "plain dx vs transformers": max_rel_err(plain_dx, hf_dx)}
    assert sorted(fused_grads) == sorted(plain_grads)
    for name in plain_grads:
        errors[f"d{name} vs plain"] = max_rel_err(fused_grads[name], plain_grads[name])
    for label, err in errors.items():
        print(f"fused AutoEP {label}: max abs err / max abs = {err:.2e}")
        assert err < 2e-2, (label, err)
