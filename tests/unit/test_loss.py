import pytest
import torch
import torch.nn.functional as F

from helpers import max_rel_err
from qwen_moe_ft.data.rows import IGNORE
from qwen_moe_ft.loss import _cce_sum, _fused_linear_ce_sum, backward_scale, select_loss_impl


def test_backward_scale_turns_deepspeed_sums_into_a_global_token_mean():
    # DeepSpeed sums gradients over ranks (gradient_allreduce_op "sum") and divides by the accumulation
    # steps; the step's gradient must be that of (sum of token losses) / (label tokens of the global batch).
    world, accum, tokens = 4, 3, 1200
    per_micro_sums = torch.rand(world, accum) * 100
    deepspeed_objective = (per_micro_sums * backward_scale(tokens, accum)).sum() / accum
    torch.testing.assert_close(deepspeed_objective, per_micro_sums.sum() / tokens)


def test_loss_impl_selection():
    assert select_loss_impl("auto", "cpu") == "torch"
    assert select_loss_impl("torch", "cuda") == "torch"
    with pytest.raises(ValueError, match="--loss-impl liger"):
        select_loss_impl("liger", "cpu")


@pytest.mark.gpu
@pytest.mark.parametrize("impl, package", [("liger", "liger_kernel"), ("cce", "cut_cross_entropy")])
def test_fused_linear_cross_entropy_matches_logits_path_in_bf16(impl, package):
    pytest.importorskip(package)
    g = torch.Generator(device="cuda").manual_seed(0)
    tokens, hidden, vocab = 4096, 2048, 151936
    h = (torch.randn(tokens, hidden, device="cuda", generator=g) * 0.5).bfloat16().requires_grad_()
    w = (torch.randn(vocab, hidden, device="cuda", generator=g) * 0.02).bfloat16().requires_grad_()
    labels = torch.randint(0, vocab, (tokens,), device="cuda", generator=g)
    labels[::7] = IGNORE
    fused = (_cce_sum if impl == "cce" else _fused_linear_ce_sum)(h, w, labels)
    dh_fused, dw_fused = torch.autograd.grad(fused * 0.001, (h, w))
    reference = F.cross_entropy((h @ w.T).float(), labels, ignore_index=IGNORE, reduction="sum")
    dh_ref, dw_ref = torch.autograd.grad(reference * 0.001, (h, w))
    print(f"{impl} vs torch: loss rel {abs(fused.item() - reference.item()) / reference.item():.2e}, "
          f"dh {max_rel_err(dh_fused, dh_ref):.2e}, dw {max_rel_err(dw_fused, dw_ref):.2e}")
    assert abs(fused.item() - reference.item()) / reference.item() < 1e-3
    assert max_rel_err(dh_fused, dh_ref) < 2e-2 and max_rel_err(dw_fused, dw_ref) < 2e-2
