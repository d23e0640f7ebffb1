"""The softmax over the chosen experts' logits routes and weighs as DeepSpeed's TokenChoiceTopKRouter does."""
import copy
import types

import pytest
import torch
from deepspeed.moe.ep_router import TokenChoiceTopKRouter
from transformers import AutoModelForCausalLM

from helpers import TINY, max_rel_err
from qwen_moe_ft.config import TrainConfig
from qwen_moe_ft.fastpath.topk_router import _topk_softmax_forward, refused_because, topk_softmax_routers
from qwen_moe_ft.parallel.ds_config import build_ds_config
from qwen_moe_ft.parallel.expert_parallel import apply_autoep


def _router(dtype, route_scale=1.0, score_func="softmax", route_norm=True):
    torch.manual_seed(0)
    router = TokenChoiceTopKRouter(dim=64, num_experts=128, num_expert_groups=None, num_limited_groups=None, top_k=8,
                                   score_func=score_func, route_norm=route_norm, route_scale=route_scale,
                                   gate_bias=False)
    return router.to(dtype)


def _route(router, x, grad_scores):
    x = x.clone().requires_grad_(True)
    scores, selected, counts = router(x)
    scores.backward(grad_scores)
    return scores, selected, counts, router.gate.weight.grad, x.grad


@pytest.mark.parametrize("dtype,route_scale", [(torch.float32, 1.0), (torch.bfloat16, 1.0), (torch.float32, 2.5)])
def test_choices_counts_weights_and_gradients_match_deepspeeds_router(dtype, route_scale):
    stock = _router(dtype, route_scale)
    with torch.no_grad():  # two experts with equal gate rows: exact ties in every token's logits
        stock.gate.weight[5] = stock.gate.weight[9]
    fast = copy.deepcopy(stock)
    x = torch.randn(512, 64, dtype=dtype)
    grad_scores = torch.randn(512, 8)
    assert not refused_because(fast)
    _bind(fast)
    want, got = _route(stock, x, grad_scores), _route(fast, x, grad_scores)
    assert torch.equal(got[1], want[1]) and torch.equal(got[2], want[2])  # the same experts in the same slots
    # the weights: fp32 in both, a few roundings apart (2^-24 each) on values of order 1/k
    assert max_rel_err(got[0], want[0]) < 1e-5
    # the gate's and the input's gradients: through dtype's matmul, an ulp or so of dtype apart
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    assert max_rel_err(got[3], want[3]) < tolerance and max_rel_err(got[4], want[4]) < tolerance


def _bind(router):
    """The fast forward on one router, as topk_softmax_routers binds it to each AutoEP block's."""
    router.forward = types.MethodType(_topk_softmax_forward, router)


def test_a_load_balancing_bias_runs_deepspeeds_forward():
    stock = _router(torch.float32)
    fast = copy.deepcopy(stock)
    _bind(fast)
    x, bias = torch.randn(64, 64), torch.randn(128) * 0.1
    for got, want in zip(fast(x, bias), stock(x, bias)):
        assert torch.equal(got, want)


def test_other_routers_are_refused():
    assert "sigmoid" in refused_because(_router(torch.float32, score_func="sigmoid"))
    assert "route_norm False" in refused_because(_router(torch.float32, route_norm=False))
    assert "not DeepSpeed's" in refused_because(torch.nn.Linear(2, 2))
    assert topk_softmax_routers(torch.nn.Linear(2, 2)).refused == "no AutoEP block"


def test_every_autoep_block_of_the_model_is_rebound(process_group):
    model = AutoModelForCausalLM.from_pretrained(TINY, dtype=torch.float32)
    apply_autoep(model, build_ds_config(TrainConfig(), ep_size=1, world_size=1, device_type="cpu"), rank=0)
    stock = copy.deepcopy(model)
    assert topk_softmax_routers(model)
    routers = [layer.mlp.router for layer in model.model.layers]
    assert routers and all("forward" in vars(router) for router in routers)
    ids = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    assert max_rel_err(model(ids).logits, stock(ids).logits) < 1e-5
