"""The layout-preserving gate/up backward against DeepSpeed AutoEP's own fused gate/up expert MLP."""
import copy

import pytest
import torch
from deepspeed.moe.ep_experts import GroupedExperts
from torch import nn

from helpers import max_rel_err
from qwen_moe_ft.fastpath.expert_mlp import use_layout_preserving_gate_up

# AutoEP's packed SwiGLU is a Triton kernel wherever a GPU is present, so CPU tensors only where there is none
DEVICES = [("cuda", torch.bfloat16, 2e-2)] if torch.cuda.is_available() else [("cpu", torch.float32, 1e-5)]


def _run(experts, x, counts, grad_out):
    x = x.clone().requires_grad_(True)
    out = experts(x, counts)
    out.backward(grad_out)
    return out, x.grad, {name: p.grad for name, p in experts.named_parameters()}


def _experts(device, dtype):
    torch.manual_seed(0)
    experts = GroupedExperts(dim=64, hidden_dim=48, num_experts=8, gate_up_impl="fused",
                             disable_triton_grouped_mm=True)
    for p in experts.parameters():
        nn.init.normal_(p, std=0.05)
    experts = experts.to(device, dtype)
    counts = torch.tensor([40, 0, 7, 25, 1, 0, 31, 16], device=device)  # empty experts too
    x = torch.randn(int(counts.sum()), 64, device=device, dtype=dtype)
    return experts, counts, x


@pytest.mark.parametrize("recompute,cached", [(False, False), (True, False), (False, True)])
@pytest.mark.parametrize("device,dtype,tolerance", DEVICES)
def test_same_output_and_gradients_as_autoeps_fused_path(device, dtype, tolerance, recompute, cached):
    experts, counts, x = _experts(device, dtype)
    grad_out = torch.randn_like(x)

    ours = copy.deepcopy(experts)
    (forward,) = use_layout_preserving_gate_up(ours, recompute=recompute)
    if cached:
        forward.keep_cache()
    ref_out, ref_dx, ref_grads = _run(experts, x, counts, grad_out)
    out, dx, grads = _run(ours, x, counts, grad_out)

    assert max_rel_err(out, ref_out) < tolerance
    assert max_rel_err(dx, ref_dx) < tolerance
    for name in ("w1", "w2", "w3"):
        assert max_rel_err(grads[name], ref_grads[name]) < tolerance, name
    assert grads["w1"][[1, 5]].abs().max() == 0  # experts without tokens get no gradient


def test_cpu_tensors_take_the_torch_swiglu_where_deepspeed_would_take_triton(monkeypatch):
    """DeepSpeed takes its Triton SwiGLU wherever a GPU exists; ours chooses by the tensors' device, so CPU tensors on
    a GPU machine (here: DeepSpeed told it has one) run, to AutoEP's output computed in torch."""
    from deepspeed.ops.triton_ops import swiglu_triton

    experts, counts, x = _experts("cpu", torch.float32)
    grad_out = torch.randn_like(x)
    ours = copy.deepcopy(experts)
    use_layout_preserving_gate_up(ours)
    monkeypatch.setattr(swiglu_triton, "_TRITON_AVAILABLE", False)  # AutoEP's own path has no such choice
    ref_out, ref_dx, _ = _run(experts, x, counts, grad_out)
    monkeypatch.setattr(swiglu_triton, "_TRITON_AVAILABLE", True)
    out, dx, _ = _run(ours, x, counts, grad_out)
    assert max_rel_err(out, ref_out) < 1e-5 and max_rel_err(dx, ref_dx) < 1e-5


def test_modules_on_another_path_are_left_alone():
    separate = GroupedExperts(dim=16, hidden_dim=8, num_experts=2, gate_up_impl="separate",
                              disable_triton_grouped_mm=True)
    assert use_layout_preserving_gate_up(nn.Sequential(separate)) == []
    assert "forward" not in vars(separate)
    frozen = GroupedExperts(dim=16, hidden_dim=8, num_experts=2, gate_up_impl="fused", disable_triton_grouped_mm=True)
    frozen.requires_grad_(False)  # LoRA's base experts: no weight gradient whose layout to keep
    assert use_layout_preserving_gate_up(nn.Sequential(frozen)) == []


@pytest.mark.parametrize("device,dtype", [(device, dtype) for device, dtype, _ in DEVICES])
def test_recompute_keeps_no_copy_of_the_weights_for_backward(device, dtype):
    experts = GroupedExperts(dim=64, hidden_dim=48, num_experts=8, gate_up_impl="fused",
                             disable_triton_grouped_mm=True).to(device, dtype)
    counts = torch.tensor([5, 3, 0, 8, 1, 1, 2, 4], device=device)
    x = torch.randn(int(counts.sum()), 64, device=device, dtype=dtype, requires_grad=True)
    shared = {p.untyped_storage().data_ptr() for p in experts.parameters()}

    def new_bytes_saved(recompute):
        saved = []
        use_layout_preserving_gate_up(experts, recompute=recompute)
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            experts(x, counts)
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in saved}
        return sum(n for ptr, n in storages.items() if ptr not in shared)

    concat_bytes = 2 * experts.w1.numel() * experts.w1.element_size()
    assert new_bytes_saved(False) - new_bytes_saved(True) == concat_bytes


@pytest.mark.parametrize("device,dtype", [(device, dtype) for device, dtype, _ in DEVICES])
def test_cache_is_reused_until_the_weights_change_through_torch(device, dtype):
    experts, counts, x = _experts(device, dtype)
    (forward,) = use_layout_preserving_gate_up(experts)
    cache = forward.keep_cache()
    first = experts(x, counts)
    assert cache.builds == 1 and torch.equal(cache.weights, torch.cat([experts.w1, experts.w3], dim=1))

    stale = cache.weights.clone()
    cache.weights.zero_()  # written behind the weights' back: the forward must use the cache as it is
    assert cache.builds == 1 and not torch.equal(experts(x, counts), first)
    cache.weights.copy_(stale)
    assert torch.equal(experts(x, counts), first)

    with torch.no_grad():
        experts.w3.mul_(2)  # through torch (as a checkpoint load does): the next forward rebuilds
    experts(x, counts)
    assert cache.builds == 2 and torch.equal(cache.weights, torch.cat([experts.w1, experts.w3], dim=1))
    cache.invalidate()
    experts(x, counts)
    assert cache.builds == 3


def test_cache_only_where_the_forward_keeps_the_concatenation():
    experts, _, _ = _experts("cpu", torch.float32)
    (forward,) = use_layout_preserving_gate_up(experts, recompute=True)
    with pytest.raises(ValueError, match="without recompute"):
        forward.keep_cache()
