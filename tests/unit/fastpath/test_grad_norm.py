"""The step's gradient norm (grad_norm.py) on DeepSpeed's real ZeRO-2 optimizer (one CPU rank, gloo): equal to
DeepSpeed's fp64 per-group norm, also where the backward took part of it; a non-finite gradient still skips
the step."""
import pytest
import torch

from helpers import zero_backward, zero_engine
from qwen_moe_ft.fastpath import grad_norm
from qwen_moe_ft.fastpath.zero_step import keep_unreduced_grads_in_place


def test_l2_norms_of_small_and_large_gradients_equal_the_fp64_norms(monkeypatch):
    monkeypatch.setattr(grad_norm, "LARGE_GRADIENT", 4096)
    g = torch.Generator().manual_seed(0)
    grads = [torch.randn(n, generator=g).bfloat16() * scale for n, scale in ((7, 1.0), (4096, 3.0), (64, 1e-3),
                                                                              (20000, 0.5))]
    norms = grad_norm.l2_norms(grads)
    assert [n.dtype for n in norms] == [torch.float32] * 4
    # n squares summed in fp32 (unit roundoff 2**-24) err by at most ~n * 2**-24 relative, whatever the order
    for norm, grad in zip(norms, grads):
        assert norm.item() == pytest.approx(grad.double().norm().item(), rel=grad.numel() * 2**-24)
    grads[3][5] = float("nan")
    assert torch.isnan(grad_norm.l2_norms(grads)[3])


def test_norm_matches_deepspeeds_fp64_norm(process_group):
    engine, _ = zero_engine()
    zero_backward(engine)
    optimizer = engine.optimizer
    ours = optimizer.scaled_global_norm()
    del optimizer.scaled_global_norm, optimizer.get_grad_norm_direct  # back to DeepSpeed's own methods
    reference = optimizer.scaled_global_norm()
    assert reference.item() > 1.0
    assert ours.item() == pytest.approx(reference.item(), rel=1e-5)


@pytest.mark.parametrize("fused_states", [None, torch.bfloat16])
@pytest.mark.parametrize("poison", ["model.layers.0.mlp.experts.w1", "model.layers.1.self_attn.q_proj.weight"])
def test_nan_gradient_skips_the_step_and_the_next_one_applies(process_group, poison, fused_states):
    engine, _ = zero_engine(fused_states=fused_states)
    weights = lambda: {n: p.detach().clone() for n, p in engine.module.named_parameters()}  # noqa: E731
    before = weights()
    zero_backward(engine, poison=poison)
    engine.step()
    assert engine.skipped_steps == 1
    assert all(torch.equal(before[n], w) for n, w in weights().items())

    zero_backward(engine)
    engine.step()
    assert engine.skipped_steps == 1
    after = weights()
    assert all(torch.isfinite(w).all() for w in after.values())
    assert not torch.equal(before[poison], after[poison])


@pytest.mark.parametrize("large_gradient", [grad_norm.LARGE_GRADIENT, 1])
def test_norms_taken_in_the_backward_give_deepspeeds_norm(process_group, monkeypatch, large_gradient):
    """Gradients reduced where autograd wrote them (a reduce bucket smaller than each expert weight) have
    their norm taken in the backward; the step's norm uses those and still equals DeepSpeed's, whichever kernel
    takes each norm."""
    monkeypatch.setattr(grad_norm, "LARGE_GRADIENT", large_gradient)
    bucket = 8 * 64 * 64 - 1
    engine, state = zero_engine(reduce_bucket_size=bucket)
    optimizer = engine.optimizer
    assert keep_unreduced_grads_in_place(state)
    zero_backward(engine)
    large = {id(p) for p in engine.module.parameters() if p.numel() > bucket}  # experts, embedding, LM head
    assert len(large) == 2 * 3 + 2 and set(state.early_norms) == large
    ours = optimizer.scaled_global_norm()
    assert not state.early_norms  # consumed: the next step takes its own
    del optimizer.scaled_global_norm, optimizer.get_grad_norm_direct
    assert ours.item() == pytest.approx(optimizer.scaled_global_norm().item(), rel=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("numel", [1 << 24, (1 << 24) + 12345, 128 * 768 * 2048])
def test_large_gradient_kernel_equals_the_fp64_norm_and_keeps_nan(numel):
    """fp32 sums of squares: each program's 65536 squares, then the programs' partials, err by at most
    ~(65536 + programs) * 2**-24 relative; a length that leaves a partial block must not read past the end."""
    g = torch.Generator(device="cuda").manual_seed(0)
    grad = torch.randn(numel, device="cuda", generator=g).bfloat16()
    norm = grad_norm.large_l2_norm(grad)
    programs = -(-numel // (grad_norm.SQUARES_BLOCK * grad_norm.SQUARES_LOADS))
    assert norm.dtype == torch.float32
    assert norm.item() == pytest.approx(grad.double().norm().item(), rel=(65536 + programs) * 2**-24)
    grad[-1] = float("nan")
    assert torch.isnan(grad_norm.large_l2_norm(grad))
