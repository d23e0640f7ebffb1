"""The lean router forward gives what DeepSpeed's TokenChoiceTopKRouter gives, bit for bit."""
import copy
import types

import pytest
import torch
from deepspeed.moe.ep_router import TokenChoiceTopKRouter
from transformers import AutoModelForCausalLM

from helpers import TINY
from qwen_moe_ft.fastpath.topk_router import _lean_forward, lean_topk_routers, refused_because
from qwen_moe_ft.parallel.ds_config import build_ds_config
from qwen_moe_ft.parallel.expert_parallel import apply_autoep


def _router(dtype, score_func="softmax", route_norm=True, route_scale=1.0):
    torch.manual_seed(0)
    router = TokenChoiceTopKRouter(dim=64, num_experts=128, num_expert_groups=None, num_limited_groups=None, top_k=8,
                                   score_func=score_func, route_norm=route_norm, route_scale=route_scale,
                                   gate_bias=False)
    return router.to(dtype)


def _bind(router):
    """The lean forward on one router, as lean_topk_routers binds it to each AutoEP block's."""
    router.forward = types.MethodType(_lean_forward, router)


def _route(router, x, grad_scores, expert_bias=None):
    x = x.clone().requires_grad_(True)
    scores, selected, counts = router(x, expert_bias)
    scores.backward(grad_scores)
    return scores, selected, counts, router.gate.weight.grad, x.grad


@pytest.mark.parametrize("dtype,score_func,route_norm,route_scale", [
    (torch.float32, "softmax", True, 1.0), (torch.bfloat16, "softmax", True, 1.0),
    (torch.float32, "softmax", False, 2.5), (torch.float32, "sigmoid", True, 1.0)])
def test_choices_counts_weights_and_gradients_are_deepspeeds(dtype, score_func, route_norm, route_scale):
    stock = _router(dtype, score_func, route_norm, route_scale)
    with torch.no_grad():  # two experts with equal gate rows: exact ties in every token's scores
        stock.gate.weight[5] = stock.gate.weight[9]
    fast = copy.deepcopy(stock)
    assert not refused_because(fast)
    _bind(fast)
    x, grad_scores = torch.randn(512, 64, dtype=dtype), torch.randn(512, 8)
    for got, want in zip(_route(fast, x, grad_scores), _route(stock, x, grad_scores)):
        assert torch.equal(got, want)


def test_a_load_balancing_bias_runs_deepspeeds_forward():
    stock = _router(torch.float32)
    fast = copy.deepcopy(stock)
    _bind(fast)
    x, grad_scores, bias = torch.randn(64, 64), torch.randn(64, 8), torch.randn(128) * 0.1
    for got, want in zip(_route(fast, x, grad_scores, bias), _route(stock, x, grad_scores, bias)):
        assert torch.equal(got, want)


def test_a_score_correction_bias_set_after_patching_runs_deepspeeds_forward():
    stock = _router(torch.float32)
    stock.e_score_correction_bias = torch.randn(128) * 0.1
    fast = copy.deepcopy(stock)
    _bind(fast)
    x, grad_scores = torch.randn(64, 64), torch.randn(64, 8)
    for got, want in zip(_route(fast, x, grad_scores), _route(stock, x, grad_scores)):
        assert torch.equal(got, want)


def test_other_routers_are_refused():
    grouped = _router(torch.float32)
    grouped.num_expert_groups = 4
    assert "group-limited" in refused_because(grouped)
    assert "not DeepSpeed's" in refused_because(torch.nn.Linear(2, 2))
    assert lean_topk_routers(torch.nn.Linear(2, 2)).refused == "no AutoEP block"


def test_every_autoep_block_of_the_model_is_rebound(process_group):
    # AutoEP's kernels are Triton wherever a GPU is present, so CPU tensors only where there is none
    device, dtype = ("cuda", torch.bfloat16) if torch.cuda.is_available() else ("cpu", torch.float32)
    model = AutoModelForCausalLM.from_pretrained(TINY, dtype=torch.float32)
    apply_autoep(model, build_ds_config(ep_size=1, world_size=1, device_type=device), rank=0)
    model = model.to(device, dtype)
    stock = copy.deepcopy(model)
    assert lean_topk_routers(model)
    assert all("forward" in vars(layer.mlp.router) for layer in model.model.layers)
    ids = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0)).to(device)
    assert torch.equal(model(ids).logits, stock(ids).logits)
