"""AutoEP's MoE block at EP=1 without the alignment permutation, and with the token rows gathered by
_GatherTokenRows, gives what AutoEP's own path gives."""
import copy
import functools
import types

import pytest
import torch
from deepspeed.module_inject import auto_ep_layer
from transformers import AutoModelForCausalLM

from helpers import TINY, max_rel_err
from qwen_moe_ft.parallel.expert_parallel import apply_autoep
from qwen_moe_ft.fastpath import local_dispatch, quack_experts
from qwen_moe_ft.fastpath.local_dispatch import dispatch_options, expert_order, one_rank_dispatch
from qwen_moe_ft.parallel.ds_config import build_ds_config

# AutoEP's kernels are Triton wherever a GPU is present, so CPU tensors only where there is none
DEVICE, DTYPE, TOLERANCE = ("cuda", torch.bfloat16, 1e-2) if torch.cuda.is_available() else ("cpu", torch.float32, 1e-6)


@pytest.fixture(scope="module")
def moe_block(process_group):
    model = AutoModelForCausalLM.from_pretrained(TINY, dtype=torch.float32)
    apply_autoep(model, build_ds_config(ep_size=1, world_size=1, device_type=DEVICE), rank=0)
    return model.model.layers[0].mlp.to(DEVICE, DTYPE), model.config.hidden_size


def _run(block, x, grad_out):
    x = x.clone().requires_grad_(True)
    out = block(x)
    out = out[0] if isinstance(out, tuple) else out
    out.backward(grad_out)
    return out, x.grad, {name: p.grad for name, p in block.named_parameters()}


def _inputs_and_reference(block, hidden_size, seed):
    """Inputs, an output gradient and AutoEP's own output and gradients for them."""
    torch.manual_seed(seed)
    x = torch.randn(2, 40, hidden_size, device=DEVICE, dtype=DTYPE)
    grad_out = torch.randn_like(x)
    return x, grad_out, _run(copy.deepcopy(block), x, grad_out)


def _assert_same(ours, reference):
    assert max_rel_err(ours[0], reference[0]) < TOLERANCE
    assert max_rel_err(ours[1], reference[1]) < TOLERANCE
    assert sorted(ours[2]) == sorted(reference[2])
    for name, grad in reference[2].items():
        assert max_rel_err(ours[2][name], grad) < TOLERANCE, name


def test_one_rank_dispatch_gives_autoeps_output_and_gradients(moe_block, monkeypatch):
    """Rows gathered by token and passed to the experts unpermuted: AutoEP's forward and its alignment
    permutation must not run, and the result must be theirs."""
    moe_block, hidden_size = moe_block
    x, grad_out, reference = _inputs_and_reference(moe_block, hidden_size, seed=1)
    block = copy.deepcopy(moe_block)
    assert one_rank_dispatch(block)

    def must_not_run(*args):
        raise AssertionError("AutoEP's own forward or permutation ran at EP=1")

    for name in ("permute_by_local_expert", "unpermute_by_local_expert"):
        monkeypatch.setattr(auto_ep_layer, name, must_not_run)
    monkeypatch.setattr(auto_ep_layer.AutoEPMoELayer, "_forward", must_not_run)
    ours = _run(block, x, grad_out)
    assert block.tokens_per_expert.sum().item() == 2 * 40 * block.top_k
    _assert_same(ours, reference)


def test_the_combine_inside_quacks_chain_gives_autoeps_output_and_gradients(moe_block, monkeypatch):
    """quack_scored_combine's block with the chain stood in for by the torch chain, its rows weighted and summed in
    torch (the chain itself is checked on a GPU in test_quack_experts.py): the block hands the chain the router's
    scores and takes its token outputs where AutoEP takes its combine's, and the scores' gradient reaches the router."""
    from qwen_moe_ft.tools.expert_kernels import combined_torch_chain

    moe_block, hidden_size = moe_block
    x, grad_out, reference = _inputs_and_reference(moe_block, hidden_size, seed=2)
    block = copy.deepcopy(moe_block)
    assert one_rank_dispatch(block)
    assert local_dispatch.quack_scored_combine(block).refused == (
        "no block on quack's experts weights their outputs by the scores")
    block._forward = types.MethodType(functools.partial(local_dispatch._one_rank_forward, pad_rows=False, quack=True),
                                      block)
    shapes = []

    def chain(x, w1, w2, w3, rows, counts, top_k, top_scores, w13=None):
        shapes.append(tuple(top_scores.shape))
        return combined_torch_chain(x, w1, w2, w3, rows, counts, top_scores, top_k)

    monkeypatch.setattr(quack_experts, "scored_gathered_swiglu_experts", chain)
    monkeypatch.setattr(quack_experts, "probe", lambda *args, **kwargs: "")
    assert local_dispatch.quack_scored_combine(block)
    assert dispatch_options(block)["quack_combine"]
    ours = _run(block, x, grad_out)
    assert shapes == [(2 * 40, block.top_k)]
    _assert_same(ours, reference)


@pytest.mark.parametrize("num_experts", [2, 128, 256, 257, 40000])
def test_expert_order_is_the_stable_argsort_of_the_choices(num_experts):
    """Narrowed keys (uint8 to 256 experts, int16 to 32768, int64 beyond) sort as the router's int64 choices do, ties
    (a token's rows for one expert: many per expert) kept in row order."""
    g = torch.Generator().manual_seed(num_experts)
    selected = torch.randint(0, num_experts, (300, 8), generator=g)
    selected[:, 0] = num_experts - 1  # the largest id, which a too-narrow key would wrap
    rows = expert_order(selected.to(DEVICE), num_experts).cpu()
    assert torch.equal(rows, torch.argsort(selected.view(-1), stable=True))
