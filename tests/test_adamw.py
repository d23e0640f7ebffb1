"""MasterAdamW against torch's AdamW: the same update with fp32 moments, unbiased bf16 moments, the
gradient taken in pieces with a bf16 copy written out, and (on a GPU) the Triton kernel = the torch path."""
import pytest
import torch

from qwen_moe_ft.adamw import MasterAdamW, round_to_bf16_stochastic, triton

HYPER = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)


def _pair(n=1000, device="cpu", state_dtype=torch.float32):
    torch.manual_seed(0)
    start = torch.randn(n, device=device)
    reference = start.clone().requires_grad_()
    ours = start.clone()
    return (reference, torch.optim.AdamW([reference], **HYPER, foreach=False),
            ours, MasterAdamW([ours], **HYPER, state_dtype=state_dtype))


def test_fp32_moments_give_torch_adamw_updates_with_the_gradient_in_pieces_and_a_scale():
    reference, torch_adam, ours, master_adam = _pair()
    scale = torch.tensor([4.0])
    for _ in range(5):
        grad = torch.randn(1000)
        reference.grad = grad / 4.0
        torch_adam.step()
        master_adam.update(master_adam.param_groups[0], ours, [(grad[:300]), grad[300:]], grad_scale=scale)
    torch.testing.assert_close(ours, reference.detach(), rtol=1e-6, atol=1e-7)
    state = master_adam.state[ours]
    torch.testing.assert_close(state["exp_avg_sq"], torch_adam.state[reference]["exp_avg_sq"], rtol=1e-6, atol=0)
    assert int(state["step"]) == 5


def test_update_writes_the_bf16_copy_and_leaves_elements_past_the_gradient_alone():
    param = torch.randn(100)
    out = torch.zeros(100, dtype=torch.bfloat16)
    adam = MasterAdamW([param], **HYPER)
    before = param.clone()
    adam.update(adam.param_groups[0], param, [torch.randn(60, dtype=torch.bfloat16)], out=out)
    assert not torch.equal(param[:60], before[:60]) and torch.equal(param[60:], before[60:])
    assert torch.equal(out[:60], param[:60].bfloat16()) and not out[60:].any()
    with pytest.raises(ValueError, match="more than the parameter's 100 elements"):
        adam.update(adam.param_groups[0], param, [torch.randn(60), torch.randn(60)])


def test_stochastic_rounding_is_unbiased_and_picks_a_neighbour():
    x = torch.full((200_000,), 1.0 + 2**-9)  # a quarter of the way from 1.0 to the next bf16 value 1 + 2**-7
    rounded = round_to_bf16_stochastic(x, torch.Generator().manual_seed(0)).float()
    assert set(rounded.unique().tolist()) == {1.0, 1.0 + 2**-7}
    assert rounded.mean().item() == pytest.approx(1.0 + 2**-9, rel=2e-5)
    negative = round_to_bf16_stochastic(-x, torch.Generator().manual_seed(0)).float()
    assert negative.mean().item() == pytest.approx(-(1.0 + 2**-9), rel=2e-5)


def test_bf16_second_moment_keeps_decaying_where_round_to_nearest_would_stall():
    """beta2 = 0.999: after the gradient stops, v shrinks 0.1% a step, under half a bf16 ulp."""
    param = torch.zeros(10_000)
    adam = MasterAdamW([param], lr=1e-3, betas=(0.9, 0.999), weight_decay=0.0, state_dtype=torch.bfloat16)
    group = adam.param_groups[0]
    adam.update(group, param, [torch.ones(10_000)])
    for _ in range(300):
        adam.update(group, param, [torch.zeros(10_000)])
    exact = 0.001 * 0.999**300  # fp32 moments give this
    assert adam.state[param]["exp_avg_sq"].dtype == torch.bfloat16
    assert adam.state[param]["exp_avg_sq"].float().mean().item() == pytest.approx(exact, rel=0.01)


def test_bf16_moments_track_fp32_adamw():
    reference, torch_adam, ours, master_adam = _pair(state_dtype=torch.bfloat16)
    for _ in range(20):
        grad = torch.randn(1000)
        reference.grad = grad.clone()
        torch_adam.step()
        master_adam.update(master_adam.param_groups[0], ours, [grad])
    moved = (reference.detach() - _pair()[2]).abs().mean()
    assert (ours - reference.detach()).abs().mean() < 0.01 * moved


def test_loaded_state_keeps_bf16_moments():
    param = torch.randn(10)
    adam = MasterAdamW([param], **HYPER)
    adam.update(adam.param_groups[0], param, [torch.randn(10)])
    saved = adam.state_dict()
    fresh = MasterAdamW([param], **HYPER)
    fresh.load_state_dict(saved)
    state = fresh.state[param]
    assert state["exp_avg"].dtype == state["exp_avg_sq"].dtype == torch.bfloat16
    assert torch.equal(state["exp_avg"], adam.state[param]["exp_avg"]) and int(state["step"]) == 1


@pytest.mark.skipif(not torch.cuda.is_available() or triton is None, reason="the Triton kernel needs a CUDA GPU")
@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16])
def test_triton_kernel_matches_the_torch_path(state_dtype):
    n = 3_000_000
    torch.manual_seed(0)
    start = torch.randn(n, device="cuda")
    runs = {}
    for path in ("triton", "torch"):
        param = start.clone()
        out = torch.empty(n, device="cuda", dtype=torch.bfloat16)
        adam = MasterAdamW([param], **HYPER, state_dtype=state_dtype)
        if path == "torch":
            adam._triton_update = adam._torch_update
        torch.manual_seed(1)
        for _ in range(3):
            grads = torch.randn(n, device="cuda").bfloat16()
            adam.update(adam.param_groups[0], param, [grads[:n // 3], grads[n // 3:]], out=out,
                        grad_scale=torch.tensor([2.0], device="cuda"))
        runs[path] = param, out, adam.state[param]
    (p_triton, out_triton, s_triton), (p_torch, out_torch, s_torch) = runs["triton"], runs["torch"]
    # the moments' random rounding differs between the two paths; the update uses unrounded moments
    # (within a few ulps of bf16 over three steps)
    tolerance = dict(rtol=3e-2, atol=1e-3) if state_dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(p_triton, p_torch, **tolerance)
    torch.testing.assert_close(out_triton, p_triton.bfloat16(), rtol=0, atol=0)
    for key in ("exp_avg", "exp_avg_sq"):
        torch.testing.assert_close(s_triton[key].float(), s_torch[key].float(), **tolerance)
